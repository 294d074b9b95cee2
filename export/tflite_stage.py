"""Stage 5: frozen GraphDef -> TFLite, builtin ops only unless the user allows Flex.

A Flex (SELECT_TF_OPS) op keeps a model off every mobile GPU and needs the Flex delegate on the
CPU, so it is never slipped in: if the builtin-only conversion fails, the Flex model is written
under a ``*_flex.tflite`` name, its Flex ops are listed, and the caller decides.
"""

from __future__ import annotations

from pathlib import Path

from common.files import atomic_path
from common.quiet import quiet_native, quiet_tensorflow
from export.tflite_info import flex_ops

VARIANTS = ("fp32", "fp16", "drq", "int8", "int16x8")
# Quantized variants (issue #5): "drq" int8 weights, float activations (no calibration);
# "int8" int8 weights and activations, float input and output; "int16x8" int16 activations and
# int8 weights. The last two need a representative dataset (calibration/dataset.py).
CALIBRATED_VARIANTS = ("int8", "int16x8")


class FlexOpsRequired(Exception):
    """The builtin-only conversion failed; the Flex model was written to ``flex_path``."""

    def __init__(self, flex_path: Path, flex_ops: list[str], reason: str):
        super().__init__(
            f"{flex_path.name} needs Flex ops {', '.join(flex_ops) or '(unknown)'}: it cannot run "
            f"on a mobile GPU and needs the Flex delegate on the CPU ({reason})"
        )
        self.flex_path, self.flex_ops, self.reason = flex_path, flex_ops, reason


def make_converter(frozen_pb: Path, io_spec: dict, variant: str, representative_dataset=None):
    tf = quiet_tensorflow()
    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(frozen_pb), input_arrays=list(io_spec["inputs"]),
        output_arrays=list(io_spec["outputs"]), input_shapes=io_spec["inputs"],
    )
    if variant == "fp16":  # fp16 weights, dequantized on the CPU, used as is by the GPU delegate
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant in ("drq", *CALIBRATED_VARIANTS):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if variant in CALIBRATED_VARIANTS:
            if representative_dataset is None:
                raise ValueError(f"variant {variant!r} needs a representative dataset")
            converter.representative_dataset = representative_dataset
    elif variant != "fp32":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return converter


def builtin_ops_sets(variant: str) -> list[list]:
    """Op sets to try in order, all builtin: the strict one first, then with float kernels for
    ops that have no quantized kernel (the manifest says when that fallback was taken)."""
    ops = quiet_tensorflow().lite.OpsSet
    if variant == "int8":
        return [[ops.TFLITE_BUILTINS_INT8], [ops.TFLITE_BUILTINS_INT8, ops.TFLITE_BUILTINS]]
    if variant == "int16x8":  # no strict try: DIV (mask normalisation) has no 16x8 kernel
        sixteen = ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        return [[sixteen, ops.TFLITE_BUILTINS]]
    return [[ops.TFLITE_BUILTINS]]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def to_tflite(
    frozen_pb: str | Path, io_spec: dict, dest: str | Path, variant: str = "fp32",
    representative_dataset=None,
) -> Path:
    """Convert with builtin ops only; on failure write ``*_flex.tflite`` and raise."""
    return convert(frozen_pb, io_spec, dest, variant, representative_dataset)[0]


def convert(
    frozen_pb: str | Path, io_spec: dict, dest: str | Path, variant: str = "fp32",
    representative_dataset=None,
) -> tuple[Path, list[str]]:
    """Like ``to_tflite``; also returns notes on fallbacks taken (float kernels in int8)."""
    tf = quiet_tensorflow()
    frozen_pb, dest = Path(frozen_pb), Path(dest)
    notes, reason = [], ""
    for ops_set in builtin_ops_sets(variant):
        converter = make_converter(frozen_pb, io_spec, variant, representative_dataset)
        converter.target_spec.supported_ops = ops_set
        try:
            with quiet_native((2,)):
                flatbuffer = converter.convert()
        except Exception as exc:  # the converter raises ConverterError with the unsupported ops
            reason = _first_line(exc)
            notes.append(f"ops set {[o.name for o in ops_set]} failed: {reason}")
            continue
        with atomic_path(dest) as tmp:
            tmp.write_bytes(flatbuffer)
        return dest, notes
    converter = make_converter(frozen_pb, io_spec, variant, representative_dataset)
    converter.target_spec.supported_ops = [
        *builtin_ops_sets(variant)[-1], tf.lite.OpsSet.SELECT_TF_OPS]
    flex_path = dest.with_name(dest.stem + "_flex.tflite")
    with atomic_path(flex_path) as tmp, quiet_native((2,)):
        tmp.write_bytes(converter.convert())
    raise FlexOpsRequired(flex_path, flex_ops(flex_path), reason) from None
