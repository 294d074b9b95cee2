"""`validate`: checks that an exported model computes what the PyTorch model computes.

A thin layer over validate.parity; exit 0 within tolerance, 1 outside it, 2 on bad input.
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    from export.io import UserError, write_json
    from export.pipeline import record_parity
    from models.nafnet import CheckpointError
    from validate.parity import format_table, read_manifest, run_parity

    try:
        if args.json:
            from export.io import ensure_writable_dir

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


if __name__ == "__main__":
    sys.exit(main())
