"""Keras DPT: parity with PyTorch, builtin-only TFLite with rank <= 4, weight-port errors."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from common.errors import CheckpointError  # noqa: E402
from models.dpt import HYBRID_CONFIG, dpt_input_size, random_dpt, tiny_dpt_config  # noqa: E402
from models.dpt_tf import (  # noqa: E402
    build_keras_dpt,
    from_midas_checkpoint,
    keras_dpt_from_torch,
    port_weights,
)

H, W = 64, 96  # non-square: the position embedding is resized from 3x3 to 4x6 tokens
TOLERANCE = 1e-4  # of the output's range


def _image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Normalised RGB (mean 0.5, std 0.5 of a [0, 1] image), NCHW."""
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _relative_diff(torch_dpt, keras_dpt, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = torch_dpt(x).numpy()
    out = keras_dpt(x.permute(0, 2, 3, 1).numpy()).numpy()
    assert out.shape == (*ref.shape, 1)
    return float(np.abs(out[..., 0] - ref).max() / (ref.max() - ref.min()))


@pytest.fixture(scope="module", params=["hybrid", "large"])
def tiny_pair(request):
    model = random_dpt(tiny_dpt_config(request.param), seed=2)
    return model, keras_dpt_from_torch(model, H, W)


def test_tiny_parity(tiny_pair):
    torch_dpt, keras_dpt = tiny_pair
    assert _relative_diff(torch_dpt, keras_dpt, _image(1, H, W)) <= TOLERANCE


def test_tiny_parity_dynamic_batch():
    model = random_dpt(tiny_dpt_config(), seed=4)
    keras_dpt = keras_dpt_from_torch(model, H, W, batch_size=None)
    assert _relative_diff(model, keras_dpt, _image(2, H, W, seed=5)) <= TOLERANCE


def _tflite_ops_and_rank(flatbuffer: bytes) -> tuple[collections.Counter, int, tf.lite.Interpreter]:
    interpreter = tf.lite.Interpreter(
        model_content=flatbuffer,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
    rank = max(len(t["shape"]) for t in interpreter.get_tensor_details())
    return ops, rank, interpreter


@pytest.mark.slow  # a TFLite conversion
def test_tflite_builtins_only_rank_4(tiny_pair):
    torch_dpt, keras_dpt = tiny_pair
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_dpt)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    ops, rank, interpreter = _tflite_ops_and_rank(converter.convert())
    print(dict(sorted(ops.items())))
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    assert rank <= 4
    assert {"GELU", "RESIZE_BILINEAR", "BATCH_MATMUL", "SOFTMAX"} <= set(ops)

    x = _image(1, H, W, seed=6)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           x.permute(0, 2, 3, 1).numpy())
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[..., 0]
    with torch.no_grad():
        ref = torch_dpt(x).numpy()
    assert np.abs(out - ref).max() <= TOLERANCE * (ref.max() - ref.min())


def test_from_midas_checkpoint(tmp_path):
    cfg = tiny_dpt_config("hybrid")
    model = random_dpt(cfg, seed=7)
    path = tmp_path / "dpt_hybrid_384.pt"
    torch.save(model.state_dict(), path)
    keras_dpt = from_midas_checkpoint(path, 32, 64, config=cfg)
    assert keras_dpt.input_shape == (1, 32, 64, 3) and keras_dpt.output_shape == (1, 32, 64, 1)
    assert _relative_diff(model, keras_dpt, _image(1, 32, 64, seed=8)) <= TOLERANCE


def test_from_midas_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="expected a MiDaS DPT file"):
        from_midas_checkpoint(path, 64, 64)


def test_port_names_a_missing_entry():
    cfg = tiny_dpt_config()
    state = random_dpt(cfg).state_dict()
    del state["pretrained.model.blocks.1.attn.qkv.bias"]
    with pytest.raises(CheckpointError, match="blocks.1.attn.qkv.bias"):
        port_weights(build_keras_dpt(cfg, 32, 32), state, cfg)


@pytest.mark.slow  # a TFLite conversion
def test_port_rejects_unused_entries_and_wrong_shapes():
    cfg = tiny_dpt_config()
    state = random_dpt(cfg).state_dict()
    with pytest.raises(CheckpointError, match="no place.*extra.weight"):
        port_weights(build_keras_dpt(cfg, 32, 32), {**state, "extra.weight": torch.zeros(1)}, cfg)
    large = tiny_dpt_config("large")
    with pytest.raises(CheckpointError):
        port_weights(build_keras_dpt(large, 32, 32), state, large)


def test_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        build_keras_dpt(tiny_dpt_config(), 48, 64)


@pytest.mark.full
def test_full_hybrid_parity_at_export_size(tmp_path):
    """The paper's DPT-Hybrid, through a saved official-layout file, at 384x576 (1024x1536)."""
    h, w = dpt_input_size(1024, 1536)
    model = random_dpt(HYBRID_CONFIG, seed=0)
    path = tmp_path / "dpt_hybrid_384.pt"
    torch.save(model.state_dict(), path)
    keras_dpt = from_midas_checkpoint(path, h, w)
    diff = _relative_diff(model, keras_dpt, _image(1, h, w, seed=9))
    print(f"full hybrid {h}x{w}: max abs diff {diff:.2e} of the output range")
    assert diff <= TOLERANCE
