"""Photos in and out: one reader for every command (upright, RGB, float32 in [0, 1]), fitting
any photo to a model's static size and back, and PNG writing.

A phone model has one static input size. A photo of another size is scaled to fit inside it
(aspect ratio kept, nothing cropped away), the rest is filled by reflecting the photo (so the
depth net and the blur see plausible content instead of a black bar), and the output is cropped
back to the photo and scaled to its original size (``letterbox`` / ``unletterbox``). Parity and
calibration instead cover the size and centre-crop (``fit_to_size``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UserError
from common.files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read a photo upright (its EXIF orientation applied, as phones store portraits) as
    float32 HxWx3 in [0, 1]; grayscale, RGBA, corrupt and oversized files are refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        with _open_quietly(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)
            mode = img.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                raise UserError(f"{path}: has an alpha channel ({mode}); give an RGB photo")
            if mode not in ("RGB", "YCbCr", "CMYK", "P"):
                raise UserError(f"{path}: is {mode}, not a colour photo; give an RGB photo")
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except UserError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: too large to read safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None
    return arr


def _open_quietly(path: Path) -> Image.Image:
    """``Image.open`` without Pillow's DecompressionBombWarning: a photo between its warning and
    error limits is read (the commands bound the memory they need), and its raw warning, once
    per read, tells the user nothing to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a photo as stored, from its header (a photo ``load_rgb`` checked)."""
    with _open_quietly(Path(path)) as img:
        return img.height, img.width


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder in a stable order; an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def fit_to_size(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, str]:
    """Scale to cover ``height x width`` keeping aspect ratio, centre-crop; say what was done."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image, "used as is"
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    pil = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))
    resized = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC), dtype=np.float32) / 255.0
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width], (
        f"resized {w}x{h} -> {new_w}x{new_h}, centre-cropped to {width}x{height}"
    )


@dataclass(frozen=True)
class Placement:
    """Where a photo sits inside the model's canvas, and its original size."""

    top: int
    left: int
    height: int  # of the scaled photo inside the canvas
    width: int
    orig_height: int
    orig_width: int

    def to_canvas(self, x: int, y: int) -> tuple[int, int]:
        """(row, column) of the canvas pixel under the centre of photo pixel (x, y)."""
        col = min(self.width - 1, int((x + 0.5) * self.width / self.orig_width))
        row = min(self.height - 1, int((y + 0.5) * self.height / self.orig_height))
        return self.top + row, self.left + col

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
    """Write a float image in [0, 1] (or uint8 / uint16 as is) as PNG, atomically."""
    path = Path(path)
    pixels = image if image.dtype in (np.uint8, np.uint16) else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", optimize=True)
    return path
