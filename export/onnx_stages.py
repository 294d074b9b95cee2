"""Stages 1-2: PyTorch -> ONNX -> simplified ONNX -> ONNX rewritten for mobile."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from common.files import atomic_path
from export.rewrites import PASSES

# Opset 12 keeps Split's sizes an attribute: from 13 on they are an int64 input that onnx-tf turns
# into tf.SplitV with int64 sizes, which TFLite only runs as a Flex op (docs/design.md, section 3).
DEFAULT_OPSET = 12


def to_onnx(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    dest: str | Path,
    opset: int = DEFAULT_OPSET,
    input_name: str = "input",
    output_name: str = "output",
) -> Path:
    """Trace ``model`` at one static shape with the legacy exporter (what onnx-tf can read)."""
    if not 12 <= opset <= 15:
        raise ValueError(f"opset {opset} is outside 12-15, the range onnx-tf 1.10 converts")
    dummy = torch.zeros(input_shape, dtype=torch.float32)
    with atomic_path(dest) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # static shape is the point
        torch.onnx.export(
            model.eval(), (dummy,), str(tmp), dynamo=False, opset_version=opset,
            input_names=[input_name], output_names=[output_name], do_constant_folding=True,
        )
    return Path(dest)


def simplify(src: str | Path, dest: str | Path) -> Path:
    """Run onnxsim and keep its result only if its own random-input check passes."""
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError(f"{src}: onnxsim could not validate the simplified model")
    with atomic_path(dest) as tmp:
        onnx.save(model, str(tmp))
    return Path(dest)


def rewrite(src: str | Path, dest: str | Path, passes: Sequence[Callable] = PASSES
            ) -> tuple[Path, dict[str, int]]:
    """Apply every exact mobile rewrite (or ``passes``, e.g. ``rewrites.NAIVE_FP16_PASSES``);
    return the artifact and how often each pass fired."""
    model = onnx.load(str(src))
    counts = {}
    for rewrite_pass in passes:
        model, counts[rewrite_pass.__name__] = rewrite_pass(model)
    onnx.checker.check_model(model)
    with atomic_path(dest) as tmp:
        onnx.save(model, str(tmp))
    return Path(dest), counts


def run_onnx(path: str | Path, x: np.ndarray, threads: int = 0) -> np.ndarray:
    """One forward pass through onnxruntime (first input, first output)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]
