"""MiDaS v2.1 Small: official sizes and state-dict layout, strict loading, Keras parity, TFLite."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from common.errors import CheckpointError  # noqa: E402
from export.tflite_info import gpu_compatibility  # noqa: E402
from models.dpt import random_dpt, tiny_dpt_config  # noqa: E402
from models.midas_small import (  # noqa: E402
    OFFICIAL_CONFIG,
    MidasSmall,
    is_midas_small_state,
    random_midas_small,
    tiny_midas_small_config,
)
from models.midas_small_tf import (  # noqa: E402
    build_keras_midas_small,
    keras_midas_small_from_checkpoint,
    keras_midas_small_from_torch,
    port_weights,
)

TOLERANCE = 2e-4  # max abs Keras-vs-PyTorch difference, of the output's range


def _image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A random [0, 1] RGB image normalised with the ImageNet mean and std, NCHW."""
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _relative_diff(torch_model, keras_model, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = torch_model(x).numpy()
    out = keras_model(x.permute(0, 2, 3, 1).numpy()).numpy()
    assert out.shape == (*ref.shape, 1)
    return float(np.abs(out[..., 0] - ref).max() / (ref.max() - ref.min()))


def _save(tmp_path, state, name="midas_v21_small_256.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


# --- PyTorch: official layout ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_meta():
    with torch.device("meta"):  # shapes only, nothing allocated
        return MidasSmall(OFFICIAL_CONFIG)


def test_official_sizes(official_meta):
    state = official_meta.state_dict()
    assert sum(p.numel() for p in official_meta.parameters()) == 21_320_545
    assert len(state) == 482
    assert sum(1 for _ in official_meta.buffers()) == 216  # 72 BatchNorms x 3
    assert sum(k.endswith("num_batches_tracked") for k in state) == 72
    unused = sum(v.numel() for k, v in state.items()
                 if k.startswith("scratch.refinenet4.resConfUnit1."))
    assert unused == 4_719_616


def test_official_keys(official_meta):
    state = {k: tuple(v.shape) for k, v in official_meta.state_dict().items()}
    assert OFFICIAL_CONFIG.level_channels() == (32, 48, 136, 384)
    assert [s.repeats for s in OFFICIAL_CONFIG.stage_specs()] == [1, 3, 3, 5, 5, 6, 1]
    assert state["pretrained.layer1.0.weight"] == (32, 3, 3, 3)
    assert state["pretrained.layer1.1.running_var"] == (32,)
    assert state["pretrained.layer1.3.0.conv_dw.weight"] == (32, 1, 3, 3)
    assert state["pretrained.layer1.3.0.conv_pw.weight"] == (24, 32, 1, 1)
    assert state["pretrained.layer1.4.2.conv_pwl.weight"] == (32, 192, 1, 1)
    assert state["pretrained.layer2.0.0.conv_dw.weight"] == (192, 1, 5, 5)
    assert state["pretrained.layer3.1.4.bn3.weight"] == (136,)
    assert state["pretrained.layer4.0.5.conv_dw.weight"] == (1392, 1, 5, 5)
    assert "pretrained.layer4.0.6.conv_pw.weight" not in state
    assert state["pretrained.layer4.1.0.conv_pwl.weight"] == (384, 1392, 1, 1)
    assert state["scratch.layer1_rn.weight"] == (64, 32, 3, 3)
    assert state["scratch.layer4_rn.weight"] == (512, 384, 3, 3)
    assert "scratch.layer4_rn.bias" not in state
    assert state["scratch.refinenet4.out_conv.weight"] == (256, 512, 1, 1)
    assert state["scratch.refinenet1.out_conv.weight"] == (64, 64, 1, 1)
    assert state["scratch.refinenet4.resConfUnit1.conv1.weight"] == (512, 512, 3, 3)
    assert state["scratch.output_conv.0.weight"] == (32, 64, 3, 3)
    assert state["scratch.output_conv.2.weight"] == (32, 32, 3, 3)
    assert state["scratch.output_conv.4.weight"] == (1, 32, 1, 1)
    assert all(k.startswith(("pretrained.layer", "scratch.")) for k in state)


@pytest.mark.parametrize("expand", [True, False])
def test_forward_shape_and_random_output_not_degenerate(expand):
    model = random_midas_small(tiny_midas_small_config(expand), seed=0)
    assert not model.training
    with torch.no_grad():
        y = model(_image(2, 64, 96))
    assert y.shape == (2, 64, 96)
    assert (y > 0).float().mean() > 0.5
    assert y.std() > 1e-3 * y.abs().max()
    assert not torch.equal(y[0], y[1])


def test_input_size_must_be_multiple_of_32():
    model = random_midas_small(tiny_midas_small_config())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 64, 80))
    with pytest.raises(ValueError, match="multiples of 32"):
        build_keras_midas_small(tiny_midas_small_config(), 48, 64)


def test_random_weights_are_deterministic_with_real_batchnorm_statistics():
    a = random_midas_small(tiny_midas_small_config(), seed=3).state_dict()
    b = random_midas_small(tiny_midas_small_config(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    var = a["pretrained.layer3.0.1.bn2.running_var"]
    assert not torch.allclose(var, torch.ones_like(var))
    assert a["pretrained.layer3.0.1.bn2.running_mean"].abs().max() > 0


# --- PyTorch: checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["raw", "midas_training", "dataparallel"])
def test_strict_load_round_trip(tmp_path, wrap):
    cfg = tiny_midas_small_config()
    model = random_midas_small(cfg, seed=1)
    state = model.state_dict()
    if wrap == "midas_training":  # MiDaS BaseModel.load accepts {"model", "optimizer"}
        state = {"model": state, "optimizer": {"state": {}}}
    elif wrap == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    loaded = MidasSmall.from_checkpoint(_save(tmp_path, state), cfg)
    assert not loaded.training and loaded.config == cfg
    x = _image(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _load_error(tmp_path, state, config=None) -> str:
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        MidasSmall.from_checkpoint(path, config)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    cfg = tiny_midas_small_config()
    state = random_midas_small(cfg).state_dict()
    missing = {k: v for k, v in state.items() if k != "scratch.output_conv.2.bias"}
    assert "1 missing keys ['scratch.output_conv.2.bias']" in _load_error(tmp_path, missing, cfg)
    extra = {**state, "scratch.extra.weight": torch.zeros(1)}
    assert "1 unexpected ['scratch.extra.weight']" in _load_error(tmp_path, extra, cfg)
    wrong = {**state, "pretrained.layer2.0.0.conv_dw.weight": torch.zeros(48, 1, 3, 3)}
    message = _load_error(tmp_path, wrong, cfg)
    assert "1 wrong shapes ['pretrained.layer2.0.0.conv_dw.weight (48, 1, 3, 3) != " in message


def test_tiny_file_does_not_fit_the_official_config(tmp_path):
    message = _load_error(tmp_path, random_midas_small(tiny_midas_small_config()).state_dict())
    assert "does not fit MiDaS v2.1 Small" in message and "wrong shapes" in message


def test_dpt_checkpoint_is_refused(tmp_path):
    state = random_dpt(tiny_dpt_config()).state_dict()
    assert not is_midas_small_state(state)
    assert is_midas_small_state(random_midas_small(tiny_midas_small_config()).state_dict())
    assert "not a MiDaS v2.1 Small checkpoint" in _load_error(tmp_path, state)


def test_unreadable_files_are_clear_errors(tmp_path):
    path = tmp_path / "midas_v21_small_256.pt"
    path.write_bytes(b"\x80\x02not really a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="midas_v21_small_256.pt.*not a readable PyTorch"):
        MidasSmall.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        keras_midas_small_from_checkpoint(tmp_path / "absent.pt", 64, 64)


# --- Keras ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return random_midas_small(tiny_midas_small_config(), seed=2)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64)])
def test_tiny_keras_parity(tiny_model, size):
    keras_model = keras_midas_small_from_torch(tiny_model, *size)
    assert keras_model.output_shape == (1, *size, 1)
    assert _relative_diff(tiny_model, keras_model, _image(1, *size, seed=3)) <= TOLERANCE


def test_tiny_keras_parity_without_expand_and_dynamic_batch():
    model = random_midas_small(tiny_midas_small_config(expand=False), seed=4)
    keras_model = keras_midas_small_from_torch(model, 64, 96, batch_size=None)
    assert _relative_diff(model, keras_model, _image(2, 64, 96, seed=5)) <= TOLERANCE


def test_official_config_keras_parity():
    model = random_midas_small(OFFICIAL_CONFIG, seed=0)
    keras_model = keras_midas_small_from_torch(model, 64, 96)
    # refinenet4.resConfUnit1 dropped; each BatchNorm's gamma and beta became its conv's bias
    folded = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert keras_model.count_params() == 21_320_545 - 4_719_616 - folded
    assert _relative_diff(model, keras_model, _image(1, 64, 96, seed=6)) <= TOLERANCE


def test_keras_from_checkpoint(tmp_path, tiny_model):
    path = _save(tmp_path, tiny_model.state_dict())
    keras_model = keras_midas_small_from_checkpoint(path, 32, 64, tiny_midas_small_config())
    assert keras_model.input_shape == (1, 32, 64, 3)
    assert _relative_diff(tiny_model, keras_model, _image(1, 32, 64, seed=7)) <= TOLERANCE


def test_port_names_missing_and_unused_entries(tiny_model):
    cfg = tiny_model.config
    state = tiny_model.state_dict()
    incomplete = {k: v for k, v in state.items() if k != "pretrained.layer3.1.1.bn2.running_var"}
    with pytest.raises(CheckpointError, match=r"layer3\.1\.1\.bn2\.running_var.*conv_dw"):
        port_weights(build_keras_midas_small(cfg, 32, 32), incomplete, cfg)
    with pytest.raises(CheckpointError, match="no place.*extra.weight"):
        port_weights(build_keras_midas_small(cfg, 32, 32),
                     {**state, "extra.weight": torch.zeros(1)}, cfg)


@pytest.mark.slow  # a TFLite conversion
def test_tflite_builtins_only_gpu_compatible(tmp_path, tiny_model):
    h, w = 64, 96
    keras_model = keras_midas_small_from_torch(tiny_model, h, w)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path = tmp_path / "midas_small.tflite"
    path.write_bytes(converter.convert())
    interpreter = tf.lite.Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
    print(dict(sorted(ops.items())))
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    assert max(len(t["shape"]) for t in interpreter.get_tensor_details()) <= 4
    assert set(ops) == {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "RELU", "RESIZE_BILINEAR"}
    assert gpu_compatibility(path) == (True, [])

    x = _image(1, h, w, seed=8).permute(0, 2, 3, 1).numpy()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    ref = keras_model(x).numpy()
    assert np.abs(out - ref).max() <= TOLERANCE * (ref.max() - ref.min())


@pytest.mark.full
def test_official_config_parity_at_export_size(tmp_path):
    """The official network through a saved official-layout file, at 384x576 (1024x1536)."""
    model = random_midas_small(OFFICIAL_CONFIG, seed=0)
    path = _save(tmp_path, model.state_dict())
    keras_model = keras_midas_small_from_checkpoint(path, 384, 576)
    diff = _relative_diff(model, keras_model, _image(1, 384, 576, seed=9))
    print(f"official MiDaS Small 384x576: max abs diff {diff:.2e} of the output range")
    assert diff <= TOLERANCE
