"""`bokeh-export`: the command-line face of export.pipeline (a thin layer, no logic of its own)."""

from __future__ import annotations

import argparse
import os
import sys

from common.errors import CheckpointError, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bokeh-export",
        description="Export NAFNet PyTorch -> ONNX -> TensorFlow -> TFLite, fuse it with the "
                    "TensorFlow DPT depth net into one photo -> bokeh model, and convert both to "
                    "TFLite (fp32 for the CPU, fp16 for the GPU delegate), builtin ops only, "
                    "with a manifest per model and report.json.",
        epilog="Next: validate parity --tflite OUT/bokeh_fp32.tflite",
    )
    p.add_argument("--out", default="build/export", help="output folder (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024, help="static input height (%(default)s)")
    p.add_argument("--width", type=int, default=1536, help="static input width (%(default)s)")
    p.add_argument("--checkpoint", help="NAFNet checkpoint (.pth/.pt); default: random weights")
    p.add_argument("--dpt-weights", help="MiDaS v3.0 DPT file (dpt_hybrid_384.pt or "
                   "dpt_large_384.pt); default: random weights, meaningless depth")
    p.add_argument("--dpt-variant", default="hybrid", choices=("hybrid", "large", "tiny"),
                   help="random DPT to use without --dpt-weights (default %(default)s; tiny is "
                        "a small test model)")
    p.add_argument("--dpt-short-side", type=int, default=384,
                   help="short side of the DPT input, a multiple of 32 (default %(default)s)")
    p.add_argument("--no-fuse", action="store_true",
                   help="export NAFNet alone (photo + mask in), no depth net")
    p.add_argument("--variants", default="fp32,fp16",
                   help="comma-separated TFLite variants (default: %(default)s)")
    p.add_argument("--quant-variants", default="drq,int8",
                   help="quantized variants of the fused model (drq, int8, int16x8), "
                        "comma-separated, '' for none (default: %(default)s; int16x8 is kept "
                        "only where the TFLite runtime can run it)")
    p.add_argument("--calib-dir", help="folder of photos to calibrate int8 on (e.g. EBB! "
                   "originals); default: the embedded set (calibration/dataset.py)")
    p.add_argument("--calib-samples", type=int, default=8,
                   help="calibration samples, crops and flips fill up (default %(default)s; "
                        "about a minute each at 1024x1536 with DPT-Hybrid)")
    p.add_argument("--opset", type=int, default=12,
                   help="ONNX opset, 12-15 (default %(default)s: keeps Split builtin in TFLite)")
    p.add_argument("--allow-flex", action="store_true",
                   help="keep going with a *_flex.tflite if builtin ops do not suffice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (%(default)s)")
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    from export.pipeline import export
    from export.tflite_stage import FlexOpsRequired

    try:
        export(
            out_dir=args.out, height=args.height, width=args.width, checkpoint=args.checkpoint,
            dpt_weights=args.dpt_weights, dpt_variant=args.dpt_variant,
            dpt_short_side=args.dpt_short_side, fuse=not args.no_fuse,
            variants=_names(args.variants), quant_variants=_names(args.quant_variants),
            calib_dir=args.calib_dir, calib_samples=args.calib_samples,
            opset=args.opset, allow_flex=args.allow_flex, seed=args.seed,
        )
    except (UserError, CheckpointError) as exc:
        print(f"bokeh-export: error: {exc}", file=sys.stderr)
        return 2
    except FlexOpsRequired as exc:
        print(f"bokeh-export: error: {exc}. Re-run with --allow-flex to keep it.", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. opset outside the converter's range
        print(f"bokeh-export: error: {exc}", file=sys.stderr)
        return 2
    model = "nafnet" if args.no_fuse else "bokeh"
    print(f"Next: validate parity --tflite {args.out}/{model}_fp32.tflite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
