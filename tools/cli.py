"""`bokeh <verb>`: every command of the toolchain behind one entry point.

The verbs are thin layers over the packages (export, calibration, validate, tools, train); the
older names stay as aliases: `bokeh-export` is `bokeh export`, `validate <verb>` is
`bokeh <verb>`, and `python -m tools.render` (and the other modules) still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.cli import non_negative_int, positive_int, run_command
from common.errors import UserError

# verb -> (module whose main(argv, prog) runs it, one line of help)
COMMANDS = {
    "export": ("tools.cli:export_main",
               "PyTorch -> ONNX -> TensorFlow -> TFLite, depth net fused in; manifests, report"),
    "parity": ("validate.cli:parity_main", "diff every exported stage against PyTorch"),
    "runtime": ("validate.cli:runtime_main", "latency and memory of every engine of an export"),
    "quality": ("validate.cli:quality_main", "PSNR / SSIM / LPIPS on a paired folder"),
    "bench": ("validate.bench:main", "the make bench tables into docs/benchmarks.md"),
    "peers": ("validate.peers:main",
              "against onnx2tf and litert-torch: ops, latency, exactness (make bench-peers)"),
    "passes": ("validate.passes_bench:main", "each export rewrite pass, timed"),
    "profile": ("validate.profile:main", "op costs and delegate coverage of a .tflite"),
    "quant-report": ("validate.quant_report:main",
                     "accuracy, size, latency of the quantized variants; int8 layer analysis"),
    "render": ("tools.render:main", "bokeh PNGs of photos from the phone model or PyTorch"),
    "inspect": ("tools.inspect:main", "what a .tflite holds and whether a phone GPU takes it"),
    "ai-benchmark": ("tools.ai_benchmark:main", "a checked bundle for the AI Benchmark app"),
    "depth-cache": ("train.depth_cache:main",
                    "masks of a folder of photos from the depth net the phone model will fuse"),
    "train": ("train.trainer:main", "the paper's two training stages"),
    "variants": ("tools.cli:variants_main",
                 "the TFLite variants: phone target, what stays float, tolerance, default"),
}


def _entry(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {verb:<{width}}  {text}" for verb, (_, text) in COMMANDS.items())
    usage = (f"usage: bokeh <verb> [options]   (bokeh <verb> --help for its options)\n\n"
             f"verbs:\n{listing}\n\nexamples:\n  bokeh export --height 512 --width 768\n"
             "  bokeh parity --tflite build/export/bokeh_fp32.tflite\n"
             "  bokeh render photo.jpg --compare --out renders\n")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"bokeh: error: unknown verb {verb!r}; one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        return _entry(COMMANDS[verb][0])(rest, prog=f"bokeh {verb}")
    except SystemExit as stop:  # argparse: usage and one error line (2), or --help (0)
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:  # while importing, before the command's own handler
        print(f"bokeh {verb}: interrupted", file=sys.stderr)
        return 130


def build_export_parser(prog: str = "bokeh export") -> argparse.ArgumentParser:
    from export.variants import names, variant

    float_default, quant_default = (",".join(names(q, defaults_only=True)) for q in (False, True))
    targets = "; ".join(f"{v}: {variant(v).target}" for v in names(False) + names(True))
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export NAFNet PyTorch -> ONNX -> TensorFlow -> TFLite, fuse it with the "
                    "TensorFlow depth net into one photo -> bokeh model, and convert both to "
                    "TFLite variants (bokeh variants lists them: " + targets + "), builtin "
                    "ops only, with a manifest per model and report.json.",
        epilog="examples:\n  bokeh export --height 512 --width 768 --overwrite\n"
               "  bokeh export --checkpoint build/train/nafnet.pt --depth-weights "
               "dpt_hybrid_384.pt\n"
               "  bokeh export --depth midas-small --depth-weights midas_v21_small_256.pt\n"
               "  bokeh export --no-fuse --variants fp32\n"
               "  bokeh export --controls   (also bokeh_controls_*.tflite: focus, strength)\n"
               "next: bokeh parity --tflite EXPORT_DIR/bokeh_fp32.tflite")
    p.add_argument("--export-dir", "--out", dest="export_dir", default="build/export",
                   help="export folder (default: %(default)s; --out is the old name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the export already in the folder (the whole set, at the end)")
    p.add_argument("--height", type=positive_int, default=1024,
                   help="static input height, a multiple of 16 (%(default)s)")
    p.add_argument("--width", type=positive_int, default=1536,
                   help="static input width, a multiple of 16 (%(default)s)")
    p.add_argument("--checkpoint", help="NAFNet checkpoint (.pth/.pt); default: random weights")
    p.add_argument("--depth", type=depth_name, metavar="NAME",
                   help=f"depth net to fuse: {', '.join(depth_names(False))} (test configs: "
                        f"{', '.join(n for n in depth_names() if n not in depth_names(False))}"
                        "); default: the net --depth-weights is, else dpt-hybrid (the paper's)")
    p.add_argument("--depth-weights", "--dpt-weights", dest="depth_weights", metavar="FILE",
                   help="the depth net's official file (dpt_hybrid_384.pt, dpt_large_384.pt, "
                        "midas_v21_small_256.pt, depth_anything_v2_vits.pth); default: random "
                        "weights, meaningless depth (--dpt-weights is the old name)")
    p.add_argument("--allow-depth-mismatch", action="store_true",
                   help="fuse another depth net (or weights, or short side) than the one the "
                        "--checkpoint's NAFNet was trained with (refused by default: NAFNet reads "
                        "masks unlike those it learned from)")
    p.add_argument("--dpt-variant", choices=("hybrid", "large", "tiny"),
                   help="old name of --depth dpt-hybrid / dpt-large / dpt-tiny")
    p.add_argument("--depth-short-side", "--dpt-short-side", dest="depth_short_side",
                   type=positive_int, metavar="N",
                   help="short side of the depth net's input, a multiple of its patch (32; 14 "
                        "for Depth Anything); default: the net's own (DPT 384, MiDaS small 256, "
                        "Depth Anything 518); --dpt-short-side is the old name")
    p.add_argument("--no-fuse", action="store_true",
                   help="export NAFNet alone (photo + mask in), no depth net")
    p.add_argument("--controls", action="store_true",
                   help="also write bokeh_controls_{fp32,fp16}.tflite: the fused model with two "
                        "more inputs, focus and strength ([1,1,1,1], in [0, 1]; 1 and 1 give the "
                        "plain model's output), chosen on the phone at run time")
    p.add_argument("--variants", default=float_default,
                   help=f"comma-separated float TFLite variants, of {', '.join(names(False))} "
                        "(default: %(default)s)")
    p.add_argument("--quant-variants", default=quant_default,
                   help=f"quantized variants of the fused model, of {', '.join(names(True))}, "
                        "comma-separated, '' for none (default: %(default)s; int16x8 is kept "
                        "only where the TFLite runtime can run it; bokeh variants says what "
                        "each keeps in float)")
    p.add_argument("--calib-dir", help="folder of photos to calibrate int8 on (e.g. EBB! "
                   "originals); default: the embedded set (calibration/dataset.py)")
    p.add_argument("--calib-samples", type=positive_int, default=8,
                   help="calibration samples, crops and flips fill up (default %(default)s; "
                        "about a minute each at 1024x1536 with DPT-Hybrid)")
    p.add_argument("--opset", type=int, default=12,
                   help="ONNX opset, 12-15 (default %(default)s: keeps Split builtin in TFLite)")
    p.add_argument("--no-gpu-check", action="store_true",
                   help="do not run the float files on LiteRT's GPU accelerator (by default "
                        "they run once where a GPU device is found: make setup-gpu; SwiftShader "
                        "needs minutes at 1024x1536)")
    p.add_argument("--allow-flex", action="store_true",
                   help="keep going with a *_flex.tflite if builtin ops do not suffice")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random weights (%(default)s)")
    return p


def depth_names(tests: bool = True) -> tuple[str, ...]:
    from models.depth import depth_names as names

    return names(tests)


def depth_name(text: str) -> str:
    """argparse type of --depth: a registered depth net (its canonical name)."""
    from models.depth import depth_net

    try:
        return depth_net(text).name
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _old_depth_name(depth: str | None, dpt_variant: str | None) -> str | None:
    """--depth, or its old spelling --dpt-variant (hybrid, large, tiny); both: they must agree."""
    from models.depth import depth_net

    old = depth_net(dpt_variant).name if dpt_variant else None
    if depth and old and depth != old:
        raise UserError(f"--depth {depth} and --dpt-variant {old} disagree "
                        "(--dpt-variant is the old name of --depth); give one")
    return depth or old


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def export_main(argv: list[str] | None = None, prog: str = "bokeh export") -> int:
    """`bokeh export`: export.pipeline with calibration data from calibration/."""
    args = build_export_parser(prog).parse_args(argv)

    def body() -> int:
        from calibration.dataset import calibration_set
        from export.pipeline import ExportOptions, export
        from export.tflite_stage import FlexOpsRequired

        options = ExportOptions(
            out_dir=args.export_dir, height=args.height, width=args.width,
            checkpoint=args.checkpoint, depth=_old_depth_name(args.depth, args.dpt_variant),
            depth_weights=args.depth_weights, depth_short_side=args.depth_short_side,
            fuse=not args.no_fuse, controls=args.controls, variants=_names(args.variants),
            quant_variants=() if args.no_fuse else _names(args.quant_variants),
            opset=args.opset, allow_flex=args.allow_flex, seed=args.seed,
            overwrite=args.overwrite, gpu_check=not args.no_gpu_check,
            allow_depth_mismatch=args.allow_depth_mismatch)
        calibration = None
        if options.quant_variants:  # before the long stages, so a bad folder fails at once
            calibration = calibration_set(args.height, args.width, args.calib_samples,
                                          args.calib_dir)
        try:
            export(options, calibration)
        except FlexOpsRequired as exc:
            print(f"{prog}: error: {exc}. Re-run with --allow-flex to keep it.",
                  file=sys.stderr)
            return 1
        model = "nafnet" if args.no_fuse else "bokeh"
        print(f"Next: bokeh parity --export-dir {args.export_dir}   (every file)\n"
              f"      bokeh parity --tflite {args.export_dir}/{model}_fp32.tflite")
        if args.controls:
            print(f"      bokeh parity --tflite {args.export_dir}/bokeh_controls_fp32.tflite")
        return 0

    return run_command(prog, body)


def variants_main(argv: list[str] | None = None, prog: str = "bokeh variants") -> int:
    """`bokeh variants`: the one table of TFLite variants (export/variants.py)."""
    from export.variants import names, table_text

    p = argparse.ArgumentParser(
        prog=prog, description="The TFLite variants bokeh export writes: the phone target of "
        "each, what it keeps in float and why, the tolerance its manifest carries, and which are "
        "written by default.")
    p.add_argument("--defaults", choices=("float", "quantized"),
                   help="print only the default variants of that kind, comma-separated")
    p.add_argument("--names", choices=("float", "quantized"),
                   help="print every exported variant of that kind, space-separated")
    args = p.parse_args(argv)
    if args.defaults:
        print(",".join(names(args.defaults == "quantized", defaults_only=True)))
    elif args.names:
        print(" ".join(names(args.names == "quantized")))
    else:
        print(table_text())
    return 0


def export_alias() -> int:
    """`bokeh-export`, the old name of `bokeh export`."""
    return export_main(prog="bokeh-export")


if __name__ == "__main__":
    sys.exit(main())
