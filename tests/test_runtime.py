"""The exported NAFNet runs wholly inside XNNPACK, and `validate runtime` reports every engine."""

from __future__ import annotations

import json

import pytest

from export.runner import RUNTIMES
from validate.cli import main as validate_main
from validate.profile import delegate_coverage
from validate.runtime import EngineSpec, measure_memory, plan_engines, read_export


@pytest.mark.slow
def test_export_has_no_transpose_and_one_xnnpack_partition(nafnet_export):
    out, report = nafnet_export
    for variant in ("fp32", "fp16"):
        assert "TRANSPOSE" not in report["variants"][f"nafnet_{variant}.tflite"]["ops"]
    blocks = sum(report["nafnet_config"][k] if isinstance(report["nafnet_config"][k], int)
                 else sum(report["nafnet_config"][k])
                 for k in ("enc_blocks", "middle_blocks", "dec_blocks"))
    for runtime in RUNTIMES:
        cov = delegate_coverage(out / "nafnet_fp32.tflite", threads=1, runtime=runtime)
        if runtime == "litert":  # the XNNPACK phone apps bundle takes the whole graph
            assert cov["not_delegated"] == {} and cov["partitions"] == 1, runtime
        else:  # TF 2.15's older XNNPACK has no one-axis MEAN: the fp16-safe staged SCA pool
            # (rewrites.global_pool_staged, one per block) stays outside it, nothing else
            assert cov["not_delegated"] == {"MEAN": blocks}, (runtime, cov["not_delegated"])
    assert report["rewrites"]["channels_last"] > 0


@pytest.mark.slow
def test_litert_and_tensorflow_interpreters_agree(nafnet_export):
    """Both interpreters run the same file; XNNPACK versions differ, the math must not."""
    import numpy as np

    from export.runner import run_tflite

    out, _ = nafnet_export
    path = out / "nafnet_fp32.tflite"
    manifest, _ = read_export(path)
    x = np.random.default_rng(3).random(manifest["inputs"][0]["shape"], dtype=np.float32)
    tf_out, lite_out = (run_tflite(path, x, threads=1, runtime=r)["output"] for r in RUNTIMES)
    assert tf_out.shape == lite_out.shape and np.abs(tf_out).max() > 0
    assert np.abs(tf_out - lite_out).max() < 1e-5


@pytest.mark.slow
def test_plan_has_every_engine(nafnet_export):
    out, _ = nafnet_export
    manifest, folder = read_export(out / "nafnet_fp32.tflite")
    specs = plan_engines(manifest, folder, threads=(1, 2), xnnpack=(True, False))
    kinds = [s.kind for s in specs]
    assert kinds.count("torch") == 2 and kinds.count("onnxruntime") == 2
    # fp32 + fp16, two interpreters, XNNPACK on/off, 2 thread counts
    assert kinds.count("tflite") == 2 * 2 * 2 * 2
    assert {s.runtime for s in specs if s.kind == "tflite"} == set(RUNTIMES)


@pytest.mark.slow
def test_runtime_command_writes_table_json_png(nafnet_export, tmp_path, capsys):
    out, _ = nafnet_export
    code = validate_main(["runtime", "--tflite", str(out / "nafnet_fp32.tflite"), "--runs", "1",
                          "--threads", "1", "--xnnpack", "on", "--no-memory",
                          "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")])
    assert code == 0
    assert "| engine | median s |" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    labels = [e["label"] for e in result["engines"]]
    assert any("PyTorch" in x for x in labels) and any("onnxruntime" in x for x in labels)
    assert sum("TFLite" in x for x in labels) == 2 * len(RUNTIMES)
    assert sum("LiteRT" in x for x in labels) == 2
    for e in result["engines"]:
        assert e["runs"] == 1 and e["min_s"] > 0
        if e["kind"] != "torch":
            assert e["max_abs_diff_vs_torch"] < (1e-4 if "fp32" in e["label"]
                                                 or e["kind"] == "onnxruntime" else 5e-2)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_memory_probe_in_fresh_process(nafnet_export):
    out, _ = nafnet_export
    tflite = out / "nafnet_fp32.tflite"
    result = measure_memory(EngineSpec("t", "tflite", 1, str(tflite)), tflite)
    assert result.get("peak_mib") is not None and result["peak_mib"] > 0, result


@pytest.mark.slow
def test_runtime_bad_input_exit_2(nafnet_export, tmp_path, capsys):
    out, _ = nafnet_export
    assert validate_main(["runtime", "--tflite", str(tmp_path / "x.tflite")]) == 2
    assert "no such TFLite file" in capsys.readouterr().err
    assert validate_main(["runtime", "--tflite", str(out / "nafnet_fp32.tflite"),
                          "--threads", "two"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
    assert validate_main(["runtime", "--tflite", str(out / "nafnet_fp32.tflite"),
                          "--runtime", "tflite-nightly"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runtime" in err[0]


@pytest.mark.slow
def test_peers_needs_an_export_and_runs_any_layout(nafnet_export, tmp_path, capsys):
    from validate import peers

    assert peers.main(["--export", str(tmp_path), "--doc", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `make export` first" in err[0]
    out, _ = nafnet_export
    manifest, _ = read_export(out / "nafnet_fp32.tflite")
    shape, out_shape = manifest["inputs"][0]["shape"], manifest["outputs"][0]["shape"]
    run = peers._nhwc_runner(out / "nafnet_fp32.tflite", 1, shape, out_shape)
    import numpy as np

    assert list(run(np.zeros(shape, np.float32)).shape) == out_shape


def test_profile_counts_conv_dense_and_attention_work(tmp_path):
    """Multiply-adds from a hand-sized graph: 3x3 conv, dense layer and an attention matmul."""
    import numpy as np
    import tensorflow as tf

    from validate.profile import op_costs

    kernel = tf.constant(np.ones((3, 3, 4, 6), np.float32))
    dense = tf.constant(np.ones((6, 5), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 10, 4], tf.float32)])
    def graph(x):
        y = tf.reshape(tf.nn.conv2d(x, kernel, 1, "SAME"), [80, 6])  # 80 x 6 outputs, 36 each
        z = tf.matmul(y, dense)  # FULLY_CONNECTED: 80 x 5 outputs, 6 each
        q = tf.reshape(z, [2, 40, 5])
        return tf.matmul(q, tf.transpose(q, [0, 2, 1]))  # BATCH_MATMUL: 2 x 40 x 40, 5 each

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [graph.get_concrete_function()], graph)
    path = tmp_path / "g.tflite"
    path.write_bytes(converter.convert())
    macs = {}
    for row in op_costs(path):
        macs[row["op"]] = macs.get(row["op"], 0) + row["macs"]
    assert macs["CONV_2D"] == 80 * 6 * 36
    assert macs["FULLY_CONNECTED"] == 80 * 5 * 6
    assert macs["BATCH_MATMUL"] == 2 * 40 * 40 * 5


@pytest.mark.slow
def test_peers_table_has_every_interpreter(nafnet_export, tmp_path, capsys):
    """The whole bench-peers path, with a copy of our file standing in for onnx2tf's output
    (a converted file newer than the ONNX is reused, so no onnx2tf run is needed)."""
    import shutil

    from validate import peers

    out, _ = nafnet_export
    stand_in = tmp_path / "peers" / "onnx2tf" / "nafnet_sim_float32.tflite"
    stand_in.parent.mkdir(parents=True)
    shutil.copy(out / "nafnet_fp32.tflite", stand_in)
    doc = tmp_path / "d.md"
    assert peers.main(["--export", str(out), "--peers", str(tmp_path / "peers"), "--runs", "1",
                       "--threads", "1", "--doc", str(doc), "--no-litert-torch"]) == 0
    result = json.loads((tmp_path / "peers" / "peers.json").read_text())
    assert len(result["rows"]) == 1 + 2 * len(RUNTIMES)
    for ratios in result["ratios"].values():
        assert ratios["onnx2tf_vs_ours_max_abs_diff"] < 1e-5  # the same file twice
    assert "fused" not in result  # no litert-torch: no peer for the fused model
    rows = {r["key"]: r for r in result["converters"]}
    assert rows["ours"]["ops"] == rows["onnx2tf"]["ops"] > 0
    assert rows["ours"]["max_rank"] <= 4 and rows["ours"]["flex_ops"] == []
    assert rows["ours"]["gpu_accelerator"] == peers.gpu_accelerator_verdict(stand_in)
    text = doc.read_text()
    assert "<!-- bench:peers -->" in text and "LiteRT" in text and "TF 2.15" in text
    assert "| converter (file) | MB | ops | top ops | TRANSPOSE |" in text


@pytest.mark.slow
def test_peers_without_litert_torch_env_exit_2(nafnet_export, tmp_path, capsys):
    from validate import peers

    out, _ = nafnet_export
    assert peers.main(["--export", str(out), "--litert-torch-venv", str(tmp_path / "none"),
                       "--doc", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make litert-torch-env" in err[0] and "--no-litert-torch" in err[0]
