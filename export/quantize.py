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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.files import write_bytes
from common.quiet import quiet_native, quiet_tensorflow
from export import tflite_stage
from export.manifest import write_manifest
from export.report import StageLog
from export.runner import make_interpreter, run_tflite
from export.variants import names
from export.variants import variant as variant_entry
from models.depth import FAMILIES

QUANT_VARIANTS = names(quantized=True)  # fused model only (export/variants.py)
CALIBRATED = "bokeh_calibrated.tflite"
# The layers each variant keeps in float, per depth-net family (models/depth.py FAMILIES): name
# patterns (regular expressions on the op's output tensor) and op kinds. Measured at 256x384 on
# the five photos of docs/benchmarks.md, bokeh / mask PSNR against the fp32 file, worst photo,
# random weights, the fp16-safe graphs (a random net amplifies an early layer's rounding through
# every later one, so the first encoder stages cost the most):
# - midas-small drq: 31.4 dB all int8; EfficientNet stem + block 0 float 34.5, + block 1 39.8,
#   + the first block of stage 3 45.4 dB (19.9 MB against 18.2 MB); the decoder float: 31.4.
# - midas-small int8: 36.9 / 21.8 dB all int8; its drq layers float 38.8 / 23.2 for 1.7 MB more,
#   not needed for the floors (30 / 20).
# - dpt-hybrid int8: 28.3 / 16.6 dB all int8; the ResNet stem's and stages' GroupNorms float
#   32.4 / 21.4, + the mask glue 32.9 / 22.0 (same size). Attention, the ViT LayerNorms, the
#   decoder, the readout or the whole ViT float add nothing to that (each part's rounding is of
#   the same size; only the whole net float gains: int8-mixed).
# - depth-anything-v2-small int8: attention (BATCH_MATMUL, SOFTMAX) float 32.7 / 18.4 dB (mask
#   under its floor); + the backbone's final norm (it normalises the four features the DPT head
#   reads) 38.4 / 21.6; + every ViT LayerNorm up to its normalised values 41.7 / 27.3, same size.
#   The DPT head, qkv or fc1 float: no gain.
# - int8-mixed: the whole depth net and the mask glue float: dpt-hybrid 46.4 / 45.3 (34.0 / 23.2
#   without the glue), midas-small 45.3 / 35.4, depth-anything-v2-small 46.4 / 63.8.
# The mask glue: the fused graph's own ops between the depth net and NAFNet (resize back to the
# photo, per-photo min-max). In int8 the depth is rounded on its own scale, then the min-max
# stretches that rounding over the whole [0, 1] mask.
MASK_GLUE = r"^StatefulPartitionedCall/(ResizeBilinear_1|Max|Min|sub|sub_1|Maximum)(;|$)"
GROUPNORMS = r"backbone\.[^;]*norm[0-9]?/"  # DPT-Hybrid's ResNet: statistics and affine
FINAL_NORM = r"pretrained\.norm/"  # DINOv2's last LayerNorm
# A ViT block's LayerNorm up to the normalised values (the fp16-safe scale `mul`, then mean,
# centring, variance, rsqrt, `mul_1`); its affine, folded into the next matmul, stays int8.
LAYERNORM_STATISTICS = (r"pretrained\.blocks\.\d+\.norm[12]/"
                        r"(mul|Mean|sub|Square|Mean_1|add|Rsqrt|mul_1)(;|$)")
SENSITIVE_LAYERS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "drq": {"midas-small": {"nodes": (r"pretrained\.layer[12]\.", r"pretrained\.layer3\.0\.")}},
    "int8": {"dpt": {"nodes": (GROUPNORMS, MASK_GLUE)},
             "midas-small": {"nodes": (MASK_GLUE,)},
             "depth-anything-v2": {"nodes": (FINAL_NORM, LAYERNORM_STATISTICS, MASK_GLUE),
                                   "ops": ("BATCH_MATMUL", "SOFTMAX")}},
    "int8-mixed": {family: {"nodes": (re.escape(f.keras_scope), MASK_GLUE)}
                   for family, f in FAMILIES.items()},
}


class QuantizationUnsupported(Exception):
    """The converter or the TFLite runtime cannot do this variant for this graph."""


def _reason(exc: Exception, limit: int = 300) -> str:
    """The informative tail of a converter or interpreter message (they repeat themselves)."""
    text = " ".join(str(exc).split())
    last = re.split(r"(?<=failure\.)|(?<=delegate)", text)[-1].strip() or text
    return last[:limit]


def sensitive_layers(variant: str, family: str | None) -> dict[str, tuple[str, ...]]:
    """What ``variant`` keeps in float for a depth net of ``family``: ``nodes`` (patterns) and
    ``ops`` (kinds); empty when it quantizes everything it can."""
    return SENSITIVE_LAYERS.get(variant, {}).get(family or "", {})


def output_names(model: bytes) -> list[str]:
    """The output tensor name of every op of a .tflite (the names denylists match)."""
    interpreter = quiet_tensorflow().lite.Interpreter(model_content=model)
    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return [tensors[op["outputs"][0]] for op in interpreter._get_ops_details()
            if len(op["outputs"])]


def _matches(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda name: any(re.search(p, name) for p in patterns)


def quantize_variant(frozen_pb: Path, io_spec: dict, dest: Path, variant: str,
                     calibration, family: str | None = None) -> tuple[Path, list[str]]:
    """Write ``dest`` (builtin ops only), the layers ``SENSITIVE_LAYERS`` names for ``family``
    kept in float, and run it once; raise QuantizationUnsupported."""
    dataset = calibration.dataset if variant_entry(variant).calibrated else None
    keep = sensitive_layers(variant, family)
    try:
        if variant in ("int8", "int8-mixed"):
            calibrated = dest.with_name(CALIBRATED)
            if not calibrated.is_file():  # once per export: int8 and int8-mixed share it
                calibrate(frozen_pb, io_spec, dataset, calibrated)
            ranges = calibrated.read_bytes()
            nodes = [n for n in output_names(ranges) if _matches(keep.get("nodes", ()))(n)]
            path = write_bytes(dest, quantize_calibrated(ranges, nodes, keep.get("ops", ())))
            notes = [f"calibrated once into {CALIBRATED}, quantized by the MLIR quantizer; ops "
                     "without an int8 kernel stay float (float_ops)"]
        else:
            path, notes = tflite_stage.convert(frozen_pb, io_spec, dest, variant, dataset)
            if keep.get("nodes"):
                fp32 = tflite_stage.make_converter(frozen_pb, io_spec, "fp32")
                with quiet_native((2,)):
                    reference = fp32.convert()
                edited, kept = with_float_weights(path.read_bytes(), reference,
                                                  _matches(keep["nodes"]))
                write_bytes(path, edited)
                notes.append(f"{len(kept)} ops given back their float32 weights")
        if keep:
            notes.append("kept in float (export/quantize.py SENSITIVE_LAYERS): " + "; ".join(
                f"{k} {', '.join(v)}" for k, v in keep.items()))
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


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                "BATCH_MATMUL")


def with_float_weights(quantized: bytes, fp32: bytes, keep: Callable[[str], bool]
                       ) -> tuple[bytes, list[str]]:
    """A dynamic-range (drq) model with the int8 weights of the ops whose output name passes
    ``keep`` replaced by their float32 weights from the fp32 file of the same graph, so those
    ops run the float kernel (no weight rounding, no on-the-fly activation quantization).

    The converter has no denylist for dynamic-range quantization (only the calibrated
    quantizer takes one), hence this edit of the flatbuffer: constant tensors keep their names
    through both conversions. Returns the model and the names of the ops put back in float."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    reference = flatbuffer_utils.convert_bytearray_to_object(bytearray(fp32))
    graph, ref_graph = model.subgraphs[0], reference.subgraphs[0]
    ref_tensors = {t.name: t for t in ref_graph.tensors}
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    kept = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = codes.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind not in WEIGHTED_OPS:
            continue
        output = graph.tensors[op.outputs[0]].name.decode()
        for index in op.inputs[1:]:
            tensor = graph.tensors[index] if index >= 0 else None
            if (tensor is None or tensor.type != schema.TensorType.INT8
                    or tensor.name not in ref_tensors or not keep(output)):
                continue
            ref = ref_tensors[tensor.name]
            tensor.type, tensor.quantization = schema.TensorType.FLOAT32, None
            model.buffers[tensor.buffer].data = reference.buffers[ref.buffer].data
            kept.append(output)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), kept


def float_op_outputs(path: str | Path) -> list[tuple[str, str]]:
    """(kind, output tensor name) of every op computing in float32 (a float32 output),
    QUANTIZE and DEQUANTIZE excluded: what an int8 variant still runs in float."""
    interpreter = make_interpreter(path, allocate=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [(op["op_name"], tensors[op["outputs"][0]]["name"])
            for op in interpreter._get_ops_details()
            if op["op_name"] not in ("DEQUANTIZE", "QUANTIZE")
            and any(np.dtype(tensors[i]["dtype"]) == np.float32 for i in op["outputs"])]


def float_ops(path: str | Path) -> dict[str, int]:
    """``float_op_outputs`` counted by kind."""
    return dict(Counter(kind for kind, _ in float_op_outputs(path)).most_common())


def write_quant_variants(frozen: Path, io_spec: dict, variants: tuple[str, ...], calibration,
                          manifest_base: dict, log: StageLog) -> dict[str, dict]:
    """Quantized variants of the fused model, each smoke-run once; return the report entry of
    each file. A variant that cannot be built or run (int16x8 here) is recorded as not
    supported and the export goes on."""
    from models.depth import depth_net, depth_record_of

    family = depth_net(depth_record_of(manifest_base)["name"]).family
    if any(variant_entry(v).calibrated for v in variants):  # new data: calibrate afresh, once
        (log.out_dir / CALIBRATED).unlink(missing_ok=True)
    entries = {}
    for variant in variants:
        tflite = log.out_dir / f"bokeh_{variant}.tflite"
        try:
            _, notes = log.run(f"tflite-bokeh-{variant}", quantize_variant, frozen, io_spec,
                               tflite, variant, calibration, family)
        except QuantizationUnsupported as exc:
            entries[tflite.name] = {"unsupported": str(exc)}
            log.echo(f"  -- {tflite.name}: {exc}")
            continue
        quantization = {"calibration": calibration.record, "notes": notes,
                        "float_ops": float_ops(tflite),
                        "kept_float": {k: list(v) for k, v in
                                       sensitive_layers(variant, family).items()}}
        entries[tflite.name] = write_manifest(tflite, variant, manifest_base,
                                              {"quantization": quantization})
    return entries
