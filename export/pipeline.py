"""The staged export: each stage a function from artifact to artifact, composed here.

Every run writes, under one output folder, the artifacts of every stage, a manifest next to each
.tflite (so no later command asks the user for shapes, names or weights again) and report.json
with per-stage timings, op histograms, Flex ops, maximum rank and the GPU-compatibility verdict.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.limits import check_memory
from common.ownership import folder_lock
from common.quiet import quiet_tensorflow
from export import folder, onnx_stages, tf_stages, tflite_stage
from export.arith import verdict_line
from export.manifest import MANIFEST_FORMAT, write_manifest
from export.quantize import write_quant_variants
from export.report import StageLog, banner, summary_text, write_report
from export.variants import check_names
from models.nafnet import PAPER_CONFIG, load_nafnet, random_nafnet
from models.nafnet import activation_bytes as nafnet_activation_bytes

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
                      warnings: list[str]) -> tuple[str | None, Path | None, int | None]:
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
        depth_weights = Path(recorded)
    name = resolve_depth_name(depth or (None if depth_weights else trained["name"]),
                              depth_weights)
    if short_side is None and name == trained["name"]:
        short_side = trained["short_side"]
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
    """The PyTorch depth net to port (its file, read once, else random weights) and its
    manifest record (models/depth.py; the input size is added once known). Without ``name``:
    the net the file is, else the default (DPT-Hybrid, the paper's)."""
    from models.depth import depth_record, load_depth

    entry, model = load_depth(name, weights, seed)
    return model, depth_record(entry.name, model, weights, seed)


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
    check_memory(f"size {height}x{width}", nafnet_activation_bytes(PAPER_CONFIG, height, width),
                 "choose a smaller --height and --width")


@dataclass(frozen=True)
class ExportOptions:
    """What one export is asked to do, checked once when built (old option names are resolved
    at the CLI edge, tools/cli.py).

    ``depth`` names a net of models/depth.py (default: the net ``depth_weights`` is, else
    DPT-Hybrid); ``depth_weights`` is its file (default: random weights, said loudly);
    ``depth_short_side`` its input short side (default: the net's own). ``fuse``: also the fused
    depth net + NAFNet model (photo in); ``controls``: the fused model once more with ``focus``
    and ``strength`` inputs (export/fuse.py) as ``bokeh_controls_{variant}.tflite``.
    ``quant_variants`` (export/variants.py) are written for the fused model only.
    ``overwrite``: replace another export in ``out_dir`` (export/folder.py). ``gpu_check``: run
    every float file once on LiteRT's GPU accelerator where a device is found.
    ``reuse_nafnet``: an export folder of the same NAFNet (weights, size, opset) whose ONNX,
    SavedModel and frozen graph are copied instead of converted again.
    A ``checkpoint`` that records the depth net its masks came from (``bokeh train``) decides
    the fused net: ``depth``, ``depth_weights`` and ``depth_short_side`` default to it, and
    another is refused unless ``allow_depth_mismatch`` (``follow_checkpoint``).
    """

    out_dir: Path = Path("build/export")
    height: int = 1024
    width: int = 1536
    checkpoint: Path | None = None
    depth: str | None = None
    depth_weights: Path | None = None
    depth_short_side: int | None = None
    fuse: bool = True
    controls: bool = False
    variants: tuple[str, ...] = ("fp32", "fp16")
    quant_variants: tuple[str, ...] = ()
    opset: int = onnx_stages.DEFAULT_OPSET
    allow_flex: bool = False
    seed: int = 0
    overwrite: bool = False
    gpu_check: bool = True
    reuse_nafnet: Path | None = None
    allow_depth_mismatch: bool = False

    def __post_init__(self):
        for name in ("out_dir", "checkpoint", "depth_weights", "reuse_nafnet"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "quant_variants", tuple(self.quant_variants))
        check_size(self.height, self.width)
        check_names(self.variants, quantized=False)
        check_names(self.quant_variants, quantized=True)
        if not 12 <= self.opset <= 15:
            raise UserError(f"opset {self.opset} is outside 12-15, the range onnx-tf 1.10 "
                            "converts")
        if self.controls and not self.fuse:
            raise UserError("--controls needs the fused model (the depth mask is computed in the "
                            "graph); drop --no-fuse")
        if self.fuse and self.depth:  # a bad name or short side fails before anything loads
            from models.depth import depth_input_size, depth_net

            object.__setattr__(self, "depth", depth_net(self.depth).name)
            depth_input_size(self.depth, self.height, self.width, self.depth_short_side)


class ExportRun:
    """One export in progress. It owns the staging folder, the run id, the stage log and the
    report: every file is written and recorded through it, and nothing else changes them."""

    def __init__(self, options: ExportOptions, base: dict, warnings: list[str],
                 echo: Callable[[str], None]):
        self.options = options
        self.out, self.staging, self.run_id = folder.begin(options.out_dir, options.overwrite)
        self.log = StageLog(self.staging, echo)
        self.base = {"format": MANIFEST_FORMAT, "run_id": self.run_id, **base,
                     "warnings": warnings, "height": options.height, "width": options.width,
                     "report": "report.json"}
        self.report = {
            "run_id": self.run_id, "height": options.height, "width": options.width,
            "nafnet_config": base["nafnet_config"], "weights": base["weights"],
            "depth": base["depth"], "warnings": warnings, "opset": options.opset,
            "software": _software_versions(), "stages": self.log.stages, "variants": {},
        }

    def write_variants(self, prefix: str, frozen: Path, io_spec: dict,
                       manifest_base: dict) -> None:
        """Convert ``frozen`` to each TFLite variant and write its manifest beside it."""
        for variant in self.options.variants:
            tflite = self.staging / f"{prefix}_{variant}.tflite"
            try:
                self.log.run(f"tflite-{prefix}-{variant}", tflite_stage.to_tflite, frozen,
                             io_spec, tflite, variant)
            except tflite_stage.FlexOpsRequired as exc:
                self.report["variants"][exc.flex_path.name] = {"flex_ops": exc.flex_ops}
                self.log.echo(banner(f"FLEX OPS: {exc}"))
                if not self.options.allow_flex:
                    raise
                tflite = exc.flex_path
            if self.options.gpu_check:
                self.log.echo(f"  .. {tflite.name}: running it on the GPU accelerator")
            summary = write_manifest(tflite, variant, manifest_base,
                                     gpu_check=self.options.gpu_check)
            self.report["variants"][tflite.name] = summary
            fp16 = summary["fp16_arithmetic"]
            if fp16["passed"] is False:  # a verdict like the GPU one: recorded, said loudly
                self.log.echo(banner(f"{tflite.name}: {verdict_line(fp16)}: a phone GPU "
                                     "computing in fp16 will not reproduce this model "
                                     "(docs/design.md, section 12)"))
            else:
                self.log.echo(f"  .. {tflite.name}: {verdict_line(fp16)}")

    def write_fused(self, prefix: str, fused, nafnet_stages: list[dict], base: dict,
                    note: str) -> tuple[Path, dict, dict]:
        """Save, freeze and convert one fused tf.function (``prefix`` "bokeh" or
        "bokeh_controls"); return the frozen graph, its I/O and its files' manifest base."""
        from export.fuse import OUTPUT_NAMES, save_fused

        tag = prefix.removeprefix("bokeh").replace("_", "-")  # "" or "-controls"
        saved = self.log.run(f"fuse{tag}", save_fused, fused,
                             self.staging / f"{prefix}_savedmodel", note=note)
        frozen, spec = self.log.run(f"freeze-fused{tag}", tf_stages.freeze, fused,
                                    self.staging / f"{prefix}_frozen.pb", OUTPUT_NAMES)
        stages = [*nafnet_stages,
                  _stage(f"bokeh{tag}-savedmodel", "saved_model", saved, "NHWC", spec,
                         role="bokeh"),
                  _stage(f"bokeh{tag}-frozen-graph", "frozen_graph", frozen, "NHWC", spec,
                         role="bokeh")]
        manifest_base = {**base, "model": "bokeh", "stages": stages}
        self.write_variants(prefix, frozen, spec, manifest_base)
        return frozen, spec, manifest_base

    def write_quantized(self, frozen: Path, io_spec: dict, manifest_base: dict,
                        calibration) -> None:
        self.report["variants"].update(write_quant_variants(
            frozen, io_spec, self.options.quant_variants, calibration, manifest_base, self.log))

    def fail(self, exc: BaseException) -> None:
        """Keep this run's files in ``failed-run/`` and say so; the last export stays."""
        self.report["failed"] = f"{type(exc).__name__}: {exc}".strip()
        try:  # on a full disk this fails too: the staging folder then goes with the next run
            write_report(self.staging, self.report)
            kept = folder.abandon(self.out, self.staging)
        except OSError:
            kept = self.staging
        self.log.echo(f"EXPORT FAILED ({self.report['failed'][:200]}); {self.out} still holds "
                      f"the last complete export; this run's files are in {kept}")

    def finish(self) -> dict:
        """Swap the complete set in and return the report."""
        self.report["files"] = sorted({p.name for p in self.staging.iterdir()}
                                      | {"report.json", "report.txt"})
        write_report(self.staging, self.report)
        folder.commit(self.out, self.staging)
        self.log.echo(summary_text(self.report))
        return self.report


def export(options: ExportOptions, calibration=None,
           echo: Callable[[str], None] = print) -> dict:
    """Export NAFNet (photo + mask in) and, with ``options.fuse``, the fused depth net + NAFNet
    model (photo in), every stage and TFLite variant, NHWC; return the report.

    ``calibration`` (calibration.dataset.calibration_set) is what the quantized variants are
    calibrated on. The run owns ``options.out_dir`` (export/folder.py): it holds a lock on it
    for the whole run (a second run refuses, naming this one's process), refused if it holds
    another export and ``overwrite`` is off; the new set replaces the old one only when every
    stage succeeded. Raises ``UserError`` for bad input and ``tflite_stage.FlexOpsRequired`` when
    a variant needs Flex ops and ``allow_flex`` is off (the Flex file is kept in
    ``failed-run/``).
    """
    o = options
    if o.fuse and o.quant_variants and calibration is None:
        raise UserError("quantized variants need calibration data (calibration_set)")
    with folder_lock(o.out_dir, "export"):  # a second run into the folder refuses at once
        folder.check(o.out_dir, o.overwrite)  # before loading anything: a bad folder fails at once
        model, weights = load_generator(o.checkpoint, o.seed)
        warnings = [RANDOM_WEIGHTS_WARNING.format(seed=o.seed)] if o.checkpoint is None else []
        if o.fuse:
            depth, depth_weights, short_side = follow_checkpoint(
                weights, o.depth, o.depth_weights, o.depth_short_side, o.seed,
                o.allow_depth_mismatch, warnings)
            o = dataclasses.replace(o, depth=depth, depth_weights=depth_weights,
                                    depth_short_side=short_side)
        config = dict(model.config)
        reuse = None if o.reuse_nafnet is None else _reusable_nafnet(o, weights, config)
        record = depth_model = None
        if o.fuse:
            from models.depth import depth_input_size, depth_net

            depth_model, record = load_depth_net(o.depth_weights, o.depth, o.seed)
            net = depth_net(record["name"])
            depth_size = depth_input_size(net.name, o.height, o.width, o.depth_short_side)
            record["input_size"] = list(depth_size)
            if o.depth_weights is None:
                warnings.append(RANDOM_DEPTH_WARNING.format(
                    name=net.name, title=net.title, seed=o.seed, file=net.official_file or "FILE"))
        _check_memory(config, o.height, o.width, record)
        run = ExportRun(o, {"nafnet_config": config, "weights": weights, "depth": record},
                        warnings, echo)
        for w in warnings:
            echo(banner(w))
        try:
            echo(f"Exporting NAFNet{tuple(config['enc_blocks'])} width {config['width']} at "
                 f"{o.height}x{o.width} to {run.out}/ (run {run.run_id})")
            nafnet_stages, saved = _nafnet_stages(run, model, reuse)
            if o.fuse:
                _fused_files(run, net, depth_model, depth_size, saved, nafnet_stages, calibration)
        except BaseException as exc:
            run.fail(exc)
            raise
        return run.finish()


def _check_memory(config: dict, height: int, width: int, depth: dict | None) -> None:
    """Before building anything: refuse sizes whose largest tensors alone exceed the memory
    this machine has (docs/design.md, section 10), instead of being killed halfway."""
    from models.depth import activation_bytes

    what, estimate = f"an export at {height}x{width}", nafnet_activation_bytes(config, height,
                                                                               width)
    if depth is not None:
        h, w = depth["input_size"]
        what += f" with {depth['name']} at {h}x{w}"
        estimate += activation_bytes(depth["name"], h, w)
    check_memory(what, estimate, "choose a smaller --height, --width or --depth-short-side")


def _nafnet_stages(run: ExportRun, model, reuse: Path | None) -> tuple[list[dict], Path]:
    """NAFNet's stages (converted, or copied from ``reuse``) and its TFLite files; return the
    stage list and the SavedModel the fused graph is built on."""
    o, log = run.options, run.log
    if reuse is None:
        nafnet_stages, saved, run.report["rewrites"] = _nafnet_graphs(
            model, run.staging, o.height, o.width, o.opset, log)
        fn = tf_stages.nchw_to_nhwc_function(saved, (1, o.height, o.width,
                                                     model.config["in_channels"]))
        frozen, io_spec = log.run("freeze", tf_stages.freeze, fn,
                                  run.staging / "nafnet_frozen.pb")
        nafnet_stages.append(_stage("frozen-graph", "frozen_graph", frozen, "NHWC", io_spec))
    else:
        run.report["nafnet_reused_from"] = str(reuse.resolve())
        nafnet_stages, run.report["rewrites"], io_spec = log.run(
            "reuse-nafnet", _copy_nafnet, reuse, run.staging,
            note=f"copying NAFNet's ONNX, SavedModel and frozen graph from {reuse}")
        saved, frozen = run.staging / "nafnet_savedmodel", run.staging / "nafnet_frozen.pb"
    run.write_variants("nafnet", frozen, io_spec,
                       {**run.base, "model": "nafnet", "stages": nafnet_stages})
    return nafnet_stages, saved


def _fused_files(run: ExportRun, net, depth_model, depth_size: tuple[int, int], saved: Path,
                 nafnet_stages: list[dict], calibration) -> None:
    """The fused model's stages and files: plain, quantized, and with the controls."""
    from export.fuse import fused_function
    from models.depth import keras_from_torch

    o = run.options
    run.log.echo(f"Fusing {net.name} at {depth_size[0]}x{depth_size[1]} with NAFNet "
                 f"({net.title}, {net.normalisation})")
    keras_depth = run.log.run("keras-depth", keras_from_torch, depth_model, *depth_size,
                              note=f"building the Keras {net.name} and porting its weights")
    fused = fused_function(keras_depth, saved, o.height, o.width, net.mean, net.std)
    frozen, spec, bokeh_base = run.write_fused("bokeh", fused, nafnet_stages, run.base,
                                               f"tracing {net.name} + NAFNet into one graph")
    if o.quant_variants:
        run.write_quantized(frozen, spec, bokeh_base, calibration)
    if o.controls:
        controlled = fused_function(keras_depth, saved, o.height, o.width, net.mean, net.std,
                                    controls=True)
        run.write_fused("bokeh_controls", controlled, nafnet_stages,
                        {**run.base, "controls": control_manifest()},
                        f"tracing {net.name} + NAFNet with focus and strength")


def control_manifest() -> dict:
    """The manifest's record of the control inputs: range, default, meaning, how applied."""
    from models.pipeline import CONTROLS

    return {name: {"shape": [1, 1, 1, 1], "range": list(rng), "default": default,
                   "description": text, "clamped": True}
            for name, (rng, default, text) in CONTROLS.items()}


NAFNET_ARTIFACTS = ("nafnet.onnx", "nafnet_sim.onnx", "nafnet_mobile.onnx", "nafnet_savedmodel",
                    "nafnet_frozen.pb")


def _reusable_nafnet(options: ExportOptions, weights: dict, config: dict) -> Path:
    """``options.reuse_nafnet`` if it holds a complete export of this very NAFNet conversion,
    else ``UserError`` saying what differs."""
    from common.files import read_json

    source = options.reuse_nafnet
    height, width, opset = options.height, options.width, options.opset
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
