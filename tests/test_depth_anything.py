"""Depth Anything V2: official sizes and keys, DINOv2's position-embedding resize, strict loading,
Keras parity (tiny and official configs), the transposed-conv rewrite, builtin-only TFLite."""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from common.errors import CheckpointError  # noqa: E402
from models.depth_anything import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_CONFIG,
    TINY_CONFIG,
    DepthAnythingV2,
    interpolate_pos_embed,
    is_depth_anything_state,
    random_depth_anything,
)
from models.depth_anything_tf import (  # noqa: E402
    DepthToSpaceConv,
    build_keras_depth_anything,
    keras_depth_anything_from_checkpoint,
    keras_depth_anything_from_torch,
    port_weights,
    transposed_conv_weights,
)
from models.dpt import random_dpt, tiny_dpt_config  # noqa: E402

TOLERANCE = 2e-4  # of the output's range


def _image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A random [0, 1] image normalised with the ImageNet mean and std, NCHW."""
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


def _relative_diff(model, keras_model, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x).numpy()
    out = keras_model(x.permute(0, 2, 3, 1).numpy()).numpy()
    assert out.shape == (*ref.shape, 1)
    return float(np.abs(out[..., 0] - ref).max() / (ref.max() - ref.min()))


@pytest.fixture(scope="module")
def tiny_model():
    return random_depth_anything(TINY_CONFIG, seed=2)


# --- PyTorch -------------------------------------------------------------------------------------


def test_small_has_official_parameter_and_entry_counts():
    with torch.device("meta"):
        model = DepthAnythingV2(SMALL_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 24_785_089
    assert len(model.state_dict()) == 239


def test_small_official_keys():
    with torch.device("meta"):
        state = {k: tuple(v.shape) for k, v in DepthAnythingV2().state_dict().items()}
    assert state["pretrained.pos_embed"] == (1, 1370, 384)  # 37x37 grid + class token
    assert state["pretrained.cls_token"] == (1, 1, 384)
    assert state["pretrained.mask_token"] == (1, 384)
    assert state["pretrained.patch_embed.proj.weight"] == (384, 3, 14, 14)
    assert state["pretrained.blocks.11.attn.qkv.bias"] == (1152,)
    assert state["pretrained.blocks.11.ls1.gamma"] == (384,)
    assert state["pretrained.blocks.11.mlp.fc1.weight"] == (1536, 384)
    assert state["pretrained.norm.weight"] == (384,)
    assert "pretrained.blocks.12.norm1.weight" not in state
    for i, ch in enumerate((48, 96, 192, 384)):
        assert state[f"depth_head.projects.{i}.weight"] == (ch, 384, 1, 1)
        assert state[f"depth_head.scratch.layer{i + 1}_rn.weight"] == (64, ch, 3, 3)
    assert state["depth_head.resize_layers.0.weight"] == (48, 48, 4, 4)  # ConvTranspose2d
    assert state["depth_head.resize_layers.1.weight"] == (96, 96, 2, 2)
    assert not any(k.startswith("depth_head.resize_layers.2.") for k in state)
    assert state["depth_head.resize_layers.3.weight"] == (384, 384, 3, 3)
    assert "depth_head.scratch.layer1_rn.bias" not in state
    assert state["depth_head.scratch.refinenet4.resConfUnit1.conv1.weight"] == (64, 64, 3, 3)
    assert state["depth_head.scratch.output_conv1.weight"] == (32, 64, 3, 3)
    assert state["depth_head.scratch.output_conv2.0.weight"] == (32, 32, 3, 3)
    assert state["depth_head.scratch.output_conv2.2.weight"] == (1, 32, 1, 1)
    assert all(k.startswith(("pretrained.", "depth_head.")) for k in state)


def _bicubic_matrix(size_in: int, size_out: int, scale_factor: float) -> np.ndarray:
    """Rows of PyTorch's bicubic weights (A = -0.75, border clamped, half-pixel centres) when
    ``scale_factor`` is given: output pixel o samples input position (o + 0.5) / scale - 0.5."""
    a = -0.75

    def cubic(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0

    m = np.zeros((size_out, size_in))
    for o in range(size_out):
        src = (o + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            m[o, min(max(base + k, 0), size_in - 1)] += cubic(base + k - src)
    return m


@pytest.mark.parametrize(("side", "grid"), [(4, (5, 7)), (4, (3, 2)), (37, (28, 42))])
def test_pos_embed_follows_dinov2_formula(side, grid):
    """DINOv2 resizes with scale_factor (grid + 0.1) / side, not to ``size=grid``."""
    dim = 6
    pos = torch.randn(1, 1 + side * side, dim, generator=torch.Generator().manual_seed(side))
    out = interpolate_pos_embed(pos, *grid)
    assert out.shape == (1, 1 + grid[0] * grid[1], dim) and torch.equal(out[:, 0], pos[:, 0])
    rows = _bicubic_matrix(side, grid[0], (grid[0] + 0.1) / side)
    cols = _bicubic_matrix(side, grid[1], (grid[1] + 0.1) / side)
    square = pos[0, 1:].double().numpy().reshape(side, side, dim)
    expected = np.einsum("ys,xt,std->yxd", rows, cols, square).reshape(-1, dim)
    np.testing.assert_allclose(out[0, 1:].numpy(), expected, atol=1e-5)
    by_size = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                            size=grid, mode="bicubic")
    by_size = by_size.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
    assert np.abs(by_size - expected).max() > 1e-3  # the offset matters


def test_pos_embed_kept_only_for_the_trained_square_grid():
    pos = torch.randn(1, 1 + 16, 3)
    assert interpolate_pos_embed(pos, 4, 4) is pos
    assert not torch.equal(interpolate_pos_embed(pos, 5, 5)[:, 1:17], pos[:, 1:])
    assert interpolate_pos_embed(pos, 2, 8).shape == (1, 17, 3)  # 16 tokens, not square


def test_forward_shape_and_random_output_not_degenerate(tiny_model):
    x = _image(2, 70, 98)
    with torch.no_grad():
        y = tiny_model(x)
    assert y.shape == (2, 70, 98)
    assert (y > 0).float().mean() > 0.5
    assert y.std() > 1e-3 * y.abs().max()
    assert not torch.equal(y[0], y[1])


def test_input_size_must_be_multiple_of_14(tiny_model):
    with pytest.raises(ValueError, match="multiples of 14"):
        tiny_model(torch.zeros(1, 3, 56, 64))
    with pytest.raises(ValueError, match="multiples of 14"):
        build_keras_depth_anything(TINY_CONFIG, 64, 56)


def test_random_model_is_deterministic():
    a = random_depth_anything(TINY_CONFIG, seed=3).state_dict()
    b = random_depth_anything(TINY_CONFIG, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_recognised_by_keys(tiny_model):
    assert is_depth_anything_state(tiny_model.state_dict())
    assert not is_depth_anything_state(random_dpt(tiny_dpt_config("large")).state_dict())


@pytest.mark.parametrize("wrap", ["raw", "model", "dataparallel"])
def test_strict_load_round_trip(tmp_path, tiny_model, wrap):
    state = tiny_model.state_dict()
    if wrap == "model":
        state = {"model": state}
    elif wrap == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(state, path)
    loaded = DepthAnythingV2.from_checkpoint(path, TINY_CONFIG)
    assert not loaded.training
    x = _image(1, 56, 84, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))


def test_midas_dpt_file_is_refused_by_name(tmp_path):
    path = tmp_path / "dpt_large_384.pt"
    torch.save(random_dpt(tiny_dpt_config("large")).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        DepthAnythingV2.from_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    assert "dpt_large_384.pt: not a Depth Anything V2 checkpoint" in message


def test_tiny_file_does_not_fit_the_small_config(tmp_path, tiny_model):
    path = tmp_path / "small.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"small.pth: .*does not fit.*wrong shapes"):
        DepthAnythingV2.from_checkpoint(path)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["pretrained.blocks.1.ls2.gamma"]
    state["depth_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "da.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"1 missing keys.*ls2.gamma.*1 unexpected.*extra.weight"):
        DepthAnythingV2.from_checkpoint(path, TINY_CONFIG)


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "depth_anything_v2_vits.pth"
    path.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="vits.pth: not a readable.*Depth Anything V2"):
        DepthAnythingV2.from_checkpoint(path)


# --- Keras and TFLite ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [4, 2])
def test_transposed_conv_equals_conv_and_depth_to_space(factor):
    """A stride == kernel ConvTranspose2d is a 1x1 conv to C*k*k channels + DCR depth_to_space."""
    gen = torch.Generator().manual_seed(factor)
    deconv = torch.nn.ConvTranspose2d(5, 3, factor, stride=factor)
    with torch.no_grad():
        deconv.weight.copy_(torch.randn(deconv.weight.shape, generator=gen))
        deconv.bias.copy_(torch.randn(3, generator=gen))
    x = torch.randn(2, 5, 3, 4, generator=gen)
    layer = DepthToSpaceConv(3, factor)
    layer.build((None, 3, 4, 5))
    layer.set_weights(transposed_conv_weights(deconv.weight.detach().numpy(),
                                              deconv.bias.detach().numpy()))
    out = layer(x.permute(0, 2, 3, 1).numpy()).numpy()
    with torch.no_grad():
        ref = deconv(x).permute(0, 2, 3, 1).numpy()
    assert out.shape == ref.shape == (2, 3 * factor, 4 * factor, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(("h", "w"), [(56, 56), (70, 98), (98, 56)])
def test_tiny_parity(tiny_model, h, w):
    """56x56 is the trained 4x4 grid (no resize); the others resize it (5x7, 7x4 tokens) and
    make the 1/32 level odd-sized."""
    keras_model = keras_depth_anything_from_torch(tiny_model, h, w)
    assert _relative_diff(tiny_model, keras_model, _image(1, h, w, seed=h)) <= TOLERANCE


def test_tiny_parity_dynamic_batch(tiny_model):
    keras_model = keras_depth_anything_from_torch(tiny_model, 42, 70, batch_size=None)
    assert _relative_diff(tiny_model, keras_model, _image(2, 42, 70, seed=5)) <= TOLERANCE


def test_small_config_parity():
    """The official ViT-S/14 sizes, random weights, at 70x98 (5x7 tokens from the 37x37 grid)."""
    model = random_depth_anything(SMALL_CONFIG, seed=0)
    keras_model = keras_depth_anything_from_torch(model, 70, 98)
    diff = _relative_diff(model, keras_model, _image(1, 70, 98, seed=9))
    print(f"official vits 70x98: max abs diff {diff:.2e} of the output range")
    assert diff <= TOLERANCE


@pytest.mark.slow  # a TFLite conversion
def test_tflite_builtins_only_rank_4_gpu_compatible(tmp_path, tiny_model):
    from export.tflite_info import gpu_compatibility

    h, w = 70, 98
    keras_model = keras_depth_anything_from_torch(tiny_model, h, w)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path = tmp_path / "depth_anything_tiny.tflite"
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
    assert "TRANSPOSE_CONV" not in ops and ops["DEPTH_TO_SPACE"] == 2
    assert {"GELU", "RESIZE_BILINEAR", "BATCH_MATMUL", "SOFTMAX"} <= set(ops)
    assert gpu_compatibility(path) == (True, [])

    x = _image(1, h, w, seed=6).permute(0, 2, 3, 1).numpy()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    ref = keras_model(x).numpy()
    assert np.abs(out - ref).max() <= TOLERANCE * (ref.max() - ref.min())


def test_keras_from_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(tiny_model.state_dict(), path)
    keras_model = keras_depth_anything_from_checkpoint(path, 42, 56, config=TINY_CONFIG)
    assert keras_model.input_shape == (1, 42, 56, 3)
    assert keras_model.output_shape == (1, 42, 56, 1)
    assert _relative_diff(tiny_model, keras_model, _image(1, 42, 56, seed=8)) <= TOLERANCE


def test_keras_from_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="expected a Depth Anything V2 file"):
        keras_depth_anything_from_checkpoint(path, 56, 56)


def test_port_names_a_missing_layer_scale(tiny_model):
    state = dict(tiny_model.state_dict())
    del state["pretrained.blocks.2.ls1.gamma"]
    with pytest.raises(CheckpointError, match="blocks.2.ls1.gamma"):
        port_weights(build_keras_depth_anything(TINY_CONFIG, 56, 56), state, TINY_CONFIG)


def test_port_rejects_unused_entries_and_wrong_shapes(tiny_model):
    state = tiny_model.state_dict()
    with pytest.raises(CheckpointError, match="no place.*extra.weight"):
        port_weights(build_keras_depth_anything(TINY_CONFIG, 56, 56),
                     {**state, "extra.weight": torch.zeros(1)}, TINY_CONFIG)
    other = random_depth_anything(dataclasses.replace(TINY_CONFIG, out_channels=(8, 16, 24, 16)))
    with pytest.raises(CheckpointError, match="shapes for Keras layer depth_head"):
        port_weights(build_keras_depth_anything(other.config, 56, 56), state, other.config)
