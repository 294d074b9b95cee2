"""The arithmetic evaluator (export/arith.py): its fp32 self-check against LiteRT on every model
kind of the shared export, and hand-made models whose fp16 run overflows exactly where the
arithmetic says it must."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from export.arith import (
    POLICIES,
    arithmetic_report,
    format_arithmetic_report,
    op_kinds,
    run_arithmetic,
    run_policies,
)
from export.runner import run_tflite

SELF_CHECK = 1e-5  # of the output's range, issue 19


def _inputs(path, rng) -> dict[str, np.ndarray]:
    from export.runner import TFLiteRunner

    runner = TFLiteRunner(path)
    feeds = {}
    for d in runner.inputs:
        shape = tuple(int(s) for s in d["shape"])
        feeds[d["name"]] = (np.full(shape, 0.7, np.float32) if shape == (1, 1, 1, 1)
                            else rng.random(shape, dtype=np.float32))
    return feeds


def assert_self_check(path, rng) -> None:
    """fp32 policy == LiteRT's CPU run within SELF_CHECK of each output's range."""
    feeds = _inputs(path, rng)
    want = run_tflite(path, runtime="litert", **feeds)
    got = run_arithmetic(path, feeds, "fp32").outputs
    assert set(got) == set(want)
    for name, value in want.items():
        span = float(value.max() - value.min()) or 1.0
        err = float(np.abs(got[name] - value).max())
        assert err <= SELF_CHECK * span, f"{path.name} {name}: {err:.2e} of range {span:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["nafnet_fp32", "nafnet_fp16", "bokeh_fp32", "bokeh_fp16",
                                  "bokeh_controls_fp32", "bokeh_controls_fp16"])
def test_fp32_policy_matches_litert(fused_export, stem, rng):
    assert_self_check(fused_export[0] / f"{stem}.tflite", rng)


@pytest.mark.slow
def test_fp16_file_reads_fp16_weights_through_dequantize(fused_export):
    kinds = op_kinds(fused_export[0] / "bokeh_fp16.tflite")
    assert kinds["DEQUANTIZE"] > 10
    assert "DEQUANTIZE" not in op_kinds(fused_export[0] / "bokeh_fp32.tflite")


@pytest.mark.slow
def test_fp16_report_of_the_tiny_fused_model(fused_export, rng):
    path = fused_export[0] / "bokeh_fp16.tflite"
    report = arithmetic_report(path, _inputs(path, rng))
    assert set(report["outputs"]) == {"bokeh", "mask"}
    for out in report["outputs"].values():
        assert out["nonfinite"] == 0
        assert out["psnr_db"] is not None and 20 < out["psnr_db"] < 200  # fp16 is not exact
    assert report["worst_ops"] and report["worst_ops"][0]["db_lost"] >= \
        report["worst_ops"][-1]["db_lost"]
    text = format_arithmetic_report(report)
    assert "fp16 arithmetic" in text and "mask" in text


@pytest.mark.slow
def test_policies_sharing_one_reference_run_as_each_alone(fused_export, rng):
    """run_policies: one fp32 run shared by fp16 and fp16-acc16 changes no output and no op
    record of either (the benches rely on it)."""
    path = fused_export[0] / "bokeh_fp16.tflite"
    feeds = _inputs(path, rng)
    together = run_policies(path, feeds, ("fp16", "fp16-acc16"), reference="fp32")
    assert [run.policy for run in together] == ["fp16", "fp16-acc16"]
    for run in together:
        alone = run_arithmetic(path, feeds, run.policy, reference="fp32")
        for name, value in alone.outputs.items():
            np.testing.assert_array_equal(run.outputs[name], value)
            np.testing.assert_array_equal(run.reference_outputs[name],
                                          alone.reference_outputs[name])
        assert [op.as_dict() for op in run.ops] == [op.as_dict() for op in alone.ops]
    assert any(a.psnr != b.psnr for a, b in zip(*(run.ops for run in together), strict=True))


def _convert(fn) -> bytes:
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()
    return tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], fn).convert()


def _mean_tflite(path, scale: float):
    """x [1,128,256,2] -> 1x1 conv (``scale`` times the identity) -> spatial MEAN (32768 values
    a channel) -> x - mean; the mean stays an inner tensor, the output is twice it."""
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 128, 256, 2], tf.float32, name="x")])
    def model(x):
        y = tf.nn.conv2d(x, scale * tf.eye(2, batch_shape=[1, 1]), 1, "SAME", name="stem_conv")
        m = tf.reduce_mean(y, axis=[1, 2], keepdims=True, name="stem_mean")
        return {"out": tf.nn.relu(x - m), "twice_mean": m * 2.0}

    path.write_bytes(_convert(model))
    return path


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory):
    """The identity conv: with x = 1 in channel 0 and 2 in channel 1 every partial sum is exact
    in fp16; channel 0 sums to 32768 (finite), channel 1 to 65536 (past 65504: inf)."""
    return _mean_tflite(tmp_path_factory.mktemp("arith") / "mean.tflite", 1.0)


def _ones(value0: float, value1: float) -> dict[str, np.ndarray]:
    x = np.empty((1, 128, 256, 2), np.float32)
    x[..., 0], x[..., 1] = value0, value1
    return {"x": x}


def test_fp16_mean_overflows_exactly_past_65504(mean_model):
    ok = run_arithmetic(mean_model, _ones(1.0, 1.0), "fp16")
    assert ok.first_nonfinite() is None
    run = run_arithmetic(mean_model, _ones(1.0, 2.0), "fp16")
    first = run.first_nonfinite()
    assert first is not None and first.kind == "MEAN" and "stem_mean" in first.name
    assert first.nonfinite == 1  # channel 1 only
    assert first.input_ranges[0] == [1.0, 2.0]
    assert first.output_range == [1.0, np.inf]
    # fp32 arithmetic holds, and agrees with LiteRT
    fp32 = run_arithmetic(mean_model, _ones(1.0, 2.0), "fp32")
    assert fp32.first_nonfinite() is None
    want = run_tflite(mean_model, runtime="litert", **_ones(1.0, 2.0))
    for name, value in want.items():
        np.testing.assert_array_equal(fp32.outputs[name], value)


def test_fp16_report_names_the_first_inf(mean_model):
    report = arithmetic_report(mean_model, _ones(1.0, 2.0))
    assert not report["passed"]
    assert report["first_nonfinite"]["kind"] == "MEAN"
    assert "stem_mean" in report["first_nonfinite"]["name"]
    assert "FAIL: first inf/NaN at MEAN" in format_arithmetic_report(report)
    assert report["threshold"]["nonfinite_values"] == 0


def test_fp16_mean_rounds_like_a_sum_in_fp16(mean_model):
    """0.3 is not exact in fp16, and a lane's running sum (512 terms, reaching about 154, where
    the fp16 step is 0.125) rounds every addition: the fp16 mean is off by far more than the
    0.3 -> fp16 rounding (1.2e-5), yet by less than 10 %."""
    run = run_arithmetic(mean_model, _ones(0.3, 0.3), "fp16", reference="fp32")
    # the converter names outputs Identity, Identity_1: the mean is the [1,1,1,2] one
    name = next(n for n, v in run.outputs.items() if v.shape == (1, 1, 1, 2))
    assert run.reference_outputs[name] / 2 == pytest.approx(0.3, abs=1e-6)
    err = np.abs(run.outputs[name] / 2 - 0.3)
    assert np.all(err > 1e-3) and np.all(err < 0.03)
    mean_op = next(op for op in run.ops if op.kind == "MEAN")
    assert mean_op.db_lost is not None and mean_op.db_lost > 0


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """x [1,4,128] @ w [128,1]: w = +1 on the first 64 terms, -1 on the last 64."""
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()
    w = np.concatenate([np.ones(64), -np.ones(64)]).astype(np.float32)[:, None]

    @tf.function(input_signature=[tf.TensorSpec([4, 128], tf.float32, name="x")])
    def model(x):
        return {"out": tf.matmul(x, tf.constant(w), name="dense")}

    path = tmp_path_factory.mktemp("arith") / "dense.tflite"
    path.write_bytes(_convert(model))
    return path


def test_fp16_acc16_overflows_where_fp32_accumulation_does_not(dense_model):
    """Terms of 1200: the running sum reaches 76800 after 64 of them and comes back to 0; fp32
    accumulation (fp16) gives 0, an fp16 accumulator (fp16-acc16) passes 65504 and stays inf."""
    assert "FULLY_CONNECTED" in op_kinds(dense_model) or "BATCH_MATMUL" in op_kinds(dense_model)
    x = {"x": np.full((4, 128), 1200.0, np.float32)}
    (fp16,) = run_arithmetic(dense_model, x, "fp16").outputs.values()
    assert np.all(fp16 == 0)
    acc16 = run_arithmetic(dense_model, x, "fp16-acc16")
    assert not np.any(np.isfinite(next(iter(acc16.outputs.values()))))
    assert acc16.first_nonfinite().kind in ("FULLY_CONNECTED", "BATCH_MATMUL")


def test_bad_policy_and_inputs_are_one_line_errors(mean_model):
    assert POLICIES == ("fp32", "fp16", "fp16-acc16")
    with pytest.raises(UserError, match="unknown arithmetic policy 'fp8'"):
        run_arithmetic(mean_model, _ones(1, 1), "fp8")
    with pytest.raises(UserError, match="takes inputs"):
        run_arithmetic(mean_model, {"y": np.zeros(1)}, "fp32")
    with pytest.raises(UserError, match=r"input 'x' is \[1, 128, 256, 2\]"):
        run_arithmetic(mean_model, {"x": np.zeros((1, 2, 2, 2), np.float32)}, "fp32")


def test_an_unknown_op_kind_is_named(tmp_path):
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
    def model(x):
        return {"out": tf.math.cumsum(x, axis=1)}

    path = tmp_path / "cumsum.tflite"
    path.write_bytes(_convert(model))
    with pytest.raises(UserError, match="does not implement: CUMSUM"):
        run_arithmetic(path, {"x": np.zeros((1, 8), np.float32)}, "fp16")


@pytest.mark.slow
# --- wiring: the export's verdict, bokeh inspect --fp16, parity --arithmetic, the bundle --------

@pytest.mark.parametrize("stem", ["nafnet_fp32", "nafnet_fp16", "bokeh_fp32", "bokeh_fp16",
                                  "bokeh_controls_fp32", "bokeh_controls_fp16"])
def test_every_float_manifest_carries_the_fp16_verdict(fused_export, stem):
    import json

    out, report = fused_export
    manifest = json.loads((out / f"{stem}.manifest.json").read_text())
    verdict = manifest["fp16_arithmetic"]
    assert verdict["policy"] == "fp16" and verdict["passed"] in (True, False)
    names = {o["name"] for o in manifest["outputs"]}
    assert set(verdict["outputs"]) == names
    assert verdict["threshold"]["nonfinite_values"] == 0
    assert verdict["passed"] == (verdict["first_nonfinite"] is None and all(
        o["passed"] for o in verdict["outputs"].values()))
    assert report["variants"][f"{stem}.tflite"]["fp16_arithmetic"] == verdict
    assert f"{stem}.tflite: fp16 arithmetic: " in (out / "report.txt").read_text()


def test_inspect_fp16_names_the_first_inf_and_exits_1(tmp_path, capsys):
    """Scaled by 8, the seeded random input (values about 0.5) sums past 65504 in the MEAN."""
    from tools.inspect import main

    path = _mean_tflite(tmp_path / "mean8.tflite", 8.0)
    assert main([str(path), "--fp16"]) == 1
    text = capsys.readouterr().out
    assert "FAIL: first inf/NaN at MEAN 'stem_mean'" in text
    assert "ops losing the most" in text


@pytest.mark.slow
def test_inspect_fp16_json_on_nafnet(fused_export, capsys):
    import json

    from tools.inspect import main

    assert main([str(fused_export[0] / "nafnet_fp16.tflite"), "--fp16", "--json",
                 "--ops", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arithmetic"]["passed"] is True
    assert len(result["arithmetic"]["worst_ops"]) == 3


@pytest.mark.slow
def test_parity_in_fp16_arithmetic(fused_export, tmp_path, capsys):
    import json

    from validate.cli import parity_main

    out = tmp_path / "parity.json"
    assert parity_main(["--tflite", str(fused_export[0] / "nafnet_fp16.tflite"), "--tflite-only",
                        "--arithmetic", "fp16", "--num-random", "1", "--json", str(out)]) == 0
    assert "tflite-fp16 in fp16 arithmetic vs fp32 arithmetic" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["arithmetic"]["policy"] == "fp16"
    assert result["arithmetic"]["first_nonfinite"] is None
    against = result["stages"][-1]
    assert against["stage"].endswith("vs fp32 arithmetic") and against["passed"]
    assert 40 <= against["inputs"][0]["psnr_db"] < 200


def test_parity_arithmetic_flag_is_checked(mean_model, capsys):
    from validate.cli import parity_main

    with pytest.raises(SystemExit) as exc:
        parity_main(["--tflite", str(mean_model), "--arithmetic", "fp8"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_bundle_refuses_a_failing_fp16_verdict(fused_export, mean_model, tmp_path, capsys):
    """The bundle reads the verdict in the manifest; here a real failing one (the MEAN model's)
    stands in the manifest of the fused fp16 file, as the export writes it for DPT-Hybrid."""
    import json
    import shutil

    from tools.ai_benchmark import main

    src = tmp_path / "export"
    src.mkdir()
    shutil.copy(fused_export[0] / "bokeh_fp16.tflite", src)
    manifest = json.loads((fused_export[0] / "bokeh_fp16.manifest.json").read_text())
    failing = arithmetic_report(mean_model, _ones(1.0, 2.0))
    manifest["fp16_arithmetic"] = failing
    (src / "bokeh_fp16.manifest.json").write_text(json.dumps(manifest))
    args = ["--tflite", str(src / "bokeh_fp16.tflite"), "--out", str(tmp_path / "bundle")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refused for a GPU bundle" in err and "first inf/NaN at MEAN 'stem_mean'" in err
    assert "--allow-fp16-failure" in err
    assert not (tmp_path / "bundle" / "model.tflite").exists()
    assert main([*args, "--allow-fp16-failure"]) == 0
    bundle = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert bundle["fp16_arithmetic"]["passed"] is False
    assert any("fp16 verdict" in w for w in bundle["warnings"])


@pytest.mark.slow  # one small fused export (NAFNet at the paper's size, a tiny depth net)
def test_the_fp16_bench_writes_its_part_of_the_table_in_its_own_section(tmp_path):
    from validate import fp16_bench

    doc = tmp_path / "bench.md"
    doc.write_text("# bench\n\n<!-- bench:fp16 -->\nthe full table\n<!-- /bench:fp16 -->\n")
    assert fp16_bench.main(["--height", "32", "--width", "48", "--nets", "midas-small-tiny",
                            "--weights", "random", "--files", "fp32", "--policies", "fp16",
                            "--photos", "1", "--dir", str(tmp_path / "b"), "--doc", str(doc),
                            "--section", "fp16-part"]) == 0
    text = doc.read_text()
    assert "the full table" in text  # the partial run left the whole table alone
    part = text.split("<!-- bench:fp16-part -->")[1].split("<!-- /bench:fp16-part -->")[0]
    rows = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| model | weights | file | fp16: bokeh / mask |")
    assert "fp16-acc16" not in rows[0]
    cells = {tuple(c.strip() for c in r.split("|")[1:4]): r.split("|")[4:6] for r in rows[1:]}
    assert set(cells) == {("nafnet", "random", "fp32"), ("midas-small-tiny", "random", "fp32")}
    for psnrs, nonfinite in cells.values():
        assert min(float(v) for v in psnrs.split("/")) > 40 and nonfinite.strip() == "0"


def test_the_fp16_bench_reads_its_photos_in_the_unit_range(tmp_path):
    """The bench feeds the photos as the model takes them, [0, 1], not scaled twice (a bug that
    once fed near-black photos, max 1/255, to every fp16 measurement)."""
    from validate.doc import write_photos
    from validate.fp16_bench import read_photos

    photos = read_photos(write_photos(tmp_path / "photos"), 32, 48)
    assert len(photos) == 5
    for stem, x in photos.items():
        assert x.shape == (1, 32, 48, 3) and x.dtype == np.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert float(x.max()) > 0.5 and float(x.std()) > 0.05, stem
