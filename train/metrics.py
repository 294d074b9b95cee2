"""Validation metrics: PSNR, SSIM (``train.losses.ssim``) and LPIPS.

LPIPS: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
(CVPR 2018), AlexNet variant (what the AIM bokeh challenge reports). Reference implementation:
richzhang/PerceptualSimilarity (``lpips`` on PyPI). Two local files are needed and nothing is
downloaded: torchvision's ``alexnet`` weights (``alexnet-owt-7be5be79.pth``, keys
``features.N.*``) and the LPIPS linear heads (``lpips/weights/v0.1/alex.pth``, keys
``linK.model.1.weight``). The network itself lives in ``validate/lpips.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from validate.lpips import LPIPS


def psnr(output: Tensor, target: Tensor) -> float:
    """PSNR in dB for images in [0,1]."""
    mse = (output - target).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


class MetricWeightsError(ValueError):
    """A metric weights file that is missing or does not fit."""


def load_lpips(lpips_weights: Path, alexnet_weights: Path) -> LPIPS:
    """LPIPS from the LPIPS heads file and torchvision's alexnet weights, frozen, in eval mode.

    One implementation serves training and ``validate quality``: ``validate/lpips.py``.
    """
    from common.errors import UserError
    from validate.lpips import load_lpips as load_from_files

    try:
        return load_from_files([alexnet_weights, lpips_weights]).requires_grad_(False)
    except UserError as exc:
        raise MetricWeightsError(str(exc)) from None
