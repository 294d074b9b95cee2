"""The whole bokeh renderer in PyTorch: photo -> DPT disparity -> mask -> NAFNet -> bokeh.

This is the reference the fused TFLite model is validated against, so each step is the exact math
the TensorFlow graph does (docs/design.md, section 1):
- the photo is resized to the DPT size with bilinear interpolation (half-pixel centres, no
  antialiasing: what TFLite's RESIZE_BILINEAR computes), normalised with mean 0.5 / std 0.5;
- the disparity is resized back the same way and min-max normalised per image to [0, 1];
- NAFNet takes concat(photo, mask) and its output is clipped to [0, 1].
MiDaS itself resizes with bicubic interpolation; bilinear is our choice, since it is the one both
frameworks and every mobile delegate compute identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_EPS = 1e-6  # a constant disparity gives an all-zero mask instead of a division by zero


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW bilinear resize with half-pixel centres, no antialiasing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def normalize_per_image(disparity: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image of ``[N,1,H,W]`` to [0, 1] (disparity has no fixed scale)."""
    low = disparity.amin(dim=(1, 2, 3), keepdim=True)
    high = disparity.amax(dim=(1, 2, 3), keepdim=True)
    return (disparity - low) / torch.clamp(high - low, min=MASK_EPS)


class BokehPipeline(nn.Module):
    """Photo ``[N,3,H,W]`` in [0,1] -> (bokeh ``[N,3,H,W]`` in [0,1], mask ``[N,1,H,W]``)."""

    def __init__(self, dpt: nn.Module, nafnet: nn.Module, dpt_size: tuple[int, int],
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.dpt = dpt  # any depth net of models/depth.py: normalised [N,3,h,w] -> [N,h,w]
        self.nafnet = nafnet
        self.dpt_size = tuple(dpt_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def depth_mask(self, photo: torch.Tensor) -> torch.Tensor:
        """The paper's greyscale mask M: near (high disparity) is 1, far is 0."""
        small = resize_bilinear(photo, self.dpt_size)
        disparity = self.dpt((small - self.mean) / self.std).unsqueeze(1)
        return normalize_per_image(resize_bilinear(disparity, tuple(photo.shape[-2:])))

    def forward(self, photo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.depth_mask(photo)
        bokeh = self.nafnet(torch.cat([photo, mask], dim=1)).clamp(0.0, 1.0)
        return bokeh, mask
