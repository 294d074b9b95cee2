"""The staged export: each stage a function from artifact to artifact, composed here.

Every run writes, under one output folder, the artifacts of every stage, a manifest next to each
.tflite (so no later command asks the user for shapes, names or weights again) and report.json
with per-stage timings, op histograms, Flex ops, maximum rank and the GPU-compatibility verdict.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from common.errors import UserError
from common.quiet import quiet_tensorflow
from export import folder, onnx_stages, tf_stages, tflite_stage
from export.manifest import MANIFEST_FORMAT, write_manifest
from export.quantize import QUANT_VARIANTS, write_quant_variants
from export.report import StageLog, banner, summary_text, write_report
from models.nafnet import PAPER_CONFIG, load_nafnet, random_nafnet

RANDOM_WEIGHTS_WARNING = (
    "NO CHECKPOINT GIVEN: NAFNet has deterministic RANDOM weights (seed {seed}). The files prove "
    "the conversion, not the rendering. Pass --checkpoint (make export NAFNET_CKPT=...) for a "
    "real model."
)
RANDOM_DEPTH_WARNING = (
    "NO DEPTH WEIGHTS GIVEN: the depth net is a RANDOM {name} ({title}, seed {seed}), so the "
    "depth mask is MEANINGLESS. Parity still proves the conversion. Pass --depth-weights "
    "(make export DEPTH={name} DEPTH_WEIGHTS={file}) for real depth."
)


def load_generator(checkpoint: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The NAFNet to export and the manifest's record of where its weights came from, with the
    depth net whose masks it was trained on (``trained_with_depth``: the trainer's record,
    ``None`` when the checkpoint does not say)."""
    if checkpoint:
        from collections.abc import Mapping

        from models.checkpoint import read_checkpoint

        model = load_nafnet(checkpoint)
        raw = read_checkpoint(checkpoint)[0]
        trained = raw.get("depth") if isinstance(raw, Mapping) else None
        return model, {"checkpoint": str(Path(checkpoint).resolve()), "random_seed": None,
                       "trained_with_depth": trained if isinstance(trained, dict) else None}
    return random_nafnet(PAPER_CONFIG, seed), {"checkpoint": None, "random_seed": seed,
                                               "trained_with_depth": None}


def follow_checkpoint(weights: dict, depth: str | None, depth_weights: str | Path | None,
                      short_side: int | None, seed: int, allow_mismatch: bool,
                      warnings: list[str]) -> tuple[str | None, str | Path | None, int | None]:
    """The depth net to fuse for a NAFNet trained on masks of ``weights["trained_with_depth"]``:
    that net, its weights file (the recorded path, when it still holds the same bytes) and
    short side, unless given. Another net, weights file or short side is refused in one line
    naming both, or with ``allow_mismatch`` said in ``warnings``."""
    from models.depth import (
        describe_mask_source,
        file_sha256,
        mask_source,
        resolve_depth_name,
        same_masks,
    )

    trained = weights.get("trained_with_depth")
    if not trained:
        return depth, depth_weights, short_side
    recorded = trained.get("weights")
    if depth_weights is None and recorded and Path(recorded).is_file() and (
            file_sha256(recorded) == trained.get("weights_sha256")):
        depth_weights = recorded
    name = resolve_depth_name(depth or (None if depth_weights else trained["name"]),
                              depth_weights)
    short_side = trained["short_side"] if short_side is None and name == trained["name"] \
        else short_side
    fused = mask_source(name, depth_weights, seed, short_side)
    if not same_masks(trained, fused):
        line = (f"{weights['checkpoint']}: NAFNet was trained on masks of "
                f"{describe_mask_source(trained)}, but this export would fuse "
                f"{describe_mask_source(fused)}")
        if not allow_mismatch:
            hint = ("give --depth-weights with that file" if trained.get("weights_sha256")
                    and name == trained["name"] else "export with the net it was trained with")
            raise UserError(f"{line}; {hint}, or --allow-depth-mismatch to fuse it anyway")
        warnings.append(f"DEPTH MISMATCH (--allow-depth-mismatch): {line}; the masks it "
                        "reads are not distributed like those it learned from")
    return name, depth_weights, short_side


def load_depth_net(weights: str | Path | None, name: str | None = None,
                   seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The PyTorch depth net to port (its file, else random weights) and its manifest record
    (models/depth.py; the input size is added once known)."""
    from models.depth import depth_record, load_depth_model, resolve_depth_name

    name = resolve_depth_name(name, weights)
    model = load_depth_model(name, weights, seed)
    return model, depth_record(name, model, weights, seed)


def _software_versions() -> dict:
    import onnx
    import onnxruntime

    tf = quiet_tensorflow()

    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "tensorflow": tf.__version__}


def check_size(height: int, width: int) -> None:
    """Refuse up front a size the pipeline cannot take (onnx-tf fails late on the padding that
    NAFNet adds to reach a multiple of 16)."""
    if height < 16 or width < 16 or height % 16 or width % 16:
        near = f"{max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)}"
        raise UserError(f"size {height}x{width}: height and width must be multiples of 16 "
                        f"(NAFNet downsamples 4 times), at least 16; e.g. {near}")


def export(
    out_dir: str | Path = "build/export",
    height: int = 1024,
    width: int = 1536,
    checkpoint: str | Path | None = None,
    depth: str | None = None,
    depth_weights: str | Path | None = None,
    depth_short_side: int | None = None,
    fuse: bool = True,
    controls: bool = False,
    variants: tuple[str, ...] = ("fp32", "fp16"),
    quant_variants: tuple[str, ...] = (),
    calibration=None,
    opset: int = onnx_stages.DEFAULT_OPSET,
    allow_flex: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    gpu_check: bool = True,
    echo: Callable[[str], None] = print,
    dpt_weights: str | Path | None = None,
    dpt_variant: str | None = None,
    dpt_short_side: int | None = None,
    reuse_nafnet: str | Path | None = None,
    allow_depth_mismatch: bool = False,
) -> dict:
    """Export NAFNet (photo + mask in) and, with ``fuse``, the fused depth net + NAFNet model
    (photo in), every stage and TFLite variant, NHWC; return the report.

    ``depth`` names a net of models/depth.py (default: the net ``depth_weights`` is, else
    DPT-Hybrid); ``depth_weights`` is its file (default: random weights, said loudly);
    ``depth_short_side`` its input short side (default: the net's own). ``dpt_weights``,
    ``dpt_variant`` (hybrid, large, tiny) and ``dpt_short_side`` are their old names.
    A ``checkpoint`` that records the depth net its masks came from (``bokeh train``) decides
    the fused net: ``depth``, ``depth_weights`` and ``depth_short_side`` default to it, and
    another is refused unless ``allow_depth_mismatch`` (``follow_checkpoint``).
    ``reuse_nafnet``: an export folder of the same NAFNet (weights, size, opset) whose ONNX,
    SavedModel and frozen graph are copied instead of converted again (to fuse several depth
    nets with one NAFNet conversion).

    With ``controls`` (and ``fuse``) the fused model is also written with two more inputs,
    ``focus`` and ``strength`` (export/fuse.py), as ``bokeh_controls_{variant}.tflite``; the plain
    files are unchanged.
    ``quant_variants`` (of ``QUANT_VARIANTS``) are written for the fused model only, calibrated
    on ``calibration`` (calibration.dataset.calibration_set), which they need.
    The run owns ``out_dir`` (export/folder.py): refused if it holds another export and
    ``overwrite`` is off; the new set replaces the old one only when every stage succeeded.
    ``gpu_check``: every float TFLite file is run once on LiteRT's GPU accelerator where a GPU
    device is found, and its manifest records the verdict (ran, failed, not tried).

    Raises ``UserError`` for bad input and ``tflite_stage.FlexOpsRequired`` when a variant needs
    Flex ops and ``allow_flex`` is off (the Flex file is kept in ``failed-run/``).
    """
    check_size(height, width)
    for v in variants:
        if v not in tflite_stage.VARIANTS:
            raise UserError(f"unknown variant {v!r}; this export writes {tflite_stage.VARIANTS}")
    for v in quant_variants:
        if v not in QUANT_VARIANTS:
            raise UserError(f"unknown quantized variant {v!r}; expected some of {QUANT_VARIANTS}")
    if fuse and quant_variants and calibration is None:
        raise UserError("quantized variants need calibration data (calibration_set)")
    if not 12 <= opset <= 15:
        raise UserError(f"opset {opset} is outside 12-15, the range onnx-tf 1.10 converts")
    depth_weights = _same("--depth-weights", depth_weights, "--dpt-weights", dpt_weights)
    depth_short_side = _same("--depth-short-side", depth_short_side, "--dpt-short-side",
                             dpt_short_side)
    if dpt_variant is not None:
        from models.depth import depth_net

        old = depth_net(dpt_variant).name
        depth = _same("--depth", depth and depth_net(depth).name, "--dpt-variant", old)
    if fuse and depth:  # a bad name or short side fails before anything is loaded
        from models.depth import depth_input_size

        depth_input_size(depth, height, width, depth_short_side)
    folder.check(out_dir, overwrite)  # before loading anything: a bad folder fails at once
    model, weights = load_generator(checkpoint, seed)
    warnings = [RANDOM_WEIGHTS_WARNING.format(seed=seed)] if checkpoint is None else []
    if fuse:
        depth, depth_weights, depth_short_side = follow_checkpoint(
            weights, depth, depth_weights, depth_short_side, seed, allow_depth_mismatch,
            warnings)
    config = dict(model.config)
    if reuse_nafnet is not None:
        reuse_nafnet = _reusable_nafnet(Path(reuse_nafnet), height, width, opset, weights, config)
    record = None
    if fuse:
        from models.depth import depth_input_size, depth_net

        depth_model, record = load_depth_net(depth_weights, depth, seed)
        net = depth_net(record["name"])
        depth_size = depth_input_size(net.name, height, width, depth_short_side)
        record["input_size"] = list(depth_size)
        if depth_weights is None:
            warnings.append(RANDOM_DEPTH_WARNING.format(
                name=net.name, title=net.title, seed=seed, file=net.official_file or "FILE"))
    out, staging, run_id = folder.begin(out_dir, overwrite)
    for w in warnings:
        echo(banner(w))

    log = StageLog(staging, echo)
    report = {
        "run_id": run_id, "height": height, "width": width, "nafnet_config": config,
        "weights": weights, "depth": record, "warnings": warnings, "opset": opset,
        "software": _software_versions(), "stages": log.stages, "variants": {},
    }
    base = {"format": MANIFEST_FORMAT, "run_id": run_id, "nafnet_config": config,
            "weights": weights, "depth": record, "warnings": warnings, "height": height,
            "width": width, "report": "report.json"}
    try:
        echo(f"Exporting NAFNet{tuple(config['enc_blocks'])} width {config['width']} at "
             f"{height}x{width} to {out}/ (run {run_id})")
        if reuse_nafnet is None:
            nafnet_stages, saved, report["rewrites"] = _nafnet_graphs(
                model, staging, height, width, opset, log)
            fn = tf_stages.nchw_to_nhwc_function(saved, (1, height, width,
                                                         config["in_channels"]))
            frozen, io_spec = log.run("freeze", tf_stages.freeze, fn,
                                      staging / "nafnet_frozen.pb")
            nafnet_stages.append(_stage("frozen-graph", "frozen_graph", frozen, "NHWC", io_spec))
        else:
            report["nafnet_reused_from"] = str(reuse_nafnet.resolve())
            nafnet_stages, report["rewrites"], io_spec = log.run(
                "reuse-nafnet", _copy_nafnet, reuse_nafnet, staging,
                note=f"copying NAFNet's ONNX, SavedModel and frozen graph from {reuse_nafnet}")
            saved, frozen = staging / "nafnet_savedmodel", staging / "nafnet_frozen.pb"
        _write_variants("nafnet", frozen, io_spec, variants, {**base, "model": "nafnet",
                        "stages": nafnet_stages}, report, log, allow_flex, gpu_check)
        if fuse:
            from export.fuse import fused_function
            from models.depth import keras_from_torch

            echo(f"Fusing {net.name} at {depth_size[0]}x{depth_size[1]} with NAFNet "
                 f"({net.title}, {net.normalisation})")
            keras_depth = log.run("keras-depth", keras_from_torch, depth_model, *depth_size,
                                  note=f"building the Keras {net.name} and porting its weights")
            fused = fused_function(keras_depth, saved, height, width, net.mean, net.std)
            frozen_fused, fused_spec, bokeh_base = _write_fused(
                "bokeh", fused, nafnet_stages, base, variants, report, log, allow_flex,
                f"tracing {net.name} + NAFNet into one graph", gpu_check)
            if quant_variants:
                write_quant_variants(frozen_fused, fused_spec, quant_variants, calibration,
                                     bokeh_base, report, log)
            if controls:
                controlled = fused_function(keras_depth, saved, height, width, net.mean,
                                            net.std, controls=True)
                _write_fused("bokeh_controls", controlled, nafnet_stages,
                             {**base, "controls": control_manifest()}, variants, report, log,
                             allow_flex, f"tracing {net.name} + NAFNet with focus and strength",
                             gpu_check)
    except BaseException as exc:
        report["failed"] = f"{type(exc).__name__}: {exc}".strip()
        try:  # on a full disk this fails too: the staging folder then goes with the next run
            write_report(staging, report)
            kept = folder.abandon(out, staging)
        except OSError:
            kept = staging
        echo(f"EXPORT FAILED ({report['failed'][:200]}); {out} still holds the last complete "
             f"export; this run's files are in {kept}")
        raise
    report["files"] = sorted({p.name for p in staging.iterdir()} | {"report.json",
                                                                     "report.txt"})
    write_report(staging, report)
    folder.commit(out, staging)
    echo(summary_text(report))
    return report


def _write_fused(prefix: str, fused, nafnet_stages: list[dict], base: dict,
                 variants: tuple[str, ...], report: dict, log: StageLog,
                 allow_flex: bool, note: str, gpu_check: bool) -> tuple[Path, dict, dict]:
    """Save, freeze and convert one fused tf.function (``prefix`` "bokeh" or "bokeh_controls");
    return the frozen graph, its I/O and the manifest base of its TFLite files."""
    from export.fuse import OUTPUT_NAMES, save_fused

    tag = prefix.removeprefix("bokeh").replace("_", "-")  # "" or "-controls"
    saved = log.run(f"fuse{tag}", save_fused, fused, log.out_dir / f"{prefix}_savedmodel",
                    note=note)
    frozen, spec = log.run(f"freeze-fused{tag}", tf_stages.freeze, fused,
                           log.out_dir / f"{prefix}_frozen.pb", OUTPUT_NAMES)
    stages = [*nafnet_stages,
              _stage(f"bokeh{tag}-savedmodel", "saved_model", saved, "NHWC", spec, role="bokeh"),
              _stage(f"bokeh{tag}-frozen-graph", "frozen_graph", frozen, "NHWC", spec,
                     role="bokeh")]
    manifest_base = {**base, "model": "bokeh", "stages": stages}
    _write_variants(prefix, frozen, spec, variants, manifest_base, report, log, allow_flex,
                    gpu_check)
    return frozen, spec, manifest_base


def control_manifest() -> dict:
    """The manifest's record of the control inputs: range, default, meaning, how applied."""
    from models.pipeline import CONTROLS

    return {name: {"shape": [1, 1, 1, 1], "range": list(rng), "default": default,
                   "description": text, "clamped": True}
            for name, (rng, default, text) in CONTROLS.items()}


NAFNET_ARTIFACTS = ("nafnet.onnx", "nafnet_sim.onnx", "nafnet_mobile.onnx", "nafnet_savedmodel",
                    "nafnet_frozen.pb")


def _reusable_nafnet(source: Path, height: int, width: int, opset: int, weights: dict,
                     config: dict) -> Path:
    """``source`` if it holds a complete export of this very NAFNet conversion, else
    ``UserError`` saying what differs."""
    from common.files import read_json

    report_path = source / "report.json"
    if not report_path.is_file():
        raise UserError(f"{source}: no export to reuse NAFNet from (no report.json)")
    report = read_json(report_path)
    want = {"height": height, "width": width, "opset": opset, "weights": weights,
            "nafnet_config": config}
    differ = [k for k, v in want.items() if report.get(k) != json.loads(json.dumps(v))]
    missing = [n for n in NAFNET_ARTIFACTS if not (source / n).exists()]
    if not any(source.glob("nafnet_*.manifest.json")):
        missing.append("nafnet_*.manifest.json")
    if report.get("failed") or differ or missing:
        raise UserError(f"{source}: cannot reuse its NAFNet: "
                        + (f"it differs in {', '.join(differ)}" if differ else
                           f"missing {', '.join(missing)}" if missing else "its export failed"))
    return source


def _copy_nafnet(source: Path, staging: Path) -> tuple[list[dict], list, dict]:
    """NAFNet's conversion artifacts copied from another export: its stage list (from the
    manifest of its NAFNet), its rewrites and the frozen graph's inputs and outputs."""
    import shutil

    from common.files import read_json

    for name in NAFNET_ARTIFACTS:
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name,
                                                                       staging / name)
    manifest = read_json(next(source.glob("nafnet_*.manifest.json")))
    io_spec = {kind: {t["name"]: t["shape"] for t in manifest[kind]}
               for kind in ("inputs", "outputs")}
    return manifest["stages"], read_json(source / "report.json").get("rewrites"), io_spec


def _same(flag: str, value, old_flag: str, old_value):
    """One option given under its name or its old name; both, disagreeing: ``UserError``."""
    if value is not None and old_value is not None and value != old_value:
        raise UserError(f"{flag} {value} and {old_flag} {old_value} disagree ({old_flag} is "
                        f"the old name of {flag}); give one")
    return old_value if value is None else value


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
                    manifest_base: dict, report: dict, log: StageLog, allow_flex: bool,
                    gpu_check: bool) -> None:
    """Convert ``frozen`` to each TFLite variant and write its manifest beside it."""
    for variant in variants:
        tflite = log.out_dir / f"{prefix}_{variant}.tflite"
        try:
            log.run(f"tflite-{prefix}-{variant}", tflite_stage.to_tflite, frozen, io_spec,
                    tflite, variant)
        except tflite_stage.FlexOpsRequired as exc:
            report["variants"][exc.flex_path.name] = {"flex_ops": exc.flex_ops}
            log.echo(banner(f"FLEX OPS: {exc}"))
            if not allow_flex:
                raise
            tflite = exc.flex_path
        if gpu_check:
            log.echo(f"  .. {tflite.name}: running it on the GPU accelerator")
        report["variants"][tflite.name] = write_manifest(tflite, variant, manifest_base,
                                                         gpu_check=gpu_check)


