"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018) with AlexNet, version 0.1, from local weight files only.

Reference implementation: richzhang/PerceptualSimilarity (the ``lpips`` package),
``lpips/lpips.py`` and ``lpips/pretrained_networks.py``; written here because that package needs
torchvision, which does not install beside this project's torch (docs/design.md, section 2).
Two weight sets are needed, from one or several files:
- AlexNet's convolutions in torchvision's layout (``features.{0,3,6,8,10}.weight/bias``, e.g.
  ``alexnet-owt-7be5be79.pth``) or as a saved LPIPS module holds them (``net.slice{k}.{i}.*``);
- the five linear heads of LPIPS v0.1 (``lin{0..4}.model.1.weight``: the package's
  ``weights/v0.1/alex.pth``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import UserError

TAPS = (1, 4, 7, 9, 11)  # ReLU outputs of AlexNet's five convolutions (torchvision indices)
CHANNELS = (64, 192, 384, 256, 256)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` up to the last ReLU, same indices (same keys)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class LinearHead(nn.Module):
    """LPIPS's ``NetLinLayer``: dropout (off in eval) and a 1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Distance between two NCHW images in [0, 1]; 0 for identical images, lower is closer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = alexnet_features()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((2 * x - 1) - self.shift) / self.scale
        found = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                found.append(x / (torch.sqrt((x**2).sum(dim=1, keepdim=True)) + 1e-10))
        return found

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
            total = total + getattr(self, f"lin{k}")((fa - fb) ** 2).mean(dim=(2, 3))
        return total.view(-1)

    @torch.no_grad()
    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS of two HxWx3 float images in [0, 1]."""
        def t(x):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].float()

        return float(self(t(a), t(b))[0])


def lpips_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the accepted layouts onto this module's names; ignore AlexNet's classifier."""
    mapped = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:net\.)?slice\d\.(\d+)\.(weight|bias)", key)
        if m:
            mapped[f"features.{m[1]}.{m[2]}"] = value
        elif key.startswith(("features.", "lin")):
            mapped[key] = value
    return mapped


def load_lpips(paths: Sequence[str | Path]) -> LPIPS:
    """An LPIPS module from local files; every failure is a ``UserError`` naming the files."""
    from models.checkpoint import extract_state_dict, load_weights_only

    state: dict[str, torch.Tensor] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: no such LPIPS weights file")
        try:
            state.update(lpips_state_dict(extract_state_dict(load_weights_only(path))))
        except Exception as exc:  # torch raises many types for a corrupt or foreign file
            raise UserError(f"{path}: not readable LPIPS/AlexNet weights ({exc})") from None
    model = LPIPS()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k not in ("shift", "scale")}
    names = ", ".join(str(p) for p in paths)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{names}: LPIPS needs AlexNet features.* and lin0-4 weights; missing "
                        f"{len(missing)} keys {missing[:4]}")
    wrong = [f"{k} {tuple(state[k].shape)} != {s}" for k, s in expected.items()
             if tuple(state[k].shape) != s]
    if wrong:
        raise UserError(f"{names}: shapes do not fit LPIPS-AlexNet: {'; '.join(wrong[:3])}")
    model.load_state_dict({k: state[k].float() for k in expected}, strict=False)
    return model.eval()
