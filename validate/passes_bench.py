"""Each export rewrite pass measured: TFLite built with the first k passes, k = 0..all.

Every variant goes from the same simplified ONNX through onnx-tf, the frozen NHWC graph and the
TFLite converter (the export's own stage functions), so the only difference between neighbours
is one pass. The variants are then timed interleaved on one input, checked against PyTorch, and
their op counts and XNNPACK coverage reported.

    python -m validate.passes_bench --export build/export --out build/passes --doc FILE
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import onnx

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import check_writable_file, read_json, write_json


def build_with_passes(sim_onnx: Path, passes, stem: str, folder: Path,
                      input_shape_nhwc: tuple[int, ...]) -> Path:
    """``folder/STEM.tflite``: the fp32 TFLite of ``sim_onnx`` rewritten with ``passes``,
    through the export's own stages (onnx-tf, the frozen NHWC graph, the converter); cached on
    disk."""
    from export import tf_stages, tflite_stage

    dest = folder / f"{stem}.tflite"
    if dest.is_file():
        return dest
    model = onnx.load(str(sim_onnx))
    for rewrite_pass in passes:
        model, _ = rewrite_pass(model)
    onnx.save(model, str(folder / f"{stem}.onnx"))
    saved = tf_stages.to_tensorflow(folder / f"{stem}.onnx", folder / f"{stem}_savedmodel")
    fn = tf_stages.nchw_to_nhwc_function(saved, input_shape_nhwc)
    frozen, spec = tf_stages.freeze(fn, folder / f"{stem}.pb")
    return tflite_stage.to_tflite(frozen, spec, dest)


def build_prefix(sim_onnx: Path, k: int, folder: Path, input_shape_nhwc: tuple[int, ...]
                 ) -> Path:
    """The fp32 TFLite of ``sim_onnx`` rewritten with the first ``k`` passes (cached on disk)."""
    from export.rewrites import PASSES

    return build_with_passes(sim_onnx, PASSES[:k], f"passes_{k:02d}", folder, input_shape_nhwc)


def main(argv: list[str] | None = None, prog: str = "bokeh passes") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"example:\n  {prog} --export-dir build/export")
    p.add_argument("--export-dir", "--export", dest="export_dir", default="build/export",
                   help="export folder (%(default)s; --export is the old name)")
    p.add_argument("--out", default="build/passes", help="where variants go (%(default)s)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--build-only", action="store_true", help="build the variants, time nothing")
    p.add_argument("--json", help="result file (default: OUT/passes.json)")
    args = p.parse_args(argv)
    return run_command(prog, lambda: _run(args))


def _run(args) -> int:
    from export.rewrites import PASSES
    from validate.profile import delegate_coverage
    from validate.runtime import tflite_engine, time_interleaved, torch_engine

    manifest = read_json(Path(args.export_dir) / "nafnet_fp32.manifest.json")
    sim = Path(args.export_dir) / "nafnet_sim.onnx"
    if not sim.is_file():
        raise UserError(f"{sim}: no such file; run the export first")
    if args.json:
        check_writable_file(args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(manifest["inputs"][0]["shape"])
    names = ["none (onnxsim output)"] + [f"+ {f.__name__}" for f in PASSES]
    paths = []
    for k in range(len(PASSES) + 1):
        print(f"  building {k}: {names[k]}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            paths.append(build_prefix(sim, k, out, shape))
    if args.build_only:
        return 0
    from models.reference import reference_model

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    engines = {"PyTorch eager": torch_engine(reference_model(manifest), args.threads)}
    engines.update({names[k]: tflite_engine(path, args.threads) for k, path in enumerate(paths)})
    stats = time_interleaved(engines, x, runs=args.runs, progress=lambda s: print(f"  {s}"),
                             pause_s=0.5)
    ref = stats["PyTorch eager"]
    rows = []
    for k, path in enumerate(paths):
        s = stats[names[k]]
        from export.tflite_info import inspect_tflite

        info = inspect_tflite(path)
        cov = delegate_coverage(path, args.threads)
        rows.append({"passes": k, "name": names[k], "median_s": s["median_s"],
                     "min_s": s["min_s"], "ops": sum(info.op_histogram.values()),
                     "transposes": info.op_histogram.get("TRANSPOSE", 0),
                     "partitions": cov["partitions"], "not_delegated": cov["not_delegated"],
                     "max_abs_diff": float(np.abs(s["output"] - ref["output"]).max())})
    result = {"threads": args.threads, "runs": args.runs, "torch_median_s": ref["median_s"],
              "shape": list(shape), "rows": rows}
    write_json(args.json or out / "passes.json", result)
    print(format_rows(result))
    return 0


def format_rows(result: dict) -> str:
    lines = [f"PyTorch eager: {result['torch_median_s']:.3f} s median",
             "| passes applied | median s | min s | ops | TRANSPOSE | XNNPACK partitions | "
             "outside XNNPACK | max abs diff vs PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        outside = ", ".join(f"{k} {v}" for k, v in r["not_delegated"].items()) or "none"
        lines.append(f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['ops']} | "
                     f"{r['transposes']} | {r['partitions']} | {outside} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
