"""`validate`: checks that an exported model computes what the PyTorch model computes.

A thin layer over validate.parity, validate.runtime and validate.quality; parity exits 0
within tolerance, 1 outside it; every command exits 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="validate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    par = sub.add_parser(
        "parity", help="diff every exported stage against the PyTorch model",
        description="Run the PyTorch model and every exported stage whose artifact is present "
                    "(ONNX via onnxruntime, TF SavedModel, frozen graph, TFLite) on the same "
                    "inputs; print max/mean abs diff and PSNR per stage and input. Exit 0 "
                    "within tolerance, 1 outside it, 2 on bad input.")
    par.add_argument("--tflite", required=True, help="a .tflite written by bokeh-export")
    par.add_argument("--checkpoint", help="PyTorch weights (default: those in the manifest)")
    par.add_argument("--images", help="folder of photos (resized/cropped to the model's size); "
                                      "default: seeded random inputs")
    par.add_argument("--atol", type=float, help="max abs diff allowed at every stage "
                                                "(default: 1e-4, the manifest's for TFLite)")
    par.add_argument("--num-random", type=int, default=2,
                     help="random inputs when no --images (default %(default)s)")
    par.add_argument("--tflite-only", action="store_true",
                     help="check the TFLite file alone, not the earlier stages")
    par.add_argument("--json", help="also write the full result to this JSON file")
    qual = sub.add_parser(
        "quality", help="PSNR / SSIM / LPIPS on a paired folder, like the paper's tables",
        description="Score the PyTorch model, each TFLite variant, the input itself and a "
                    "classical thin-lens render against the bokeh photos of a paired folder "
                    "(EBB! layout: "
                    "DIR/original/NAME.jpg and DIR/bokeh/NAME.jpg). Prints a Markdown table "
                    "Model | PSNR | SSIM | LPIPS. Exit 0, or 2 on bad input.")
    qual.add_argument("--data", required=True, help="paired folder (original/ and bokeh/)")
    qual.add_argument("--tflite", action="append", default=[],
                      help="fused bokeh_*.tflite to score (repeat for several variants); the "
                           "PyTorch row then uses the first one's weights and size")
    qual.add_argument("--checkpoint", help="NAFNet checkpoint for the PyTorch row")
    qual.add_argument("--dpt-weights", help="MiDaS DPT file, with --checkpoint and no --tflite")
    qual.add_argument("--allow-random-dpt", action="store_true",
                      help="with --checkpoint and no --dpt-weights: random depth (meaningless)")
    qual.add_argument("--lpips-weights", nargs="+", metavar="FILE",
                      help="local LPIPS weights: torchvision AlexNet (features.*) and the LPIPS "
                           "v0.1 heads (lin0-4), one file or several; without: LPIPS n/a")
    qual.add_argument("--limit", type=int, help="score only the first N pairs")
    qual.add_argument("--json", help="also write the full result (per pair) to this JSON file")

    rt = sub.add_parser(
        "runtime", help="latency and peak memory of every engine of an export",
        description="Time PyTorch eager, onnxruntime and every TFLite variant of the export that "
                    "FILE belongs to (threads, XNNPACK on/off, TF 2.15 interpreter and LiteRT), "
                    "interleaved on the same "
                    "input: warm-up, N runs, median, p90, min. Peak memory is measured per "
                    "engine in a fresh process. Writes a table, JSON and a PNG bar chart.")
    rt.add_argument("--tflite", required=True,
                    help="any .tflite written by bokeh-export (its manifest names the model)")
    rt.add_argument("--threads", default="1,2,4", help="thread counts (default %(default)s)")
    rt.add_argument("--xnnpack", default="on,off",
                    help="TFLite with the XNNPACK delegate on, off or both (default %(default)s)")
    rt.add_argument("--runtime", default="tensorflow,litert",
                    help="TFLite interpreters: tensorflow (TF 2.15's own), litert (the "
                         "ai-edge-litert package, newer XNNPACK) or both (default %(default)s)")
    rt.add_argument("--runs", type=int, default=5, help="timed runs per engine (%(default)s)")
    rt.add_argument("--warmup", type=int, default=1, help="untimed runs first (%(default)s)")
    rt.add_argument("--no-memory", action="store_true",
                    help="skip the per-engine peak-memory subprocesses")
    rt.add_argument("--json", help="result file (default: runtime.json beside the .tflite)")
    rt.add_argument("--png", help="bar chart (default: runtime.png beside the .tflite)")
    return p


def _int_list(text: str, what: str) -> tuple[int, ...]:
    from common.errors import UserError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what} needs positive integers, got {text!r}")
    return values


def _choices(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of ``allowed`` names, in order, without repeats."""
    from common.errors import UserError

    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names):
        raise UserError(f"--{flag} takes {' or '.join(allowed)} (comma-separated), got {text!r}")
    return tuple(dict.fromkeys(names))


def runtime_main(args: argparse.Namespace) -> int:
    from common.errors import UserError
    from common.files import ensure_writable_dir, write_json
    from export.tflite_stage import RUNTIMES
    from validate.runtime import format_runtime_table, plot_runtime, run_runtime

    try:
        threads = _int_list(args.threads, "threads")
        modes = tuple(n == "on" for n in _choices(args.xnnpack, "xnnpack", ("on", "off")))
        runtimes = _choices(args.runtime, "runtime", RUNTIMES)
        if args.runs < 1 or args.warmup < 0:
            raise UserError("--runs must be >= 1 and --warmup >= 0")
        folder = Path(args.tflite).resolve().parent
        json_path = Path(args.json) if args.json else folder / "runtime.json"
        png_path = Path(args.png) if args.png else folder / "runtime.png"
        for path in (json_path, png_path):
            ensure_writable_dir(path.resolve().parent)
        print(f"Runtime of the export of {args.tflite}:")
        result = run_runtime(args.tflite, threads, modes, args.runs, args.warmup,
                             memory=not args.no_memory, runtimes=runtimes)
    except UserError as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    print(format_runtime_table(result))
    write_json(json_path, result)
    plot_runtime(result, png_path)
    print(f"Wrote {json_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    if args.command == "quality":
        return quality_main(args)
    if args.command == "runtime":
        return runtime_main(args)
    from common.errors import CheckpointError, UserError
    from common.files import write_json
    from export.pipeline import record_parity
    from validate.parity import format_table, read_manifest, run_parity

    try:
        if args.json:
            from common.files import ensure_writable_dir

            ensure_writable_dir(Path(args.json).resolve().parent)
        print(f"Parity of {args.tflite} against PyTorch:")
        result = run_parity(args.tflite, args.checkpoint, args.images, args.atol,
                            args.num_random, tflite_only=args.tflite_only)
    except (UserError, CheckpointError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    manifest, folder = read_manifest(args.tflite)
    if (folder / manifest.get("report", "")).is_file() and not args.checkpoint:
        record_parity(folder / manifest["report"], result["tflite"], result)
    return 0 if result["passed"] else 1


def quality_main(args: argparse.Namespace) -> int:
    from common.errors import CheckpointError, UserError
    from common.files import ensure_writable_dir, write_json
    from validate.quality import evaluate, format_table

    try:
        if args.json:
            ensure_writable_dir(Path(args.json).resolve().parent)
        result = evaluate(args.data, args.tflite, args.checkpoint, args.dpt_weights,
                          args.allow_random_dpt, args.limit, args.lpips_weights)
    except (UserError, CheckpointError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
