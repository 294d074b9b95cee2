"""The export lane on a small shape: every stage, parity, rewrites, Flex handling, reports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from common.quiet import quiet_tensorflow
from export import onnx_stages, tf_stages, tflite_stage
from export.rewrites import depth_to_space_crd_to_dcr, max_tensor_rank
from export.tflite_info import inspect_tflite
from tests.conftest import SMALL_H, SMALL_W
from validate.parity import run_parity


@pytest.mark.slow
def test_every_stage_written_with_manifest_and_report(nafnet_export):
    out, report = nafnet_export
    for name in ("nafnet.onnx", "nafnet_sim.onnx", "nafnet_mobile.onnx", "nafnet_frozen.pb",
                 "nafnet_fp32.tflite", "nafnet_fp16.tflite", "report.json", "report.txt"):
        assert (out / name).is_file(), name
    assert (out / "nafnet_savedmodel" / "saved_model.pb").is_file()
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    manifest = json.loads((out / "nafnet_fp32.manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, SMALL_H, SMALL_W, 4]
    assert manifest["outputs"][0]["shape"] == [1, SMALL_H, SMALL_W, 3]
    assert manifest["weights"]["checkpoint"] is None and manifest["warnings"]
    stages = [s["stage"] for s in json.loads((out / "report.json").read_text())["stages"]]
    assert stages[:7] == ["onnx", "simplify", "rewrite", "tensorflow", "freeze",
                          "tflite-nafnet-fp32", "tflite-nafnet-fp16"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_tflite_is_builtin_only_rank4(nafnet_export, variant):
    out, report = nafnet_export
    info = inspect_tflite(out / f"nafnet_{variant}.tflite")
    assert info.flex_ops == [] and not any(op.startswith("Flex") for op in info.op_histogram)
    assert info.max_rank == 4
    assert "DEPTH_TO_SPACE" in info.op_histogram
    assert report["variants"][f"nafnet_{variant}.tflite"]["max_rank"] == 4


@pytest.mark.slow
def test_parity_of_every_stage_within_1e4(nafnet_export, photo_dir):
    out, _ = nafnet_export
    result = run_parity(out / "nafnet_fp32.tflite", images=photo_dir, echo=lambda s: None)
    names = [s["stage"] for s in result["stages"]]
    assert names == ["onnx", "onnx-simplified", "onnx-mobile", "tf-savedmodel", "frozen-graph",
                     "tflite-fp32"]
    for stage in result["stages"]:
        assert stage["passed"] and stage["max_abs_diff"] <= 1e-4, stage
        assert len(stage["inputs"]) == 3


@pytest.mark.slow
def test_fp16_variant_close_to_pytorch(nafnet_export):
    out, _ = nafnet_export
    result = run_parity(out / "nafnet_fp16.tflite", echo=lambda s: None)
    tfl = result["stages"][-1]
    assert tfl["passed"]
    assert min(r["psnr_db"] for r in tfl["inputs"]) >= 45


@pytest.mark.slow
def test_parity_detects_a_wrong_model(nafnet_export, tmp_path):
    """A different checkpoint must fail parity: the check can fail."""
    from models.nafnet import PAPER_CONFIG, random_nafnet

    other = random_nafnet(PAPER_CONFIG, seed=7)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    out, _ = nafnet_export
    result = run_parity(out / "nafnet_fp32.tflite", checkpoint=tmp_path / "other.pth",
                        num_random=1, echo=lambda s: None)
    assert not result["passed"] and result["max_abs_diff"] > 1e-2


class _Upsampler(nn.Module):
    """Conv + PixelShuffle, the decoder's `ups` pattern, alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 1, bias=True)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def _tflite_max_rank(onnx_path, folder):
    """Max tensor rank after onnx-tf and the TFLite converter: what a GPU delegate would see."""
    saved = tf_stages.to_tensorflow(onnx_path, folder / "saved")
    fn = tf_stages.nchw_to_nhwc_function(saved, (1, 6, 10, 8))
    frozen, spec = tf_stages.freeze(fn, folder / "frozen.pb")
    return inspect_tflite(
        tflite_stage.to_tflite(frozen, spec, folder / "m.tflite")).max_rank


@pytest.mark.slow  # a TFLite conversion
def test_crd_to_dcr_rewrite_is_exact_and_removes_rank6(tmp_path):
    torch.manual_seed(0)
    model = _Upsampler().eval()
    raw = onnx_stages.to_onnx(model, (1, 8, 6, 10), tmp_path / "up.onnx", opset=12)
    rewritten, count = depth_to_space_crd_to_dcr(onnx.load(str(raw)))
    assert count == 1
    onnx.save(rewritten, str(tmp_path / "up_dcr.onnx"))
    x = np.random.default_rng(0).random((1, 8, 6, 10), dtype=np.float32)
    expected = model(torch.from_numpy(x)).detach().numpy()
    got = onnx_stages.run_onnx(tmp_path / "up_dcr.onnx", x)
    assert np.abs(got - expected).max() <= 1e-6
    (tmp_path / "crd").mkdir()
    (tmp_path / "dcr").mkdir()
    assert _tflite_max_rank(raw, tmp_path / "crd") == 6
    assert _tflite_max_rank(tmp_path / "up_dcr.onnx", tmp_path / "dcr") == 4


def test_rewrite_leaves_shared_convs_alone(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 16, 1)

        def forward(self, x):
            y = self.conv(x)
            return nn.functional.pixel_shuffle(y, 2), y

    raw = onnx_stages.to_onnx(Shared(), (1, 4, 4, 4), tmp_path / "s.onnx")
    _, count = depth_to_space_crd_to_dcr(onnx.load(str(raw)))
    assert count == 0


def test_max_tensor_rank_reads_onnx(tmp_path):
    raw = onnx_stages.to_onnx(_Upsampler(), (1, 8, 4, 4), tmp_path / "u.onnx")
    assert max_tensor_rank(onnx.load(str(raw))) == 4


def test_flex_op_is_flagged_not_slipped_in(tmp_path):
    """A graph with an op TFLite has no builtin for writes *_flex.tflite and raises."""
    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="input")])
    def fn(x):
        return tf.math.cumprod(x, axis=1) * tf.raw_ops.Atan2(y=x, x=x + 1.0)

    frozen, spec = tf_stages.freeze(fn, tmp_path / "g.pb")
    with pytest.raises(tflite_stage.FlexOpsRequired) as info:
        tflite_stage.to_tflite(frozen, spec, tmp_path / "g.tflite")
    assert not (tmp_path / "g.tflite").exists()
    assert (tmp_path / "g_flex.tflite").is_file()
    assert info.value.flex_ops and "Flex" not in "".join(info.value.flex_ops)
    assert "cannot run on a mobile GPU" in str(info.value)
