"""The small depth nets fused with NAFNet (models/depth.py): one export per net at 64x96, each
reusing the NAFNet conversion of the shared export, then the same checks as the fused DPT's.

The NAFNet stages of these exports are copies of the shared export's, whose parity
tests/test_fused.py checks; they are removed after the export, so parity here runs the stages
the depth net changes: the fused SavedModel and frozen graph (for Depth Anything; the fusing code
is the same for every net) and the TFLite files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from export.pipeline import NAFNET_ARTIFACTS
from export.tflite_info import inspect_tflite
from models.depth import depth_net
from models.reference import Reference
from validate.parity import parity_inputs, read_manifest, run_parity

SMALL_H, SMALL_W = 64, 96  # the shared export's size (conftest.py)

# net -> depth short side: 64x96 for MiDaS small (no resize), 56x84 for Depth Anything (resized
# both ways, sides multiples of 14)
NETS = {"midas-small-tiny": 64, "depth-anything-v2-small-tiny": 56}
EVERY_STAGE = "depth-anything-v2-small-tiny"  # parity of the fused SavedModel and frozen graph


@pytest.fixture(scope="module", params=list(NETS))
def depth_export(request, fused_export, tmp_path_factory):
    from export.pipeline import ExportOptions, export

    name = request.param
    out = tmp_path_factory.mktemp(name)
    report = export(ExportOptions(out, SMALL_H, SMALL_W, depth=name,
                                  depth_short_side=NETS[name], reuse_nafnet=fused_export[0],
                                  gpu_check=False), echo=lambda s: None)
    for artifact in NAFNET_ARTIFACTS:
        path = out / artifact
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return name, out, report


@pytest.mark.slow
def test_fp32_matches_the_pytorch_pipeline_with_the_same_net(depth_export, photo_dir):
    name, out, _ = depth_export
    result = run_parity(out / "bokeh_fp32.tflite", images=photo_dir, echo=lambda s: None,
                        tflite_only=name != EVERY_STAGE)
    assert result["passed"], result["summary"]
    final = result["stages"][-1]
    assert final["stage"] == "tflite-fp32"
    for row in final["inputs"]:
        if row["output"] == "mask":
            assert row["max_abs_diff"] <= 1e-3
        else:
            assert row["psnr_db"] >= 60
    names = [s["stage"] for s in result["stages"]]
    assert names == (["bokeh-savedmodel", "bokeh-frozen-graph", "tflite-fp32"]
                     if name == EVERY_STAGE else ["tflite-fp32"])


@pytest.mark.slow
def test_reference_uses_the_net_and_its_mask_is_not_degenerate(depth_export, photo_dir):
    name, out, _ = depth_export
    manifest, _ = read_manifest(out / "bokeh_fp32.tflite")
    ref = Reference(manifest)
    net = depth_net(name)
    assert type(ref.pipeline.depth).__name__ in ("MidasSmall", "DepthAnythingV2")
    assert ref.pipeline.depth_size == (NETS[name], NETS[name] * 3 // 2)
    assert ref.pipeline.mean.flatten().tolist() == pytest.approx(net.mean)
    for inp in parity_inputs(manifest, photo_dir, echo=lambda s: None):
        mask = ref.run(inp.value)["bokeh"]["mask"]
        assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
        assert mask.std() > 0.05


@pytest.mark.slow
def test_fp16_within_45db_of_fp32(depth_export, photo_dir):
    _, out, _ = depth_export
    result = run_parity(out / "bokeh_fp16.tflite", images=photo_dir, echo=lambda s: None,
                        tflite_only=True)
    versus = result["stages"][-1]
    assert versus["stage"] == "tflite-fp16 vs bokeh_fp32.tflite"
    assert versus["passed"]
    assert min(r["psnr_db"] for r in versus["inputs"] if r["output"] == "bokeh") >= 45


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_builtin_only_rank4_gpu_ready_and_named_everywhere(depth_export, variant):
    name, out, report = depth_export
    info = inspect_tflite(out / f"bokeh_{variant}.tflite")
    assert info.flex_ops == [] and info.max_rank <= 4
    entry = report["variants"][f"bokeh_{variant}.tflite"]
    assert entry["gpu_compatible"] is True and entry["flex_ops"] == []
    manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
    depth = manifest["depth"]
    assert depth["name"] == name and depth["input_size"] == [NETS[name], NETS[name] * 3 // 2]
    assert depth["mean"] == list(depth_net(name).mean) and depth["random_seed"] == 0
    assert any("MEANINGLESS" in w and name in w for w in manifest["warnings"])
    assert json.loads(json.dumps(report["depth"])) == depth and report["nafnet_reused_from"]
    assert f"depth net: {name}" in (out / "report.txt").read_text()


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
        info = inspect_tflite(out / f"bokeh_{variant}.tflite")
        assert info.flex_ops == [] and info.max_rank <= 4
        manifest = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
        assert manifest["gpu_compatible"] is True
    assert (out / "bokeh_fp16.tflite").stat().st_size < 60e6
