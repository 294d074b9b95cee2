"""Renderers: a photo in, its bokeh and depth mask out, from the phone model or from PyTorch.

``render`` fits any photo into a renderer's static size and maps the output back
(common/images.py), so `bokeh render`, the quality table and the docs pictures agree. Every
renderer takes the two controls as keywords (``focus``, ``strength``; None: the paper's model);
a TFLite renderer of a plain model refuses them, a controls model fills in their defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.images import letterbox, unletterbox
from export.manifest import read_manifest
from export.runner import make_interpreter
from export.tflite_info import dynamic_dims
from models.pipeline import CONTROLS

# A photo (and focus=, strength=) -> (bokeh HxWx3, mask HxW), both in [0, 1], at the size the
# renderer was given.
RenderFn = Callable[..., tuple[np.ndarray, np.ndarray]]


class TFLiteRenderer:
    """The fused phone model (photo in; bokeh and mask out) through the TFLite interpreter."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "litert"):
        path = Path(path)
        probe = make_interpreter(path, allocate=False)  # a corrupt file is refused first
        manifest, _ = read_manifest(path)  # then one that is not one of ours
        inputs, outputs = probe.get_input_details(), probe.get_output_details()
        names = {d["name"] for d in outputs}
        if manifest["model"] == "nafnet":
            raise UserError(f"{path}: is NAFNet alone (photo + depth mask in); render needs the "
                            "fused model that computes its own mask, e.g. bokeh_fp32.tflite")
        photos = [d for d in inputs if d["name"] not in CONTROLS]
        controls = [d for d in inputs if d["name"] in CONTROLS]
        if (len(photos) != 1 or int(photos[0]["shape"][-1]) != 3 or not {"bokeh", "mask"} <= names
                or controls and ({d["name"] for d in controls} != set(CONTROLS)
                                 or any(list(d["shape"]) != [1, 1, 1, 1] for d in controls))):
            raise UserError(f"{path}: not a fused bokeh model (expected one [1,H,W,3] input, "
                            "optionally focus and strength [1,1,1,1], and outputs 'bokeh' and "
                            f"'mask', found inputs {[d['name'] for d in inputs]}, outputs "
                            f"{sorted(names)})")
        dynamic = dynamic_dims(path)
        if dynamic:
            raise UserError(f"{path}: has a dynamic shape ({'; '.join(dynamic)}); render needs "
                            "the static size of an exported phone model")
        self.interpreter = make_interpreter(path, threads, runtime=runtime)
        details = {d["name"]: d for d in self.interpreter.get_input_details()}
        self.input = details[photos[0]["name"]]
        self.control_index = {d["name"]: details[d["name"]]["index"] for d in controls}
        self.outputs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        self.size = tuple(int(d) for d in self.input["shape"][1:3])
        self.label = path.name
        self.path = path
        self.warnings = list(manifest.get("warnings", []))

    @property
    def has_controls(self) -> bool:
        """Whether the model takes focus and strength (``bokeh export --controls``)."""
        return bool(self.control_index)

    def __call__(self, photo: np.ndarray, focus: float | None = None,
                 strength: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        given = {"focus": focus, "strength": strength}
        if not self.has_controls and any(v is not None for v in given.values()):
            raise UserError(f"{self.path}: takes no focus or strength (a plain model); use the "
                            "controls model, bokeh_controls_fp32.tflite (bokeh export --controls)")
        self.interpreter.set_tensor(self.input["index"], photo[None].astype(np.float32))
        for name, index in self.control_index.items():
            value = CONTROLS[name][1] if given[name] is None else given[name]
            self.interpreter.set_tensor(index, np.full((1, 1, 1, 1), value, np.float32))
        self.interpreter.invoke()
        bokeh = self.interpreter.get_tensor(self.outputs["bokeh"])[0]
        mask = self.interpreter.get_tensor(self.outputs["mask"])[0, ..., 0]
        return np.clip(bokeh, 0.0, 1.0), mask


class TorchRenderer:
    """The PyTorch reference pipeline: a NAFNet checkpoint and a depth net's file
    (models/depth.py: ``depth`` names the net, by default the one the file is)."""

    def __init__(self, checkpoint: str | Path, depth_weights: str | Path | None = None,
                 allow_random_depth: bool = False, size: tuple[int, int] | None = None,
                 depth_short_side: int | None = None, depth: str | None = None):
        from models.depth import depth_input_size, depth_net, load_depth
        from models.nafnet import load_nafnet

        if depth_weights is None and not allow_random_depth:
            raise UserError("--checkpoint needs --depth-weights (a depth net's file such as "
                            "dpt_hybrid_384.pt or midas_v21_small_256.pt): with a random depth "
                            "net the render is meaningless; --allow-random-depth to render "
                            "anyway")
        name = depth_net(depth).name if depth else None
        if name:  # a bad short side fails before anything is loaded
            depth_input_size(name, 1024, 1024, depth_short_side)
        self.nafnet = load_nafnet(checkpoint)
        if self.nafnet.config["in_channels"] != 4:
            raise UserError(f"{checkpoint}: NAFNet takes {self.nafnet.config['in_channels']} "
                            "channels; the bokeh pipeline feeds it photo + mask (4)")
        self.warnings = []
        if depth_weights is not None:
            self.net, self.depth = load_depth(name, depth_weights)
        else:
            self.net, self.depth = load_depth(name or "dpt-tiny")
            self.warnings.append(f"RANDOM depth net {self.net.name} (--allow-random-depth): the "
                                 "mask and the render are meaningless")
        name = self.net.name
        depth_input_size(name, 1024, 1024, depth_short_side)
        self.size = size  # None: each photo at its own size
        self.short_side = depth_short_side
        self.label = f"PyTorch {Path(checkpoint).name} + {name}"
        self.has_controls = True

    def __call__(self, photo: np.ndarray, focus: float | None = None,
                 strength: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from models.depth import depth_input_size
        from models.pipeline import BokehPipeline

        h, w = photo.shape[:2]
        pipeline = BokehPipeline(self.depth, self.nafnet,
                                 depth_input_size(self.net.name, h, w, self.short_side),
                                 self.net.mean, self.net.std).eval()
        x = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            bokeh, mask = pipeline(x, focus, strength)
        return bokeh[0].numpy().transpose(1, 2, 0), mask[0, 0].numpy()


def render(renderer: RenderFn, size: tuple[int, int] | None, rgb: np.ndarray,
           **controls: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Bokeh and mask of one photo at its own size, and how it was fitted to the model;
    ``controls`` (focus=, strength=) go to the renderer."""
    size = size or rgb.shape[:2]
    fitted, where = letterbox(rgb, *size)
    bokeh, mask = renderer(fitted, **controls)
    bad = int(np.size(bokeh) - np.isfinite(bokeh).sum() + np.size(mask) - np.isfinite(mask).sum())
    if bad:  # NaN clips to black: never written as if it were a render
        raise UserError(f"{getattr(renderer, 'label', 'the model')}: its output holds {bad} "
                        "non-finite values (NaN or inf); are its weights finite? nothing written")
    return unletterbox(bokeh, where), unletterbox(mask, where), where.describe(size)


def focus_at(renderer: RenderFn, size: tuple[int, int] | None, rgb: np.ndarray, x: int,
             y: int) -> float:
    """The ``focus`` that keeps photo pixel (x, y) sharp: the model's own mask output read at
    that pixel, mapped through the letterbox placement (what an app does with a tap)."""
    size = size or rgb.shape[:2]
    fitted, where = letterbox(rgb, *size)
    _, mask = renderer(fitted)  # the mask does not depend on the controls
    row, col = where.to_canvas(x, y)
    return float(np.clip(mask[row, col], 0.0, 1.0))


class ReferenceRenderer:
    """The PyTorch reference of a fused export, at the export's static size."""

    def __init__(self, tflite: str | Path, checkpoint: str | Path | None = None):
        from models.reference import reference_pipeline

        manifest, _ = read_manifest(tflite)
        if manifest["model"] != "bokeh":
            raise UserError(f"{tflite}: is not a fused bokeh model; quality needs photo-in models")
        self.pipeline = reference_pipeline(manifest, checkpoint)
        self.size = tuple(int(d) for d in manifest["inputs"][0]["shape"][1:3])
        weights = manifest.get("weights", {})
        name = Path(checkpoint or weights.get("checkpoint") or "").name
        self.label = f"PyTorch ({name or 'random weights'})"
        self.warnings = list(manifest.get("warnings", [])) if checkpoint is None else []
        self.has_controls = True

    def __call__(self, photo: np.ndarray, focus: float | None = None,
                 strength: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            bokeh, mask = self.pipeline(x, focus, strength)
        return bokeh[0].numpy().transpose(1, 2, 0), mask[0, 0].numpy()
