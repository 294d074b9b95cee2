"""The one variant table (export/variants.py) and the per-net float layers of the quantized
variants (export/quantize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from export.manifest import TOLERANCE
from export.variants import VARIANTS, check_names, names, tolerance


def test_the_manifests_read_the_table():
    for v in VARIANTS:
        for model, bounds in v.tolerance.items():
            assert TOLERANCE[model][v.name] == bounds == tolerance(model, v.name)
    assert names(False, defaults_only=True) == ("fp32", "fp16")
    assert set(names(True, defaults_only=True)) == {"drq", "int8"}
    assert "int8-selective" not in names(True)  # made by quant-report, not the export


def test_unknown_variant_is_one_line():
    with pytest.raises(UserError, match="--quant-variants: unknown variant 'int4'.*drq"):
        check_names(("drq", "int4"), quantized=True)
    with pytest.raises(UserError, match="--variants"):
        check_names(("drq",), quantized=False)  # a quantized one among the float ones


def test_bokeh_variants_prints_the_defaults(capsys):
    from tools.cli import main

    assert main(["variants", "--defaults", "quantized"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(names(True, defaults_only=True))
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    assert all(f"{v.name} (" in out for v in VARIANTS) and "target:" in out


def test_sensitive_layers_name_registered_families():
    from export.quantize import SENSITIVE_LAYERS, sensitive_layers
    from models.depth import FAMILIES

    for per_family in SENSITIVE_LAYERS.values():
        assert set(per_family) <= set(FAMILIES)
    assert sensitive_layers("drq", "dpt") == {}
    assert sensitive_layers("int8", "depth-anything-v2")["ops"] == ("BATCH_MATMUL", "SOFTMAX")


def test_drq_ops_given_back_their_float_weights_compute_the_fp32_result():
    from common.quiet import quiet_tensorflow
    from export.quantize import with_float_weights

    tf = quiet_tensorflow()
    tf.random.set_seed(0)
    inputs = tf.keras.Input((16, 16, 32), batch_size=1)
    x = tf.keras.layers.Conv2D(32, 3, padding="same", name="first")(inputs)
    outputs = tf.keras.layers.Conv2D(32, 3, padding="same", name="second")(tf.nn.relu(x))
    model = tf.keras.Model(inputs, outputs)

    def convert(drq: bool) -> bytes:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if drq:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()

    def run(content: bytes, x: np.ndarray) -> np.ndarray:
        interpreter = tf.lite.Interpreter(model_content=content)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    fp32, drq = convert(False), convert(True)
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 32)).astype(np.float32)
    want, hybrid = run(fp32, x), run(drq, x)
    assert np.abs(hybrid - want).max() > 1e-4  # int8 weights change the result
    edited, kept = with_float_weights(drq, fp32, lambda name: True)
    assert len(kept) == 2
    np.testing.assert_allclose(run(edited, x), want, rtol=1e-5, atol=1e-5)
    assert len(edited) > len(drq)
    partly, kept = with_float_weights(drq, fp32, lambda name: "first" in name)
    assert len(kept) == 1
    assert 0 < np.abs(run(partly, x) - want).max() < np.abs(hybrid - want).max()
