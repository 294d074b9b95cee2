"""The manifest beside every .tflite: what the model takes and returns, where its weights came
from, which earlier artifacts it was made from, and how closely it must match PyTorch.

No later command asks the user for shapes, names or weights again: they read the manifest, and
``read_manifest`` checks it against the file before anything trusts it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import read_json, write_json
from export.runner import make_interpreter
from export.tflite_info import TFLiteInfo, gpu_verdict, inspect_tflite
from export.variants import VARIANTS, describe

MANIFEST_FORMAT = "bokehlite-manifest/1"
# `validate parity` bounds per model, variant and output: export/variants.py, the one table.
TOLERANCE = {model: {v.name: v.tolerance[model] for v in VARIANTS if model in v.tolerance}
             for model in ("nafnet", "bokeh")}
DESCRIPTIONS = {
    "nafnet": {"input": "photo RGB + depth mask, NHWC, values in [0, 1]",
               "output": "bokeh RGB, NHWC, about [0, 1] (not clipped)"},
    "bokeh": {"photo": "photo RGB, NHWC, values in [0, 1]",
              "bokeh": "bokeh RGB, NHWC, clipped to [0, 1]",
              "mask": "depth mask from the depth net, NHWC, per-image min-max to [0, 1] "
                      "(1 = near)",
              # the two inputs of bokeh_controls_*.tflite (export --controls)
              "focus": "mask level to keep sharp, [1,1,1,1]: NAFNet reads 1 - |mask - focus|; "
                       "1 = the nearest (the paper's model), 0 = the farthest; clamped to "
                       "[0, 1] in the graph",
              "strength": "blur strength, [1,1,1,1]: strength * bokeh + (1 - strength) * "
                          "photo; 1 = the paper's model, 0 = the photo; clamped to [0, 1] in "
                          "the graph"},
}
FLOAT_VARIANTS = ("fp32", "fp16")  # what the fp16-arithmetic verdict evaluates
REQUIRED = ("model", "variant", "inputs", "outputs", "stages", "tolerance")


def manifest_path(tflite: str | Path) -> Path:
    """``X.manifest.json`` beside ``X.tflite`` (a ``*_flex.tflite`` shares its builtin twin's)."""
    tflite = Path(tflite)
    path = tflite.with_suffix(".manifest.json")
    if not path.is_file() and tflite.stem.endswith("_flex"):
        path = tflite.with_name(tflite.stem.removesuffix("_flex") + ".manifest.json")
    return path


def variant_summary(info: TFLiteInfo) -> dict:
    """What report.json keeps of one .tflite: size, ops, Flex ops, rank, GPU-ready verdict."""
    ready, reasons = gpu_verdict(info)
    return {
        "tflite": Path(info.path).name, "bytes": info.size_bytes, "ops": info.op_histogram,
        "flex_ops": info.flex_ops, "max_rank": info.max_rank,
        "gpu_compatible": ready, "gpu_messages": (reasons or info.gpu_messages)[:5],
    }


def gpu_execution(tflite: Path, check: bool) -> dict:
    """The GPU-execution verdict beside the analyzer's: the file run once on LiteRT's GPU
    accelerator (export/accelerator.py): ran (max abs vs CPU), failed (why), or not tried."""
    if not check:
        return {"status": "not tried", "reason": "not asked (--no-gpu-check)"}
    from export.accelerator import gpu_execution_verdict

    return gpu_execution_verdict(tflite)


def fp16_arithmetic(tflite: Path, variant: str, base: dict) -> dict:
    """The fp16-arithmetic verdict of a float file (export/arith.py: what a phone GPU computing
    in fp16 makes of it, on one seeded random input; controls at their defaults); quantized
    files are not evaluated."""
    if variant not in FLOAT_VARIANTS:
        return {"policy": "fp16", "passed": None,
                "not_evaluated": f"{variant} is a quantized file (float files only)"}
    from export.arith import fp16_verdict

    defaults = {name: float(c["default"]) for name, c in (base.get("controls") or {}).items()}
    return fp16_verdict(tflite, defaults)


def write_manifest(tflite: Path, variant: str, base: dict, extra: dict | None = None,
                   gpu_check: bool = False) -> dict:
    """Write ``tflite``'s manifest (``base`` plus what the file itself says); return the
    report.json summary of the file. ``gpu_check`` runs it on the GPU accelerator when a GPU
    device is found; a float file also gets its fp16-arithmetic verdict."""
    descriptions = DESCRIPTIONS[base["model"]]
    info = inspect_tflite(tflite)
    summary = {**variant_summary(info), "gpu_execution": gpu_execution(tflite, gpu_check),
               "fp16_arithmetic": fp16_arithmetic(tflite, variant, base)}
    manifest = {
        **base, "variant": variant, "tflite": tflite.name,
        "inputs": [_io_entry(t, descriptions.get(t["name"], ""), base.get("controls"))
                   for t in info.inputs],
        "outputs": [_io_entry(t, descriptions.get(t["name"], "")) for t in info.outputs],
        "tolerance": TOLERANCE[base["model"]][variant], "variant_info": describe(variant),
        "flex_ops": info.flex_ops, "max_rank": info.max_rank,
        "gpu_compatible": summary["gpu_compatible"], "gpu_reasons": summary["gpu_messages"],
        "gpu_execution": summary["gpu_execution"],
        "fp16_arithmetic": summary["fp16_arithmetic"], **(extra or {}),
    }
    write_json(manifest_path(tflite), manifest)
    return summary


def _io_entry(tensor: dict, description: str, controls: dict | None = None) -> dict:
    """A tensor as the manifest lists it; a control input also carries its default."""
    control = (controls or {}).get(tensor["name"])
    if control:
        return {**tensor, "layout": "NHWC", "range": control["range"],
                "default": control["default"], "description": description}
    return {**tensor, "layout": "NHWC", "range": [0.0, 1.0], "description": description}


def control_inputs(manifest: dict) -> dict[str, float]:
    """Control input name -> default of a controls model (``bokeh export --controls``); empty
    for every other model."""
    return {name: float(c["default"]) for name, c in (manifest.get("controls") or {}).items()}


def read_manifest(tflite: str | Path) -> tuple[dict, Path]:
    """The manifest beside ``tflite``, checked against the file, and the folder it lives in.

    Every way a manifest can disagree with its model (a missing key, a tolerance that is not a
    number, inputs or outputs of other names, shapes or dtypes) is one ``UserError`` line.
    """
    tflite = Path(tflite)
    if not tflite.is_file():
        raise UserError(f"{tflite}: no such TFLite file")
    path = manifest_path(tflite)
    if not path.is_file():
        raise UserError(f"{tflite}: no manifest ({path.name}) beside it; was it written by "
                        "bokeh-export?")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (a JSON object expected)")
    missing = [k for k in REQUIRED if manifest.get(k) is None]
    if missing:
        raise UserError(f"{path}: manifest has no {', '.join(map(repr, missing))}")
    if manifest["model"] not in TOLERANCE:
        raise UserError(f"{path}: unknown model {manifest['model']!r}; expected one of "
                        f"{', '.join(TOLERANCE)}")
    _check_tolerance(path, manifest)
    if not tflite.stem.endswith("_flex"):
        _check_io(path, manifest, tflite)
    _check_kind(path, manifest)
    return manifest, path.parent


# What each model kind takes: its main input's name and channels.
KIND_INPUT = {"nafnet": ("input", 4), "bokeh": ("photo", 3)}


def _check_kind(path: Path, manifest: dict) -> None:
    """The kind the manifest names takes what that kind takes (a photo, or photo + mask, and
    the controls); otherwise a command would build the wrong PyTorch reference and fail deep
    inside it."""
    kind = manifest["model"]
    main, channels = KIND_INPUT[kind]
    try:
        inputs = {t["name"]: list(t["shape"]) for t in manifest["inputs"]}
    except (TypeError, KeyError):
        raise UserError(f"{path}: malformed 'inputs' entries (name, shape expected)") from None
    controls = set(manifest.get("controls") or {}) if kind == "bokeh" else set()
    shape = inputs.get(main)
    if shape is None or len(shape) != 4 or shape[-1] != channels or set(inputs) - {main} - controls:
        raise UserError(f"{path}: says model {kind!r}, which takes {main} [1,H,W,{channels}], "
                        f"but lists inputs {inputs}; it does not describe this file")


def _check_tolerance(path: Path, manifest: dict) -> None:
    tol = manifest["tolerance"]
    names = [o.get("name") for o in manifest["outputs"] if isinstance(o, dict)]
    if not isinstance(tol, dict) or not tol:
        raise UserError(f"{path}: 'tolerance' must map output names to bounds, got {tol!r}")
    for name, bounds in tol.items():
        if name not in names:
            raise UserError(f"{path}: tolerance for {name!r}, which is not an output {names}")
        if not isinstance(bounds, dict) or not bounds or any(
                k not in ("atol", "min_psnr") or isinstance(v, bool)
                or not isinstance(v, int | float) or not math.isfinite(v)
                for k, v in bounds.items()):
            raise UserError(f"{path}: tolerance of {name!r} must be finite 'atol' and/or "
                            f"'min_psnr' numbers, got {bounds!r}")


def _check_io(path: Path, manifest: dict, tflite: Path) -> None:
    interpreter = make_interpreter(tflite, allocate=False)
    for kind, details in (("inputs", interpreter.get_input_details()),
                          ("outputs", interpreter.get_output_details())):
        actual = [(d["name"], [int(s) for s in d["shape"]], np.dtype(d["dtype"]).name)
                  for d in details]
        try:
            claimed = [(t["name"], [int(s) for s in t["shape"]], t["dtype"])
                       for t in manifest[kind]]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: malformed {kind!r} entries (name, shape, dtype "
                            "expected)") from None
        if claimed != actual:
            raise UserError(f"{path}: {kind} {claimed} do not match {tflite.name} {actual}; "
                            "the manifest belongs to another file (re-export)")
