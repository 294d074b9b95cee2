"""Files out and in: atomic writes and JSON.

Every artifact is written to a temporary name beside its destination and renamed, so an
interrupted run never leaves a half-written file where a later stage would pick it up.
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

from common.errors import UserError


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


ARTIFACT_MARK = ".bokehlite-artifact"  # inside every folder atomic_path publishes


def _replaceable(dest: Path, making_dir: bool) -> None:
    """Refuse to put a file where a folder is (or the reverse), or to replace a folder that
    this project did not write: user data is never deleted."""
    if dest.is_dir() and not dest.is_symlink():
        if not making_dir:
            raise UserError(f"{dest}: is a folder; give a file name to write to")
        if not (dest / ARTIFACT_MARK).is_file():
            raise UserError(f"{dest}: is a folder this project did not write; refusing to "
                            "replace it (remove it or choose another name)")
    elif making_dir and (dest.exists() or dest.is_symlink()):
        raise UserError(f"{dest}: is a file; refusing to replace it with a folder")
    elif dest.exists() and not dest.is_file():
        raise UserError(f"{dest}: is not a regular file; refusing to replace it")


def check_writable_file(dest: str | Path) -> Path:
    """Before long work: ``dest`` can be written as a file (its folder made and writable, and
    nothing that is not a file in the way)."""
    dest = Path(dest)
    _replaceable(dest, making_dir=False)
    ensure_writable_dir(dest.resolve().parent)
    return dest


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (file or folder), renamed over ``dest`` on success.

    A folder is marked as ours (ARTIFACT_MARK); only such a folder is ever replaced.
    """
    dest = Path(dest)
    if dest.is_dir() and not dest.is_symlink():
        _replaceable(dest, making_dir=True)
    elif dest.exists() and not dest.is_file():
        _replaceable(dest, making_dir=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage produced nothing at {tmp}")
        is_dir = tmp.is_dir()
        _replaceable(dest, making_dir=is_dir)
        if is_dir:
            (tmp / ARTIFACT_MARK).touch()
            remove_path(dest)
        os.replace(tmp, dest)
    finally:
        remove_path(tmp)


def remove_path(path: Path) -> None:
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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 kB': sizes as a person reads them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
