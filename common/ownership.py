"""Which files of an output folder this tool wrote, and which run is writing a folder now.

Nothing of the user's is ever overwritten (docs/design.md, section 10):

- A command that writes named files into a folder (`bokeh render`, `bokeh ai-benchmark`) keeps a
  ledger there (``LEDGER``): each file it wrote with its sha256. A file it is about to write that
  already exists is replaced only when the ledger lists it with the same content (the user did
  not edit or replace it since), or with ``--overwrite``.
- A run that builds a folder over minutes (an export) holds ``folder_lock`` on it for the whole
  run: a second run into the same folder refuses in one line naming the holder's process id.
  The lock file lies beside the folder, since the run replaces the folder itself at the end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.errors import UserError
from common.files import ensure_writable_dir, write_json

LEDGER = ".bokehlite-written.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ledger(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) else {}


def written_here(folder: Path) -> set[str]:
    """Names of the files in ``folder`` that this tool wrote and nobody changed since."""
    return {name for name, digest in _ledger(folder).items()
            if (folder / name).is_file() and sha256_of(folder / name) == digest}


def claim(folder: Path, names: Iterable[str], overwrite: bool) -> None:
    """Before any work: refuse (``UserError``) when a file about to be written into ``folder``
    exists and is not one this tool wrote, unless ``overwrite``."""
    existing = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not existing or overwrite:
        return
    ours = written_here(folder)
    foreign = [n for n in existing if n not in ours]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(f"{folder / foreign[0]}: exists and was not written by this tool{more}; "
                        "refusing to overwrite it (choose another --out, move it away, or pass "
                        "--overwrite)")


def record(folder: Path, paths: Iterable[Path]) -> None:
    """Add the files just written to ``folder``'s ledger."""
    files = {n: d for n, d in _ledger(folder).items() if (folder / n).is_file()}
    files.update({p.name: sha256_of(p) for p in paths})
    write_json(folder / LEDGER, {"format": "bokehlite-written/1", "files": files})


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.bokehlite.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder`` (created if needed) for one run of ``what``; a second holder is refused
    with the first one's process id. The lock is an flock on ``.<name>.bokehlite.lock`` beside
    the folder, so a killed run never leaves it held; a folder the lock created and nothing else
    filled is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder = ensure_writable_dir(folder).resolve()
    path = lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise UserError(f"{folder}: another {what} is writing into this folder (process "
                            f"{holder}); wait for it to finish or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder removed while we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
