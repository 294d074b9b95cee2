"""`make bench-peers`: our NAFNet TFLite against the one onnx2tf makes from the same ONNX.

onnx2tf pins TensorFlow 2.19, which cannot share an environment with onnx-tf's TF 2.15, so it
runs from its own virtual environment (``.venv-peers``, made by the Makefile) as a subprocess.
Its TFLite then runs on *our* interpreters (TF 2.15's and LiteRT), interleaved with ours and with
PyTorch eager on the same input and thread count, so each ratio compares converters on one
runtime, at one moment.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import read_json, write_json
from export.runner import RUNTIMES, runtime_label

ONNX2TF_VERSION = "1.29.24"
PAUSE_S = 0.5  # idle gap before each timed call (see validate.runtime.time_interleaved)


def convert_with_onnx2tf(onnx_path: Path, out_dir: Path, venv: Path) -> Path:
    """onnx2tf's float32 TFLite of ``onnx_path`` (reused while newer than the ONNX file)."""
    tflite = out_dir / f"{onnx_path.stem}_float32.tflite"
    if tflite.is_file() and tflite.stat().st_mtime > onnx_path.stat().st_mtime:
        return tflite
    exe = venv / "bin" / "onnx2tf"
    if not exe.is_file():
        raise UserError(f"{exe}: not found; `make bench-peers` creates {venv} with onnx2tf "
                        f"{ONNX2TF_VERSION}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    log = out_dir.with_suffix(".log")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"  onnx2tf {onnx_path} -> {out_dir}/ (minutes; log in {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run([str(exe), "-i", str(onnx_path), "-o", str(out_dir)],
                              stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode or not tflite.is_file():
        raise UserError(f"onnx2tf failed (exit {done.returncode}); see {log}")
    print(f"  ok onnx2tf {time.perf_counter() - start:.0f} s  {tflite}")
    return tflite


def _nhwc_runner(path: Path, threads: int, in_shape: list[int], out_shape: list[int],
                 runtime: str = "tensorflow"):
    """Our interpreter on any TFLite of the model, NHWC in and out whatever layout it uses.

    onnx2tf makes the input NHWC but may keep an NCHW output; a transpose outside the timed
    interpreter call would bill our side, so it is applied to the returned array only.
    """
    from export.runner import make_interpreter
    from validate.runtime import tflite_engine

    run = tflite_engine(path, threads, runtime=runtime)
    probe = make_interpreter(path, 1, xnnpack=False)
    want_in = [int(d) for d in probe.get_input_details()[0]["shape"]]
    want_out = [int(d) for d in probe.get_output_details()[0]["shape"]]
    n, h, w, c = in_shape
    if want_in not in (in_shape, [n, c, h, w]):
        raise UserError(f"{path}: input shape {want_in} is neither NHWC nor NCHW of {in_shape}")
    to_model = (lambda x: x) if want_in == in_shape else (
        lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    from_model = (lambda y: y) if want_out == out_shape else (lambda y: y.transpose(0, 2, 3, 1))
    return lambda x: from_model(run(to_model(x)))


def bench_peers(export: Path, peers: Path, venv: Path, threads: int, runs: int,
                baseline: Path | None = None) -> dict:
    from validate.parity import reference_model
    from validate.runtime import machine, time_interleaved, torch_engine

    manifest = read_json(export / "nafnet_fp32.manifest.json")
    shape = manifest["inputs"][0]["shape"]
    out_shape = manifest["outputs"][0]["shape"]
    theirs = convert_with_onnx2tf(export / "nafnet_sim.onnx", peers / "onnx2tf", venv)
    files = {"ours": export / "nafnet_fp32.tflite", f"onnx2tf {ONNX2TF_VERSION}": theirs}
    if baseline is not None:
        files["onnx-tf without rewrites"] = baseline
    labels = {(who, runtime): f"{who} ({path.name}), {runtime_label(runtime)}"
              for runtime in RUNTIMES for who, path in files.items()}
    engines = {"PyTorch eager": torch_engine(reference_model(manifest), threads)}
    for (who, runtime), label in labels.items():
        engines[label] = _nhwc_runner(files[who], threads, shape, out_shape, runtime)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    print(f"Timing {len(engines)} engines, {runs} interleaved rounds, {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, progress=lambda s: print(f"  {s}"),
                             pause_s=PAUSE_S)
    torch_s = stats["PyTorch eager"]
    rows = []
    for name, s in stats.items():
        rows.append({"engine": name, "median_s": s["median_s"], "p90_s": s["p90_s"],
                     "min_s": s["min_s"],
                     "vs_torch": s["median_s"] / torch_s["median_s"],
                     "max_abs_diff_vs_torch": float(np.abs(s["output"] - torch_s["output"]).max())})
    ratios = {}
    ours_key, theirs_key = list(files)[:2]
    for runtime in RUNTIMES:
        ours_s, theirs_s = stats[labels[ours_key, runtime]], stats[labels[theirs_key, runtime]]
        ratios[runtime_label(runtime)] = {
            "ours_vs_onnx2tf": ours_s["median_s"] / theirs_s["median_s"],
            "ours_vs_torch": ours_s["median_s"] / torch_s["median_s"],
            "onnx2tf_vs_ours_max_abs_diff": float(np.abs(theirs_s["output"]
                                                         - ours_s["output"]).max())}
    return {"shape": shape, "threads": threads, "runs": runs, "machine": machine(),
            "rows": rows, "ratios": ratios}


def format_peers(result: dict, command: str) -> str:
    h, w = result["shape"][1:3]
    m = result["machine"]
    lines = [f"## NAFNet {h}x{w}, fp32, {result['threads']} threads: peer converters", "",
             f"Command: `{command}`. Machine: {m['cpu']}, {m['cores']} cores, load average "
             f"{m['load_avg_1m']:.1f} at the end. Median of {result['runs']} interleaved runs "
             "after one warm-up, every TFLite file on each interpreter (XNNPACK on), "
             f"{PAUSE_S} s idle before each timed call.", "",
             "| engine | median s | p90 s | min s | time vs PyTorch | max abs diff vs PyTorch |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        diff = "-" if r["engine"] == "PyTorch eager" else f"{r['max_abs_diff_vs_torch']:.1e}"
        lines.append(f"| {r['engine']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
                     f"{r['min_s']:.3f} | {r['vs_torch']:.2f}x | {diff} |")
    lines.append("")
    for name, r in result["ratios"].items():
        lines.append(f"- {name}: ours / onnx2tf **{r['ours_vs_onnx2tf']:.2f}x** (target <= "
                     f"0.8x), ours / PyTorch eager **{r['ours_vs_torch']:.2f}x** (target <= "
                     f"0.3x); onnx2tf vs ours: max abs diff "
                     f"{r['onnx2tf_vs_ours_max_abs_diff']:.1e}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "bokeh peers") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"example:\n  {prog} --export-dir build/export")
    p.add_argument("--export-dir", "--export", dest="export_dir", default="build/export",
                   help="our export folder (%(default)s; --export is the old name)")
    p.add_argument("--peers", default="build/peers", help="peer outputs (%(default)s)")
    p.add_argument("--venv", default=".venv-peers", help="onnx2tf's environment (%(default)s)")
    p.add_argument("--baseline", help="also time this TFLite (e.g. one built without rewrites)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown to update")
    args = p.parse_args(argv)
    from validate.bench import publish_section

    def body() -> int:
        export = Path(args.export_dir)
        for name in ("nafnet_fp32.manifest.json", "nafnet_sim.onnx", "nafnet_fp32.tflite"):
            if not (export / name).is_file():
                raise UserError(f"{export / name}: no such file; run `make export` first")
        if args.baseline and not Path(args.baseline).is_file():
            raise UserError(f"{args.baseline}: no such TFLite file")
        result = bench_peers(export, Path(args.peers), Path(args.venv), args.threads, args.runs,
                             Path(args.baseline) if args.baseline else None)
        write_json(Path(args.peers) / "peers.json", result)
        given = sys.argv[1:] if argv is None else argv
        command = f"bokeh peers {' '.join(given)}" if given else "make bench-peers"
        publish_section(args.doc, "peers", format_peers(result, command))
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
