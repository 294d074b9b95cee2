"""Focus and blur strength chosen at run time (issue #14): the PyTorch reference, the controls
TFLite model (bokeh_controls_*.tflite of the shared export), parity, and the render command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from phone import assert_phone_ready
from PIL import Image

from common.images import letterbox
from export.runner import run_tflite
from models.pipeline import BokehPipeline, focus_guide
from tools.render import main as render_main
from validate.parity import run_parity


def _ones(value: float) -> np.ndarray:
    return np.full((1, 1, 1, 1), value, np.float32)


@pytest.fixture(scope="module")
def pipeline():
    """Tiny random DPT + a one-block NAFNet: the reference math, fast."""
    from models.dpt import random_dpt, tiny_dpt_config
    from models.nafnet import NAFNet

    torch.manual_seed(0)
    nafnet = NAFNet(width=8, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,)).eval()
    return BokehPipeline(random_dpt(tiny_dpt_config("hybrid"), 0), nafnet, (64, 96)).eval()


@pytest.fixture(scope="module")
def photos():
    return torch.rand((2, 3, 64, 96), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_pytorch_defaults_are_the_plain_pipeline_bit_for_bit(pipeline, photos):
    bokeh, mask = pipeline(photos)
    b, m = pipeline(photos, 1.0, 1.0)
    assert torch.equal(b, bokeh) and torch.equal(m, mask)  # the mask output is the depth mask
    # the same through render() with one mask, with tensors as controls
    assert torch.equal(pipeline.render(photos, mask, torch.ones(2), torch.ones(2, 1, 1, 1)),
                       bokeh)
    assert torch.equal(pipeline.render(photos, mask, 0.3, 0.0), photos)  # strength 0: the photo
    # one control value per image of the batch (convolutions of batch 1 and 2 round apart)
    b = pipeline.render(photos, mask, torch.tensor([1.0, 0.2]), torch.tensor([1.0, 0.6]))
    assert torch.equal(b[:1], bokeh[:1])
    torch.testing.assert_close(b[1:], pipeline.render(photos[1:], mask[1:], 0.2, 0.6),
                               rtol=0, atol=1e-6)


@torch.no_grad()
def test_pytorch_clamps_out_of_range_controls(pipeline, photos):
    photo = photos[:1]
    mask = pipeline.depth_mask(photo)  # the controls act after it: one depth pass serves all
    for (f, s), (cf, cs) in [((3.0, 7.0), (1.0, 1.0)), ((-2.0, -1.0), (0.0, 0.0)),
                             ((1.5, 0.4), (1.0, 0.4))]:
        assert torch.equal(pipeline.render(photo, mask, f, s), pipeline.render(photo, mask, cf, cs))


def test_focus_guide_is_one_minus_distance_and_exact_at_focus_one():
    m = torch.tensor([0.0, 1e-8, 3e-5, 0.2, 0.5, 0.7, 1.0])
    assert torch.equal(focus_guide(m, torch.tensor(1.0)), m)
    # the textbook form rounds: 1 - |1e-8 - 1| is 0 in float32
    assert (1.0 - (m - 1.0).abs())[1] == 0.0
    for f in (0.0, 0.3, 0.5, 0.9):
        expect = 1.0 - (m.double() - f).abs()
        assert (focus_guide(m, torch.tensor(f)).double() - expect).abs().max() < 1e-7
    # in focus: 1 up to one rounding (0.3 + 0.7 is 1 - 2**-24 in float32)
    assert focus_guide(torch.tensor([0.3]), torch.tensor(0.3)).item() == pytest.approx(1.0,
                                                                                      abs=1e-7)


def _photo(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 8, 12), dtype=np.float32))
    return torch.nn.functional.interpolate(coarse, (64, 96), mode="bilinear").numpy().transpose(
        0, 2, 3, 1).copy()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_tflite_defaults_equal_plain_and_controls_clamp(fused_export, variant):
    out, _ = fused_export
    x = _photo()
    controls = out / f"bokeh_controls_{variant}.tflite"
    plain = run_tflite(out / f"bokeh_{variant}.tflite", x)
    at = {}
    for f, s in [(1, 1), (3, 7), (0, 0), (-2, -1), (0.4, 0.6)]:
        at[f, s] = run_tflite(controls, photo=x, focus=_ones(f), strength=_ones(s))
    for name in ("bokeh", "mask"):
        np.testing.assert_array_equal(at[1, 1][name], plain[name])  # bit for bit
        np.testing.assert_array_equal(at[3, 7][name], at[1, 1][name])
        np.testing.assert_array_equal(at[-2, -1][name], at[0, 0][name])
        np.testing.assert_array_equal(at[0.4, 0.6]["mask"], plain["mask"])
    np.testing.assert_array_equal(at[0, 0]["bokeh"], x)  # strength 0: the photo
    assert np.abs(at[0.4, 0.6]["bokeh"] - plain["bokeh"]).max() > 1e-3  # the controls act


@pytest.mark.slow
def test_parity_at_control_pairs_and_against_the_plain_model(fused_export):
    out, _ = fused_export
    result = run_parity(out / "bokeh_controls_fp32.tflite", num_random=1,
                        echo=lambda s: None, tflite_only=True)
    assert result["passed"], result["summary"]
    final, versus = result["stages"]
    assert final["stage"] == "tflite-fp32"
    assert {r["input"] for r in final["inputs"]} == {
        f"random-0 f={f} s={s}"
        for f, s in (("1", "1"), ("0", "1"), ("0.5", "0.5"), ("0.25", "0.75"))}
    for row in final["inputs"]:
        if row["output"] == "mask":
            assert row["max_abs_diff"] <= 1e-3
        else:
            assert row["psnr_db"] >= 60
    assert versus["stage"] == "tflite-fp32 at defaults vs bokeh_fp32.tflite"
    assert {r["input"] for r in versus["inputs"]} == {"random-0 f=1 s=1"}
    assert versus["max_abs_diff"] == 0.0
    half = run_parity(out / "bokeh_controls_fp16.tflite", num_random=1, tflite_only=True,
                      control_pairs=[(1, 1), (0.3, 0.6)], echo=lambda s: None)
    assert half["passed"], half["summary"]
    assert [s["stage"] for s in half["stages"]] == [
        "tflite-fp16", "tflite-fp16 vs bokeh_controls_fp32.tflite",
        "tflite-fp16 at defaults vs bokeh_fp16.tflite"]
    assert min(r["psnr_db"] for r in half["stages"][0]["inputs"]
               if r["output"] == "bokeh") >= 45


def test_multi_input_stages_run_by_name(tmp_path):
    """The frozen-graph stage feeds photo, focus and strength by name (cheap stand-in graph)."""
    from common.quiet import quiet_tensorflow
    from export.tf_stages import freeze
    from validate.parity import stage_runner

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 3], tf.float32, name="photo"),
                                  tf.TensorSpec([1, 1, 1, 1], tf.float32, name="focus"),
                                  tf.TensorSpec([1, 1, 1, 1], tf.float32, name="strength")])
    def fn(photo, focus, strength):
        return photo * strength + focus, tf.reduce_mean(photo, axis=-1, keepdims=True)

    path, spec = freeze(fn, tmp_path / "g.pb", ("bokeh", "mask"))
    assert list(spec["inputs"]) == ["photo", "focus", "strength"]
    run = stage_runner({"name": "g", "engine": "frozen_graph", "path": path.name,
                        "inputs": list(spec["inputs"]), "outputs": ["bokeh", "mask"]}, tmp_path)
    x = np.full((1, 4, 4, 3), 0.5, np.float32)
    got = run({"strength": _ones(0.5), "photo": x, "focus": _ones(0.1)})
    np.testing.assert_allclose(got["bokeh"], 0.35, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_controls_tflite_facts_and_manifest(fused_export, variant):
    out, report = fused_export
    info = assert_phone_ready(out / f"bokeh_controls_{variant}.tflite", report)
    assert [(t["name"], t["shape"]) for t in info.inputs] == [
        ("photo", [1, 64, 96, 3]), ("focus", [1, 1, 1, 1]), ("strength", [1, 1, 1, 1])]
    assert sorted(t["name"] for t in info.outputs) == ["bokeh", "mask"]
    manifest = json.loads((out / f"bokeh_controls_{variant}.manifest.json").read_text())
    assert manifest["model"] == "bokeh" and manifest["variant"] == variant
    assert manifest["controls"]["focus"]["default"] == 1.0
    assert manifest["controls"]["strength"]["range"] == [0.0, 1.0]
    inputs = {t["name"]: t for t in manifest["inputs"]}
    for name in ("focus", "strength"):
        assert inputs[name]["range"] == [0.0, 1.0] and inputs[name]["default"] == 1.0
        assert "clamped" in inputs[name]["description"]
    assert [s["name"] for s in manifest["stages"][-2:]] == [
        "bokeh-controls-savedmodel", "bokeh-controls-frozen-graph"]
    plain = json.loads((out / f"bokeh_{variant}.manifest.json").read_text())
    assert "controls" not in plain and [t["name"] for t in plain["inputs"]] == ["photo"]


@pytest.mark.slow
def test_runtime_engine_and_ai_benchmark_with_a_controls_model(fused_export, tmp_path,
                                                               capsys):
    from tools.ai_benchmark import main as bundle_main
    from validate.runtime import tflite_engine

    out, _ = fused_export
    x = _photo()
    bokeh = tflite_engine(out / "bokeh_controls_fp32.tflite", threads=1)(x)
    np.testing.assert_array_equal(bokeh, run_tflite(out / "bokeh_fp32.tflite", x)["bokeh"])
    code = bundle_main(["--tflite", str(out / "bokeh_controls_fp16.tflite"), "--out",
                        str(tmp_path / "b")])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert "takes 3 inputs (photo, focus, strength)" in line and "bokeh_fp16.tflite" in line
    assert not (tmp_path / "b").exists()


def test_letterbox_maps_photo_pixels_to_canvas():
    photo = np.zeros((90, 300, 3), np.float32)
    _, where = letterbox(photo, 64, 96)  # 96x29 at row 17
    assert where.to_canvas(0, 0) == (17, 0)
    assert where.to_canvas(299, 89) == (17 + 28, 95)
    assert where.to_canvas(150, 45) == (17 + 14, 48)


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


@pytest.mark.slow
def test_render_focus_at_compare_and_sweep(fused_export, photo_dir, tmp_path, capsys):
    from validate.renderers import TFLiteRenderer, focus_at

    out, _ = fused_export
    model = out / "bokeh_controls_fp32.tflite"
    dest = tmp_path / "r"
    code = render_main([str(photo_dir / "chelsea.png"), "--tflite", str(model), "--focus-at",
                        "200,120", "--strength", "0.8", "--compare", "--focus-sweep", "3",
                        "--panel-height", "64", "--out", str(dest)])
    assert code == 0
    text = capsys.readouterr().out
    renderer = TFLiteRenderer(model)
    from common.images import load_rgb

    rgb = load_rgb(photo_dir / "chelsea.png")
    focus = focus_at(renderer, renderer.size, rgb, 200, 120)
    fitted, where = letterbox(rgb, *renderer.size)
    assert focus == pytest.approx(float(renderer(fitted)[1][where.to_canvas(200, 120)]))
    assert f"focus {focus:.3f} at (200, 120)" in text
    assert _size(dest / "chelsea_bokeh.png") == (451, 300)
    width, height = _size(dest / "chelsea_compare.png")
    assert height > 64 and width > 3 * 64 * 451 / 300
    width, height = _size(dest / "chelsea_sweep.png")
    assert height > 64 and width > 3 * 64 * 451 / 300
    # the plain model renders the same picture as the controls model at focus 1, strength 1
    assert render_main([str(photo_dir / "chelsea.png"), "--tflite", str(model), "--strength",
                        "1", "--out", str(tmp_path / "c")]) == 0
    assert render_main([str(photo_dir / "chelsea.png"), "--tflite",
                        str(out / "bokeh_fp32.tflite"), "--out", str(tmp_path / "p")]) == 0
    a, b = (np.asarray(Image.open(d / "chelsea_bokeh.png")) for d in (tmp_path / "c",
                                                                         tmp_path / "p"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--focus-at", "451,10"], "--focus-at 451,10 is outside chelsea.png (451x300: X in 0..450, "
                               "Y in 0..299)"),
    (["--focus-at", "10,300"], "is outside chelsea.png"),
    (["--strength", "0.5", "--plain"], "takes no focus or strength (a plain model)"),
])
def test_render_refuses_bad_controls_in_one_line(fused_export, photo_dir, tmp_path, capsys,
                                                  args, message):
    out, _ = fused_export
    model = "bokeh_fp32.tflite" if "--plain" in args else "bokeh_controls_fp32.tflite"
    args = [a for a in args if a != "--plain"]
    code = render_main([str(photo_dir / "chelsea.png"), "--tflite", str(out / model),
                        "--out", str(tmp_path / "o"), *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bokeh render: error: ") and message in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--focus-sweep", "1"], "a sweep needs at least 2 renders"),
    (["--strength", "1.5"], "'1.5' is not a number in [0, 1]"),
    (["--focus-at", "12"], "is not X,Y"),
    (["--focus-at=-1,4"], "X and Y must be >= 0"),
])
def test_render_refuses_bad_control_values(photo_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        render_main([str(photo_dir / "chelsea.png"), "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bokeh render: error: argument ") and message in last


def test_export_controls_needs_the_fused_model(tmp_path, capsys):
    from tools.cli import export_main

    code = export_main(["--export-dir", str(tmp_path / "o"), "--height", "64", "--width", "96",
                        "--controls", "--no-fuse"])
    assert code == 2
    assert "--controls needs the fused model" in capsys.readouterr().err
