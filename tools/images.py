"""Photos of any size in and out of a static-shape model, colour maps and labelled panels.

A phone model has one static input size. A photo of another size is scaled to fit inside it
(aspect ratio kept, nothing cropped away), the rest is filled by reflecting the photo (so the
depth net and the blur see plausible content instead of a black bar), and the output is cropped
back to the photo and scaled to its original size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.files import atomic_path


@dataclass(frozen=True)
class Placement:
    """Where a photo sits inside the model's canvas, and its original size."""

    top: int
    left: int
    height: int  # of the scaled photo inside the canvas
    width: int
    orig_height: int
    orig_width: int

    def describe(self, canvas: tuple[int, int]) -> str:
        if (self.orig_height, self.orig_width) == canvas:
            return "used as is"
        return (f"{self.orig_width}x{self.orig_height} -> {self.width}x{self.height}, "
                f"reflect-padded to {canvas[1]}x{canvas[0]}")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float HxW or HxWxC image in [0, 1] (float precision kept)."""
    if image.shape[:2] == (height, width):
        return image
    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize(
        (width, height), Image.BICUBIC)) for c in channels]
    result = out[0] if image.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(result, 0.0, 1.0).astype(np.float32)


def letterbox(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, Placement]:
    """Scale ``image`` to fit inside ``height x width`` and reflect-pad the rest."""
    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    scaled = resize(image, new_h, new_w)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    pad = [(top, height - new_h - top), (left, width - new_w - left)] + [(0, 0)] * (
        image.ndim - 2)
    canvas = np.pad(scaled, pad, mode="reflect") if new_h > 1 and new_w > 1 else np.pad(
        scaled, pad, mode="edge")
    return canvas.astype(np.float32), Placement(top, left, new_h, new_w, h, w)


def unletterbox(output: np.ndarray, where: Placement) -> np.ndarray:
    """The inverse of :func:`letterbox`: crop the photo's area, scale to its original size."""
    crop = output[where.top: where.top + where.height, where.left: where.left + where.width]
    return resize(crop, where.orig_height, where.orig_width)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a float image in [0, 1] (or uint8) as PNG, atomically."""
    path = Path(path)
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", optimize=True)
    return path


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
