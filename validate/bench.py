"""`make bench`: NAFNet at the export size, PyTorch eager vs onnxruntime vs TFLite, side by side.

Exports first if the folder has no export of that size, then times the engines interleaved on the
same input with the same thread count and writes the table, the machine and the command into a
marked section of docs/benchmarks.md (other sections of that file are left as they are).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np

from export.io import UserError, read_json, write_bytes
from validate.runtime import onnx_engine, tflite_engine, time_interleaved, torch_engine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def update_section(doc: Path, key: str, body: str) -> None:
    """Replace (or append) the section between <!-- bench:key --> markers."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    write_bytes(doc, text.encode())


def bench_nafnet(out: Path, height: int, width: int, threads: int, runs: int) -> str:
    from export.pipeline import export
    from validate.parity import reference_model

    manifest_path = out / "nafnet_fp32.manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else None
    if manifest is None or (manifest["height"], manifest["width"]) != (height, width):
        print(f"No {height}x{width} export in {out}: exporting first.")
        export(out, height, width, fuse=False, variants=("fp32",))
        manifest = read_json(manifest_path)
    model = reference_model(manifest)
    engines = {
        "PyTorch eager": torch_engine(model, threads),
        "onnxruntime (nafnet_mobile.onnx)": onnx_engine(out / "nafnet_mobile.onnx", threads),
        "TFLite fp32 + XNNPACK (nafnet_fp32.tflite)": tflite_engine(
            out / "nafnet_fp32.tflite", threads),
    }
    x = np.random.default_rng(0).random((1, height, width, 4), dtype=np.float32)
    print(f"Timing {len(engines)} engines, {runs} interleaved rounds, {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, progress=lambda s: print(f"  {s}"))
    ref_name = "PyTorch eager"
    ref = stats[ref_name]
    rows = []
    for name, s in stats.items():
        diff = float(np.abs(s["output"] - ref["output"]).max())
        rows.append(f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['p90_s']:.3f} | "
                    f"{s['median_s'] / ref['median_s']:.2f}x | "
                    f"{'-' if name == ref_name else f'{diff:.1e}'} |")
    seed = manifest["weights"]["random_seed"]
    weights = manifest["weights"]["checkpoint"] or f"random (seed {seed})"
    return "\n".join([
        f"## NAFNet {height}x{width}, fp32, {threads} threads",
        "",
        f"Command: `make bench` (`python -m validate.bench --height {height} --width {width} "
        f"--threads {threads} --runs {runs}`). Machine: {cpu_name()}, {os.cpu_count()} cores. "
        f"Weights: {weights}. Median of {runs} interleaved runs after one warm-up.",
        "",
        "| engine | median s | min s | p90 s | time vs PyTorch | max abs diff vs PyTorch |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m validate.bench", description=__doc__)
    p.add_argument("--out", default="build/export", help="export folder (%(default)s)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update")
    args = p.parse_args(argv)
    try:
        section = bench_nafnet(Path(args.out), args.height, args.width, args.threads, args.runs)
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(section)
    update_section(Path(args.doc), "nafnet", section)
    print(f"Updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
