"""The staged export: each stage a function from artifact to artifact, composed here.

Every run writes, under one output folder, the artifacts of every stage, a manifest next to each
.tflite (so no later command asks the user for shapes, names or weights again) and report.json
with per-stage timings, op histograms, Flex ops, maximum rank and the GPU-compatibility verdict.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.files import ensure_writable_dir, read_json, write_bytes, write_json
from export import onnx_stages, tf_stages, tflite_stage
from models.nafnet import PAPER_CONFIG, load_nafnet, random_nafnet

MANIFEST_FORMAT = "bokehlite-manifest/1"
DPT_VARIANTS = ("hybrid", "large", "tiny")
# `validate parity` defaults, per model, variant and output (outputs in [0, 1]): "atol" bounds the
# largest absolute difference, "min_psnr" the PSNR in dB against the PyTorch reference.
TOLERANCE = {
    "nafnet": {"fp32": {"output": {"atol": 1e-4}},
               "fp16": {"output": {"atol": 2e-2, "min_psnr": 45.0}}},
    "bokeh": {"fp32": {"bokeh": {"min_psnr": 60.0}, "mask": {"atol": 1e-3}},
              "fp16": {"bokeh": {"min_psnr": 45.0}, "mask": {"atol": 5e-2}},
              # Quantized variants (calibration/): PSNR floors from measurements on held-out
              # photos and random inputs, docs/benchmarks.md.
              "drq": {"bokeh": {"min_psnr": 40.0}, "mask": {"min_psnr": 30.0}},
              "int8": {"bokeh": {"min_psnr": 30.0}, "mask": {"min_psnr": 20.0}},
              "int16x8": {"bokeh": {"min_psnr": 40.0}, "mask": {"min_psnr": 30.0}},
              "int8-selective": {"bokeh": {"min_psnr": 30.0}, "mask": {"min_psnr": 20.0}}},
}
QUANT_VARIANTS = ("drq", "int8", "int16x8")  # fused model only; int16x8 where TFLite allows
DESCRIPTIONS = {
    "nafnet": {"input": "photo RGB + depth mask, NHWC, values in [0, 1]",
               "output": "bokeh RGB, NHWC, about [0, 1] (not clipped)"},
    "bokeh": {"photo": "photo RGB, NHWC, values in [0, 1]",
              "bokeh": "bokeh RGB, NHWC, clipped to [0, 1]",
              "mask": "depth mask from DPT, NHWC, per-image min-max to [0, 1] (1 = near)"},
}
RANDOM_WEIGHTS_WARNING = (
    "NO CHECKPOINT GIVEN: NAFNet has deterministic RANDOM weights (seed {seed}). The files prove "
    "the conversion, not the rendering. Pass --checkpoint (make export NAFNET_CKPT=...) for a "
    "real model."
)
RANDOM_DPT_WARNING = (
    "NO DPT WEIGHTS GIVEN: the depth net is a RANDOM DPT-{variant} (seed {seed}), so the depth "
    "mask is MEANINGLESS. Parity still proves the conversion. Pass --dpt-weights "
    "(make export DPT_WEIGHTS=dpt_hybrid_384.pt) for real depth."
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
        else:
            self.echo(f"  ok {name:<12} {seconds:6.1f} s")
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


def load_depth_net(weights: str | Path | None, variant: str = "hybrid",
                   seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The PyTorch DPT to port and its manifest record (official file, else random weights)."""
    from models.dpt import DPT, default_dpt_config, random_dpt, tiny_dpt_config

    if weights:
        model = DPT.from_midas_checkpoint(weights)
        record = {"checkpoint": str(Path(weights).resolve()), "random_seed": None}
    else:
        if variant not in DPT_VARIANTS:
            raise UserError(f"unknown DPT variant {variant!r}; expected one of {DPT_VARIANTS}")
        config = (tiny_dpt_config("hybrid") if variant == "tiny"
                  else default_dpt_config(variant))
        model = random_dpt(config, seed)
        record = {"checkpoint": None, "random_seed": seed}
    return model.eval(), {**record, "config": dataclasses.asdict(model.config)}


def _software_versions() -> dict:
    import onnx
    import onnxruntime

    tf = tf_stages.quiet_tensorflow()

    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "tensorflow": tf.__version__}


def export(
    out_dir: str | Path = "build/export",
    height: int = 1024,
    width: int = 1536,
    checkpoint: str | Path | None = None,
    dpt_weights: str | Path | None = None,
    dpt_variant: str = "hybrid",
    dpt_short_side: int = 384,
    fuse: bool = True,
    variants: tuple[str, ...] = ("fp32", "fp16"),
    quant_variants: tuple[str, ...] = (),
    calib_dir: str | Path | None = None,
    calib_samples: int = 8,
    opset: int = onnx_stages.DEFAULT_OPSET,
    allow_flex: bool = False,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """Export NAFNet (photo + mask in) and, with ``fuse``, the fused DPT + NAFNet model
    (photo in), every stage and TFLite variant, NHWC; return the report.

    ``quant_variants`` (of ``QUANT_VARIANTS``) are written for the fused model only, calibrated
    on ``calib_samples`` photos from ``calib_dir`` (default: the embedded set, calibration/).

    Raises ``UserError`` for bad input and ``tflite_stage.FlexOpsRequired`` when a variant needs
    Flex ops and ``allow_flex`` is off (the Flex file is written, the builtin one is not).
    """
    if height < 16 or width < 16:
        raise UserError(f"size {height}x{width} is too small; NAFNet needs at least 16x16")
    for v in variants:
        if v not in tflite_stage.VARIANTS:
            raise UserError(f"unknown variant {v!r}; this export writes {tflite_stage.VARIANTS}")
    for v in quant_variants:
        if v not in QUANT_VARIANTS:
            raise UserError(f"unknown quantized variant {v!r}; expected some of {QUANT_VARIANTS}")
    if not 12 <= opset <= 15:
        raise UserError(f"opset {opset} is outside 12-15, the range onnx-tf 1.10 converts")
    if fuse and (dpt_short_side < 32 or dpt_short_side % 32):
        raise UserError(f"--dpt-short-side {dpt_short_side} must be a positive multiple of 32")
    out = ensure_writable_dir(out_dir)
    calibration = None
    if fuse and quant_variants:  # before the long stages, so a bad folder fails at once
        from calibration.dataset import calibration_set

        calibration = calibration_set(height, width, calib_samples, calib_dir)
    model, weights = load_generator(checkpoint, seed)
    warnings = [RANDOM_WEIGHTS_WARNING.format(seed=seed)] if checkpoint is None else []
    depth = None
    if fuse:
        from models.dpt import dpt_input_size

        dpt, dpt_record = load_depth_net(dpt_weights, dpt_variant, seed)
        dpt_size = dpt_input_size(height, width, dpt_short_side)
        depth = {**dpt_record, "input_size": list(dpt_size)}
        if dpt_weights is None:
            warnings.append(RANDOM_DPT_WARNING.format(variant=dpt_variant, seed=seed))
    for w in warnings:
        echo(_banner(w))

    config = dict(model.config)
    log = StageLog(out, echo)
    report = {
        "height": height, "width": width, "nafnet_config": config, "weights": weights,
        "dpt": depth, "warnings": warnings, "opset": opset, "software": _software_versions(),
        "stages": log.stages, "variants": {},
    }
    common = {"format": MANIFEST_FORMAT, "nafnet_config": config, "weights": weights,
              "dpt": depth, "warnings": warnings, "height": height, "width": width,
              "report": "report.json"}
    try:
        echo(f"Exporting NAFNet{tuple(config['enc_blocks'])} width {config['width']} at "
             f"{height}x{width} to {out}/")
        nafnet_stages, saved, report["rewrites"] = _nafnet_graphs(
            model, out, height, width, opset, log)
        fn = tf_stages.nchw_to_nhwc_function(saved, (1, height, width, config["in_channels"]))
        frozen, io_spec = log.run("freeze", tf_stages.freeze, fn, out / "nafnet_frozen.pb")
        nafnet_stages.append(_stage("frozen-graph", "frozen_graph", frozen, "NHWC", io_spec))
        _write_variants("nafnet", frozen, io_spec, variants, {**common, "model": "nafnet",
                        "stages": nafnet_stages}, report, log, allow_flex)
        if fuse:
            from export.fuse import OUTPUT_NAMES, fused_function, save_fused
            from models.dpt_tf import keras_dpt_from_torch

            echo(f"Fusing DPT-{depth['config']['variant']} at {dpt_size[0]}x{dpt_size[1]} "
                 "with NAFNet")
            keras_dpt = log.run("keras-dpt", keras_dpt_from_torch, dpt, *dpt_size,
                                note="building the Keras DPT and porting its weights")
            fused = fused_function(keras_dpt, saved, height, width)
            fused_saved = log.run("fuse", save_fused, fused, out / "bokeh_savedmodel",
                                  note="tracing DPT + NAFNet into one graph")
            frozen_fused, fused_spec = log.run("freeze-fused", tf_stages.freeze, fused,
                                               out / "bokeh_frozen.pb", OUTPUT_NAMES)
            bokeh_stages = [*nafnet_stages,
                            _stage("bokeh-savedmodel", "saved_model", fused_saved, "NHWC",
                                   fused_spec, role="bokeh"),
                            _stage("bokeh-frozen-graph", "frozen_graph", frozen_fused, "NHWC",
                                   fused_spec, role="bokeh")]
            _write_variants("bokeh", frozen_fused, fused_spec, variants,
                            {**common, "model": "bokeh", "stages": bokeh_stages}, report, log,
                            allow_flex)
            if calibration:
                _write_quant_variants(frozen_fused, fused_spec, quant_variants, calibration,
                                      {**common, "model": "bokeh", "stages": bokeh_stages},
                                      report, log)
    finally:
        write_json(out / "report.json", report)
        write_bytes(out / "report.txt", summary_text(report).encode())
    echo(summary_text(report))
    return report


def _nafnet_graphs(model, out: Path, height: int, width: int, opset: int, log: StageLog):
    """Stages 1-3 for NAFNet: ONNX, simplified, rewritten for mobile, SavedModel."""
    shape = (1, model.config["in_channels"], height, width)
    raw = log.run("onnx", onnx_stages.to_onnx, model, shape, out / "nafnet.onnx", opset=opset)
    simplified = log.run("simplify", onnx_stages.simplify, raw, out / "nafnet_sim.onnx")
    mobile, rewrites = log.run("rewrite", onnx_stages.rewrite, simplified,
                               out / "nafnet_mobile.onnx")
    saved = log.run("tensorflow", tf_stages.to_tensorflow, mobile, out / "nafnet_savedmodel",
                    note="onnx-tf conversion (about 30 s)")
    stages = [_stage("onnx", "onnx", raw, "NCHW"),
              _stage("onnx-simplified", "onnx", simplified, "NCHW"),
              _stage("onnx-mobile", "onnx", mobile, "NCHW"),
              _stage("tf-savedmodel", "saved_model", saved, "NCHW")]
    return stages, saved, rewrites


def _stage(name: str, engine: str, path: Path, layout: str, io_spec: dict | None = None,
           role: str = "nafnet") -> dict:
    """A manifest entry telling `validate parity` how to run one stage's artifact."""
    entry = {"name": name, "engine": engine, "path": path.name, "layout": layout, "role": role}
    if io_spec:
        entry.update(inputs=list(io_spec["inputs"]), outputs=list(io_spec["outputs"]))
    return entry


def _write_variants(prefix: str, frozen: Path, io_spec: dict, variants: tuple[str, ...],
                    manifest_base: dict, report: dict, log: StageLog, allow_flex: bool) -> None:
    """Convert ``frozen`` to each TFLite variant and write its manifest beside it."""
    for variant in variants:
        tflite = log.out_dir / f"{prefix}_{variant}.tflite"
        try:
            log.run(f"tflite-{prefix}-{variant}", tflite_stage.to_tflite, frozen, io_spec,
                    tflite, variant)
        except tflite_stage.FlexOpsRequired as exc:
            report["variants"][exc.flex_path.name] = {"flex_ops": exc.flex_ops}
            log.echo(_banner(f"FLEX OPS: {exc}"))
            if not allow_flex:
                raise
            tflite = exc.flex_path
        _write_manifest(tflite, variant, manifest_base, report)


def _write_manifest(tflite: Path, variant: str, manifest_base: dict, report: dict,
                    extra: dict | None = None) -> None:
    descriptions = DESCRIPTIONS[manifest_base["model"]]
    info = tflite_stage.inspect_tflite(tflite)
    report["variants"][tflite.name] = _variant_summary(info)
    manifest = {
        **manifest_base, "variant": variant, "tflite": tflite.name,
        "inputs": [_io_entry(t, descriptions[t["name"]]) for t in info.inputs],
        "outputs": [_io_entry(t, descriptions[t["name"]]) for t in info.outputs],
        "tolerance": TOLERANCE[manifest_base["model"]][variant],
        "flex_ops": info.flex_ops, "max_rank": info.max_rank,
        "gpu_compatible": info.gpu_compatible, **(extra or {}),
    }
    write_json(tflite.with_suffix(".manifest.json"), manifest)


def _write_quant_variants(frozen: Path, io_spec: dict, variants: tuple[str, ...], calibration,
                          manifest_base: dict, report: dict, log: StageLog) -> None:
    """Quantized variants of the fused model, each smoke-run once; a variant that cannot be
    built or run (int16x8 here) is recorded as not supported and the export goes on."""
    from calibration.variants import QuantizationUnsupported, float_ops, quantize_variant

    for variant in variants:
        tflite = log.out_dir / f"bokeh_{variant}.tflite"
        try:
            _, notes = log.run(f"tflite-bokeh-{variant}", quantize_variant, frozen, io_spec,
                               tflite, variant, calibration)
        except QuantizationUnsupported as exc:
            report["variants"][tflite.name] = {"unsupported": str(exc)}
            log.echo(f"  -- {tflite.name}: {exc}")
            continue
        _write_manifest(tflite, variant, manifest_base, report,
                        {"quantization": {"calibration": calibration.record, "notes": notes,
                                          "float_ops": float_ops(tflite)}})


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
    lines = [f"Export summary ({report['height']}x{report['width']}):"]
    for w in report["warnings"]:
        lines.append(f"  WARNING: {w}")
    total = sum(s["seconds"] for s in report["stages"])
    lines.append(f"  {len(report['stages'])} stages in {total:.0f} s")
    for name, v in report["variants"].items():
        if "unsupported" in v:
            lines.append(f"  {name}: {v['unsupported']}")
            continue
        if "ops" not in v:
            lines.append(f"  {name}: FAILED builtin conversion; Flex ops {v['flex_ops']}")
            continue
        top = ", ".join(f"{k} {n}" for k, n in list(v["ops"].items())[:3])
        lines.append(
            f"  {name}: {_human(v['bytes'])}, {sum(v['ops'].values())} ops ({top} ...), "
            f"Flex ops: {', '.join(v['flex_ops']) or 'none'}, max rank {v['max_rank']}, "
            f"GPU delegate: {'compatible' if v['gpu_compatible'] else 'ISSUES'}")
    for name, p in report.get("parity", {}).items():
        lines.append(f"  parity {name}: {'PASS' if p['passed'] else 'FAIL'} "
                     f"({p['summary']})")
    return "\n".join(lines) + "\n"


def record_parity(report_path: str | Path, tflite_name: str, result: dict) -> None:
    """Add a parity result to an export's report.json (validate parity calls this)."""
    report_path = Path(report_path)
    report = read_json(report_path)
    report.setdefault("parity", {})[tflite_name] = result
    write_json(report_path, report)
    write_bytes(report_path.parent / "report.txt", summary_text(report).encode())
