"""An export run owns its folder: it builds everything in a staging folder beside it and swaps
the whole folder in at the end, so the folder never mixes two runs.

- Each run has an id, recorded in report.json and in every manifest it writes.
- A folder that already holds an export is replaced only with ``overwrite`` (`make export` passes
  it); a non-empty folder that holds something else is refused, never emptied.
- The staging folder is a sibling, ``.<name>.staging-<pid>-<hex>``, so the swap is one atomic
  rename of a folder (Linux ``renameat2(RENAME_EXCHANGE)``): a reader sees the old export or the
  new one, never a mix. Anything in the folder that was not the old export's (the user's notes,
  hidden files) is moved into the new one first.
- A run holds a lock beside the folder from start to end (common/ownership.py, ``folder_lock``):
  a second run into the same folder refuses in one line naming the first one's process id.
- A run that fails leaves the last complete export as it was; its own files go to
  ``failed-run/`` with report.txt saying why. A run that was killed leaves a staging folder and
  temporary files named after its process id: the next run removes them once that process is
  gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from common.errors import UserError
from common.files import ensure_writable_dir, read_json, remove_path

STAGING = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")  # inside the folder: before the swap
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")  # common.files.atomic_path's temporary names
LEGACY_FILES = re.compile(r"^(nafnet|bokeh|report|runtime|quant_report)[._]")  # before run ids
FAILED = "failed-run"
REPORT = "report.json"


def new_run_id() -> str:
    """Sortable by time, unique across processes: 20261130T061500-1a2b3c."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_beside(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.staging-(\d+)-[0-9a-f]+(\.old)?$")


def clean_leftovers(out: Path) -> list[str]:
    """Remove staging folders and temporary files of runs whose process is gone."""
    beside = _staging_beside(out)
    candidates = [(e, STAGING.match(e.name) or TEMPORARY.match(e.name)) for e in out.iterdir()]
    candidates += [(e, beside.match(e.name)) for e in out.parent.iterdir()]
    removed = []
    for entry, match in candidates:
        if match and not _alive(int(match.group(1))):
            remove_path(entry)
            removed.append(entry.name)
    return removed


def previous_run(out: Path) -> dict | None:
    """The report of the export in ``out``, or None when ``out`` holds no export."""
    report = out / REPORT
    if not report.is_file():
        return None
    try:
        data = read_json(report)
    except UserError:
        return None
    return data if isinstance(data, dict) and ("run_id" in data or "stages" in data) else None


def export_around(path: str | Path) -> Path | None:
    """The export folder ``path`` is or lies in (None: none): other commands' ``--out`` must
    not add files among an export's own."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if previous_run(p) is not None), None)


def check(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` can take a new export (made and writable, leftovers cleaned), or UserError."""
    out = ensure_writable_dir(out_dir)
    clean_leftovers(out)
    content = [e.name for e in out.iterdir() if not e.name.startswith(".")]
    if content:
        if previous_run(out) is None:
            raise UserError(f"{out}: is not empty and holds no export ({', '.join(content[:3])}"
                            f"{' ...' if len(content) > 3 else ''}); choose an empty or new "
                            "folder")
        if not overwrite:
            raise UserError(f"{out}: already holds an export; pass --overwrite to replace it "
                            "(the new set replaces the whole old one at the end)")
    return out


def begin(out_dir: str | Path, overwrite: bool) -> tuple[Path, Path, str]:
    """Check ``out_dir`` again and open a staging folder beside it; return (folder, staging,
    id)."""
    out = check(out_dir, overwrite).resolve()
    ensure_writable_dir(out.parent)
    run_id = new_run_id()
    staging = out.parent / f".{out.name}.staging-{os.getpid()}-{run_id.rsplit('-', 1)[1]}"
    staging.mkdir()
    return out, staging, run_id


RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> None:
    """Swap two folders in one atomic step (Linux 3.15+, on the file systems that support it);
    OSError where it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def commit(out: Path, staging: Path) -> None:
    """Put the staged folder where ``out`` is, in one rename; what ``out`` held beside the
    previous export (the user's files) moves over first, the previous export goes."""
    old = previous_run(out)
    old_files = set(old.get("files") or [p.name for p in out.iterdir()
                                        if LEGACY_FILES.match(p.name)]) if old else set()
    if (out / FAILED).is_dir() and previous_run(out / FAILED) is not None:
        old_files.add(FAILED)  # a failed run of the last export: superseded by this one
    for entry in out.iterdir():
        if entry.name not in old_files and not (staging / entry.name).exists():
            os.rename(entry, staging / entry.name)
    try:
        exchange(staging, out)
    except OSError as exc:  # no atomic exchange here: two renames, a moment without ``out``
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.rename(out, f"{staging}.old")
        os.rename(staging, out)
        staging = Path(f"{staging}.old")
    shutil.rmtree(staging)  # the previous export, now under the staging name


def abandon(out: Path, staging: Path) -> Path:
    """Keep a failed run's files, for reading, in ``failed-run/``; the last export is intact."""
    failed = out / FAILED
    if failed.exists():
        if previous_run(failed) is None and any(failed.iterdir()):
            shutil.rmtree(staging)
            return staging
        remove_path(failed)
    os.replace(staging, failed)
    return failed
