"""Every depth net the bokeh pipeline can fuse, by name: one registry (docs/design.md, section 4).

Each entry knows its input rule (sides a multiple of 32, or of 14 for Depth Anything), its
default input short side, the normalisation it was trained with, what its output means and the
official weights file. The functions here are the one way the rest of the project builds a depth
net, in PyTorch or Keras, from a name, a checkpoint or a manifest record:

- ``load_depth_model(name, checkpoint=None, seed=0)``: the PyTorch module in eval mode,
  normalised ``[N,3,H,W]`` -> ``[N,H,W]`` (the official output); no checkpoint: deterministic
  random weights.
- ``keras_depth_model(name, checkpoint, height=, width=)`` / ``keras_from_torch(model, h, w)``:
  the Keras twin, NHWC ``[N,H,W,3]`` normalised -> ``[N,H,W,1]``, same weights.
- ``depth_input_size(name, height, width, short_side=None)``: the net's input size for a photo.
- ``identify_checkpoint(state)``: which registered net a state dict is; a file of another net
  than the one named is refused with one ``CheckpointError`` line saying which net it is.
- ``depth_record(...)`` / ``depth_record_of(manifest)`` / ``model_from_record(record)``: the
  manifest's record of a depth net and the PyTorch module rebuilt from it (old manifests, whose
  ``dpt`` record is a MiDaS DPT, read as well).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import CheckpointError, UserError
from models.checkpoint import read_checkpoint
from models.depth_anything import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_CONFIG,
    TINY_CONFIG,
    DepthAnythingConfig,
    DepthAnythingV2,
    is_depth_anything_state,
    random_depth_anything,
)
from models.dpt import (
    DPT,
    HYBRID_CONFIG,
    LARGE_CONFIG,
    DPTConfig,
    detect_variant,
    dpt_input_size,
    random_dpt,
    tiny_dpt_config,
)
from models.midas_small import (
    OFFICIAL_CONFIG,
    MidasSmall,
    MidasSmallConfig,
    is_midas_small_state,
    random_midas_small,
    tiny_midas_small_config,
)

OUTPUT = "relative inverse depth (disparity): unknown scale and shift, 1 channel, >= 0"
MIDAS_V3_MEAN = MIDAS_V3_STD = (0.5, 0.5, 0.5)
DEFAULT_DEPTH = "dpt-hybrid"


@dataclass(frozen=True)
class Family:
    """What every net of one architecture shares: how to build, load and port it."""

    key: str
    config_type: type
    model_type: type
    random: Callable[[Any, int], nn.Module]
    load: Callable[[Mapping, Path, Any], nn.Module]  # (state, its file, config): strict,
    # one-line CheckpointError on failure
    keras_scope: str  # the Keras model's name prefix, the scope of its ops in the fused graph


FAMILIES = {f.key: f for f in (
    Family("dpt", DPTConfig, DPT, random_dpt, DPT.from_state_dict, "dpt_"),
    Family("midas-small", MidasSmallConfig, MidasSmall, random_midas_small,
           MidasSmall.from_state_dict, "midas_small_"),
    Family("depth-anything-v2", DepthAnythingConfig, DepthAnythingV2, random_depth_anything,
           DepthAnythingV2.from_state_dict, "depth_anything_v2_"),
)}
DEPTH_SCOPES = tuple(f.keras_scope for f in FAMILIES.values())


@dataclass(frozen=True)
class DepthNet:
    """One registered depth net."""

    name: str
    title: str
    family: str
    config: Any
    multiple: int  # both input sides must be a multiple of this
    short_side: int  # default input short side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    official_file: str | None  # None: a test config, no official weights
    normalisation: str

    @property
    def test_only(self) -> bool:
        return self.official_file is None

    @property
    def input_rule(self) -> str:
        return f"sides multiples of {self.multiple}"


_MIDAS_V3 = "MiDaS v3 DPT: mean 0.5, std 0.5"
_IMAGENET = "ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
_NETS = (
    DepthNet("dpt-hybrid", "MiDaS v3.0 DPT-Hybrid", "dpt", HYBRID_CONFIG, 32, 384,
             MIDAS_V3_MEAN, MIDAS_V3_STD, "dpt_hybrid_384.pt", _MIDAS_V3),
    DepthNet("dpt-large", "MiDaS v3.0 DPT-Large", "dpt", LARGE_CONFIG, 32, 384,
             MIDAS_V3_MEAN, MIDAS_V3_STD, "dpt_large_384.pt", _MIDAS_V3),
    DepthNet("midas-small", "MiDaS v2.1 Small", "midas-small", OFFICIAL_CONFIG, 32, 256,
             IMAGENET_MEAN, IMAGENET_STD, "midas_v21_small_256.pt", _IMAGENET),
    DepthNet("depth-anything-v2-small", "Depth Anything V2 Small", "depth-anything-v2",
             SMALL_CONFIG, 14, 518, IMAGENET_MEAN, IMAGENET_STD, "depth_anything_v2_vits.pth",
             _IMAGENET),
    # Test configs: every kind of module of the real net, a few hundred kB, random weights only.
    DepthNet("dpt-tiny", "DPT-Hybrid (tiny test config)", "dpt", tiny_dpt_config("hybrid"), 32,
             384, MIDAS_V3_MEAN, MIDAS_V3_STD, None, _MIDAS_V3),
    DepthNet("midas-small-tiny", "MiDaS v2.1 Small (tiny test config)", "midas-small",
             tiny_midas_small_config(), 32, 256, IMAGENET_MEAN, IMAGENET_STD, None, _IMAGENET),
    DepthNet("depth-anything-v2-small-tiny", "Depth Anything V2 Small (tiny test config)",
             "depth-anything-v2", TINY_CONFIG, 14, 518, IMAGENET_MEAN, IMAGENET_STD, None,
             _IMAGENET),
)
DEPTH_NETS: dict[str, DepthNet] = {n.name: n for n in _NETS}
# The values `--dpt-variant` took before the registry.
ALIASES = {"hybrid": "dpt-hybrid", "large": "dpt-large", "tiny": "dpt-tiny"}


def depth_names(tests: bool = True) -> tuple[str, ...]:
    """Registered names, the official nets first (``tests``: with the tiny test configs)."""
    return tuple(n.name for n in _NETS if tests or not n.test_only)


def depth_net(name: str) -> DepthNet:
    """The registry entry of ``name`` (or of an old ``--dpt-variant`` value); ``UserError``
    naming the choices otherwise."""
    entry = DEPTH_NETS.get(ALIASES.get(name, name))
    if entry is None:
        tests = [n for n in depth_names() if DEPTH_NETS[n].test_only]
        raise UserError(f"unknown depth net {name!r}; one of {', '.join(depth_names(False))} "
                        f"(test configs: {', '.join(tests)})")
    return entry


def depth_input_size(name: str, height: int, width: int,
                     short_side: int | None = None) -> tuple[int, int]:
    """The net's input size for a ``height x width`` photo: aspect ratio kept, short side
    ``short_side`` (default: the net's own), both sides rounded to the net's multiple
    (1024x1536: DPT 384x576, MiDaS small 256x384, Depth Anything 518x784)."""
    entry = depth_net(name)
    short = entry.short_side if short_side is None else short_side
    if short < entry.multiple or short % entry.multiple:
        raise UserError(f"depth short side {short}: {entry.name} needs a positive multiple of "
                        f"{entry.multiple} (default {entry.short_side})")
    return dpt_input_size(height, width, short, entry.multiple)


def activation_bytes(name: str, height: int, width: int) -> int:
    """A lower bound on the memory of one forward pass of ``name`` at a ``height x width``
    input: its largest float32 tensor, twice (an op's input and output are alive at once).
    That is the head's full-resolution map (features / 2 channels), or for the ViT nets one
    block's attention matrix (tokens^2 per head), whichever is larger."""
    config = depth_net(name).config
    largest = height * width * config.features // 2
    heads = getattr(config, "num_heads", 0)
    if heads:
        tokens = (height // config.patch_size) * (width // config.patch_size)
        largest = max(largest, tokens * tokens * heads)
    return 2 * 4 * largest


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints ---------------------------------------------------------------------------------


def _distance(entry: DepthNet, state: Mapping[str, torch.Tensor]) -> int:
    """How many keys of ``state`` are missing, extra or mis-shaped for ``entry``'s network
    (0: it fits exactly)."""
    with torch.device("meta"):
        expected = FAMILIES[entry.family].model_type(entry.config).state_dict()
    return len(set(expected) ^ set(state)) + sum(
        tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items() if k in state)


def identify_checkpoint(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered net a flat state dict is, from its keys (and shapes, to tell a test
    config from the official net); ``None`` when it is no depth net of the registry.

    A file of a known architecture that fits no entry exactly is named as the entry of that
    architecture it is closest to (fewest missing, extra and mis-shaped keys), so that loading
    it names the few keys that are wrong, not the hundreds another size would miss."""
    if is_midas_small_state(state):
        family, official = "midas-small", "midas-small"
    elif is_depth_anything_state(state):
        family, official = "depth-anything-v2", "depth-anything-v2-small"
    else:
        try:
            variant = detect_variant(state)
        except CheckpointError:
            return None
        family, official = "dpt", f"dpt-{variant}"
    variant_of = DEPTH_NETS[official].config
    candidates = [n for n in _NETS if n.family == family and (
        family != "dpt" or n.config.variant == variant_of.variant)]
    # built on the meta device: no memory for the weights, a second for the largest net
    return min(candidates, key=lambda n: (_distance(n, state), n.name != official)).name


def load_depth(name: str | None, checkpoint: str | Path | None = None,
               seed: int = 0) -> tuple[DepthNet, nn.Module]:
    """The registered net and its PyTorch module in eval mode: ``checkpoint`` loaded strictly
    (read from disk once), or deterministic random weights (``seed``) without one. ``name``
    ``None``: the net the file is, else the default (DPT-Hybrid, the paper's). Forward: float32
    ``[N,3,H,W]`` normalised with the net's mean and std -> ``[N,H,W]``, the official output.

    A checkpoint of another registered net is refused with one ``CheckpointError`` line naming
    the net it is; every other failure (a missing, extra, mis-shaped, non-float or non-finite
    tensor) is the architecture's own one-line error naming the tensor.
    """
    if checkpoint is None:
        entry = depth_net(name or DEFAULT_DEPTH)
        return entry, FAMILIES[entry.family].random(entry.config, seed).eval()
    path = Path(checkpoint)
    named = depth_net(name) if name else None
    expected = (f"a {named.title} file" + (f" such as {named.official_file}"
                                           if named.official_file else "")) if named else \
        "a depth net file such as " + ", ".join(n.official_file for n in _NETS
                                                if not n.test_only)
    state = read_checkpoint(path, expected)[1]
    found = identify_checkpoint(state)
    entry = named or depth_net(found or DEFAULT_DEPTH)
    other = DEPTH_NETS.get(found)
    # Another architecture, or exactly another size of this one: say which net the file is.
    # A near miss of the net asked for is loaded as it, which names the keys that are wrong.
    if other is not None and found != entry.name and (
            other.family != entry.family or _distance(other, state) == 0):
        raise CheckpointError(f"{path}: is a {other.title} checkpoint ({found}), not "
                              f"{entry.name}; use --depth {found}")
    return entry, FAMILIES[entry.family].load(state, path, entry.config).eval()


def load_depth_model(name: str, checkpoint: str | Path | None = None,
                     seed: int = 0) -> nn.Module:
    """The PyTorch net ``name`` (see ``load_depth``)."""
    return load_depth(name, checkpoint, seed)[1]


def checkpoint_net(checkpoint: str | Path) -> str | None:
    """The registered net a checkpoint file is (``None``: no registered depth net)."""
    expected = "a depth net file such as " + ", ".join(
        n.official_file for n in _NETS if not n.test_only)
    return identify_checkpoint(read_checkpoint(checkpoint, expected)[1])


# --- Keras ---------------------------------------------------------------------------------------


def family_of(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(model, family.model_type):
            return family
    raise TypeError(f"not a registered depth net: {type(model).__name__}")


def keras_from_torch(model: nn.Module, height: int, width: int, batch_size: int | None = 1):
    """The Keras twin of a PyTorch depth net of this registry, same weights, for one static
    input size: NHWC ``[N,height,width,3]`` normalised -> ``[N,height,width,1]``."""
    key = family_of(model).key
    if key == "dpt":
        from models.dpt_tf import keras_dpt_from_torch as port
    elif key == "midas-small":
        from models.midas_small_tf import keras_midas_small_from_torch as port
    else:
        from models.depth_anything_tf import keras_depth_anything_from_torch as port
    return port(model, height, width, batch_size)


def keras_depth_model(name: str, checkpoint: str | Path | None = None, *, height: int,
                      width: int, seed: int = 0, batch_size: int | None = 1):
    """The Keras net ``name`` for ``height x width`` input, weights as ``load_depth_model``."""
    return keras_from_torch(load_depth_model(name, checkpoint, seed), height, width, batch_size)


# --- the manifest record -------------------------------------------------------------------------


def depth_record(name: str, model: nn.Module, checkpoint: str | Path | None, seed: int | None,
                 input_size: tuple[int, int] | None = None) -> dict:
    """What a manifest says of its depth net: enough to rebuild the PyTorch module and to tell a
    person which net, at which size (once known), normalised how, with which weights."""
    entry = depth_net(name)
    size = {} if input_size is None else {"input_size": [int(s) for s in input_size]}
    return {
        "name": entry.name, "title": entry.title, "official_file": entry.official_file,
        "config": dataclasses.asdict(model.config), **size, "input_rule": entry.input_rule,
        "mean": list(entry.mean), "std": list(entry.std),
        "normalisation": entry.normalisation, "output": OUTPUT, "params": param_count(model),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "random_seed": None if checkpoint else seed,
    }


def _tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _legacy_dpt_record(dpt: dict) -> dict:
    """An old manifest's ``dpt`` record (a MiDaS DPT, mean/std 0.5) in today's form."""
    config = DPTConfig(**{k: _tuples(v) for k, v in dpt["config"].items()})
    name = next((n.name for n in _NETS if n.config == config), f"dpt-{config.variant}")
    entry = DEPTH_NETS[name]
    return {**dpt, "name": name, "title": entry.title, "mean": list(entry.mean),
            "std": list(entry.std), "normalisation": entry.normalisation}


def depth_record_of(manifest: Mapping) -> dict:
    """The depth-net record of a fused model's manifest (or report.json): ``depth``, or an old
    export's ``dpt``; ``UserError`` when it has none."""
    record = manifest.get("depth")
    if not record and manifest.get("dpt"):
        if "config" not in manifest["dpt"]:
            raise UserError("manifest of a fused model: its 'dpt' record has no config")
        record = _legacy_dpt_record(manifest["dpt"])
    if not record or not {"name", "config", "input_size", "mean", "std"} <= set(record):
        raise UserError("manifest of a fused model has no depth-net record (name, config, "
                        "input size, mean, std)")
    return record


def model_from_record(record: Mapping) -> nn.Module:
    """The PyTorch depth net a record describes (its checkpoint, else its random seed), eval."""
    family = FAMILIES[depth_net(record["name"]).family]
    config = family.config_type(**{k: _tuples(v) for k, v in record["config"].items()})
    if record.get("checkpoint"):
        path = Path(record["checkpoint"])
        return family.load(read_checkpoint(path, f"a {record['name']} file")[1], path,
                           config).eval()
    return family.random(config, record.get("random_seed") or 0).eval()


def describe_record(record: Mapping) -> str:
    """One line for reports: name, input size, normalisation, weights."""
    h, w = record["input_size"]
    weights = record.get("checkpoint") or f"RANDOM (seed {record.get('random_seed') or 0})"
    norm = record.get("normalisation") or f"mean {record['mean']}, std {record['std']}"
    return f"{record['name']} ({record.get('title', '')}) at {h}x{w}, {norm}; weights: {weights}"


def resolve_depth_name(name: str | None, weights: str | Path | None) -> str:
    """The registered net meant: ``name`` (old ``--dpt-variant`` values too); without one, the
    net the weights file is, else the default (DPT-Hybrid, the paper's)."""
    if name:
        return depth_net(name).name
    return (checkpoint_net(weights) if weights else None) or DEFAULT_DEPTH


# --- which net made a generator's masks (depth cache -> checkpoint -> export) --------------------


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks (depth files reach 1.4 GB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mask_source(name: str, weights: str | Path | None, seed: int,
                short_side: int | None = None) -> dict:
    """What a depth cache, a NAFNet checkpoint and a fused model's manifest record of the net
    that made (or makes) the masks: name, input short side, normalisation and the weights
    file's name and SHA-256 (random weights: their seed). Two records of the same masks are
    equal in ``same_masks``."""
    entry = depth_net(name)
    return {"name": entry.name, "title": entry.title,
            "short_side": entry.short_side if short_side is None else int(short_side),
            "input_rule": entry.input_rule, "mean": list(entry.mean), "std": list(entry.std),
            "weights": str(Path(weights).resolve()) if weights else None,
            "weights_sha256": file_sha256(weights) if weights else None,
            "random_seed": None if weights else seed}


MASK_IDENTITY = ("name", "short_side", "weights_sha256", "random_seed")


def same_masks(a: Mapping, b: Mapping) -> bool:
    """Whether two ``mask_source`` records describe the same masks (net, input size, weights)."""
    return all(a.get(k) == b.get(k) for k in MASK_IDENTITY)


def describe_mask_source(record: Mapping) -> str:
    """One line naming the net and its weights: ``midas-small (short side 256), weights
    midas_v21_small_256.pt sha256 1a2b3c4d...`` or ``..., RANDOM weights (seed 0)``."""
    weights = (f"weights {Path(record['weights']).name} sha256 {record['weights_sha256'][:12]}"
               if record.get("weights_sha256") else
               f"RANDOM weights (seed {record.get('random_seed')})")
    return f"{record['name']} (short side {record['short_side']}), {weights}"
