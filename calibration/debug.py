"""Per-layer int8 error from TensorFlow's QuantizationDebugger, and selective quantization.

The debugger runs the quantized model with a NumericVerify op after every quantized tensor and
compares it with the float value. ``rmse / scale`` is the error in units of the quantization step:
rounding alone gives about 0.29 (1/sqrt(12)); a layer far above that has a range the int8 grid
cannot hold. Keeping the worst layers (or whole op kinds, or a whole sub-network) in float is
selective quantization; whether it pays is measured on held-out photos, never assumed. Both
start from the export's stored calibration (calibration/variants.py), so nothing recalibrates.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from common.quiet import quiet_native, quiet_tensorflow
from export.quantize import quantize_calibrated

ROUNDING_ONLY = 1 / math.sqrt(12)  # rmse/scale of a layer whose only error is int8 rounding


@dataclass
class LayerError:
    tensor: str
    op: str
    rmse_over_scale: float
    max_abs_error: float


def layer_errors(calibrated: bytes, debug_dataset) -> list[LayerError]:
    """Every verified tensor, worst first by rmse/scale (the debugger's layer statistics)."""
    tf = quiet_tensorflow()
    debug_model = quantize_calibrated(calibrated, numeric_verify=True)
    with quiet_native():
        dbg = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=debug_model, debug_dataset=debug_dataset)
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
    return sorted(rows, key=_severity, reverse=True)


def _severity(row: LayerError) -> float:
    """inf (the debugger's squared error overflowed: a blown-up range) first; NaN (no
    samples reached the layer) last, instead of scrambling the sort."""
    return -1.0 if math.isnan(row.rmse_over_scale) else row.rmse_over_scale


def selective_model(calibrated: bytes, denylisted_nodes=(), denylisted_ops=()) -> bytes:
    """The calibrated model quantized with the named nodes / op kinds left in float."""
    return quantize_calibrated(calibrated, denylisted_nodes, denylisted_ops)
