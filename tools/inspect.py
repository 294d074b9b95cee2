"""`python -m tools.inspect F.tflite`: what a .tflite holds and whether a phone GPU will take it.

One screen a person reads at a glance: size, inputs and outputs (dynamic dimensions marked), the
GPU delegate verdict with its reasons, Flex ops, maximum rank, the op histogram and the largest
tensors. ``--json`` prints the same as JSON. Exit 0, or 2 on a missing or unreadable file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common.errors import UserError


def open_tflite(path: str | Path):
    """A TFLite interpreter (tensors not allocated) or a ``UserError`` naming the file."""
    from export.tf_stages import quiet_tensorflow

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such TFLite file")
    tf = quiet_tensorflow()
    try:
        return tf.lite.Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UserError(f"{path}: not a readable TFLite model ({reason})") from None


def dynamic_dims(path: str | Path) -> list[str]:
    """Inputs and outputs with a dynamic (-1) dimension, as 'name [1,-1,-1,3]' strings.

    ``shape`` shows a placeholder 1 for a dynamic dimension; only ``shape_signature`` tells.
    """
    interpreter = open_tflite(path)
    found = []
    for detail in interpreter.get_input_details() + interpreter.get_output_details():
        signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        if any(d < 0 for d in signature):
            found.append(f"{detail['name']} [{','.join(map(str, signature))}]")
    return found


def inspect(path: str | Path, largest: int = 5):
    """``export.tflite_stage.inspect_tflite`` with file errors turned into ``UserError``."""
    from export.tflite_stage import inspect_tflite

    open_tflite(path)
    return inspect_tflite(path, largest)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def gpu_verdict(info) -> tuple[str, list[str]]:
    """'READY' or 'NOT READY' for the GPU delegate, with every reason."""
    reasons = []
    if info.flex_ops:
        reasons.append(f"Flex ops {', '.join(info.flex_ops)}: the GPU delegate runs builtin "
                       "ops only")
    if info.max_rank > 4:
        reasons.append(f"a tensor of rank {info.max_rank}: the GPU delegate takes rank <= 4")
    if not info.gpu_compatible:
        reasons.extend(info.gpu_messages or ["TensorFlow's GPU analyzer flagged the model"])
    return ("READY" if not reasons else "NOT READY"), reasons


def _shape(t: dict) -> str:
    return "[" + ",".join(map(str, t["shape"])) + "]"


def format_report(info, dynamic: list[str] | None = None, top_ops: int = 15) -> str:
    """The aligned text report."""
    ops = info.op_histogram
    verdict, reasons = gpu_verdict(info)
    lines = [f"{Path(info.path).name}: {human_bytes(info.size_bytes)}, {sum(ops.values())} ops "
             f"of {len(ops)} kinds"]
    for title, tensors in (("input", info.inputs), ("output", info.outputs)):
        for t in tensors:
            lines.append(f"  {title:<10} {t['name']:<12} {_shape(t):<18} {t['dtype']}")
    lines.append(f"  {'shapes':<10} " + ("DYNAMIC: " + "; ".join(dynamic) if dynamic
                                         else "static"))
    lines.append(f"  {'Flex ops':<10} {', '.join(info.flex_ops) or 'none'}")
    lines.append(f"  {'max rank':<10} {info.max_rank}" + ("" if info.max_rank <= 4
                                                          else "  (> 4: no mobile GPU)"))
    lines.append(f"  {'GPU':<10} {verdict} for the TFLite GPU delegate")
    for reason in reasons:
        lines.append(f"  {'':<10} - {reason}")
    if verdict == "READY":
        for note in info.gpu_messages:
            lines.append(f"  {'':<10} note: {note}")
    lines.append("  ops (by count):")
    width = max((len(k) for k in ops), default=0)
    peak = max(ops.values(), default=1)
    for name, count in list(ops.items())[:top_ops]:
        bar = "#" * max(1, round(24 * count / peak))
        lines.append(f"    {name:<{width}} {count:>5}  {bar}")
    if len(ops) > top_ops:
        rest = list(ops.items())[top_ops:]
        lines.append(f"    ... {len(rest)} more kinds, {sum(c for _, c in rest)} ops")
    lines.append("  largest tensors:")
    for t in info.largest_tensors:
        lines.append(f"    {t['mbytes']:>8.2f} MB  {_shape(t):<18} {t['dtype']:<8} "
                     f"{t['name'][:60]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.inspect",
        description="What a .tflite holds and whether a phone GPU will take it: size, inputs and "
                    "outputs, dynamic shapes, Flex ops, maximum rank, GPU delegate verdict with "
                    "reasons, op histogram, largest tensors. Exit 2 on a missing or corrupt file.")
    p.add_argument("tflite", help="a .tflite file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--top", type=int, default=15, help="op kinds listed (default %(default)s)")
    p.add_argument("--largest", type=int, default=5,
                   help="largest tensors listed (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        info = inspect(args.tflite, args.largest)
        dynamic = dynamic_dims(args.tflite)
    except UserError as exc:
        print(f"inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from dataclasses import asdict

        verdict, reasons = gpu_verdict(info)
        print(json.dumps({**asdict(info), "dynamic": dynamic, "gpu_verdict": verdict,
                          "gpu_reasons": reasons}, indent=2))
    else:
        print(format_report(info, dynamic, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
