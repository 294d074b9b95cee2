"""The staged export: each stage a function from artifact to artifact, composed here.

Every run writes, under one output folder, the artifacts of every stage, a manifest next to each
.tflite (so no later command asks the user for shapes, names or weights again) and report.json
with per-stage timings, op histograms, Flex ops, maximum rank and the GPU-compatibility verdict.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export import onnx_stages, tf_stages, tflite_stage
from export.io import UserError, ensure_writable_dir, read_json, write_bytes, write_json
from models.nafnet import PAPER_CONFIG, load_nafnet, random_nafnet

MANIFEST_FORMAT = "bokehlite-manifest/1"
# Per-variant defaults for `validate parity` (absolute difference on outputs in [0, 1]).
TOLERANCE = {"fp32": {"atol": 1e-4}, "fp16": {"atol": 2e-2, "min_psnr": 45.0}}
RANDOM_WEIGHTS_WARNING = (
    "NO CHECKPOINT GIVEN: NAFNet has deterministic RANDOM weights (seed {seed}). The files prove "
    "the conversion, not the rendering. Pass --checkpoint (make export NAFNET_CKPT=...) for a "
    "real model."
)


@dataclass
class StageLog:
    """Collects what each stage did, prints one line per stage and becomes report.json."""

    out_dir: Path
    echo: Callable[[str], None] = print
    stages: list[dict] = field(default_factory=list)

    def run(self, name: str, fn: Callable, *args, note: str = "", **kwargs):
        if note:
            self.echo(f"  .. {name}: {note}")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        artifact = result[0] if isinstance(result, tuple) else result
        entry = {"stage": name, "seconds": round(seconds, 2)}
        if isinstance(artifact, Path):
            entry.update(artifact=artifact.name, bytes=_size(artifact))
            self.echo(f"  ok {name:<12} {seconds:6.1f} s  {artifact}  ({_human(entry['bytes'])})")
        self.stages.append(entry)
        return result


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def load_generator(checkpoint: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The NAFNet to export and the manifest's record of where its weights came from."""
    if checkpoint:
        model = load_nafnet(checkpoint)
        return model, {"checkpoint": str(Path(checkpoint).resolve()), "random_seed": None}
    return random_nafnet(PAPER_CONFIG, seed), {"checkpoint": None, "random_seed": seed}


def _software_versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf

    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "tensorflow": tf.__version__}


def export_nafnet(
    out_dir: str | Path = "build/export",
    height: int = 1024,
    width: int = 1536,
    checkpoint: str | Path | None = None,
    variants: tuple[str, ...] = ("fp32", "fp16"),
    opset: int = onnx_stages.DEFAULT_OPSET,
    allow_flex: bool = False,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """Export NAFNet (photo + mask in, NHWC) to every stage and TFLite variant; return the report.

    Raises ``UserError`` for bad input and ``tflite_stage.FlexOpsRequired`` when a variant needs
    Flex ops and ``allow_flex`` is off (the Flex file is written, the builtin one is not).
    """
    if height < 16 or width < 16:
        raise UserError(f"size {height}x{width} is too small; NAFNet needs at least 16x16")
    for v in variants:
        if v not in tflite_stage.VARIANTS:
            raise UserError(f"unknown variant {v!r}; this export writes {tflite_stage.VARIANTS}")
    out = ensure_writable_dir(out_dir)
    model, weights = load_generator(checkpoint, seed)
    config = dict(model.config)
    channels = config["in_channels"]
    warnings = [RANDOM_WEIGHTS_WARNING.format(seed=seed)] if checkpoint is None else []
    for w in warnings:
        echo(_banner(w))

    log = StageLog(out, echo)
    echo(f"Exporting NAFNet{tuple(config['enc_blocks'])} width {config['width']} at "
         f"{height}x{width} to {out}/")
    raw = log.run("onnx", onnx_stages.to_onnx, model, (1, channels, height, width),
                  out / "nafnet.onnx", opset=opset)
    simplified = log.run("simplify", onnx_stages.simplify, raw, out / "nafnet_sim.onnx")
    mobile, rewrites = log.run("rewrite", onnx_stages.rewrite, simplified,
                               out / "nafnet_mobile.onnx")
    saved = log.run("tensorflow", tf_stages.to_tensorflow, mobile, out / "nafnet_savedmodel",
                    note="onnx-tf conversion (about a minute at 1024x1536)")
    fn = tf_stages.nchw_to_nhwc_function(saved, (1, height, width, channels))
    frozen, io_spec = log.run("freeze", tf_stages.freeze, fn, out / "nafnet_frozen.pb")

    stages = [
        {"name": "onnx", "engine": "onnx", "path": raw.name, "layout": "NCHW"},
        {"name": "onnx-simplified", "engine": "onnx", "path": simplified.name, "layout": "NCHW"},
        {"name": "onnx-mobile", "engine": "onnx", "path": mobile.name, "layout": "NCHW"},
        {"name": "tf-savedmodel", "engine": "saved_model", "path": saved.name, "layout": "NCHW"},
        {"name": "frozen-graph", "engine": "frozen_graph", "path": frozen.name, "layout": "NHWC"},
    ]
    report = {
        "model": "nafnet", "height": height, "width": width, "nafnet_config": config,
        "weights": weights, "warnings": warnings, "opset": opset, "rewrites": rewrites,
        "software": _software_versions(), "stages": log.stages, "variants": {},
    }
    try:
        for variant in variants:
            tflite = out / f"nafnet_{variant}.tflite"
            try:
                log.run(f"tflite-{variant}", tflite_stage.to_tflite, frozen, io_spec, tflite,
                        variant)
            except tflite_stage.FlexOpsRequired as exc:
                report["variants"][variant] = {"flex": str(exc.flex_path.name),
                                               "flex_ops": exc.flex_ops}
                echo(_banner(f"FLEX OPS: {exc}"))
                if not allow_flex:
                    raise
                tflite = exc.flex_path
            info = tflite_stage.inspect_tflite(tflite)
            report["variants"][variant] = _variant_summary(info)
            manifest = {
                "format": MANIFEST_FORMAT, "model": "nafnet", "variant": variant,
                "tflite": tflite.name, "nafnet_config": config, "weights": weights,
                "warnings": warnings, "height": height, "width": width,
                "inputs": [_io_entry(i, "photo RGB + depth mask, NHWC, values in [0, 1]")
                           for i in info.inputs],
                "outputs": [_io_entry(o, "bokeh RGB, NHWC, about [0, 1] (not clipped)")
                            for o in info.outputs],
                "tolerance": TOLERANCE[variant], "stages": stages, "report": "report.json",
                "flex_ops": info.flex_ops, "max_rank": info.max_rank,
                "gpu_compatible": info.gpu_compatible,
            }
            write_json(tflite.with_suffix(".manifest.json"), manifest)
    finally:
        write_json(out / "report.json", report)
        write_bytes(out / "report.txt", summary_text(report).encode())
    echo(summary_text(report))
    return report


def _io_entry(tensor: dict, description: str) -> dict:
    return {**tensor, "layout": "NHWC", "range": [0.0, 1.0], "description": description}


def _variant_summary(info: tflite_stage.TFLiteInfo) -> dict:
    return {
        "tflite": Path(info.path).name, "bytes": info.size_bytes, "ops": info.op_histogram,
        "flex_ops": info.flex_ops, "max_rank": info.max_rank,
        "gpu_compatible": info.gpu_compatible, "gpu_messages": info.gpu_messages[:5],
    }


def _banner(text: str) -> str:
    bar = "!" * 78
    return f"\n{bar}\n!! {text}\n{bar}\n"


def summary_text(report: dict) -> str:
    """A few lines a person reads after the export: per variant size, ops, Flex, rank, GPU."""
    lines = [f"Export summary ({report['model']} {report['height']}x{report['width']}):"]
    for w in report["warnings"]:
        lines.append(f"  WARNING: {w}")
    total = sum(s["seconds"] for s in report["stages"])
    lines.append(f"  stages: {', '.join(s['stage'] for s in report['stages'])} ({total:.0f} s)")
    for variant, v in report["variants"].items():
        if "ops" not in v:
            lines.append(f"  {variant}: FAILED builtin conversion; Flex ops {v['flex_ops']}")
            continue
        top = ", ".join(f"{k} {n}" for k, n in list(v["ops"].items())[:4])
        lines.append(
            f"  {v['tflite']}: {_human(v['bytes'])}, {sum(v['ops'].values())} ops ({top} ...), "
            f"Flex ops: {', '.join(v['flex_ops']) or 'none'}, max rank {v['max_rank']}, "
            f"TF GPU analyzer: {'compatible' if v['gpu_compatible'] else 'issues'}")
    for name, p in report.get("parity", {}).items():
        lines.append(f"  parity {name}: max abs diff {p['max_abs_diff']:.2e} "
                     f"({'PASS' if p['passed'] else 'FAIL'})")
    return "\n".join(lines) + "\n"


def record_parity(report_path: str | Path, tflite_name: str, result: dict) -> None:
    """Add a parity result to an export's report.json (validate parity calls this)."""
    report_path = Path(report_path)
    report = read_json(report_path)
    report.setdefault("parity", {})[tflite_name] = result
    write_json(report_path, report)
    write_bytes(report_path.parent / "report.txt", summary_text(report).encode())
