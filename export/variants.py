"""The one table of TFLite variants: what each keeps in float and why, the phone target it is
for, the tolerance its manifest carries, and whether `bokeh export` writes it by default.

The export, the manifests, `bokeh inspect`, the AI Benchmark bundle, the CLI help and the
Makefile (through `bokeh variants --defaults`) all read this table; nothing else lists variants.
Tolerances are per model and output (outputs in [0, 1]): ``atol`` bounds the largest absolute
difference, ``min_psnr`` the PSNR in dB, against the PyTorch reference and, for the fused
model's reduced-precision files, against the fp32 file (docs/benchmarks.md has the figures the
floors come from). A model missing from a variant's tolerance is never written in that variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError


@dataclass(frozen=True)
class Variant:
    name: str  # the file is {model}_{name}.tflite
    target: str  # the phone target it is for
    keeps_float: str  # what stays in float, and why
    tolerance: dict  # model -> output -> {"atol": x} and/or {"min_psnr": dB}
    default: bool  # written by `bokeh export` unless the user names other variants
    delegate: str = "cpu"  # the AI Benchmark app's delegate for it: cpu, gpu or nnapi
    calibrated: bool = False  # needs a representative dataset (calibration/)
    made_by: str = "bokeh export"

    @property
    def quantized(self) -> bool:
        """Made for the fused model only, from its frozen graph (``--quant-variants``)."""
        return "nafnet" not in self.tolerance


_FUSED_FP32 = {"bokeh": {"min_psnr": 60.0}, "mask": {"atol": 1e-3}}
VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "the phone CPU (TFLite CPU / XNNPACK, fp32)",
            "everything: the reference file",
            {"nafnet": {"output": {"atol": 1e-4}}, "bokeh": _FUSED_FP32}, default=True),
    Variant("fp16", "a phone GPU (the TFLite GPU delegate, fp16)",
            "activations: fp16 weights, computed in fp16 on the GPU, dequantized on the CPU",
            {"nafnet": {"output": {"atol": 2e-2, "min_psnr": 45.0}},
             "bokeh": {"bokeh": {"min_psnr": 45.0}, "mask": {"atol": 5e-2}}}, default=True,
            delegate="gpu"),
    Variant("drq", "the phone CPU, int8 weights (dynamic range: hybrid kernels)",
            "activations (quantized on the fly per op; weights int8 per channel), and per depth "
            "net the layers measured to cost the accuracy (export/quantize.py SENSITIVE_LAYERS; "
            "midas-small: its first encoder stages, whose rounding every later layer amplifies)",
            {"bokeh": {"bokeh": {"min_psnr": 40.0}, "mask": {"min_psnr": 30.0}}}, default=True),
    Variant("int8", "the CPU's int8 kernels, or an NPU through NNAPI (every conv and fully "
            "connected layer int8; the few float ops fall back to the CPU)",
            "the input and output, the ops without an int8 kernel (the LayerNorms' SQRT and "
            "DIV), the mask glue (resize back and per-photo min-max, which would stretch the "
            "depth's int8 rounding over the whole mask) and per depth net the layers measured to "
            "cost the accuracy (SENSITIVE_LAYERS; dpt: the ResNet GroupNorms; "
            "depth-anything-v2-small: the attention BATCH_MATMUL and SOFTMAX and the ViT "
            "LayerNorms up to their normalised values); every other tensor, every conv and fully "
            "connected layer included, is int8, ranges from the calibration",
            {"bokeh": {"bokeh": {"min_psnr": 30.0}, "mask": {"min_psnr": 20.0}}},
            default=True, calibrated=True, delegate="nnapi"),
    Variant("int8-mixed", "the phone CPU's int8 kernels, the depth mask kept accurate",
            "as int8, plus the whole depth net (SENSITIVE_LAYERS): NAFNet alone is int8; "
            "opt-in (the file is nearly the fp32 size: for dpt-hybrid 466 MB at 256x384)",
            {"bokeh": {"bokeh": {"min_psnr": 38.0}, "mask": {"min_psnr": 28.0}}},
            default=False, calibrated=True),
    Variant("int16x8", "CPUs with int16 activation kernels (opt-in)",
            "ops without a 16x8 kernel (DIV); converts, but TFLite 2.15 has no int16 "
            "SQUARED_DIFFERENCE kernel, so the file cannot run and is not kept",
            {"bokeh": {"bokeh": {"min_psnr": 40.0}, "mask": {"min_psnr": 30.0}}},
            default=False, calibrated=True),
    Variant("int8-selective", "the phone CPU's int8 kernels",
            "the configuration `bokeh quant-report` found best on held-out photos",
            {"bokeh": {"bokeh": {"min_psnr": 30.0}, "mask": {"min_psnr": 20.0}}},
            default=False, calibrated=True, made_by="bokeh quant-report"),
)
BY_NAME = {v.name: v for v in VARIANTS}


def variant(name: str) -> Variant:
    """The table's entry of ``name``; ``UserError`` naming the choices otherwise."""
    if name not in BY_NAME:
        raise UserError(f"unknown variant {name!r}; one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def names(quantized: bool, defaults_only: bool = False, exported: bool = True
          ) -> tuple[str, ...]:
    """Variant names of one kind (float: ``--variants``; quantized: ``--quant-variants``),
    in table order; ``exported``: only those `bokeh export` can write."""
    return tuple(v.name for v in VARIANTS if v.quantized == quantized
                 and (v.default or not defaults_only)
                 and (v.made_by == "bokeh export" or not exported))


def tolerance(model: str, name: str) -> dict:
    """The tolerance a manifest of ``model`` in variant ``name`` carries."""
    entry = variant(name)
    if model not in entry.tolerance:
        raise UserError(f"variant {name!r} is not written for the {model} model")
    return entry.tolerance[model]


def check_names(requested: tuple[str, ...], quantized: bool) -> tuple[str, ...]:
    """``requested`` if every name is an exported variant of that kind, else one ``UserError``
    line naming the choices."""
    allowed = names(quantized)
    for name in requested:
        if name not in allowed:
            flag = "--quant-variants" if quantized else "--variants"
            raise UserError(f"{flag}: unknown variant {name!r}; expected some of "
                            f"{', '.join(allowed)}")
    return requested


def variant_of(tflite: str | Path) -> str | None:
    """The variant a file's manifest names (``None``: no manifest, or none of the table's)."""
    import json

    path = Path(tflite).with_suffix(".manifest.json")
    try:
        name = json.loads(path.read_text()).get("variant")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in BY_NAME else None


def describe(name: str) -> str:
    """One line for the report, `bokeh inspect` and the bundle: target and what stays float."""
    v = variant(name)
    return f"{v.name}: for {v.target}; kept in float: {v.keeps_float}"


def table_text() -> str:
    """The table as `bokeh variants` prints it."""
    lines = []
    for v in VARIANTS:
        bounds = "; ".join(f"{model}: " + ", ".join(
            f"{out} " + " ".join(f"{k} {b:g}" for k, b in bound.items())
            for out, bound in outputs.items()) for model, outputs in v.tolerance.items())
        made = "default" if v.default else (
            "opt-in" if v.made_by == "bokeh export" else f"made by {v.made_by}")
        lines += [f"{v.name} ({'quantized, fused model only' if v.quantized else 'float'}, "
                  f"{made})", f"  target: {v.target}", f"  float:  {v.keeps_float}",
                  f"  tolerance: {bounds}"]
    return "\n".join(lines)
