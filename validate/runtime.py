"""Side-by-side latency: engines built with the same thread count, timed interleaved.

Interleaving (engine A, B, C, then A, B, C again ...) spreads any slow phase of the machine over
every engine alike, so the ratios between medians are fair even when absolute numbers drift.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.runner import RUNTIMES, TFLiteRunner, runtime_label

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


def tflite_engine(path, threads: int, xnnpack: bool = True, runtime: str = "tensorflow") -> Runner:
    """The model's first output, through the one TFLite runner (export/runner.py); a controls
    model (photo, focus, strength) runs at its default controls."""
    from models.pipeline import CONTROLS

    runner = TFLiteRunner(path, threads, xnnpack, runtime)
    first = runner.outputs[0]["name"]
    controls = {d["name"]: np.full(d["shape"], CONTROLS[d["name"]][1], np.float32)
                for d in runner.inputs if d["name"] in CONTROLS}
    if controls:
        (photo,) = (d["name"] for d in runner.inputs if d["name"] not in CONTROLS)
        return lambda x: runner(**{photo: x, **controls})[first]
    return lambda x: runner(x)[first]


def time_interleaved(engines: dict[str, Runner], x: np.ndarray, runs: int = 5,
                     warmup: int = 1, progress: Callable[[str], None] | None = None,
                     pause_s: float = 0.0) -> dict[str, dict]:
    """Warm each engine up, then time ``runs`` rounds of one call per engine; per-engine stats.

    ``pause_s`` sleeps before each timed call: the previous engine's worker threads (OpenMP,
    pthreadpool) spin for a while after it returns and would steal the next engine's cores.
    """
    outputs = {}
    for name, run in engines.items():
        for _ in range(warmup):
            outputs[name] = np.array(run(x))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(runs):
        for name, run in engines.items():
            if pause_s:
                time.sleep(pause_s)
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


# --- `validate runtime`: every engine of one export, latency and peak memory ---------------------

TFLITE_THREADS = (1, 2, 4)


@dataclass(frozen=True)
class EngineSpec:
    """One engine to time: plain data, so a fresh process can rebuild it to measure memory."""

    label: str
    kind: str  # "torch", "onnxruntime" or "tflite"
    threads: int
    path: str = ""  # artifact for onnxruntime / tflite
    xnnpack: bool = True
    variant: str = ""
    runtime: str = "tensorflow"  # TFLite interpreter: export.runner.RUNTIMES

    def to_json(self) -> dict:
        return asdict(self)


def read_export(tflite: str | Path) -> tuple[dict, Path]:
    """The manifest beside ``tflite`` (validated by validate.parity) and its folder."""
    from export.manifest import read_manifest

    return read_manifest(tflite)


def sibling_tflites(manifest: dict, folder: Path) -> list[tuple[str, Path]]:
    """(variant, path) of every .tflite in the folder exported from the same model and size."""
    found = []
    for path in sorted(folder.glob("*.manifest.json")):
        other = json.loads(path.read_text())
        tflite = folder / other.get("tflite", "")
        same = all(other.get(k) == manifest.get(k) for k in ("model", "height", "width"))
        if same and tflite.is_file() and other.get("inputs") == manifest["inputs"]:
            found.append((other.get("variant", tflite.stem), tflite))
    return found


def plan_engines(manifest: dict, folder: Path, threads: tuple[int, ...] = TFLITE_THREADS,
                 xnnpack: tuple[bool, ...] = (True, False),
                 runtimes: tuple[str, ...] = RUNTIMES) -> list[EngineSpec]:
    """PyTorch eager and onnxruntime where the export has them, then every TFLite variant in
    every interpreter."""
    specs = []
    name = manifest["model"]
    for t in threads:
        specs.append(EngineSpec(f"PyTorch eager ({name}), {t} thr", "torch", t))
    onnx_stage = _whole_model_onnx(manifest, folder)
    if onnx_stage is not None:
        for t in threads:
            specs.append(EngineSpec(f"onnxruntime ({onnx_stage.name}), {t} thr", "onnxruntime", t,
                                    str(onnx_stage)))
    for variant, path in sibling_tflites(manifest, folder):
        for runtime in runtimes:
            for on in xnnpack:
                for t in threads:
                    specs.append(EngineSpec(
                        f"TFLite {path.name}, {runtime_label(runtime)}, {t} thr, XNNPACK "
                        f"{'on' if on else 'off'}", "tflite", t, str(path), on, variant, runtime))
    return specs


def _whole_model_onnx(manifest: dict, folder: Path) -> Path | None:
    """The last ONNX stage if it takes the model's whole input (NCHW of the NHWC input)."""
    import onnx

    onnx_stages = [s for s in manifest["stages"] if s["engine"] == "onnx"
                   and (folder / s["path"]).is_file()]
    if not onnx_stages:
        return None
    path = folder / onnx_stages[-1]["path"]
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    n, h, w, c = manifest["inputs"][0]["shape"]
    return path if len(graph.input) == 1 and dims == [n, c, h, w] else None


def build_engine(spec: EngineSpec, manifest: dict) -> Runner:
    """Turn a spec into a callable taking the model's NHWC input."""
    if spec.kind == "torch":
        return _torch_reference(manifest, spec.threads)
    if spec.kind == "onnxruntime":
        return onnx_engine(spec.path, spec.threads)
    if spec.kind == "tflite":
        return tflite_engine(spec.path, spec.threads, spec.xnnpack, spec.runtime)
    raise ValueError(f"unknown engine kind {spec.kind!r}")


def _torch_reference(manifest: dict, threads: int) -> Runner:
    """PyTorch eager, with its thread count set on every call (torch's is process-wide).

    NAFNet alone: the generator. The fused model (kind "bokeh"): the PyTorch reference pipeline
    (depth net, mask, NAFNet) from ``models.reference``, timed up to its bokeh output.
    """
    from models.reference import BokehOutput, reference_model, reference_pipeline

    if manifest["model"] == "nafnet":
        model = reference_model(manifest)
    elif manifest["model"] == "bokeh":
        model = BokehOutput(reference_pipeline(manifest))
    else:
        from common.errors import UserError

        raise UserError(f"no PyTorch reference for model kind {manifest['model']!r}")
    run = torch_engine(model, threads)

    def timed(x: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        return run(x)

    return timed


def model_input(manifest: dict, seed: int = 0) -> np.ndarray:
    """Seeded uniform [0, 1) input of the manifest's first input shape."""
    shape = manifest["inputs"][0]["shape"]
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def probe_memory(spec: EngineSpec, manifest: dict) -> dict:
    """In this process: peak RSS added by building ``spec`` and running it once, in MiB.

    After the imports and the input exist, the kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs`` = 5), so VmHWM afterwards minus VmRSS at the reset is what the
    engine itself needed at its peak: weights, arena, intermediate tensors, thread stacks.
    """
    import onnxruntime  # noqa: F401  every probe pays the same imports before the reset

    from common.quiet import quiet_tensorflow

    quiet_tensorflow()

    x = model_input(manifest)
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm_kib("VmRSS")
    run = build_engine(spec, manifest)
    run(x)
    return {"peak_mib": round((_vm_kib("VmHWM") - base) / 1024, 1),
            "baseline_rss_mib": round(base / 1024, 1)}


def measure_memory(spec: EngineSpec, tflite: Path, timeout: float = 900) -> dict:
    """Run probe_memory in a fresh Python so no engine sees another's allocations."""
    cmd = [sys.executable, "-m", "validate.runtime", "--probe", json.dumps(spec.to_json()),
           "--tflite", str(tflite)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_mib": None, "error": tail[:200]}
    return json.loads(lines[-1])


def run_runtime(tflite: str | Path, threads: tuple[int, ...] = TFLITE_THREADS,
                xnnpack: tuple[bool, ...] = (True, False), runs: int = 5, warmup: int = 1,
                memory: bool = True, echo: Callable[[str], None] = print,
                pause_s: float = 0.5, runtimes: tuple[str, ...] = RUNTIMES) -> dict:
    """Time every engine of an export interleaved, and measure each one's peak memory."""
    tflite = Path(tflite)
    manifest, folder = read_export(tflite)
    specs = plan_engines(manifest, folder, threads, xnnpack, runtimes)
    x = model_input(manifest)
    engines: dict[str, Runner] = {}
    skipped = {}
    for spec in specs:
        try:
            engines[spec.label] = build_engine(spec, manifest)
        except Exception as exc:  # one engine that cannot run must not hide the others
            skipped[spec.label] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            echo(f"  skip {spec.label}: {skipped[spec.label]}")
    echo(f"Timing {len(engines)} engines: {warmup} warm-up, {runs} interleaved rounds ...")
    stats = time_interleaved(engines, x, runs=runs, warmup=warmup,
                             progress=lambda s: echo(f"  {s}"), pause_s=pause_s)
    reference = next((s["output"] for k, s in stats.items() if k.startswith("PyTorch")), None)
    rows = []
    for spec in specs:
        if spec.label not in stats:
            continue
        s = stats[spec.label]
        row = {**spec.to_json(), **{k: v for k, v in s.items() if k != "output"}}
        if reference is not None and s["output"].shape == reference.shape:
            row["max_abs_diff_vs_torch"] = float(np.abs(s["output"] - reference).max())
        if memory:
            echo(f"  memory: {spec.label}")
            row.update(measure_memory(spec, tflite))
        rows.append(row)
    return {"model": manifest["model"], "tflite": tflite.name, "input_shape":
            manifest["inputs"][0]["shape"], "runs": runs, "warmup": warmup, "pause_s": pause_s,
            "machine": machine(), "engines": rows, "skipped": skipped}


def machine() -> dict:
    import platform

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def format_runtime_table(result: dict) -> str:
    """Markdown table: one row per engine."""
    lines = ["| engine | median s | p90 s | min s | peak MiB | max abs diff vs PyTorch |",
             "|---|---|---|---|---|---|"]
    for r in result["engines"]:
        mem = r.get("peak_mib")
        diff = r.get("max_abs_diff_vs_torch")
        lines.append(f"| {r['label']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
                     f"{r['min_s']:.3f} | {'-' if mem is None else f'{mem:.0f}'} | "
                     f"{'-' if diff is None or r['kind'] == 'torch' else f'{diff:.1e}'} |")
    return "\n".join(lines)


def plot_runtime(result: dict, dest: str | Path) -> Path:
    """Horizontal bars of the median latency (whiskers to p90), one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["engines"]
    colors = {"torch": "#c44e52", "onnxruntime": "#8172b2", "tflite": "#4c72b0",
              "litert": "#55a868"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    ys = np.arange(len(rows))[::-1]
    medians = [r["median_s"] for r in rows]
    errs = [max(r["p90_s"] - r["median_s"], 0.0) for r in rows]
    bar_colors = [colors["litert" if r.get("runtime") == "litert" else r["kind"]]
                  if r.get("xnnpack", True) else "#93a9c9" for r in rows]
    ax.barh(ys, medians, xerr=[[0.0] * len(errs), errs], color=bar_colors, capsize=2)
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=7)
    ax.set_xlabel("median latency, s (whisker to p90; blue: TF interpreter, green: LiteRT, "
                  "pale: XNNPACK off)")
    shape = "x".join(map(str, result["input_shape"]))
    ax.set_title(f"{result['model']} {shape}: {result['runs']} interleaved runs", fontsize=9)
    for y, m in zip(ys, medians, strict=True):
        ax.text(m, y, f" {m:.2f}", va="center", fontsize=6)
    fig.tight_layout()
    dest = Path(dest)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def _probe_main(argv: list[str]) -> int:
    """``python -m validate.runtime --probe SPEC --tflite FILE``: one engine's peak memory."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m validate.runtime")
    p.add_argument("--probe", required=True, help="EngineSpec as JSON")
    p.add_argument("--tflite", required=True)
    args = p.parse_args(argv)
    manifest, _ = read_export(args.tflite)
    result = probe_memory(EngineSpec(**json.loads(args.probe)), manifest)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
