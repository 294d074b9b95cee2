"""The fp16-safe rewrites (docs/design.md, section 13), each on its own: exact in fp32, and under
fp16 arithmetic (export/arith.py) finite and close at stress magnitudes where the textbook form
is not; then stress models that fail without the rewrites and pass with them."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import onnx
import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from export import onnx_stages, rewrites, tf_stages, tflite_stage  # noqa: E402
from export.arith import run_arithmetic  # noqa: E402
from models import fp16_tf, stress  # noqa: E402
from models.depth import keras_from_torch, load_depth_model  # noqa: E402
from models.dpt_tf import GroupNorm, StdConv2DSame  # noqa: E402
from models.nafnet import NAFNet, randomize_residual_scales  # noqa: E402


def _tflite(fn, shape: tuple[int, ...], path) -> str:
    """``fn`` on one float input named ``x`` as an fp32 .tflite."""
    spec = tf.TensorSpec(shape, tf.float32, name="x")
    concrete = tf.function(fn, input_signature=[spec]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    path.write_bytes(converter.convert())
    return str(path)


def _fp16_error(path: str, x: np.ndarray) -> tuple[int, float]:
    """(non-finite values, largest error relative to the output's range) of the fp16 run
    against the fp32 run of the same file."""
    ref = next(iter(run_arithmetic(path, {"x": x}, "fp32").outputs.values()))
    out = next(iter(run_arithmetic(path, {"x": x}, "fp16").outputs.values()))
    bad = int(np.count_nonzero(~np.isfinite(out)))
    err = float(np.nanmax(np.abs(out - ref)) / (ref.max() - ref.min())) if bad < out.size else 1
    return bad, err


def _massive_tokens(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """ViT tokens with two DINOv2-style massive channels (stress.MASSIVE)."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    dim = shape[-1]
    for channel, value in zip((dim // 3, 2 * dim // 3), stress.MASSIVE, strict=True):
        x[..., channel] += value
    return x


def test_layer_norm_exact_in_fp32_and_safe_in_fp16(tmp_path):
    shape = (1, 65, 96)
    rng = np.random.default_rng(1)
    gamma, beta = (tf.constant(rng.normal(m, 0.1, shape[-1]).astype(np.float32)) for m in (1, 0))
    x = _massive_tokens(shape)
    safe, naive = (lambda t, s=s: fp16_tf.layer_norm(t, gamma, beta, 1e-6, s)
                   for s in (True, False))
    a, b = safe(tf.constant(x)).numpy(), naive(tf.constant(x)).numpy()
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    safe_bad, safe_err = _fp16_error(_tflite(safe, shape, tmp_path / "safe.tflite"), x)
    naive_bad, naive_err = _fp16_error(_tflite(naive, shape, tmp_path / "naive.tflite"), x)
    assert safe_bad == 0 and safe_err < 3e-3
    assert naive_bad > 0 or naive_err > 0.1  # (x - mean)^2 passes 65504


def _conv_group_norm(kernel: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                     shape: tuple[int, ...]) -> tf.keras.Model:
    """StdConv2DSame -> GroupNorm as the DPT-Hybrid backbone builds them (safe or naive by the
    switch), with the weights the port gives them."""
    x = tf.keras.Input(shape[1:], batch_size=1)
    conv = StdConv2DSame(kernel.shape[-1], kernel.shape[0])
    norm = GroupNorm(4, relu=False)
    model = tf.keras.Model(x, norm(conv(x)))
    conv.set_weights([kernel * np.float32(conv.output_scale)])
    norm.set_weights([gamma, beta])
    return model


def test_group_norm_exact_in_fp32_and_safe_in_fp16(tmp_path):
    shape = (1, 48, 64, 8)
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    gamma, beta = rng.normal(1, 0.1, 16).astype(np.float32), rng.normal(0, 0.1, 16).astype(
        np.float32)
    x = (rng.normal(size=shape) * 40 + 5).astype(np.float32)  # conv outputs near +-1000
    safe = _conv_group_norm(kernel, gamma, beta, shape)
    with fp16_tf.naive_fp16():
        naive = _conv_group_norm(kernel, gamma, beta, shape)
    a, b = safe(x).numpy(), naive(x).numpy()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    conv_out = tf.nn.conv2d(x, kernel, 1, "SAME").numpy()
    assert 500 < np.abs(conv_out).max() < 5000
    safe_bad, safe_err = _fp16_error(_tflite(safe, shape, tmp_path / "safe.tflite"), x)
    naive_bad, naive_err = _fp16_error(_tflite(naive, shape, tmp_path / "naive.tflite"), x)
    assert safe_bad == 0 and safe_err < 3e-3
    assert naive_bad > 0 or naive_err > 0.1


def test_spatial_mean_staged_equals_one_mean_and_survives_fp16(tmp_path):
    shape = (1, 128, 192, 4)
    x = (np.random.default_rng(3).random(shape) * 8 + 1).astype(np.float32)  # sum ~ 123k
    staged, one = (lambda t, s=s: fp16_tf.spatial_mean(t, s) for s in (True, False))
    exact = x.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    a, b = staged(tf.constant(x)).numpy(), one(tf.constant(x)).numpy()
    assert np.abs(a - exact).max() <= max(np.abs(b - exact).max(), 1e-6 * np.abs(exact).max())
    safe_bad, _ = _fp16_error(_tflite(staged, shape, tmp_path / "staged.tflite"), x)
    naive_bad, _ = _fp16_error(_tflite(one, shape, tmp_path / "one.tflite"), x)
    assert safe_bad == 0 and naive_bad > 0


# --- NAFNet: the ONNX passes ---------------------------------------------------------------------

NAFNET_SHAPE = (1, 4, 32, 48)


@pytest.fixture(scope="module")
def stress_nafnet_onnx(tmp_path_factory):
    """A 1-level NAFNet with its residual stream near |x| = 500 (stress weights), simplified."""
    torch.manual_seed(0)
    model = stress.stress_nafnet(randomize_residual_scales(NAFNet(4, 3, 8, (1,), 1, (1,))).eval())
    folder = tmp_path_factory.mktemp("fp16_nafnet")
    raw = onnx_stages.to_onnx(model, NAFNET_SHAPE, folder / "m.onnx")
    return model, onnx_stages.simplify(raw, folder / "m_sim.onnx"), folder


def test_residual_stream_pass_is_bit_exact_and_adds_no_op(stress_nafnet_onnx, tmp_path):
    _, sim, _ = stress_nafnet_onnx
    model = onnx.load(str(sim))
    ops = [n.op_type for n in model.graph.node]
    onnx.save(model, str(tmp_path / "before.onnx"))
    scaled, count = rewrites.residual_stream_scaled(model)
    assert count == 2 * 3  # two LayerNorms in each of the 3 blocks
    assert [n.op_type for n in scaled.graph.node] == ops
    onnx.save(scaled, str(tmp_path / "after.onnx"))
    x = np.random.default_rng(4).random(NAFNET_SHAPE, dtype=np.float32)
    before = onnx_stages.run_onnx(tmp_path / "before.onnx", x)
    assert np.array_equal(onnx_stages.run_onnx(tmp_path / "after.onnx", x), before)


@pytest.mark.slow
def test_stress_nafnet_survives_fp16(stress_nafnet_onnx):
    """The stress NAFNet converted with every pass, in fp16 arithmetic against fp32."""
    model, sim, folder = stress_nafnet_onnx
    photo = np.random.default_rng(5).random((1, *NAFNET_SHAPE[2:], 4), dtype=np.float32)
    peak = stress.residual_peaks(model, torch.from_numpy(photo).permute(0, 3, 1, 2))
    assert 250 < peak["residual"] < 1500
    onnx_path, counts = onnx_stages.rewrite(sim, folder / "mobile.onnx")
    assert counts["residual_stream_scaled"] == 6 and counts["global_pool_staged"] == 3
    with contextlib.redirect_stdout(io.StringIO()):
        saved = tf_stages.to_tensorflow(onnx_path, folder / "sm")
        fn = tf_stages.nchw_to_nhwc_function(saved, (1, *NAFNET_SHAPE[2:], 4))
        frozen, spec = tf_stages.freeze(fn, folder / "mobile.pb")
        path = tflite_stage.to_tflite(frozen, spec, folder / "mobile.tflite")
    ref = next(iter(run_arithmetic(path, {"input": photo}, "fp32").outputs.values()))
    out = next(iter(run_arithmetic(path, {"input": photo}, "fp16").outputs.values()))
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 2e-2


@pytest.mark.parametrize("name,size", [("dpt-tiny", (64, 96)), ("midas-small-tiny", (64, 96)),
                                       ("depth-anything-v2-small-tiny", (56, 84))])
def test_stress_weights_reach_trained_magnitudes(name, size):
    """Measured on another input than the probe the weights were scaled on: a few residual
    channels near +-1000, DPT-Hybrid's GroupNorm inputs near 1000, where random weights stay
    near 1-40."""
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(7)) * 4 - 2
    model = load_depth_model(name, seed=1)
    before = stress.residual_peaks(model, x)
    after = stress.residual_peaks(stress.stress_depth(model), x)
    assert before["residual"] < 50 and 800 < after["residual"] < 1500
    if name == "dpt-tiny":
        assert before["group_norm_input"] < 100 and 500 < after["group_norm_input"] < 2000


def test_stress_nafnet_is_the_same_function_larger_inside():
    torch.manual_seed(2)
    model = randomize_residual_scales(NAFNet(4, 3, 8, (1, 1), 1, (1, 1))).eval()
    x = torch.rand(1, 4, 32, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(x)
        assert stress.residual_peaks(model, x)["residual"] < 10
        stress.stress_nafnet(model)
        after = model(x)
    assert 250 < stress.residual_peaks(model, x)["residual"] < 1500
    assert torch.allclose(after, before, atol=1e-4)


# --- depth nets: stress models -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("dpt-tiny", (64, 96)),
                                       ("depth-anything-v2-small-tiny", (56, 84))])
def test_stress_depth_net_fails_naive_and_passes_safe(name, size, tmp_path):
    """The tiny test configs with stress weights (massive channels; GroupNorm inputs near 1000)
    in fp16 arithmetic: the textbook graph loses the depth, the fp16-safe one keeps it."""
    model = stress.stress_depth(load_depth_model(name, seed=3))
    x = (np.random.default_rng(6).random((1, *size, 3), dtype=np.float32) - 0.5) * 4
    peaks = stress.residual_peaks(model, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert 800 < peaks["residual"] < 1500
    assert peaks.get("group_norm_input", 1000) > 500
    errors = {}
    for safe in (True, False):
        with contextlib.nullcontext() if safe else fp16_tf.naive_fp16():
            keras_model = keras_from_torch(model, *size)
        path = _tflite(lambda t, m=keras_model: m(t), (1, *size, 3), tmp_path / f"{safe}.tflite")
        errors[safe] = _fp16_error(path, x)
    assert errors[True][0] == 0 and errors[True][1] < 1e-2, errors
    assert errors[False][0] > 0 or errors[False][1] > 0.1, errors


@pytest.mark.slow  # NAFNet converted twice, on the session export's ONNX
def test_the_speed_bench_times_both_forms_of_each_part_and_they_agree(fused_export, tmp_path):
    """validate/fp16_speed.py: NAFNet with and without the fp16 passes, a depth net built as is
    and under naive_fp16(); the two forms compute the same in fp32 and the fp16-safe LayerNorms
    are more ops (the scale)."""
    from common.files import read_json
    from validate import fp16_speed

    doc = tmp_path / "bench.md"
    doc.write_text("# bench\n")
    net = "depth-anything-v2-small-tiny"
    assert fp16_speed.main(["--export-dir", str(fused_export[0]), "--nets", net,
                            "--depth-short-side", "56", "--out", str(tmp_path / "s"),
                            "--runs", "1", "--doc", str(doc)]) == 0
    rows = {r["part"]: r for r in read_json(tmp_path / "s" / "fp16_speed.json")["rows"]}
    assert set(rows) == {"NAFNet", net}
    for row in rows.values():
        assert row["max_abs_diff"] < 1e-4 and row["textbook_median_s"] > 0
    assert rows[net]["ops"]["fp16-safe"] > rows[net]["ops"]["textbook"]
    assert rows["NAFNet"]["input"] == [1, 64, 96, 4]
    assert "<!-- bench:fp16-speed -->" in doc.read_text()
