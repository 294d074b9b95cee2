"""Reading checkpoint files for every model: weights only, unwrapped, one-line errors."""

from __future__ import annotations

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


def read_checkpoint(path: str | Path, expected: str = "a NAFNet checkpoint") -> tuple[object, dict]:
    """``torch.load`` (weights only) and unwrap: the raw object and its flat state dict.

    Every failure is one ``CheckpointError`` line naming the file and what was ``expected``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint; expected {expected} ({reason})") from None
    try:
        return raw, extract_state_dict(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
