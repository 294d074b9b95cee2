"""The exported models run on LiteRT's GPU accelerator (ML Drift over WebGPU), fully, and agree
with the CPU; a model the GPU cannot take gets a clean verdict, never a crash.

Without a GPU the device is SwiftShader's software Vulkan (`make setup-gpu`); without any
device the GPU tests skip and say why.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from export import accelerator
from export.accelerator import (
    ACCELERATORS,
    AcceleratorError,
    compile_model,
    fully_accelerated,
    gpu_device,
    gpu_execution_verdict,
    run_compiled,
    unsupported_ops,
)

# SwiftShader has no shader-f16, so ML Drift computes in fp32 and matches XNNPACK to about
# 1e-5 (measured: at most 1.3e-5 up to 1024x1536). A phone GPU computes in fp16 (about 1e-3
# relative), which the export's fp16 tolerances cover; 1e-4 here would catch a wrong kernel
# without flagging float reassociation.
GPU_VS_CPU_ATOL = 1e-4
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    ok, why = gpu_device()
    if not ok:
        print(f"SKIP: no GPU device: {why}")
        pytest.skip(f"no GPU device: {why}")
    return why


def _tiny_tflite(folder, name, fn, shape, flex=False):
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()
    fn = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                                fn)
    if flex:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
    path = folder / f"{name}.tflite"
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def gather_nd_model(tmp_path_factory):
    """A tiny model with GATHER_ND, an op ML Drift's WebGPU backend does not have."""
    import tensorflow as tf

    return _tiny_tflite(tmp_path_factory.mktemp("gather"), "gather_nd",
                        lambda x: tf.gather_nd(x, [[0, 1], [0, 2]]), [1, 4, 4, 4])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_fused_model_runs_fully_on_gpu_and_agrees_with_cpu(gpu, fused_export, variant):
    out, _ = fused_export
    path = out / f"bokeh_{variant}.tflite"
    assert fully_accelerated(path) == (True, [])
    verdict = gpu_execution_verdict(path)
    assert verdict["status"] == "ran", verdict
    assert verdict["fully_accelerated"] is True
    assert set(verdict["max_abs_by_output"]) == {"bokeh", "mask"}
    assert verdict["max_abs_vs_cpu"] < GPU_VS_CPU_ATOL, verdict


@pytest.mark.slow
def test_run_compiled_in_process_on_both_accelerators(gpu, fused_export, rng):
    out, _ = fused_export
    path = out / "nafnet_fp32.tflite"
    x = rng.random((1, 64, 96, 4), dtype=np.float32)
    results = {a: run_compiled(path, [x], a) for a in ACCELERATORS}
    assert set(results["gpu"]) == {"output"} and results["gpu"]["output"].shape == (1, 64, 96, 3)
    assert np.abs(results["gpu"]["output"] - results["cpu"]["output"]).max() < GPU_VS_CPU_ATOL
    model = compile_model(path, "gpu")
    assert model.is_fully_accelerated()
    by_name = run_compiled(model, {"input": x})
    np.testing.assert_array_equal(by_name["output"], results["gpu"]["output"])


def test_op_the_gpu_lacks_gets_a_clean_verdict(gpu, gather_nd_model):
    ok, ops = fully_accelerated(gather_nd_model)
    assert not ok and ops and ops[0].startswith("GATHER_ND:"), ops
    verdict = gpu_execution_verdict(gather_nd_model)
    assert verdict["status"] == "failed", verdict
    assert verdict["reason"].startswith("not fully accelerated: GATHER_ND"), verdict
    with pytest.raises(AcceleratorError, match="not fully accelerated: GATHER_ND"):
        compile_model(gather_nd_model, "gpu")
    model = compile_model(gather_nd_model, "gpu", cpu_fallback=True)
    assert not model.is_fully_accelerated()
    x = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)
    np.testing.assert_array_equal(run_compiled(model, [x])["Identity"], x[0, [1, 2]])


@pytest.mark.slow
def test_a_dying_or_hanging_gpu_process_is_a_failed_verdict(gpu, fused_export, monkeypatch):
    """The verdict holds when the native code kills or hangs its process."""
    path = fused_export[0] / "nafnet_fp32.tflite"
    monkeypatch.setattr(accelerator, "_CHILD_CODE", "import os, signal; os.kill(os.getpid(), "
                        "signal.SIGSEGV)")
    verdict = gpu_execution_verdict(path)
    assert verdict["status"] == "failed" and "killed by SIGSEGV" in verdict["reason"], verdict
    monkeypatch.setattr(accelerator, "_CHILD_CODE", "import time; time.sleep(60)")
    verdict = gpu_execution_verdict(path, timeout_s=2)
    assert verdict["status"] == "failed" and "timed out after 2 s" in verdict["reason"], verdict


@pytest.mark.slow
def test_no_device_is_not_tried(monkeypatch, fused_export):
    accelerator._probe_gpu.cache_clear()
    monkeypatch.setenv("VK_ICD_FILENAMES", "/nonexistent/icd.json")
    try:
        ok, why = gpu_device()
        assert not ok and "no WebGPU adapter" in why, why
        verdict = gpu_execution_verdict(fused_export[0] / "nafnet_fp16.tflite")
        assert verdict == {"status": "not tried", "reason": f"no GPU device: {why}"}
        assert fully_accelerated(fused_export[0] / "nafnet_fp16.tflite") == (
            False, [f"no GPU device: {why}"])
    finally:
        accelerator._probe_gpu.cache_clear()


def test_unsupported_ops_parses_the_native_log():
    log = ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
           "ERROR: Following operations are not supported by GPU delegate:\n"
           "ARG_MAX: Tensor type(INT64) is not supported. ArgMax\n"
           "CAST: Tensor type(INT64) is not supported. ArgMax\n"
           "No operations will run on the GPU, and all 2 operations will run on the CPU.\n"
           "INFO: Replacing 2 out of 2 node(s) with delegate\n")
    assert unsupported_ops(log) == ["ARG_MAX: Tensor type(INT64) is not supported. ArgMax",
                                    "CAST: Tensor type(INT64) is not supported. ArgMax"]
    assert unsupported_ops("nothing here") == []


@pytest.mark.slow
def test_bad_files_and_inputs_are_one_line_user_errors(tmp_path, fused_export):
    missing, text = tmp_path / "missing.tflite", tmp_path / "text.tflite"
    text.write_text("not a model at all")
    for path, message in ((missing, "no such TFLite file"), (tmp_path, "not a file"),
                          (text, "not a TFLite model")):
        for call in (lambda p: compile_model(p, "cpu"), gpu_execution_verdict,
                     fully_accelerated):
            with pytest.raises(UserError, match=message):
                call(path)
    # LiteRT dies with SIGSEGV on a truncated file, so the module reads it first.
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes((fused_export[0] / "nafnet_fp32.tflite").read_bytes()[:200_000])
    for accel in ACCELERATORS:
        with pytest.raises(UserError, match="not a readable TFLite model .broken TFLite model"):
            compile_model(truncated, accel)
    path = fused_export[0] / "nafnet_fp32.tflite"
    with pytest.raises(UserError, match="unknown accelerator 'npu'"):
        compile_model(path, "npu")
    with pytest.raises(UserError, match=r"input 'input' has shape \[1, 2\]"):
        run_compiled(path, [np.zeros((1, 2), np.float32)])
    with pytest.raises(UserError, match="do not match the model's inputs"):
        run_compiled(path, {"photo": np.zeros((1, 64, 96, 4), np.float32)})


def test_a_flex_model_gets_a_failed_verdict(gpu, tmp_path):
    """Flex ops run on LiteRT's CPU only where TensorFlow is imported (as in this process: its
    Flex delegate is found by symbol); the GPU child has none, and the verdict says so."""
    import tensorflow as tf

    flex = _tiny_tflite(tmp_path, "erf", tf.math.erf, [1, 4], flex=True)
    verdict = gpu_execution_verdict(flex)
    assert verdict["status"] == "failed" and "needs Flex" in verdict["reason"], verdict
    assert "FlexErf" in verdict["reason"]
    ok, why = fully_accelerated(flex)
    assert not ok and "FlexErf" in why[0], why


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_parity_on_the_gpu_accelerator(gpu, fused_export, variant, capsys):
    """`bokeh parity --accelerator gpu`: the fused model on the GPU against PyTorch (the
    manifest's tolerance) and against the CPU (1e-4: SwiftShader computes in fp32); the
    verdict lands in report.json beside the analyzer's."""
    import json

    from tools.cli import main as bokeh

    out, _ = fused_export
    code = bokeh(["parity", "--tflite", str(out / f"bokeh_{variant}.tflite"), "--tflite-only",
                  "--num-random", "1", "--accelerator", "gpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "on GPU vs CPU" in printed and "PASS" in printed
    report = json.loads((out / "report.json").read_text())
    verdict = report["gpu_execution"][f"bokeh_{variant}.tflite"]
    assert verdict["status"] == "ran" and verdict["max_abs_vs_cpu"] <= GPU_VS_CPU_ATOL
    assert report["parity"][f"bokeh_{variant}.tflite on GPU"]["passed"]


@pytest.mark.slow
def test_every_float_file_of_the_export_records_its_gpu_execution(fused_export):
    """The export ran each float file on the GPU accelerator where a device exists: the
    manifest says ran (max abs vs CPU) or, without a device, not tried and why."""
    import json

    from conftest import backend_required

    out, report = fused_export
    found, why = gpu_device()
    assert found or not backend_required("gpu"), f"BOKEH_REQUIRE_GPU=1, but no GPU device: {why}"
    for name in ("nafnet_fp32", "bokeh_fp16", "bokeh_controls_fp32"):
        verdict = json.loads((out / f"{name}.manifest.json").read_text())["gpu_execution"]
        assert report["variants"][f"{name}.tflite"]["gpu_execution"] == verdict
        if found:
            assert verdict["status"] == "ran", verdict
            assert verdict["max_abs_vs_cpu"] <= GPU_VS_CPU_ATOL
        else:
            assert verdict["status"] == "not tried" and "no GPU device" in verdict["reason"]


@pytest.mark.slow
def test_the_ai_benchmark_bundle_carries_the_gpu_execution_verdict(fused_export, tmp_path):
    import json

    from tools.cli import main as bokeh

    out, _ = fused_export
    assert bokeh(["ai-benchmark", "--tflite", str(out / "bokeh_fp16.tflite"),
                  "--out", str(tmp_path / "bundle")]) == 0
    bundle = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    manifest = json.loads((out / "bokeh_fp16.manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    recorded = report.get("gpu_execution", {}).get("bokeh_fp16.tflite")
    assert bundle["gpu_execution"] == (recorded or manifest["gpu_execution"])
    assert bundle["gpu_execution"]["status"] in ("ran", "not tried")


@pytest.mark.slow
def test_inspect_says_what_the_gpu_accelerator_takes(gpu, fused_export, gather_nd_model,
                                                     capsys):
    from tools.cli import main as bokeh

    assert bokeh(["inspect", str(fused_export[0] / "bokeh_fp16.tflite"), "--gpu"]) == 0
    assert "fully accelerated on" in capsys.readouterr().out
    assert bokeh(["inspect", str(gather_nd_model), "--gpu"]) == 0
    out = capsys.readouterr().out
    assert "NOT fully accelerated" in out and "GATHER_ND" in out
