"""Per-layer int8 error from TensorFlow's QuantizationDebugger, and selective quantization.

The debugger runs the calibrated model with a NumericVerify op after every quantized tensor and
compares it with the float value. ``rmse / scale`` is the error in units of the quantization step:
rounding alone gives about 0.29 (1/sqrt(12)); a layer far above that has a range the int8 grid
cannot hold. Keeping the worst layers (or whole op kinds) in float is selective quantization;
whether it pays is measured on held-out photos, never assumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from export.tf_stages import quiet_tensorflow
from export.tflite_stage import _converter

ROUNDING_ONLY = 1 / math.sqrt(12)  # rmse/scale of a layer whose only error is int8 rounding


@contextlib.contextmanager
def _captured_output():
    """Silence the quantizer's C++ chatter, which goes to both fd 1 and fd 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)  # C++ streams buffer: empty them into the sink
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


@dataclass
class LayerError:
    tensor: str
    op: str
    rmse_over_scale: float
    max_abs_error: float


def debugger(frozen_pb: str | Path, io_spec: dict, dataset, denylisted_nodes=(),
             denylisted_ops=()):
    """A QuantizationDebugger over the same frozen graph and converter the export uses."""
    tf = quiet_tensorflow()
    converter = _converter(Path(frozen_pb), io_spec, "int8", dataset)
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(denylisted_nodes) or None,
        denylisted_ops=list(denylisted_ops) or None)
    with _captured_output():
        return tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=dataset, debug_options=options)


def layer_errors(dbg) -> list[LayerError]:
    """Every verified tensor, worst first by rmse/scale (the debugger's layer statistics)."""
    import csv
    import io

    with _captured_output():
        dbg.run()
    buffer = io.StringIO()
    dbg.layer_statistics_dump(buffer)
    buffer.seek(0)
    rows = []
    for row in csv.DictReader(buffer):
        scale = float(row["scale"]) or math.inf
        rows.append(LayerError(row["tensor_name"], row["op_name"],
                               math.sqrt(float(row["mean_squared_error"])) / scale,
                               float(row["max_abs_error"])))
    return sorted(rows, key=lambda r: r.rmse_over_scale, reverse=True)


def selective_model(dbg, denylisted_nodes=(), denylisted_ops=()) -> bytes:
    """The calibrated model quantized with the named nodes / op kinds left in float."""
    tf = quiet_tensorflow()
    dbg.options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(denylisted_nodes) or None,
        denylisted_ops=list(denylisted_ops) or None)
    with _captured_output():
        return dbg.get_nondebug_quantized_model()
