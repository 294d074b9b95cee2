"""Files in and out: atomic writes, image loading, and the error type the CLIs turn into exit 2.

Every artifact is written to a temporary name beside its destination and renamed, so an
interrupted export never leaves a half-written file where a later stage would pick it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """Bad input from the user: the CLIs print it on one line and exit 2."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove we can write there, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{path}: output folder is not writable ({exc.strerror or exc})") from None
    return path


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (file or folder), renamed over ``dest`` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage produced nothing at {tmp}")
        _remove(dest)
        os.replace(tmp, dest)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_json(dest: str | Path, obj: object) -> Path:
    return write_bytes(dest, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


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
