"""The image metrics of every table: PSNR, SSIM (the paper's and the trainer's) on [0, 1] images.

One implementation each, used by training, parity, the quality table and the quantized report.
SSIM: an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, as Wang et al. (2004) and
the paper's L_SSIM; the trainer's loss is ``1 - ssim``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PSNR_CAP = 200.0  # reported for identical images (infinite PSNR does not fit in JSON)


def _float64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(reference, output) -> float:
    """PSNR in dB of two images (arrays or tensors) with values in [0, 1], capped at PSNR_CAP;
    NaN when either holds a non-finite value."""
    mse = float(np.mean((_float64(reference) - _float64(output)) ** 2))
    if not math.isfinite(mse):  # NaN or inf in an image: no PSNR (min() would say the cap)
        return math.nan
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


# --- SSIM --------------------------------------------------------------------------------------

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel SSIM over the valid region (no padding), like scikit-image's cropped mean.

    An 11x11 Gaussian window (sigma 1.5, applied separably), C1 = 0.01^2, C2 = 0.03^2 for data
    range 1, population (not sample) covariance. Output ``[N,C,H-10,W-10]``.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    c = a.shape[1]
    g = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA, a.dtype, a.device)
    gx = g.view(1, 1, 1, -1).expand(c, 1, 1, SSIM_WINDOW)
    gy = g.view(1, 1, -1, 1).expand(c, 1, SSIM_WINDOW, 1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, gx, groups=c), gy, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return num / den


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of two image batches (the metric; the loss is ``1 - ssim``)."""
    return ssim_map(a, b).mean()


def ssim_images(reference: np.ndarray, output: np.ndarray) -> float:
    """Mean SSIM of two HxWxC arrays (the same SSIM, for tables of photos)."""
    def nchw(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (2, 0, 1))))[None].double()

    return float(ssim(nchw(reference), nchw(output)))
