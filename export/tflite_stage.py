"""Stage 5: frozen GraphDef -> TFLite, builtin ops only unless the user allows Flex.

A Flex (SELECT_TF_OPS) op keeps a model off every mobile GPU and needs the Flex delegate on the
CPU, so it is never slipped in: if the builtin-only conversion fails, the Flex model is written
under a ``*_flex.tflite`` name, its Flex ops are listed, and the caller decides.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.files import atomic_path
from export.tf_stages import quiet_tensorflow

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


def _converter(frozen_pb: Path, io_spec: dict, variant: str, representative_dataset=None):
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
        converter = _converter(frozen_pb, io_spec, variant, representative_dataset)
        converter.target_spec.supported_ops = ops_set
        try:
            with _captured_stderr():
                flatbuffer = converter.convert()
        except Exception as exc:  # the converter raises ConverterError with the unsupported ops
            reason = _first_line(exc)
            notes.append(f"ops set {[o.name for o in ops_set]} failed: {reason}")
            continue
        with atomic_path(dest) as tmp:
            tmp.write_bytes(flatbuffer)
        return dest, notes
    converter = _converter(frozen_pb, io_spec, variant, representative_dataset)
    converter.target_spec.supported_ops = [
        *builtin_ops_sets(variant)[-1], tf.lite.OpsSet.SELECT_TF_OPS]
    flex_path = dest.with_name(dest.stem + "_flex.tflite")
    with atomic_path(flex_path) as tmp, _captured_stderr():
        tmp.write_bytes(converter.convert())
    raise FlexOpsRequired(flex_path, inspect_tflite(flex_path).flex_ops, reason) from None


@contextlib.contextmanager
def _captured_stderr():
    """Silence the converter's C++ chatter (it writes to fd 2, below Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class TFLiteInfo:
    """What a person (and the report) wants to know about a .tflite file at a glance."""

    path: str
    size_bytes: int
    op_histogram: dict[str, int]
    flex_ops: list[str]
    max_rank: int
    inputs: list[dict]
    outputs: list[dict]
    largest_tensors: list[dict] = field(default_factory=list)
    gpu_compatible: bool | None = None
    gpu_messages: list[str] = field(default_factory=list)


def _tensor_entry(detail: dict) -> dict:
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name}


def inspect_tflite(path: str | Path, largest: int = 5) -> TFLiteInfo:
    """Op histogram, Flex ops, max rank, I/O, largest tensors and the GPU-compatibility verdict."""
    tf = quiet_tensorflow()
    path = Path(path)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    ops = interpreter._get_ops_details()  # the public API has no op list; this one is stable
    names = [op["op_name"] for op in ops]
    flex = sorted({n.removeprefix("Flex") for n in names if n.startswith("Flex")})
    tensors = interpreter.get_tensor_details()
    by_size = sorted(
        tensors, key=lambda t: int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize,
        reverse=True)
    verdict, messages = gpu_compatibility(path)
    return TFLiteInfo(
        path=str(path), size_bytes=path.stat().st_size,
        op_histogram=dict(Counter(names).most_common()), flex_ops=flex,
        max_rank=max((len(t["shape"]) for t in tensors), default=0),
        inputs=[_tensor_entry(d) for d in interpreter.get_input_details()],
        outputs=[_tensor_entry(d) for d in interpreter.get_output_details()],
        largest_tensors=[
            {**_tensor_entry(t), "mbytes": round(
                int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize / 2**20, 2)}
            for t in by_size[:largest]],
        gpu_compatible=verdict, gpu_messages=messages,
    )


def gpu_compatibility(path: str | Path) -> tuple[bool, list[str]]:
    """TensorFlow's GPU delegate compatibility analyzer; it does not check rank (we do).

    The analyzer flags every op whose weights come through a DEQUANTIZE of fp16 constants (it
    counts them as runtime inputs). Those are fp16 models as the GPU delegate wants them: it
    reads the fp16 weights directly instead of dequantizing. Such flags are explained in the
    messages, not counted against the model; any other flag is.
    """
    tf = quiet_tensorflow()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path), gpu_compatibility=True)
    text = buffer.getvalue()
    messages = sorted({m.strip() for m in re.findall(r"GPU COMPATIBILITY WARNING: (.*)", text)})
    flagged = {int(n) for m in re.findall(r"issues at nodes ([\d, ]+)", text)
               for n in m.replace(" ", "").split(",") if n}
    if not flagged and not messages and "not compatible" not in text.lower():
        return True, []
    unexplained = flagged - _fp16_weight_consumers(path)
    if flagged and not unexplained and all("runtime input" in m or "issues at nodes" in m
                                           for m in messages):
        return True, [f"{len(flagged)} ops read fp16 weights through DEQUANTIZE: the analyzer "
                      "flags them, the GPU delegate reads fp16 weights directly"]
    return False, messages


def _fp16_weight_consumers(path: str | Path) -> set[int]:
    """Indices of ops that take an input dequantized from an fp16 constant."""
    tf = quiet_tensorflow()
    interpreter = tf.lite.Interpreter(model_path=str(path))
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    dequantized = {out for op in ops if op["op_name"] == "DEQUANTIZE"
                   and all(dtypes.get(i) == np.float16 for i in op["inputs"])
                   for out in op["outputs"]}
    return {op["index"] for op in ops if dequantized.intersection(op["inputs"])}


def run_tflite(path: str | Path, inputs: list[np.ndarray], threads: int | None = None,
               xnnpack: bool = True, runtime: str = "tensorflow") -> list[np.ndarray]:
    """One forward pass; inputs and outputs in the model's own order."""
    interpreter = make_interpreter(path, threads, xnnpack, runtime)
    for detail, value in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


# Two interpreters run the same .tflite file: TensorFlow's own (the converter's version, 2.15)
# and LiteRT (the ai-edge-litert package), the runtime TFLite ships as today, with the newer
# XNNPACK that phone apps bundle. Results match; speed and delegate coverage differ.
RUNTIMES = ("tensorflow", "litert")


def runtime_label(runtime: str) -> str:
    """A table label naming the interpreter and its version."""
    if runtime == "litert":
        from importlib.metadata import version

        return f"LiteRT {version('ai-edge-litert')}"
    return f"TF {quiet_tensorflow().__version__} interpreter"


def make_interpreter(path: str | Path, threads: int | None = None, xnnpack: bool = True,
                     runtime: str = "tensorflow"):
    """An allocated interpreter of ``runtime`` (see RUNTIMES), XNNPACK on or off."""
    if runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    elif runtime == "tensorflow":
        tf = quiet_tensorflow()
        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    else:
        raise ValueError(f"unknown TFLite runtime {runtime!r}; choose from {RUNTIMES}")
    resolver = (OpResolverType.AUTO if xnnpack
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter = Interpreter(model_path=str(path), num_threads=threads,
                              experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter
