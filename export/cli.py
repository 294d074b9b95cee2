"""`bokeh-export`: the command-line face of export.pipeline (a thin layer, no logic of its own)."""

from __future__ import annotations

import argparse
import sys

from export.io import UserError
from models.nafnet import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bokeh-export",
        description="Export NAFNet PyTorch -> ONNX -> TensorFlow -> TFLite (fp32 for the CPU, "
                    "fp16 for the GPU delegate), builtin ops only, with a manifest per model "
                    "and report.json.",
        epilog="Next: validate parity --tflite OUT/nafnet_fp32.tflite",
    )
    p.add_argument("--out", default="build/export", help="output folder (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024, help="static input height (%(default)s)")
    p.add_argument("--width", type=int, default=1536, help="static input width (%(default)s)")
    p.add_argument("--checkpoint", help="NAFNet checkpoint (.pth/.pt); default: random weights")
    p.add_argument("--variants", default="fp32,fp16",
                   help="comma-separated TFLite variants (default: %(default)s)")
    p.add_argument("--opset", type=int, default=12,
                   help="ONNX opset, 12-15 (default %(default)s: keeps Split builtin in TFLite)")
    p.add_argument("--allow-flex", action="store_true",
                   help="keep going with a *_flex.tflite if builtin ops do not suffice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (%(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.pipeline import export_nafnet
    from export.tflite_stage import FlexOpsRequired

    try:
        export_nafnet(
            out_dir=args.out, height=args.height, width=args.width, checkpoint=args.checkpoint,
            variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
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
    print(f"Next: validate parity --tflite {args.out}/nafnet_fp32.tflite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
