"""Pictures for people: colour maps of depth and labelled side-by-side panels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.images import resize, to_uint8


def colorize(disparity: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """HxW values in [0, 1] -> HxWx3 RGB through a perceptual matplotlib colour map."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(disparity, 0.0, 1.0))[..., :3].astype(np.float32)


def labelled_row(panels: list[tuple[str, np.ndarray]], height: int | None = None,
                 gap: int = 4) -> np.ndarray:
    """Side-by-side uint8 image of HxWx3 panels, each with a small caption strip above it."""
    target = height or max(p.shape[0] for _, p in panels)
    scaled = [(label, resize(p, target, max(1, round(p.shape[1] * target / p.shape[0]))))
              for label, p in panels]
    font_size = max(11, min(24, target // 22))
    font = ImageFont.load_default(size=font_size)
    strip = font_size + 8
    total_w = sum(p.shape[1] for _, p in scaled) + gap * (len(scaled) - 1)
    canvas = Image.new("RGB", (total_w, target + strip), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, panel in scaled:
        canvas.paste(Image.fromarray(to_uint8(panel)), (x, strip))
        draw.text((x + 4, 3), label, fill=(0, 0, 0), font=font)
        x += panel.shape[1] + gap
    return np.asarray(canvas)
