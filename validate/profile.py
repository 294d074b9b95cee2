"""Where a TFLite model's time goes, without the benchmark_model binary.

TensorFlow's Python interpreter has no op profiler, so this module measures what it can:
- delegate coverage: which ops the XNNPACK delegate took (a delegated op's output is either a
  delegate partition's output or an internal tensor the interpreter never allocates) and how
  many partitions the graph was cut into;
- per op: the bytes it must move and the multiply-adds it must do, from the tensor shapes;
- the machine's limits, measured: streaming memory bandwidth and fp32 GEMM throughput.
Dividing bytes by bandwidth and FLOPs by throughput gives each op's lower bound; the sum against
the measured latency says how far the model is from what the machine can do.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def delegate_coverage(path: str | Path, threads: int = 2, runtime: str = "tensorflow") -> dict:
    """Ops per type inside and outside XNNPACK, and the number of delegate partitions."""
    from export.runner import make_interpreter

    interpreter = make_interpreter(path, threads, xnnpack=True, runtime=runtime)
    ops = interpreter._get_ops_details()
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    partition_outputs = {t for op in partitions for t in op["outputs"]}
    inside: Counter = Counter()
    outside: Counter = Counter()
    for op in ops:
        if op["op_name"] == "DELEGATE":
            continue
        delegated = all(t in partition_outputs or not _allocated(interpreter, t)
                        for t in op["outputs"])
        (inside if delegated else outside)[op["op_name"]] += 1
    return {"partitions": len(partitions), "delegated": dict(inside.most_common()),
            "not_delegated": dict(outside.most_common())}


def _allocated(interpreter, index: int) -> bool:
    try:
        interpreter.get_tensor(index)
    except ValueError:  # "Tensor data is null": an internal tensor of a delegate partition
        return False
    return True


def op_costs(path: str | Path) -> list[dict]:
    """Per op: type, bytes read and written (fp32 activations and weights), multiply-adds."""
    from export.runner import make_interpreter

    interpreter = make_interpreter(path, 1, xnnpack=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}

    def nbytes(i: int) -> int:
        t = tensors.get(i)
        return 0 if t is None else int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize

    rows = []
    for op in interpreter._get_ops_details():
        ins = [i for i in op["inputs"] if i >= 0]
        shapes = [list(tensors[i]["shape"]) for i in ins if i in tensors]
        out = tensors[op["outputs"][0]]["shape"]
        rows.append({"op": op["op_name"], "bytes": sum(map(nbytes, ins)) + sum(
            map(nbytes, op["outputs"])), "macs": int(np.prod(out)) * _macs_per_output(
                op["op_name"], shapes, list(out))})
    return rows


def _macs_per_output(op: str, shapes: list[list[int]], out: list[int]) -> int:
    """Multiply-adds behind one output element of a conv or matmul op (0 for other ops)."""
    if len(shapes) < 2:
        return 0
    if op == "CONV_2D":  # weight OHWI
        return int(np.prod(shapes[1][1:]))
    if op == "DEPTHWISE_CONV_2D":  # weight 1HWC
        return int(np.prod(shapes[1][1:3]))
    if op == "FULLY_CONNECTED":  # weight [out, in]
        return shapes[1][-1]
    if op == "BATCH_MATMUL":  # out [..., M, N]; the adjoint flags are not exposed, so the
        a = shapes[0]  # left operand is [..., M, K] or, adjoint, [..., K, M]
        return a[-1] if a[-2] == out[-2] else a[-2]
    return 0


def machine_limits(threads: int = 2, repeats: int = 10) -> dict:
    """Best of ``repeats``: one-thread copies (read + write) and a 2048^3 fp32 GEMM (torch).

    Two copy sizes: 48 MiB, the size of NAFNet's largest activations (1024x1536x8 fp32), and
    1 GiB, beyond any cache; the faster one is the bandwidth the lower bounds use.
    """
    import torch

    torch.set_num_threads(threads)

    def best(fn) -> float:
        fn()  # first call pays page faults and lazy init
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def copy_rate(mib: int) -> float:  # numpy's copy: one thread, plain memcpy
        src = np.ones(mib * 2**18, np.float32)
        dst = np.zeros_like(src)
        return round(2 * mib * 2**20 / best(lambda: np.copyto(dst, src)) / 1e9, 2)

    rates = {"copy_48mib_gb_s": copy_rate(48), "copy_1gib_gb_s": copy_rate(1024)}
    a = torch.randn(2048, 2048)
    gemm_s = best(lambda: a @ a)
    return {**rates, "copy_gb_s": max(rates.values()),
            "gemm_gflop_s": round(2 * 2048**3 / gemm_s / 1e9, 1), "threads": threads}


def profile(path: str | Path, threads: int = 2, latency_s: float | None = None) -> dict:
    """Coverage, per-op-type traffic and arithmetic, and lower bounds against the machine."""
    limits = machine_limits(threads)
    by_type: dict[str, dict] = defaultdict(lambda: {"count": 0, "bytes": 0, "macs": 0})
    for row in op_costs(path):
        entry = by_type[row["op"]]
        entry["count"] += 1
        entry["bytes"] += row["bytes"]
        entry["macs"] += row["macs"]
    bw, peak = limits["copy_gb_s"] * 1e9, limits["gemm_gflop_s"] * 1e9
    table = []
    for op, e in sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"]):
        bound = max(e["bytes"] / bw, 2 * e["macs"] / peak)
        table.append({"op": op, **e, "mbytes": round(e["bytes"] / 2**20, 1),
                      "gflop": round(2 * e["macs"] / 1e9, 2), "lower_bound_s": round(bound, 4)})
    total_bytes = sum(e["bytes"] for e in by_type.values())
    total_flop = 2 * sum(e["macs"] for e in by_type.values())
    from export.runner import RUNTIMES, runtime_label

    coverage = {runtime_label(r): delegate_coverage(path, threads, r) for r in RUNTIMES}
    result = {"tflite": Path(path).name, "limits": limits, "coverage": coverage, "ops": table,
              "total_gb": round(total_bytes / 1e9, 2), "total_gflop": round(total_flop / 1e9, 1),
              "memory_bound_s": round(total_bytes / bw, 3),
              "compute_bound_s": round(total_flop / peak, 3)}
    if latency_s:
        result["latency_s"] = latency_s
        result["achieved_gb_s"] = round(total_bytes / latency_s / 1e9, 2)
        result["achieved_gflop_s"] = round(total_flop / latency_s / 1e9, 1)
    return result


def _op_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"


def format_profile(result: dict) -> str:
    """Markdown: machine limits, delegate coverage, and per op type traffic, FLOPs, bounds."""
    lim = result["limits"]
    lines = [f"Machine limits: one-thread numpy copy (read + write) "
             f"{lim['copy_48mib_gb_s']} GB/s at 48 MiB (the largest activation), "
             f"{lim['copy_1gib_gb_s']} GB/s at 1 GiB; torch fp32 GEMM, {lim['threads']} "
             f"threads, {lim['gemm_gflop_s']} GFLOP/s. Lower bounds use the faster copy rate.",
             *(f"XNNPACK in the {name}: {cov['partitions']} partition(s); ops outside the "
               f"delegate: {_op_counts(cov['not_delegated'])}."
               for name, cov in result["coverage"].items()),
             f"Whole model: {result['total_gb']} GB of tensor traffic, {result['total_gflop']} "
             f"GFLOP; lower bounds {result['memory_bound_s']} s (memory) and "
             f"{result['compute_bound_s']} s (compute).", "",
             "| op | count | MiB moved | GFLOP | lower bound s |", "|---|---|---|---|---|"]
    for r in result["ops"]:
        lines.append(f"| {r['op']} | {r['count']} | {r['mbytes']:.0f} | {r['gflop']:.2f} | "
                     f"{r['lower_bound_s']:.3f} |")
    if "latency_s" in result:
        lines.append("")
        lines.append(f"Measured {result['latency_s']:.3f} s: {result['achieved_gb_s']} GB/s and "
                     f"{result['achieved_gflop_s']} GFLOP/s achieved.")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "bokeh profile") -> int:
    import argparse

    from common.cli import positive_float, positive_int, run_command
    from export.runner import verify_tflite

    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"example:\n  {prog} --tflite build/export/bokeh_fp32.tflite"
                                )
    p.add_argument("--tflite", required=True)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--latency", type=positive_float,
                   help="measured median seconds, for achieved rates")
    args = p.parse_args(argv)

    def body() -> int:
        verify_tflite(args.tflite)
        print(format_profile(profile(args.tflite, args.threads, args.latency)))
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    raise SystemExit(main())
