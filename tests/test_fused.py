"""The fused photo -> bokeh model: a depth net (TensorFlow) + NAFNet (onnx-tf) in one TFLite
graph, checked the same way for every registered depth net at 64x96.

dpt-tiny is the shared export (tests/conftest.py); the small nets are exported once each,
reusing its NAFNet conversion. Their NAFNet stages are copies of the shared export's, whose parity
tests/test_export.py checks; they are removed after the export, so parity there runs the stages
the depth net changes: the fused SavedModel and frozen graph (for Depth Anything; the fusing code
is the same for every net) and the TFLite files.

Under `make test` this module runs in its own pytest-xdist group, beside the other tests on the
shared export (each worker makes that export once): its per-net exports are the longest part of
the suite.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from phone import assert_phone_ready

from export.pipeline import NAFNET_ARTIFACTS
from models.depth import depth_net
from models.pipeline import normalize_per_image, resize_bilinear
from models.reference import Reference
from tools.cli import export_main
from validate.parity import parity_inputs, read_manifest, run_parity

SMALL_H, SMALL_W = 64, 96  # the shared export's size (conftest.py)
# net -> depth short side: 64x96 for dpt-tiny and MiDaS small (no resize), 56x84 for Depth
# Anything (resized both ways, sides multiples of 14)
NETS = {"dpt-tiny": 64, "midas-small-tiny": 64, "depth-anything-v2-small-tiny": 56}
# parity of the fused SavedModel and frozen graph besides the TFLite file
EVERY_STAGE = ("depth-anything-v2-small-tiny",)
pytestmark = pytest.mark.xdist_group("fused-nets")


@pytest.fixture(scope="module", params=list(NETS))
def fused(request, fused_export, tmp_path_factory):
    """(net, export folder, report) of the fused model with each registered test net."""
    from export.pipeline import ExportOptions, export

    name = request.param
    if name == "dpt-tiny":
        return name, *fused_export
    out = tmp_path_factory.mktemp(name)
    report = export(ExportOptions(out, SMALL_H, SMALL_W, depth=name,
                                  depth_short_side=NETS[name], reuse_nafnet=fused_export[0],
                                  gpu_check=False), echo=lambda s: None)
    for artifact in NAFNET_ARTIFACTS:
        path = out / artifact
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return name, out, report


@pytest.mark.slow
def test_fp32_matches_the_pytorch_pipeline_with_the_same_net(fused, photo_dir):
    name, out, _ = fused
    result = run_parity(out / "bokeh_fp32.tflite", images=photo_dir, echo=lambda s: None,
                        tflite_only=name not in EVERY_STAGE)
    assert result["passed"], result["summary"]
    final = result["stages"][-1]
    assert final["stage"] == "tflite-fp32"
    for row in final["inputs"]:
        if row["output"] == "mask":
            assert row["max_abs_diff"] <= 1e-3
        else:
            assert row["psnr_db"] >= 60
    names = [s["stage"] for s in result["stages"]]
    if name in EVERY_STAGE:
        assert names[-3:] == ["bokeh-savedmodel", "bokeh-frozen-graph", "tflite-fp32"]
    else:
        assert names == ["tflite-fp32"]


@pytest.mark.slow
def test_reference_uses_the_net_and_its_mask_is_not_degenerate(fused, photo_dir):
    """Parity on a constant mask would prove little: the random net must give real structure."""
    name, out, _ = fused
    manifest, _ = read_manifest(out / "bokeh_fp32.tflite")
    ref = Reference(manifest)
    net = depth_net(name)
    assert type(ref.pipeline.depth).__name__ == {
        "dpt": "DPT", "midas-small": "MidasSmall", "depth-anything-v2": "DepthAnythingV2"}[
        net.family]
    assert ref.pipeline.depth_size == (NETS[name], NETS[name] * 3 // 2)
    assert ref.pipeline.mean.flatten().tolist() == pytest.approx(net.mean)
    for inp in parity_inputs(manifest, photo_dir, echo=lambda s: None):
        mask = ref.run(inp.value)["bokeh"]["mask"]
        assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
        assert mask.std() > 0.05


@pytest.mark.slow
def test_fp16_within_45db_of_fp32(fused, photo_dir):
    _, out, _ = fused
    result = run_parity(out / "bokeh_fp16.tflite", images=photo_dir, echo=lambda s: None,
                        tflite_only=True)
    versus = result["stages"][-1]
    assert versus["stage"] == "tflite-fp16 vs bokeh_fp32.tflite"
    assert versus["passed"]
    assert min(r["psnr_db"] for r in versus["inputs"] if r["output"] == "bokeh") >= 45


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_phone_ready_and_the_net_named_everywhere(fused, variant):
    name, out, report = fused
    info = assert_phone_ready(out / f"bokeh_{variant}.tflite", report)
    assert [t["name"] for t in info.inputs] == ["photo"]
    assert sorted(t["name"] for t in info.outputs) == ["bokeh", "mask"]
    manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
    depth = manifest["depth"]
    assert depth["name"] == name and depth["input_size"] == [NETS[name], NETS[name] * 3 // 2]
    assert depth["mean"] == list(depth_net(name).mean) and depth["random_seed"] == 0
    assert any("MEANINGLESS" in w and name in w for w in manifest["warnings"])
    assert json.loads(json.dumps(report["depth"])) == depth
    assert f"depth net: {name}" in (out / "report.txt").read_text()
    if name != "dpt-tiny":
        assert report["nafnet_reused_from"]


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
    assert not out.exists() or not list(out.iterdir())


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
    assert "bokeh_controls_fp32.tflite" in {f.name for f in export_files(out)}
    for extra in out.glob("bokeh_controls_*.tflite"):  # listed, but gone: not checked (time)
        extra.unlink()
    files = export_files(out)
    assert {f.name for f in files} == {"nafnet_fp32.tflite", "nafnet_fp16.tflite",
                                       "bokeh_fp32.tflite", "bokeh_fp16.tflite"}
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
    assert set(recorded) >= {f.name for f in files}  # other tests' GPU/fp16 runs may be there
    assert all(recorded[f.name]["passed"] for f in files)


def test_parity_export_dir_refuses_single_file_flags_and_foreign_folders(tmp_path, capsys):
    from tools.cli import main as bokeh

    assert bokeh(["parity", "--export-dir", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err
    assert bokeh(["parity", "--export-dir", str(tmp_path), "--pair", "1,1"]) == 2
    assert "--pair: only with --tflite" in capsys.readouterr().err
    assert bokeh(["parity", "--export-dir", str(tmp_path), "--tflite", "x.tflite"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- full size: the official configs at the paper's 1024x1536 (pytest -m full) -------------------

FULL_NETS = ("midas-small", "depth-anything-v2-small")


@pytest.fixture(scope="module")
def full_exports(tmp_path_factory):
    """Both official small nets fused at 1024x1536 (fp32, fp16), NAFNet converted once; an
    existing set (make bench-depth's build/bench-depth) is reused when BOKEHLITE_DEPTH_EXPORTS
    names it."""
    import os
    from pathlib import Path

    from validate.depth_bench import ensure_depth_exports

    root = os.environ.get("BOKEHLITE_DEPTH_EXPORTS") or tmp_path_factory.mktemp("depth_full")
    return ensure_depth_exports(Path(root), 1024, 1536, FULL_NETS, echo=lambda s: None)


@pytest.fixture(scope="module")
def bench_photos(tmp_path_factory):
    from validate.doc import write_photos

    return write_photos(tmp_path_factory.mktemp("bench_photos"))


@pytest.mark.full
@pytest.mark.parametrize("name", FULL_NETS)
def test_full_size_official_config_parity_on_photos(full_exports, bench_photos, name):
    out = full_exports[name]
    manifest, _ = read_manifest(out / "bokeh_fp32.tflite")
    official = json.loads(json.dumps(dataclasses.asdict(depth_net(name).config)))
    assert manifest["depth"]["name"] == name and manifest["depth"]["config"] == official
    result = run_parity(out / "bokeh_fp32.tflite", images=bench_photos, tflite_only=True,
                        echo=lambda s: None)
    assert result["passed"], result["summary"]
    for row in result["stages"][-1]["inputs"]:
        assert row["max_abs_diff"] <= 1e-3 if row["output"] == "mask" else row["psnr_db"] >= 60
    fp16 = run_parity(out / "bokeh_fp16.tflite", images=bench_photos, tflite_only=True,
                      echo=lambda s: None)
    assert fp16["passed"], fp16["summary"]
    versus = fp16["stages"][-1]
    assert min(r["psnr_db"] for r in versus["inputs"] if r["output"] == "bokeh") >= 45


@pytest.mark.full
@pytest.mark.parametrize("name", FULL_NETS)
def test_full_size_builtin_rank4_gpu_ready_and_small(full_exports, name):
    out = full_exports[name]
    for variant in ("fp32", "fp16"):
        assert_phone_ready(out / f"bokeh_{variant}.tflite")
        manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
        assert manifest["gpu_compatible"] is True
    assert (out / "bokeh_fp16.tflite").stat().st_size < 60e6


@pytest.mark.slow
def test_fp32_arithmetic_matches_litert_and_the_fp16_verdict_is_recorded(fused):
    """The evaluator's fp32 self-check (export/arith.py) on both float files of each net, and
    the export's fp16 verdict in their manifests: its content, not a pass (random weights; the
    graphs without fp16 rewrites fail)."""
    from test_arith import assert_self_check

    name, out, report = fused
    rng = np.random.default_rng(0)
    for variant in ("fp32", "fp16"):
        assert_self_check(out / f"bokeh_{variant}.tflite", rng)
        manifest, _ = read_manifest(out / f"bokeh_{variant}.tflite")
        verdict = manifest["fp16_arithmetic"]
        assert set(verdict["outputs"]) == {"bokeh", "mask"} and verdict["passed"] in (True, False)
        if verdict["passed"] is False:
            assert verdict["first_nonfinite"] or any(
                not o["passed"] for o in verdict["outputs"].values())
        assert report["variants"][f"bokeh_{variant}.tflite"]["fp16_arithmetic"] == verdict


@pytest.mark.slow
def test_every_float_layer_pattern_of_the_net_names_ops_of_its_fused_graph(fused):
    """SENSITIVE_LAYERS (export/quantize.py) keeps ops in float by name: a pattern that names
    nothing would keep nothing without a word, so each must name ops of the depth net here (the
    mask glue: ops of the fused graph itself, outside the depth net and NAFNet)."""
    from export.quantize import MASK_GLUE, SENSITIVE_LAYERS, output_names
    from models.depth import FAMILIES

    name, out, _ = fused
    family = depth_net(name).family
    names = output_names((out / "bokeh_fp32.tflite").read_bytes())
    scope = FAMILIES[family].keras_scope
    for variant, per_family in SENSITIVE_LAYERS.items():
        for pattern in per_family.get(family, {}).get("nodes", ()):
            hits = [n for n in names if re.search(pattern, n)]
            assert hits, f"{variant}: {pattern!r} names no op of the fused {name}"
            if pattern == MASK_GLUE:
                assert not any(scope in n or "onnx_tf_prefix_" in n for n in hits), hits
                assert {"Max", "Min", "Maximum"} <= {n.split(";")[0].split("/")[-1]
                                                      for n in hits}
            else:
                assert all(scope in n for n in hits), f"{variant}: {pattern!r} leaves the net"
