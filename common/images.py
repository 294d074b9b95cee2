"""Photos in: one reader for every command, upright, RGB, float32 in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read a photo as float32 HxWx3 in [0, 1]; grayscale, RGBA and corrupt files are refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                raise UserError(f"{path}: has an alpha channel ({mode}); give an RGB photo")
            if mode not in ("RGB", "YCbCr", "CMYK", "P"):
                raise UserError(f"{path}: is {mode}, not a colour photo; give an RGB photo")
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None
    return arr


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
