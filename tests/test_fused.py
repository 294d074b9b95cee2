"""The fused photo -> bokeh model: DPT (TensorFlow) + NAFNet (onnx-tf) in one TFLite graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.tflite_info import inspect_tflite
from models.pipeline import normalize_per_image, resize_bilinear
from models.reference import Reference
from tools.cli import export_main
from validate.parity import parity_inputs, read_manifest, run_parity


@pytest.mark.slow
def test_fused_tflite_matches_pytorch_pipeline_on_photos(fused_export, photo_dir):
    out, _ = fused_export
    result = run_parity(out / "bokeh_fp32.tflite", images=photo_dir, echo=lambda s: None)
    assert result["passed"], result["summary"]
    final = result["stages"][-1]
    assert final["stage"] == "tflite-fp32"
    for row in final["inputs"]:
        if row["output"] == "mask":
            assert row["max_abs_diff"] <= 1e-3
        else:
            assert row["psnr_db"] >= 60
    names = [s["stage"] for s in result["stages"]]
    assert "bokeh-savedmodel" in names and "bokeh-frozen-graph" in names


@pytest.mark.slow
def test_reference_mask_is_not_degenerate(fused_export, photo_dir):
    """Parity on a constant mask would prove little: the random DPT must give real structure."""
    out, _ = fused_export
    manifest, _ = read_manifest(out / "bokeh_fp32.tflite")
    ref = Reference(manifest)
    for inp in parity_inputs(manifest, photo_dir, echo=lambda s: None):
        mask = ref.run(inp.value)["bokeh"]["mask"]
        assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
        assert mask.std() > 0.05


@pytest.mark.slow
def test_fp16_within_45db_of_fp32(fused_export, photo_dir):
    out, _ = fused_export
    result = run_parity(out / "bokeh_fp16.tflite", images=photo_dir, echo=lambda s: None)
    versus = result["stages"][-1]
    assert versus["stage"] == "tflite-fp16 vs bokeh_fp32.tflite"
    assert versus["passed"]
    assert min(r["psnr_db"] for r in versus["inputs"] if r["output"] == "bokeh") >= 45


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_fused_variants_builtin_only_rank4_with_gpu_verdict(fused_export, variant):
    out, report = fused_export
    info = inspect_tflite(out / f"bokeh_{variant}.tflite")
    assert info.flex_ops == [] and info.max_rank <= 4
    assert [t["name"] for t in info.inputs] == ["photo"]
    assert sorted(t["name"] for t in info.outputs) == ["bokeh", "mask"]
    entry = report["variants"][f"bokeh_{variant}.tflite"]
    assert entry["gpu_compatible"] is True and entry["flex_ops"] == []
    manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
    assert manifest["depth"]["name"] == "dpt-tiny"  # the old --dpt-variant tiny
    assert manifest["depth"]["input_size"] == [64, 96]
    assert manifest["depth"]["mean"] == manifest["depth"]["std"] == [0.5] * 3
    assert any("MEANINGLESS" in w and "dpt-tiny" in w for w in manifest["warnings"])


def test_resize_matches_tflite_resize_bilinear():
    """The reference's resize is the same math as TensorFlow's half-pixel bilinear resize."""
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()
    x = np.random.default_rng(0).random((1, 3, 37, 53), dtype=np.float32)
    for size in [(16, 24), (64, 96), (37, 53)]:
        ours = resize_bilinear(torch.from_numpy(x), size).numpy().transpose(0, 2, 3, 1)
        theirs = tf.compat.v1.image.resize_bilinear(
            x.transpose(0, 2, 3, 1), size, half_pixel_centers=True).numpy()
        assert np.abs(ours - theirs).max() <= 1e-5  # float32 rounding, different op order


def test_mask_normalisation():
    d = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    np.testing.assert_allclose(normalize_per_image(d).flatten().tolist(), [0, 0.25, 0.5, 1.0])
    assert normalize_per_image(torch.full((1, 1, 2, 2), 3.0)).abs().max() == 0


def _line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_corrupt_dpt_file_clear_error_and_nothing_written(tmp_path, capsys):
    bad = tmp_path / "dpt_hybrid_384.pt"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    code = export_main(["--export-dir", str(out), "--height", "64", "--width", "96",
                        "--depth-weights", str(bad)])
    assert code == 2
    line = _line(capsys)
    assert "dpt_hybrid_384.pt" in line and "expected a depth net file" in line
    assert not list(out.iterdir())


def test_dpt_of_another_architecture(tmp_path, capsys):
    from models.nafnet import NAFNet

    path = tmp_path / "not_dpt.pt"
    torch.save(NAFNet(width=8, enc_blocks=(1,), dec_blocks=(1,)).state_dict(), path)
    code = export_main(["--export-dir", str(tmp_path / "o"), "--height", "64", "--width", "96",
                        "--depth-weights", str(path)])
    assert code == 2
    line = _line(capsys)
    assert "not_dpt.pt: not a MiDaS v3.0 DPT checkpoint" in line and "DPT-Hybrid" in line


@pytest.mark.slow
def test_parity_of_a_whole_export_dir_in_one_process(fused_export, tmp_path, capsys,
                                                     monkeypatch):
    """`bokeh parity --export-dir` checks every file report.json lists, records each result
    there, and builds one PyTorch reference per (weights, depth net)."""
    import shutil

    from models import reference
    from tools.cli import main as bokeh
    from validate.parity import export_files

    out = tmp_path / "export"
    shutil.copytree(fused_export[0], out)
    files = export_files(out)
    assert {f.name for f in files} >= {"nafnet_fp32.tflite", "bokeh_fp16.tflite",
                                       "bokeh_controls_fp32.tflite"}
    built = []
    original = reference.Reference.__init__

    def counting(self, manifest, checkpoint=None):
        built.append(manifest["model"])
        original(self, manifest, checkpoint)

    monkeypatch.setattr(reference.Reference, "__init__", counting)
    assert bokeh(["parity", "--export-dir", str(out), "--num-random", "1"]) == 0
    assert sorted(built) == ["bokeh", "nafnet"]  # one per reference, not one per file
    assert f"{len(files)} of {len(files)} files within tolerance" in capsys.readouterr().out
    recorded = json.loads((out / "report.json").read_text())["parity"]
    assert set(recorded) == {f.name for f in files}
    assert all(r["passed"] for r in recorded.values())


def test_parity_export_dir_refuses_single_file_flags_and_foreign_folders(tmp_path, capsys):
    from tools.cli import main as bokeh

    assert bokeh(["parity", "--export-dir", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err
    assert bokeh(["parity", "--export-dir", str(tmp_path), "--pair", "1,1"]) == 2
    assert "--pair: only with --tflite" in capsys.readouterr().err
    assert bokeh(["parity", "--export-dir", str(tmp_path), "--tflite", "x.tflite"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
