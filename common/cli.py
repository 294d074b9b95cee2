"""What every command shares: one error format (``<command>: error: <what>``, exit 2) and
argument types that refuse bad values before any work starts."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from common.errors import UserError

# The disk said no: full, over quota, read-only or not ours. One line, like bad input.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body; a ``UserError`` becomes one line on stderr and exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror}{where} (nothing half-written was left in place)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, threads, runs, sizes)."""
    return _bounded(int, text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (warm-up runs, seeds)."""
    return _bounded(int, text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (tolerances)."""
    value = _bounded(float, text, 0.0, "a number > 0")
    if value == 0.0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (focus and strength controls)."""
    value = _bounded(float, text, 0.0, "a number in [0, 1]")
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1]")
    return value


def name_list(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of ``allowed`` names, in order, without repeats; ``UserError``
    naming ``--flag`` and the choices otherwise."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        raise UserError(f"--{flag} takes {' or '.join(allowed)} (comma-separated), got {text!r}")
    return tuple(dict.fromkeys(names))


def _bounded(kind: type, text: str, low: float, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value != value or value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value
