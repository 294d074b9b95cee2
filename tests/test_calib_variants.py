"""Quantized variants of the tiny fused export: builtin only, manifests, parity in tolerance."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from export.manifest import TOLERANCE
from export.quantize import QUANT_VARIANTS
from export.tflite_info import inspect_tflite
from validate.parity import run_parity

pytestmark = pytest.mark.slow  # every test here uses a session export

@pytest.fixture(scope="module")
def quant_export(fused_export, tmp_path_factory):
    """The shared export copied (it is not exported again) with every quantized variant added."""
    from calibration.variants import add_quant_variants

    src, _ = fused_export
    out = tmp_path_factory.mktemp("quant") / "export"
    shutil.copytree(src, out)
    report = add_quant_variants(out, QUANT_VARIANTS, calib_samples=6, echo=lambda s: None)
    return out, report


def test_every_variant_is_written_or_says_why_not(quant_export):
    out, report = quant_export
    for variant in QUANT_VARIANTS:
        entry = report["variants"][f"bokeh_{variant}.tflite"]
        if "unsupported" in entry:  # allowed for int16x8 only, with the reason
            assert variant == "int16x8" and entry["unsupported"].strip()
            assert not (out / f"bokeh_{variant}.tflite").exists()
        else:
            assert (out / f"bokeh_{variant}.manifest.json").is_file()
    assert (out / "bokeh_drq.tflite").is_file() and (out / "bokeh_int8.tflite").is_file()


@pytest.mark.parametrize("variant", QUANT_VARIANTS)
def test_variant_builtin_only_float_io_with_manifest(quant_export, variant):
    out, _ = quant_export
    path = out / f"bokeh_{variant}.tflite"
    if not path.exists():
        pytest.skip(f"{variant} not supported here (reason in report.json)")
    info = inspect_tflite(path)
    assert info.flex_ops == [] and info.max_rank <= 4
    assert {t["dtype"] for t in info.inputs + info.outputs} == {"float32"}
    assert info.size_bytes < (out / "bokeh_fp32.tflite").stat().st_size
    manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
    assert manifest["variant"] == variant and manifest["tolerance"] == TOLERANCE["bokeh"][variant]
    assert manifest["quantization"]["calibration"]["samples"] == 6


@pytest.mark.parametrize("variant", QUANT_VARIANTS)
def test_variant_parity_within_its_manifest_tolerance(quant_export, photo_dir, variant):
    out, _ = quant_export
    path = out / f"bokeh_{variant}.tflite"
    if not path.exists():
        pytest.skip(f"{variant} not supported here (reason in report.json)")
    result = run_parity(path, images=photo_dir, tflite_only=True, echo=lambda s: None)
    assert [s["stage"] for s in result["stages"]] == [
        f"tflite-{variant}", f"tflite-{variant} vs bokeh_fp32.tflite"]
    assert result["passed"], result["summary"]


def test_int8_runs_integer_kernels(quant_export):
    """int8: every conv and fully connected layer is integer; in float stay only the LayerNorms'
    SQRT and DIV (the XNNPACK-friendly form the sqrt_divisor_in_delegate pass writes has no int8
    kernel), the mask's concat and division, and the layers SENSITIVE_LAYERS names for the depth
    net (dpt: the GroupNorms and the mask glue)."""
    from export.quantize import float_op_outputs, sensitive_layers

    out, _ = quant_export
    path = out / "bokeh_int8.tflite"
    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    assert manifest["quantization"]["float_ops"].get("SQRT", 0) <= 72  # one per NAFNet LayerNorm
    patterns = sensitive_layers("int8", "dpt")["nodes"]
    named = [(kind, name) for kind, name in float_op_outputs(path)
             if kind not in ("DIV", "SQRT", "CONCATENATION")]
    assert named, "the GroupNorms and the mask glue stay float"
    for kind, name in named:
        assert kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"), name
        assert any(re.search(p, name) for p in patterns), f"{kind} {name} is float unasked"


@pytest.mark.full
def test_report_measures_every_variant_and_the_int8_layers(quant_export, tmp_path):
    """The accuracy table end to end (several minutes: per-layer debugging, selective runs)."""
    from validate.quant_report import main

    out, _ = quant_export
    doc = tmp_path / "bench.md"
    assert main(["--export-dir", str(out), "--runs", "1", "--doc", str(doc)]) == 0
    result = json.loads((out / "quant_report.json").read_text())
    assert {"fp32", "fp16", "drq", "int8"} <= set(result["variants"])
    assert result["selective"]["worst_layers"] and "full int8" in result["selective"][
        "configurations"]
    text = doc.read_text()
    assert "<!-- bench:quant -->" in text and "| int8 |" in text
