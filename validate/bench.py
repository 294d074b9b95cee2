"""`make bench`: NAFNet at the export size, PyTorch eager vs onnxruntime vs TFLite, side by side.

Exports first if the folder has no export of that size, then times the engines interleaved on the
same input with the same thread count and writes the table, the machine and the command into a
marked section of docs/benchmarks.md (other sections of that file are left as they are). The
depth-net table (validate/depth_bench.py; alone: --depth-table) fuses every official depth net.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from common.cli import positive_int, run_command
from common.files import read_json, write_json
from export.runner import RUNTIMES, runtime_label
from validate.doc import cpu_name, publish_section, write_photos
from validate.runtime import Runner, onnx_engine, tflite_engine, time_interleaved, torch_engine


def ensure_export(out: Path, height: int, width: int) -> dict:
    """The fused export's fp32 manifest at this size, exporting first when there is none."""
    from export.pipeline import ExportOptions, export

    manifest_path = out / "bokeh_fp32.manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else None
    if manifest is None or (manifest["height"], manifest["width"]) != (height, width):
        print(f"No fused {height}x{width} export in {out}: exporting first (replacing any).")
        export(ExportOptions(out, height, width, overwrite=True))
        manifest = read_json(manifest_path)
    return manifest


def _weights_line(manifest: dict) -> str:
    def describe(record: dict | None) -> str:
        if not record:
            return "none"
        return record["checkpoint"] or f"random (seed {record['random_seed']})"

    depth = manifest.get("depth") or manifest.get("dpt")
    name = depth.get("name", "DPT") if depth else "depth net"
    return f"NAFNet weights: {describe(manifest['weights'])}; {name} weights: {describe(depth)}"


def _timing_table(stats: dict[str, dict], ref_name: str, diffs: bool) -> list[str]:
    ref = stats[ref_name]
    rows = ["| engine | median s | min s | p90 s | time vs PyTorch |"
            + (" max abs diff vs PyTorch |" if diffs else ""),
            "|---|---|---|---|---|" + ("---|" if diffs else "")]
    for name, s in stats.items():
        row = (f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['p90_s']:.3f} | "
               f"{s['median_s'] / ref['median_s']:.2f}x |")
        if diffs:
            diff = float(np.abs(s["output"] - ref["output"]).max())
            row += f" {'-' if name == ref_name else f'{diff:.1e}'} |"
        rows.append(row)
    return rows


def _header(title: str, command: str, manifest: dict, runs: int) -> list[str]:
    return [f"## {title}", "",
            f"Command: `{command}`. Machine: {cpu_name()}, {os.cpu_count()} cores. "
            f"{_weights_line(manifest)}. Median of {runs} interleaved runs after one warm-up.",
            ""]


def bench_nafnet(out: Path, manifest: dict, threads: int, runs: int, command: str) -> str:
    from models.reference import reference_model

    height, width = manifest["height"], manifest["width"]
    engines = {
        "PyTorch eager": torch_engine(reference_model(manifest), threads),
        "onnxruntime (nafnet_mobile.onnx)": onnx_engine(out / "nafnet_mobile.onnx", threads),
    }
    for same_file in tflite_engines(out, "nafnet", ("fp32",), threads).values():
        engines.update(same_file)
    x = np.random.default_rng(0).random((1, height, width, 4), dtype=np.float32)
    print(f"NAFNet: {len(engines)} engines, {runs} interleaved rounds, {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, progress=lambda s: print(f"  {s}"))
    return "\n".join([*_header(f"NAFNet {height}x{width}, fp32, {threads} threads", command,
                                manifest, runs),
                      *_timing_table(stats, "PyTorch eager", diffs=True)])


def tflite_engines(out: Path, model: str, variants: tuple[str, ...],
                   threads: int) -> dict[str, dict[str, Runner]]:
    """Per exported variant's file name: that file in each TFLite interpreter, XNNPACK on
    (variants not exported are left out)."""
    by_file = {}
    for variant in variants:
        path = out / f"{model}_{variant}.tflite"
        if path.is_file():
            by_file[path.name] = {
                f"TFLite {variant} + XNNPACK, {runtime_label(runtime)} ({path.name})":
                    tflite_engine(path, threads, runtime=runtime) for runtime in RUNTIMES}
    return by_file


def bench_fused(out: Path, manifest: dict, threads: int, runs: int, command: str,
                photos: Path | None) -> str:
    from models.reference import BokehOutput, reference_pipeline
    from validate.parity import run_parity

    height, width = manifest["height"], manifest["width"]
    engines = {"PyTorch reference pipeline (DPT + NAFNet)": torch_engine(
        BokehOutput(reference_pipeline(manifest)), threads)}
    by_file = tflite_engines(out, "bokeh", ("fp32", "fp16"), threads)
    for same_file in by_file.values():
        engines.update(same_file)
    x = np.random.default_rng(0).random((1, height, width, 3), dtype=np.float32)
    print(f"Fused: {len(engines)} engines, {runs} interleaved rounds, {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, progress=lambda s: print(f"  {s}"))
    lines = [*_header(f"Fused photo -> bokeh model {height}x{width}, {threads} threads",
                      command, manifest, runs),
             *_timing_table(stats, next(iter(engines)), diffs=False),
             "", _interpreters_agree(stats, [list(f) for f in by_file.values()])]
    if photos is not None:
        names = ", ".join(p.stem for p in sorted(photos.iterdir()))
        lines += ["", f"Parity on real photos ({names}; scikit-image), TFLite vs the PyTorch "
                      "reference pipeline:", "",
                  "| model | output | worst max abs diff | worst PSNR dB | tolerance | verdict |",
                  "|---|---|---|---|---|---|"]
        for variant in ("fp32", "fp16"):
            path = out / f"bokeh_{variant}.tflite"
            if not path.is_file():
                continue
            print(f"Parity of {path.name} on {photos} ...")
            result = run_parity(path, images=photos, tflite_only=True, echo=lambda s: None)
            for stage in result["stages"]:
                for name, tol in stage["tolerance"].items():
                    rows = [r for r in stage["inputs"] if r["output"] == name]
                    worst = max(r["max_abs_diff"] for r in rows)
                    psnr = min(r["psnr_db"] for r in rows)
                    tol_text = ", ".join(f"{k} {v:g}" for k, v in tol.items())
                    label = stage["stage"].replace("tflite-", "")
                    lines.append(f"| {label} | {name} | {worst:.1e} | {psnr:.1f} | {tol_text} | "
                                 f"{'pass' if stage['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def _interpreters_agree(stats: dict[str, dict], same_file: list[list[str]]) -> str:
    """One line: the largest difference between the interpreters on the same file and input."""
    diffs = [float(np.abs(stats[labels[0]]["output"] - stats[other]["output"]).max())
             for labels in same_file for other in labels[1:]]
    if not diffs:
        return "Only one TFLite interpreter was timed."
    return (f"The interpreters on the same file and input (first output): max abs diff "
            f"{max(diffs):.1e}.")


def main(argv: list[str] | None = None, prog: str = "bokeh bench") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  {prog}\n  {prog} --height 512 --width 768 --runs 3")
    p.add_argument("--export-dir", "--out", dest="export_dir", default="build/export",
                   help="export folder, made if missing (%(default)s; --out is the old name)")
    p.add_argument("--height", type=positive_int, default=1024)
    p.add_argument("--width", type=positive_int, default=1536)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--no-photos", action="store_true", help="skip the real-photo parity tables")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update")
    p.add_argument("--depth-table", action="store_true",
                   help="only the depth-net table (validate/depth_bench.py): every official "
                        "depth net fused at this size, one export each under --depth-dir")
    p.add_argument("--no-depth-table", action="store_true",
                   help="skip the depth-net table (its three exports take a while)")
    p.add_argument("--depth-dir", default="build/bench-depth",
                   help="exports of the depth-net table, one folder per net (%(default)s)")
    p.add_argument("--depth-runs", type=positive_int, default=1,
                   help="timed rounds of the depth-net table (%(default)s)")
    args = p.parse_args(argv)
    out = Path(args.export_dir)
    command = (f"make bench (bokeh bench --height {args.height} --width "
               f"{args.width} --threads {args.threads} --runs {args.runs})")
    depth_command = (f"bokeh bench --depth-table --height {args.height} --width {args.width} "
                     f"--threads {args.threads} --depth-runs {args.depth_runs}")

    def body() -> int:
        from validate import depth_bench

        photos = None if args.no_photos else write_photos(out.parent / "bench_photos")
        sections = {}
        if not args.depth_table:
            manifest = ensure_export(out, args.height, args.width)
            sections["nafnet"] = bench_nafnet(out, manifest, args.threads, args.runs, command)
            sections["fused"] = bench_fused(out, manifest, args.threads, args.runs, command,
                                            photos)
        if args.depth_table or not args.no_depth_table:
            result = depth_bench.measure(Path(args.depth_dir), args.height, args.width,
                                         args.threads, args.depth_runs, photos)
            sections["depth"] = depth_bench.markdown(result, depth_command)
            write_json(Path(args.depth_dir) / "depth_table.json", result)
        for key, section in sections.items():
            publish_section(args.doc, key, section)
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
