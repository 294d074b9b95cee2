"""Side-by-side latency: engines built with the same thread count, timed interleaved.

Interleaving (engine A, B, C, then A, B, C again ...) spreads any slow phase of the machine over
every engine alike, so the ratios between medians are fair even when absolute numbers drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

Runner = Callable[[np.ndarray], np.ndarray]  # NHWC in, NHWC out


def torch_engine(model: torch.nn.Module, threads: int) -> Runner:
    torch.set_num_threads(threads)
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(
                0, 2, 3, 1)

    return run


def onnx_engine(path, threads: int) -> Runner:
    """onnxruntime on an NCHW ONNX file, wrapped to NHWC."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        y = session.run(None, {name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
        return y.transpose(0, 2, 3, 1)

    return run


def tflite_engine(path, threads: int, xnnpack: bool = True) -> Runner:
    from export.tflite_stage import make_interpreter

    interpreter = make_interpreter(path, threads, xnnpack)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    return run


def time_interleaved(engines: dict[str, Runner], x: np.ndarray, runs: int = 5,
                     warmup: int = 1, progress: Callable[[str], None] | None = None
                     ) -> dict[str, dict]:
    """Warm each engine up, then time ``runs`` rounds of one call per engine; per-engine stats."""
    outputs = {}
    for name, run in engines.items():
        for _ in range(warmup):
            outputs[name] = np.array(run(x))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(runs):
        for name, run in engines.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
        if progress:
            progress(f"round {i + 1}/{runs}")
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t),
               "p90_s": float(np.percentile(t, 90)), "runs": len(t), "output": outputs[name]}
        for name, t in times.items()
    }
