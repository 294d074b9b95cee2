"""Reading checkpoint files for every model: weights only, unwrapped, one-line errors."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from common.errors import CheckpointError

_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "generator", "net_g")


def extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap the usual checkpoint containers and strip a DataParallel ``module.`` prefix."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(
                f"no state dict found (top-level keys: {sorted(map(str, obj))[:8]}); expected "
                f"a raw state dict or one under {', '.join(_WRAPPER_KEYS)}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_only(path: Path) -> object:
    """``torch.load`` that never runs code from the file and never passes on torch's advice to
    (``weights_only=False`` would run whatever the file holds) or its warnings; a file it
    cannot read is one ``CheckpointError`` saying why, in our words."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        text = str(exc)
        code = re.search(r"unsupported GLOBAL (\S+)", text)
        if code:
            reason = (f"it holds Python code or objects ({code.group(1)}), not only tensors; "
                      "refused without running it")
        elif "Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError):
            reason = "not a readable PyTorch weights file (no pickle of tensors in it)"
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            reason = f"not a readable PyTorch file ({first})"
        raise CheckpointError(reason) from None


def read_checkpoint(path: str | Path, expected: str = "a NAFNet checkpoint") -> tuple[object, dict]:
    """``torch.load`` (weights only) and unwrap: the raw object and its flat state dict.

    Every failure is one ``CheckpointError`` line naming the file and what was ``expected``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = load_weights_only(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; expected {expected}") from None
    try:
        return raw, extract_state_dict(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def check_values(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 path: Path) -> None:
    """Weights a model can compute with: floating point where the model's are, and finite
    (a NaN weight makes every output NaN, which no later check should have to discover).
    ``CheckpointError`` names the first tensor that is not."""
    for key, value in state.items():
        want = expected.get(key)
        if want is not None and want.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} is {str(value.dtype)[6:]}, where the "
                                  f"model's is floating point ({str(want.dtype)[6:]})")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{path}: tensor {key!r} holds {bad} non-finite values (NaN "
                                  f"or inf) of {value.numel()}; weights like these make NaN "
                                  "output")


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                what: str) -> torch.nn.Module:
    """Load ``state`` into ``model`` (built on the meta device: its weights are assigned) with
    the same keys and shapes, or one ``CheckpointError`` naming the file, ``what`` it does not
    fit, and the missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in sorted(expected)
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not fit {what}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} wrong shapes "
            f"{wrong[:3]}")
    check_values(state, model.state_dict(), path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
