"""What the fp16-safe graphs cost the fp32 CPU path (issue 19): each part of the fused model built
twice, in its textbook form and in its fp16-safe form, and timed side by side.

- NAFNet: the export's simplified ONNX rewritten with every pass (``rewrites.PASSES``) and with
  every pass but the fp16 ones (``NAIVE_FP16_PASSES``), each through onnx-tf, the frozen NHWC
  graph and the TFLite converter (the export's own stage functions), at the export's size;
- each depth net: its Keras twin (random weights, seed 0) at the input size it has inside the
  fused model for that photo size, built as is and under ``fp16_tf.naive_fp16()``.

Each pair runs interleaved in LiteRT (fp32, XNNPACK) on one seeded input: the median of each and
their ratio, and the largest difference between the two outputs (the rewrites are exact in fp32:
it should be float rounding). The fused model's cost is the sum of its parts' (the glue between
them does not change).

    python -m validate.fp16_speed --export-dir build/export --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.cli import name_list, positive_int, run_command
from common.errors import UserError
from common.files import read_json, write_json

FORMS = ("textbook", "fp16-safe")


def nafnet_pair(sim_onnx: Path, shape_nhwc: tuple[int, ...], folder: Path) -> dict[str, Path]:
    """NAFNet's fp32 TFLite in both forms (cached in ``folder``)."""
    from export.rewrites import NAIVE_FP16_PASSES, PASSES
    from validate.passes_bench import build_with_passes

    with contextlib.redirect_stdout(io.StringIO()):
        return {form: build_with_passes(sim_onnx, passes, f"nafnet_{form}", folder, shape_nhwc)
                for form, passes in zip(FORMS, (NAIVE_FP16_PASSES, PASSES), strict=True)}


def depth_pair(name: str, size: tuple[int, int], folder: Path) -> dict[str, Path]:
    """The depth net's fp32 TFLite alone, at ``size``, in both forms (cached in ``folder``)."""
    from common.quiet import quiet_tensorflow
    from export import tf_stages, tflite_stage
    from models import fp16_tf
    from models.depth import keras_depth_model

    tf = quiet_tensorflow()
    paths = {}
    for form in FORMS:
        dest = folder / f"{name}_{size[0]}x{size[1]}_{form}.tflite"
        if not dest.is_file():
            with fp16_tf.naive_fp16() if form == "textbook" else contextlib.nullcontext():
                model = keras_depth_model(name, height=size[0], width=size[1])
            spec = tf.TensorSpec((1, *size, 3), tf.float32, name="input")
            fn = tf.function(lambda x, m=model: m(x), input_signature=[spec])
            frozen, io_spec = tf_stages.freeze(fn, dest.with_suffix(".pb"))
            with contextlib.redirect_stdout(io.StringIO()):
                tflite_stage.to_tflite(frozen, io_spec, dest)
        paths[form] = dest
    return paths


def time_pair(part: str, paths: dict[str, Path], threads: int, runs: int,
              echo: Callable[[str], None] = print) -> dict:
    """Both forms interleaved in LiteRT on one seeded input: medians, ratio, ops, difference."""
    from export.tflite_info import inspect_tflite
    from validate.runtime import tflite_engine, time_interleaved

    engines = {form: tflite_engine(path, threads, runtime="litert") for form, path in paths.items()}
    infos = {form: inspect_tflite(path) for form, path in paths.items()}
    shape = tuple(infos["textbook"].inputs[0]["shape"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    echo(f"{part}: {runs} interleaved round(s), {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, pause_s=0.5)
    slow, safe = (stats[f]["median_s"] for f in FORMS)
    ops = {form: sum(info.op_histogram.values()) for form, info in infos.items()}
    return {"part": part, "input": list(shape),
            **{f"{form}_median_s": stats[form]["median_s"] for form in FORMS},
            "ratio": round(safe / slow, 4),
            "ops": ops,
            "max_abs_diff": float(np.abs(stats["fp16-safe"]["output"]
                                         - stats["textbook"]["output"]).max())}


def measure(export_dir: Path, out: Path, nets: tuple[str, ...], threads: int, runs: int,
            short_side: int | None = None, echo: Callable[[str], None] = print) -> dict:
    """Every row: NAFNet at the export's size, then each depth net at its size inside it."""
    from models.depth import depth_input_size

    manifest = read_json(export_dir / "nafnet_fp32.manifest.json")
    sim = export_dir / "nafnet_sim.onnx"
    if not sim.is_file():
        raise UserError(f"{sim}: no such file; run the export first")
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(manifest["inputs"][0]["shape"])
    height, width = shape[1:3]
    echo(f"NAFNet at {height}x{width}: building both forms")
    rows = [time_pair("NAFNet", nafnet_pair(sim, shape, out), threads, runs, echo)]
    for name in nets:
        size = depth_input_size(name, height, width, short_side)
        echo(f"{name} at {size[0]}x{size[1]}: building both forms")
        rows.append(time_pair(name, depth_pair(name, size, out), threads, runs, echo))
    return {"height": height, "width": width, "threads": threads, "runs": runs, "rows": rows}


def markdown(result: dict, command: str) -> str:
    """The table for docs/benchmarks.md."""
    lines = [f"Photo size {result['height']}x{result['width']}; LiteRT, fp32, XNNPACK, "
             f"{result['threads']} threads, {result['runs']} interleaved rounds after one warm-up "
             "(0.5 s idle before each call), medians. Random weights (seed 0).", "",
             f"Command: `{command}`", "",
             "| part | input | textbook s | fp16-safe s | fp16-safe / textbook | ops (textbook "
             "-> fp16-safe) | max abs diff |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']} | {'x'.join(str(d) for d in r['input'][1:3])} | "
                     f"{r['textbook_median_s']:.3f} | {r['fp16-safe_median_s']:.3f} | "
                     f"{r['ratio']:.3f} | {r['ops']['textbook']} -> {r['ops']['fp16-safe']} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m validate.fp16_speed") -> int:
    from validate.depth_bench import NETS

    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", default="build/export",
                   help="an export (its NAFNet ONNX and size; %(default)s)")
    p.add_argument("--nets", default=",".join(NETS), help="depth nets (%(default)s)")
    p.add_argument("--depth-short-side", type=positive_int,
                   help="the depth nets' input short side (default: each net's own)")
    p.add_argument("--out", default="build/fp16-speed", help="the built pairs (%(default)s)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--doc", help="markdown file whose fp16-speed section to update")
    args = p.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])

    def body() -> int:
        from models.depth import DEPTH_NETS
        from validate.doc import publish_section

        nets = name_list(args.nets, "nets", tuple(DEPTH_NETS))
        result = measure(Path(args.export_dir), Path(args.out), nets, args.threads, args.runs,
                         args.depth_short_side)
        write_json(Path(args.out) / "fp16_speed.json", result)
        text = markdown(result, command)
        if args.doc:
            publish_section(args.doc, "fp16-speed", text)
        else:
            print(text)
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
