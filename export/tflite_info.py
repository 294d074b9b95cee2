"""What a .tflite holds: ops, Flex ops, rank, I/O, largest tensors, and one GPU-ready verdict.

The verdict is the one every command shows (export report, manifests, `bokeh inspect`, the AI
Benchmark bundle): builtin ops only, no tensor of rank above 4 (TensorFlow's analyzer does not
check rank) and TensorFlow's GPU compatibility analyzer.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.quiet import quiet_tensorflow
from export.runner import make_interpreter


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
    path = Path(path)
    interpreter = make_interpreter(path, allocate=False)
    ops = interpreter._get_ops_details()  # the public API has no op list; this one is stable
    names = [op["op_name"] for op in ops]
    tensors = interpreter.get_tensor_details()
    by_size = sorted(
        tensors, key=lambda t: int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize,
        reverse=True)
    verdict, messages = gpu_compatibility(path)
    return TFLiteInfo(
        path=str(path), size_bytes=path.stat().st_size,
        op_histogram=dict(Counter(names).most_common()), flex_ops=flex_ops(path),
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
    interpreter = make_interpreter(path, allocate=False)
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    dequantized = {out for op in ops if op["op_name"] == "DEQUANTIZE"
                   and all(dtypes.get(i) == np.float16 for i in op["inputs"])
                   for out in op["outputs"]}
    return {op["index"] for op in ops if dequantized.intersection(op["inputs"])}


def flex_ops(path: str | Path) -> list[str]:
    """The Flex (SELECT_TF_OPS) ops a model needs, sorted; empty for a builtin-only model."""
    ops = make_interpreter(path, allocate=False)._get_ops_details()
    return sorted({op["op_name"].removeprefix("Flex") for op in ops
                   if op["op_name"].startswith("Flex")})


def dynamic_dims(path: str | Path) -> list[str]:
    """Inputs and outputs with a dynamic (-1) dimension, as 'name [1,-1,-1,3]' strings.

    ``shape`` shows a placeholder 1 for a dynamic dimension; only ``shape_signature`` tells.
    """
    interpreter = make_interpreter(path, allocate=False)
    found = []
    for detail in interpreter.get_input_details() + interpreter.get_output_details():
        signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        if any(d < 0 for d in signature):
            found.append(f"{detail['name']} [{','.join(map(str, signature))}]")
    return found


def gpu_verdict(info: TFLiteInfo) -> tuple[bool, list[str]]:
    """Whether the TFLite GPU delegate can take the model, with every reason it cannot."""
    reasons = []
    if info.flex_ops:
        reasons.append(f"Flex ops {', '.join(info.flex_ops)}: the GPU delegate runs builtin "
                       "ops only")
    if info.max_rank > 4:
        reasons.append(f"a tensor of rank {info.max_rank}: the GPU delegate takes rank <= 4")
    if not info.gpu_compatible:
        reasons.extend(info.gpu_messages or ["TensorFlow's GPU analyzer flagged the model"])
    return not reasons, reasons
