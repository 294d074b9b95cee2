"""`python -m tools.inspect F.tflite`: what a .tflite holds and whether a phone GPU will take it.

One screen a person reads at a glance: size, inputs and outputs (dynamic dimensions marked), the
GPU delegate verdict with its reasons, Flex ops, maximum rank, the op histogram and the largest
tensors. ``--json`` prints the same as JSON. Exit 0, or 2 on a missing or unreadable file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import positive_int, run_command
from common.files import human_bytes
from export.arith import POLICIES, arithmetic_report, format_arithmetic_report, random_inputs
from export.runner import verify_tflite
from export.tflite_info import TFLiteInfo, dynamic_dims, gpu_verdict, inspect_tflite
from export.variants import describe, variant_of


def inspect(path: str | Path, largest: int = 5) -> TFLiteInfo:
    """``inspect_tflite`` of a verified file (a corrupt one is a ``UserError``)."""
    verify_tflite(path)
    return inspect_tflite(path, largest)


def gpu_accelerated(path: str | Path) -> dict:
    """Whether LiteRT's GPU accelerator on the device found takes every op, and which fall back."""
    from export.accelerator import fully_accelerated, gpu_device

    found, device = gpu_device()
    if not found:
        return {"device": None, "fully_accelerated": None, "fell_back": [],
                "line": f"not tried: no GPU device ({device}); make setup-gpu"}
    full, ops = fully_accelerated(path)
    return {"device": device, "fully_accelerated": full, "fell_back": [] if full else ops,
            "line": (f"fully accelerated on {device}" if full
                     else f"NOT fully accelerated on {device}; falls back:")}


def _shape(t: dict) -> str:
    return "[" + ",".join(map(str, t["shape"])) + "]"


def format_report(info, dynamic: list[str] | None = None, top_ops: int = 15) -> str:
    """The aligned text report."""
    ops = info.op_histogram
    ready, reasons = gpu_verdict(info)
    verdict = "READY" if ready else "NOT READY"
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


def build_parser(prog: str = "bokeh inspect") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  {prog} build/export/bokeh_fp16.tflite\n"
               f"  {prog} build/export/bokeh_fp16.tflite --fp16 --ops 30\n"
               f"  {prog} build/export/bokeh_fp16.tflite --json",
        description="What a .tflite holds and whether a phone GPU will take it: size, inputs and "
                    "outputs, dynamic shapes, Flex ops, maximum rank, GPU delegate verdict with "
                    "reasons, op histogram, largest tensors. Exit 2 on a missing or corrupt file.")
    p.add_argument("tflite", help="a .tflite file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--top", type=positive_int, default=15,
                   help="op kinds listed (default %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="also compile it on LiteRT's GPU accelerator (the device found: a real "
                        "GPU, or SwiftShader after make setup-gpu) and say which ops fall back")
    p.add_argument("--fp16", nargs="?", const="fp16", choices=POLICIES, metavar="POLICY",
                   help="also run it op by op in fp16 arithmetic (export/arith.py; or POLICY: "
                        f"{', '.join(POLICIES)}) against fp32 on one seeded random input and "
                        "print the per-op table: the first op that made an inf/NaN, the ops "
                        "losing the most; exit 1 when the verdict fails")
    p.add_argument("--ops", type=positive_int, default=15,
                   help="ops listed in the --fp16 table (default %(default)s)")
    p.add_argument("--largest", type=positive_int, default=5,
                   help="largest tensors listed (default %(default)s)")
    return p


def main(argv: list[str] | None = None, prog: str = "bokeh inspect") -> int:
    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        info = inspect(args.tflite, args.largest)
        dynamic = dynamic_dims(args.tflite)
        accelerated = gpu_accelerated(args.tflite) if args.gpu else None
        name = variant_of(args.tflite)
        arithmetic = (arithmetic_report(args.tflite, random_inputs(args.tflite), args.fp16,
                                        worst=args.ops) if args.fp16 else None)
        if args.json:
            from dataclasses import asdict

            ready, reasons = gpu_verdict(info)
            print(json.dumps({**asdict(info), "dynamic": dynamic,
                              "variant": describe(name) if name else None,
                              "gpu_verdict": "READY" if ready else "NOT READY",
                              "gpu_reasons": reasons, "gpu_accelerator": accelerated,
                              "arithmetic": arithmetic}, indent=2))
        else:
            print(format_report(info, dynamic, args.top))
            if name:  # the manifest beside it names the variant (export/variants.py)
                print(f"  {'variant':<10} {describe(name)}")
            if accelerated:
                print(f"  {'GPU run':<10} {accelerated['line']}")
                for op in accelerated["fell_back"]:
                    print(f"  {'':<10} - {op}")
            if arithmetic:
                print(format_arithmetic_report(arithmetic))
        return 1 if arithmetic and not arithmetic["passed"] else 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
