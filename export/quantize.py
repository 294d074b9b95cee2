"""Quantized TFLite variants of the fused model: convert, then prove the file runs.

The representative data (calibration/) comes in from the caller; this is the export stage.

Calibration (running the float model over the representative set with every tensor's range
recorded, on reference kernels) is by far the slowest step, about 15 s per 256x384 sample on 2
busy cores. It runs once: ``bokeh_calibrated.tflite`` keeps the ranges, and full int8, the
debugger's instrumented model and every selective configuration are quantized from it by the
same MLIR quantizer the converter itself calls (``convert.mlir_quantize``; the converter's
public API offers no way to reuse a calibration).

The converter can accept a model the TFLite runtime then refuses (int16x8 converts SQUARED_
DIFFERENCE, whose kernel has no int16 path), so every variant runs one calibration sample before
it counts as written. What did not work is reported, not hidden.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from common.files import write_bytes
from common.quiet import quiet_native
from export import tflite_stage
from export.manifest import write_manifest
from export.report import StageLog
from export.runner import make_interpreter, run_tflite

QUANT_VARIANTS = ("drq", "int8", "int16x8")  # fused model only; int16x8 where TFLite allows
CALIBRATED = "bokeh_calibrated.tflite"


class QuantizationUnsupported(Exception):
    """The converter or the TFLite runtime cannot do this variant for this graph."""


def _reason(exc: Exception, limit: int = 300) -> str:
    """The informative tail of a converter or interpreter message (they repeat themselves)."""
    text = " ".join(str(exc).split())
    last = re.split(r"(?<=failure\.)|(?<=delegate)", text)[-1].strip() or text
    return last[:limit]


def quantize_variant(frozen_pb: Path, io_spec: dict, dest: Path, variant: str,
                     calibration) -> tuple[Path, list[str]]:
    """Write ``dest`` (builtin ops only) and run it once; raise QuantizationUnsupported."""
    dataset = calibration.dataset if variant in tflite_stage.CALIBRATED_VARIANTS else None
    try:
        if variant == "int8":
            calibrated = calibrate(frozen_pb, io_spec, dataset, dest.with_name(CALIBRATED))
            path, notes = write_bytes(dest, quantize_calibrated(calibrated.read_bytes())), [
                f"calibrated once into {CALIBRATED}, quantized by the MLIR quantizer; ops "
                "without an int8 kernel stay float (float_ops)"]
        else:
            path, notes = tflite_stage.convert(frozen_pb, io_spec, dest, variant, dataset)
    except tflite_stage.FlexOpsRequired as exc:
        exc.flex_path.unlink(missing_ok=True)
        raise QuantizationUnsupported(
            f"not supported by the converter: needs Flex ops {', '.join(exc.flex_ops)}") from None
    except Exception as exc:  # ConverterError: the op it cannot quantize
        raise QuantizationUnsupported(f"not supported by the converter: {_reason(exc)}") from None
    try:
        run_tflite(path, calibration.first_sample, threads=1)
    except (RuntimeError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise QuantizationUnsupported(
            f"converted, but the TFLite runtime cannot run it: {_reason(exc)}") from None
    if any(n.startswith("ops set") for n in notes):
        notes.append("float kernels allowed for the ops without a quantized kernel")
    return path, notes


def calibrate(frozen_pb: Path, io_spec: dict, dataset, dest: Path) -> Path:
    """The float model with each tensor's calibrated range recorded (the slow step)."""
    converter = tflite_stage.make_converter(Path(frozen_pb), io_spec, "int8", dataset)
    converter._experimental_calibrate_only = True  # stop after calibration, before quantizing
    with quiet_native():
        return write_bytes(dest, converter.convert())


def quantize_calibrated(calibrated: bytes, denylisted_nodes=(), denylisted_ops=(),
                        numeric_verify: bool = False) -> bytes:
    """int8 weights and activations, float input and output; named nodes / op kinds stay float.
    ``numeric_verify`` adds the debugger's NumericVerify ops."""
    from tensorflow.lite.python import convert as tfl_convert

    with quiet_native():
        return tfl_convert.mlir_quantize(
            calibrated, disable_per_channel=False, fully_quantize=False,
            enable_numeric_verify=numeric_verify,
            denylisted_nodes=list(denylisted_nodes) or None,
            denylisted_ops=list(denylisted_ops) or None)


def float_ops(path: str | Path) -> dict[str, int]:
    """Ops computing in float32 (outputs float32), by kind, DEQUANTIZE of I/O excluded: what
    an int8 variant still runs in float."""
    interpreter = make_interpreter(path, allocate=False)
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    kinds = Counter(
        op["op_name"] for op in interpreter._get_ops_details()
        if op["op_name"] not in ("DEQUANTIZE", "QUANTIZE")
        and any(dtypes.get(i) == np.float32 for i in op["outputs"]))
    return dict(kinds.most_common())


def write_quant_variants(frozen: Path, io_spec: dict, variants: tuple[str, ...], calibration,
                          manifest_base: dict, log: StageLog) -> dict[str, dict]:
    """Quantized variants of the fused model, each smoke-run once; return the report entry of
    each file. A variant that cannot be built or run (int16x8 here) is recorded as not
    supported and the export goes on."""
    entries = {}
    for variant in variants:
        tflite = log.out_dir / f"bokeh_{variant}.tflite"
        try:
            _, notes = log.run(f"tflite-bokeh-{variant}", quantize_variant, frozen, io_spec,
                               tflite, variant, calibration)
        except QuantizationUnsupported as exc:
            entries[tflite.name] = {"unsupported": str(exc)}
            log.echo(f"  -- {tflite.name}: {exc}")
            continue
        quantization = {"calibration": calibration.record, "notes": notes,
                        "float_ops": float_ops(tflite)}
        entries[tflite.name] = write_manifest(tflite, variant, manifest_base,
                                              {"quantization": quantization})
    return entries
