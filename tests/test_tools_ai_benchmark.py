"""tools.ai_benchmark: the phone bundle, and the models it must refuse with the reason."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from tools_models import dynamic_tflite, fake_manifest, flex_tflite

from export.tflite_info import TFLiteInfo
from tools.ai_benchmark import check_delegate, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {"flex": flex_tflite(folder), "dynamic": dynamic_tflite(folder)}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


@pytest.mark.slow
def test_fp16_gpu_bundle(fused_export, tmp_path, capsys):
    out, _ = fused_export
    bundle = tmp_path / "bundle"
    assert main(["--variant", "fp16", "--export-dir", str(out), "--out", str(bundle)]) == 0
    assert "Download folder" in capsys.readouterr().out
    assert sorted(p.name for p in bundle.iterdir()) == [  # and the hidden list of what it wrote
        ".bokehlite-written.json", "README.txt", "manifest.json", "model.tflite"]
    data = (bundle / "model.tflite").read_bytes()
    assert data == (out / "bokeh_fp16.tflite").read_bytes()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["delegate"] == "gpu" and manifest["variant"] == "fp16"
    (photo,) = manifest["inputs"]
    assert (photo["name"], photo["shape"], photo["dtype"], photo["range"]) == (
        "photo", [1, 64, 96, 3], "float32", [0.0, 1.0])
    assert [o["name"] for o in manifest["outputs"]] == ["bokeh", "mask"]
    assert manifest["flex"] == {"required": False, "ops": []} and manifest["static_shapes"]
    assert manifest["delegates"]["gpu"]["compatible"] is True
    assert manifest["parity"].startswith("not measured — run validate parity")
    assert any("RANDOM" in w for w in manifest["warnings"])
    readme = (bundle / "README.txt").read_text()
    for words in ("Download folder", "PRO Mode", "Custom Model", "GPU delegate",
                  "1x64x96x3", "Kirin", "WARNING"):
        assert words in readme, words


@pytest.mark.slow
def test_parity_from_report_and_cpu_bundle(fused_export, tmp_path):
    """The parity entry `validate parity` writes into report.json lands in the bundle."""
    out, _ = fused_export
    export = tmp_path / "export"
    export.mkdir()
    for name in ("bokeh_fp32.tflite", "bokeh_fp32.manifest.json", "report.json"):
        shutil.copy(out / name, export / name)
    report = json.loads((export / "report.json").read_text())
    report["parity"] = {"bokeh_fp32.tflite": {
        "passed": True, "summary": "bokeh max abs 1.0e-06, min PSNR 120.0 dB",
        "max_abs_diff": 1e-6, "inputs": ["random-0"],
        "stages": [{"stage": "tflite-fp32", "tolerance": {"bokeh": {"min_psnr": 60.0}}}]}}
    (export / "report.json").write_text(json.dumps(report))
    bundle = tmp_path / "bundle"
    assert main(["--variant", "fp32", "--export-dir", str(export), "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["delegate"] == "cpu"
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["tolerance"] == {"bokeh": {"min_psnr": 60.0}}
    assert "CPU" in (bundle / "README.txt").read_text()


def test_refuses_flex_model_for_gpu_but_not_for_cpu(tiny, tmp_path, capsys):
    bundle = tmp_path / "b"
    assert main(["--tflite", str(tiny["flex"]), "--out", str(bundle)]) == 2
    line = _error_line(capsys)
    assert "flex_fp16.tflite: refused for a GPU bundle" in line and "Flex ops Cumprod" in line
    assert not bundle.exists()
    assert main(["--tflite", str(tiny["flex"]), "--delegate", "cpu", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["flex"] == {"required": True, "ops": ["Cumprod"]}
    assert manifest["delegates"]["cpu"]["notes"] == ["needs the Flex delegate"]


@pytest.mark.parametrize("delegate", ["gpu", "cpu"])
def test_refuses_dynamic_shape_for_every_delegate(tiny, tmp_path, capsys, delegate):
    assert main(["--tflite", str(tiny["dynamic"]), "--delegate", delegate,
                 "--out", str(tmp_path / "b")]) == 2
    line = _error_line(capsys)
    assert "dynamic shape photo [1,-1,-1,3]" in line and "static shapes" in line
    assert not (tmp_path / "b").exists()


def test_gpu_refusal_names_rank_and_analyzer():
    info = TFLiteInfo(path="m.tflite", size_bytes=1, op_histogram={}, flex_ops=[], max_rank=6,
                      inputs=[], outputs=[], gpu_compatible=False,
                      gpu_messages=["RESHAPE: Unsupported"])
    reasons = check_delegate(info, [], "gpu")
    assert reasons == ["a tensor of rank 6: the GPU delegate takes rank <= 4",
                       "RESHAPE: Unsupported"]
    assert check_delegate(info, [], "cpu") == []


def test_missing_export_and_missing_manifest(tmp_path, capsys):
    assert main(["--export-dir", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    line = _error_line(capsys)
    assert "bokeh_fp16.tflite: no such TFLite file" in line and "make export" in line
    lone = tmp_path / "lone.tflite"
    lone.write_bytes(b"x")
    assert main(["--tflite", str(lone), "--out", str(tmp_path / "b")]) == 2
    assert "lone.tflite: no manifest" in _error_line(capsys)
    fake_manifest(lone, [1, 8, 8, 3])  # a manifest beside a corrupt file
    assert main(["--tflite", str(lone), "--out", str(tmp_path / "b")]) == 2
    assert "lone.tflite: not a readable TFLite model" in _error_line(capsys)
    assert not (tmp_path / "b").exists()
