"""Validation metrics: PSNR, SSIM (``train.losses.ssim``) and LPIPS.

LPIPS: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
(CVPR 2018), AlexNet variant (what the AIM bokeh challenge reports). Reference implementation:
richzhang/PerceptualSimilarity (``lpips`` on PyPI). Two local files are needed and nothing is
downloaded: torchvision's ``alexnet`` weights (``alexnet-owt-7be5be79.pth``, keys
``features.N.*``) and the LPIPS linear heads (``lpips/weights/v0.1/alex.pth``, keys
``linK.model.1.weight``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

# Channel shift and scale that LPIPS applies to an input in [-1, 1] before AlexNet.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_ALEX_TAPS = (1, 4, 7, 9, 11)  # the ReLUs after conv1..conv5 in torchvision's alexnet.features
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


def psnr(output: Tensor, target: Tensor) -> float:
    """PSNR in dB for images in [0,1]."""
    mse = (output - target).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


class MetricWeightsError(ValueError):
    """A metric weights file that is missing or does not fit."""


class LPIPS(nn.Module):
    """LPIPS (AlexNet, v0.1): unit-normalised AlexNet features, squared differences weighted by
    learned 1x1 heads, averaged over space and summed over five layers. Images in [0,1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _ALEX_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        x = ((2 * x - 1) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _ALEX_TAPS:
                taps.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance per image, ``[N]``."""
        return sum(lin((fa - fb) ** 2).mean((1, 2, 3))
                   for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b), strict=True))


def _load(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise MetricWeightsError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise MetricWeightsError(f"{path}: not a readable PyTorch file ({exc})") from None


def load_lpips(lpips_weights: Path, alexnet_weights: Path) -> LPIPS:
    """LPIPS from the LPIPS heads file and torchvision's alexnet weights, frozen, in eval mode."""
    model = LPIPS()
    alex, heads = _load(alexnet_weights, "AlexNet weights"), _load(lpips_weights, "LPIPS weights")
    try:
        model.features.load_state_dict(
            {k.removeprefix("features."): v for k, v in alex.items() if k.startswith("features.")})
    except RuntimeError as exc:
        raise MetricWeightsError(f"{alexnet_weights}: not torchvision alexnet weights "
                                 f"({str(exc).splitlines()[0]})") from None
    try:
        model.lins.load_state_dict({f"{k[3]}.weight": v for k, v in heads.items()
                                    if k.startswith("lin") and k.endswith("model.1.weight")})
    except (RuntimeError, IndexError) as exc:
        raise MetricWeightsError(f"{lpips_weights}: not LPIPS alex.pth heads "
                                 f"({str(exc).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)
