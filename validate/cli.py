"""`validate <verb>` (also `bokeh <verb>`): does an exported model compute what the PyTorch
model computes, how fast, and how good are its renders.

parity exits 0 within tolerance, 1 outside it; every command exits 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common.cli import name_list, non_negative_int, positive_float, positive_int, run_command
from common.errors import UserError
from export.arith import POLICIES

VERBS = {  # verb -> "module:function" taking (argv, prog)
    "parity": "validate.cli:parity_main",
    "runtime": "validate.cli:runtime_main",
    "quality": "validate.cli:quality_main",
    "bench": "validate.bench:main",
    "peers": "validate.peers:main",
    "passes": "validate.passes_bench:main",
    "profile": "validate.profile:main",
    "quant-report": "validate.quant_report:main",
}


def _parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="examples:\n" + examples)


def parity_parser(prog: str = "validate parity") -> argparse.ArgumentParser:
    par = _parser(
        prog, "Run the PyTorch model and every exported stage whose artifact is present (ONNX "
              "via onnxruntime, TF SavedModel, frozen graph, TFLite) on the same inputs; print "
              "max/mean abs diff and PSNR per stage and input. Exit 0 within tolerance, 1 "
              "outside it, 2 on bad input.",
        f"  {prog} --tflite build/export/bokeh_fp32.tflite\n"
        f"  {prog} --tflite build/export/bokeh_fp16.tflite --images ~/photos --tflite-only\n"
        f"  {prog} --tflite build/export/nafnet_fp32.tflite --json parity.json\n"
        f"  {prog} --tflite build/export/bokeh_fp16.tflite --tflite-only --arithmetic fp16\n"
        f"  {prog} --tflite build/export/bokeh_controls_fp32.tflite --pair 1,1 --pair 0.3,0.6\n"
        f"  {prog} --export-dir build/export   # every file report.json lists, one process")
    what = par.add_mutually_exclusive_group(required=True)
    what.add_argument("--tflite", help="a .tflite written by bokeh export")
    what.add_argument("--export-dir", help="every .tflite the folder's report.json lists, each "
                                           "with its manifest's tolerance: all stages for the "
                                           "fp32 files, the file alone for the others")
    par.add_argument("--checkpoint", help="PyTorch weights (default: those in the manifest)")
    par.add_argument("--images", help="folder of photos (resized/cropped to the model's size); "
                                      "default: seeded random inputs")
    par.add_argument("--atol", type=positive_float,
                     help="max abs diff allowed at every stage (default: the manifest's)")
    par.add_argument("--num-random", type=positive_int, default=2,
                     help="random inputs when no --images (default %(default)s)")
    par.add_argument("--tflite-only", action="store_true",
                     help="check the TFLite file alone, not the earlier stages")
    par.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                     help="run the TFLite file on LiteRT's CPU (XNNPACK) or GPU accelerator; "
                          "gpu also compares it with the CPU (default %(default)s; a GPU "
                          "device: make setup-gpu)")
    par.add_argument("--arithmetic", choices=POLICIES,
                     help="run the TFLite file op by op in this arithmetic (export/arith.py) "
                          "instead of LiteRT: fp16 is what a phone GPU computes; also compared "
                          "with the same file in fp32 arithmetic, naming the first op that "
                          "made an inf/NaN (slow: numpy)")
    par.add_argument("--pair", action="append", type=control_pair, metavar="FOCUS,STRENGTH",
                     help="a controls model (bokeh_controls_*.tflite): check at this (focus, "
                          "strength), repeatable (default: 1,1 0,1 0.5,0.5 0.25,0.75; 1,1 is "
                          "also compared with the plain model beside it)")
    par.add_argument("--json", help="also write the full result to this JSON file")
    return par


def control_pair(text: str) -> tuple[float, float]:
    """argparse type: ``FOCUS,STRENGTH``, two finite numbers (outside [0, 1] they are clamped,
    by the model and the reference alike)."""
    try:
        focus, strength = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FOCUS,STRENGTH (two numbers, e.g. "
                                         "0.5,1)") from None
    if not all(math.isfinite(v) for v in (focus, strength)):
        raise argparse.ArgumentTypeError(f"{text!r}: focus and strength must be finite")
    return focus, strength


def parity_main(argv: list[str] | None = None, prog: str = "validate parity") -> int:
    args = parity_parser(prog).parse_args(argv)

    def body() -> int:
        from common.files import check_writable_file, write_json
        from export.manifest import control_inputs, read_manifest
        from validate.parity import CONTROL_PAIRS, format_table, run_parity

        if args.json:
            check_writable_file(args.json)
        if args.export_dir:
            return export_dir_parity()
        manifest, folder = read_manifest(args.tflite)
        if args.pair and not control_inputs(manifest):
            raise UserError(f"--pair: {Path(args.tflite).name} takes no focus or strength "
                            "(only bokeh_controls_*.tflite does)")
        print(f"Parity of {args.tflite} against PyTorch:")
        result = run_parity(args.tflite, args.checkpoint, args.images, args.atol,
                            args.num_random, tflite_only=args.tflite_only,
                            control_pairs=args.pair or CONTROL_PAIRS,
                            accelerator=args.accelerator, arithmetic=args.arithmetic)
        print(format_table(result))
        if args.json:
            write_json(args.json, result)
        if not args.checkpoint:
            record(result, manifest, folder)
        return 0 if result["passed"] else 1

    def record(result: dict, manifest: dict, folder: Path) -> None:
        from export.report import record_parity

        report = folder / manifest.get("report", "report.json")
        if report.is_file() and not record_parity(report, manifest, result):
            print(f"note: {report} belongs to another export run; result not recorded there")

    def export_dir_parity() -> int:
        from common.files import write_json
        from export.manifest import read_manifest
        from validate.parity import check_export, format_table

        given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--atol", args.atol),
                                          ("--tflite-only", args.tflite_only),
                                          ("--pair", args.pair),
                                          ("--accelerator", args.accelerator != "cpu"),
                                          ("--arithmetic", args.arithmetic)) if value]
        if given:
            raise UserError(f"{', '.join(given)}: only with --tflite (one file); --export-dir "
                            "checks each file with its manifest's settings")
        results = check_export(args.export_dir, args.images, args.num_random)
        for result in results:
            print(format_table(result))
            tflite = Path(args.export_dir) / result["tflite"]
            record(result, *read_manifest(tflite))
        failed = [r["tflite"] for r in results if not r["passed"]]
        if args.json:
            write_json(args.json, {"export_dir": str(args.export_dir), "results": results})
        print(f"{len(results) - len(failed)} of {len(results)} files within tolerance"
              + (f"; outside: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    return run_command(prog, body)


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what} needs positive integers, got {text!r}")
    return values


def runtime_parser(prog: str = "validate runtime") -> argparse.ArgumentParser:
    rt = _parser(
        prog, "Time PyTorch eager, onnxruntime and every TFLite variant of the export that FILE "
              "belongs to (threads, XNNPACK on/off, TF 2.15 interpreter and LiteRT), "
              "interleaved on the same input: warm-up, N runs, median, p90, min. Peak memory is "
              "measured per engine in a fresh process. Writes a table, JSON and a PNG chart.",
        f"  {prog} --tflite build/export/nafnet_fp32.tflite\n"
        f"  {prog} --tflite build/export/bokeh_fp32.tflite --threads 2 --runtime litert")
    rt.add_argument("--tflite", required=True,
                    help="any .tflite written by bokeh export (its manifest names the model)")
    rt.add_argument("--threads", default="1,2,4", help="thread counts (default %(default)s)")
    rt.add_argument("--xnnpack", default="on,off",
                    help="TFLite with the XNNPACK delegate on, off or both (default %(default)s)")
    rt.add_argument("--runtime", default="tensorflow,litert",
                    help="TFLite interpreters: tensorflow (TF 2.15's own), litert (the "
                         "ai-edge-litert package, newer XNNPACK) or both (default %(default)s)")
    rt.add_argument("--runs", type=positive_int, default=5,
                    help="timed runs per engine (%(default)s)")
    rt.add_argument("--warmup", type=non_negative_int, default=1,
                    help="untimed runs first (%(default)s)")
    rt.add_argument("--no-memory", action="store_true",
                    help="skip the per-engine peak-memory subprocesses")
    rt.add_argument("--json", help="result file (default: runtime.json beside the .tflite)")
    rt.add_argument("--png", help="bar chart (default: runtime.png beside the .tflite)")
    return rt


def runtime_main(argv: list[str] | None = None, prog: str = "validate runtime") -> int:
    args = runtime_parser(prog).parse_args(argv)

    def body() -> int:
        from common.files import check_writable_file, write_json
        from export.runner import RUNTIMES
        from validate.runtime import format_runtime_table, plot_runtime, run_runtime

        threads = _int_list(args.threads, "threads")
        modes = tuple(n == "on" for n in name_list(args.xnnpack, "xnnpack", ("on", "off")))
        runtimes = name_list(args.runtime, "runtime", RUNTIMES)
        folder = Path(args.tflite).resolve().parent
        json_path = Path(args.json) if args.json else folder / "runtime.json"
        png_path = Path(args.png) if args.png else folder / "runtime.png"
        for path in (json_path, png_path):
            check_writable_file(path)
        print(f"Runtime of the export of {args.tflite}:")
        result = run_runtime(args.tflite, threads, modes, args.runs, args.warmup,
                             memory=not args.no_memory, runtimes=runtimes)
        print(format_runtime_table(result))
        write_json(json_path, result)
        plot_runtime(result, png_path)
        print(f"Wrote {json_path} and {png_path}")
        return 0

    return run_command(prog, body)


def quality_parser(prog: str = "validate quality") -> argparse.ArgumentParser:
    qual = _parser(
        prog, "Score the PyTorch model, each TFLite variant, the input itself and a classical "
              "thin-lens render against the bokeh photos of a paired folder (EBB! layout: "
              "DIR/original/NAME.jpg and DIR/bokeh/NAME.jpg). Prints a Markdown table "
              "Model | PSNR | SSIM | LPIPS. Exit 0, or 2 on bad input.",
        f"  {prog} --data EBB/Val294 --tflite build/export/bokeh_fp32.tflite\n"
        f"  {prog} --data EBB/Val294 --checkpoint nafnet.pt --depth-weights dpt_hybrid_384.pt")
    qual.add_argument("--data", required=True, help="paired folder (original/ and bokeh/)")
    qual.add_argument("--tflite", action="append", default=[],
                      help="fused bokeh_*.tflite to score (repeat for several variants); the "
                           "PyTorch row then uses the first one's weights and size")
    qual.add_argument("--checkpoint", help="NAFNet checkpoint for the PyTorch row")
    qual.add_argument("--depth-weights", "--dpt-weights", dest="depth_weights", metavar="FILE",
                      help="a depth net's file, with --checkpoint and no --tflite "
                           "(--dpt-weights is the old name)")
    qual.add_argument("--allow-random-depth", "--allow-random-dpt", dest="allow_random_depth",
                      action="store_true",
                      help="with --checkpoint and no --depth-weights: random depth (meaningless; "
                           "--allow-random-dpt is the old name)")
    qual.add_argument("--lpips-weights", nargs="+", metavar="FILE",
                      help="local LPIPS weights: torchvision AlexNet (features.*) and the LPIPS "
                           "v0.1 heads (lin0-4), one file or several; without: LPIPS n/a")
    qual.add_argument("--limit", type=positive_int, help="score only the first N pairs")
    qual.add_argument("--json", help="also write the full result (per pair) to this JSON file")
    return qual


def quality_main(argv: list[str] | None = None, prog: str = "validate quality") -> int:
    args = quality_parser(prog).parse_args(argv)

    def body() -> int:
        from common.files import check_writable_file, write_json
        from validate.quality import evaluate, format_table

        if args.json:
            check_writable_file(args.json)
        result = evaluate(args.data, args.tflite, args.checkpoint, args.depth_weights,
                          args.allow_random_depth, args.limit, args.lpips_weights)
        print(format_table(result))
        if args.json:
            write_json(args.json, result)
        return 0

    return run_command(prog, body)


def main(argv: list[str] | None = None) -> int:
    """`validate <verb>`: the validators' verbs of `bokeh`, under their first name."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(f"usage: validate <verb> [options]   verbs: {', '.join(VERBS)}\n"
              "(validate <verb> --help for its options; `bokeh` has these and more)",
              file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"validate: error: unknown verb {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, name = VERBS[argv[0]].split(":")
    try:
        return getattr(importlib.import_module(module), name)(argv[1:],
                                                              prog=f"validate {argv[0]}")
    except SystemExit as stop:  # argparse: usage and one error line (2), or --help (0)
        return stop.code if isinstance(stop.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
