"""The whole bokeh renderer in PyTorch: photo -> DPT disparity -> mask -> NAFNet -> bokeh.

This is the reference the fused TFLite model is validated against, so each step is the exact math
the TensorFlow graph does (docs/design.md, section 1):
- the photo is resized to the DPT size with bilinear interpolation (half-pixel centres, no
  antialiasing: what TFLite's RESIZE_BILINEAR computes), normalised with mean 0.5 / std 0.5;
- the disparity is resized back the same way and min-max normalised per image to [0, 1];
- NAFNet takes concat(photo, mask) and its output is clipped to [0, 1].
MiDaS itself resizes with bicubic interpolation; bilinear is our choice, since it is the one both
frameworks and every mobile delegate compute identically.

Two optional controls (issue #14), clamped to [0, 1]; their defaults give the paper's output bit
for bit (docs/design.md, section 11):
- ``focus``: NAFNet reads ``1 - |mask - focus|`` instead of the mask, so the chosen mask level
  becomes "near" (sharp). Computed as ``min(mask + (1 - focus), (1 + focus) - mask)``, which at
  ``focus = 1`` is ``min(mask, 2 - mask) = mask`` exactly (``1 - |mask - 1|`` is not: ``1 - mask``
  rounds for a mask below 0.5).
- ``strength``: ``strength * bokeh + (1 - strength) * photo``, exactly the bokeh at 1 and exactly
  the photo at 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_EPS = 1e-6  # a constant disparity gives an all-zero mask instead of a division by zero
# The controls: input name -> (range, default, meaning). The defaults are the paper's model.
CONTROLS = {
    "focus": ((0.0, 1.0), 1.0, "mask level kept sharp (1 = nearest, 0 = farthest)"),
    "strength": ((0.0, 1.0), 1.0, "blend of photo (0) and bokeh (1)"),
}


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW bilinear resize with half-pixel centres, no antialiasing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def depth_mask(net: nn.Module, photo: torch.Tensor, size: tuple[int, int],
               mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The mask the fused graph computes: ``photo`` ``[N,3,H,W]`` resized to the depth net's
    ``size``, normalised with its ``mean`` and ``std`` (``[1,3,1,1]``), its disparity resized
    back and min-max normalised per image. Also what fills a training depth cache
    (train/depth_cache.py), so NAFNet trains on the masks the phone model gives it."""
    small = resize_bilinear(photo, size)
    disparity = net((small - mean) / std).unsqueeze(1)
    return normalize_per_image(resize_bilinear(disparity, tuple(photo.shape[-2:])))


def normalize_per_image(disparity: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image of ``[N,1,H,W]`` to [0, 1] (disparity has no fixed scale)."""
    low = disparity.amin(dim=(1, 2, 3), keepdim=True)
    high = disparity.amax(dim=(1, 2, 3), keepdim=True)
    return (disparity - low) / torch.clamp(high - low, min=MASK_EPS)


def focus_guide(mask: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """``1 - |mask - focus|``: the mask NAFNet reads when ``focus`` (in [0, 1]) is the depth to
    keep sharp; exactly ``mask`` at ``focus = 1``."""
    return torch.minimum(mask + (1.0 - focus), (1.0 + focus) - mask)


def blend(photo: torch.Tensor, bokeh: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """``strength * bokeh + (1 - strength) * photo``: exactly ``bokeh`` at 1, ``photo`` at 0."""
    return strength * bokeh + (1.0 - strength) * photo


def control_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """A control (number or tensor) as ``[N,1,1,1]`` float32 on ``like``'s device, clamped to
    [0, 1] (out-of-range values act like the nearest end, as in the TFLite graph)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1)
    return t.clamp(0.0, 1.0)


class BokehPipeline(nn.Module):
    """Photo ``[N,3,H,W]`` in [0,1] -> (bokeh ``[N,3,H,W]`` in [0,1], mask ``[N,1,H,W]``)."""

    def __init__(self, depth: nn.Module, nafnet: nn.Module, depth_size: tuple[int, int],
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.depth = depth  # any depth net of models/depth.py: normalised [N,3,h,w] -> [N,h,w]
        self.nafnet = nafnet
        self.depth_size = tuple(depth_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def depth_mask(self, photo: torch.Tensor) -> torch.Tensor:
        """The paper's greyscale mask M: near (high disparity) is 1, far is 0."""
        return depth_mask(self.depth, photo, self.depth_size, self.mean, self.std)

    def nafnet_input(self, photo: torch.Tensor, mask: torch.Tensor, focus=None) -> torch.Tensor:
        """concat(photo, mask), the mask remapped by ``focus`` when given."""
        guide = mask if focus is None else focus_guide(mask, control_tensor(focus, mask))
        return torch.cat([photo, guide], dim=1)

    def finish(self, photo: torch.Tensor, nafnet_out: torch.Tensor, strength=None) -> torch.Tensor:
        """NAFNet's output clipped to [0, 1], blended with the photo when ``strength`` is given."""
        bokeh = nafnet_out.clamp(0.0, 1.0)
        if strength is not None:
            bokeh = blend(photo, bokeh, control_tensor(strength, photo))
        return bokeh

    def render(self, photo: torch.Tensor, mask: torch.Tensor, focus=None,
               strength=None) -> torch.Tensor:
        """The bokeh of ``photo`` given its mask (so one mask serves many control values)."""
        return self.finish(photo, self.nafnet(self.nafnet_input(photo, mask, focus)), strength)

    def forward(self, photo: torch.Tensor, focus=None,
                strength=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(bokeh, mask); ``focus`` and ``strength`` (numbers or ``[N]``/``[N,1,1,1]`` tensors)
        are the controls, ``None`` the paper's model. The mask returned is always the depth
        mask, never the focus-remapped one."""
        mask = self.depth_mask(photo)
        return self.render(photo, mask, focus, strength), mask
