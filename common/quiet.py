"""Turning down the noise of native libraries: TensorFlow's logging and C++ chatter on fd 1/2."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


def quiet_tensorflow():
    """Import TensorFlow with its C++ and Python logging turned down to errors, and return it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module="tensorflow_addons")
    warnings.filterwarnings("ignore", message=".*TensorFlow Addons.*")
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def quiet_native(fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Silence C/C++ output written straight to ``fds`` (below Python's sys.stdout/stderr):
    the TFLite converter and quantizer print pages of it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile() as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)  # C++ streams buffer: empty them into the sink
            for fd, copy in zip(fds, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
