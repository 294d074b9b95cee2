"""Depth Anything V2 in Keras, NHWC, for a phone model; weights come from the PyTorch model.

Same network as ``models.depth_anything`` (which names the paper and reference code), built for
one static input size so that it converts to TFLite with builtin ops only and every tensor of
rank <= 4, for the phone GPU delegate. It reuses the ViT and decoder pieces of ``models.dpt_tf``
(LayerNorm, rank-4 attention, fusion blocks whose 1x1 conv runs before the resize). Beyond those:
- The position embedding is resized bicubically for the model's token grid at port time, in
  PyTorch with DINOv2's formula, and stored as a constant.
- LayerScale is folded into the Linear before it (``attn.proj``, ``mlp.fc2``): ``gamma * (W x +
  b)`` is ``(gamma W) x + gamma b``, so the graph has no extra MUL.
- The transposed convs with stride == kernel (k4s4, k2s2) run as a 1x1 conv to ``C * k * k``
  channels followed by DEPTH_TO_SPACE (each output pixel of such a transposed conv reads exactly
  one input pixel), since some GPU delegates refuse TRANSPOSE_CONV.
- The final norm is applied to the hooked patch tokens after the class token is dropped (it is
  per token, so the order does not matter).

Keras layer names are the PyTorch module names (``pretrained.blocks.3.attn.qkv``,
``depth_head.scratch.refinenet2.out_conv``...), so ``port_weights`` maps a state dict by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
import torch

from models.depth_anything import (
    DepthAnythingConfig,
    DepthAnythingV2,
    check_input_size,
    interpolate_pos_embed,
)
from models.dpt_tf import (
    LayerNorm,
    TokenEmbed,
    _layer_weights,
    _np,
    fusion_block,
    port_by_layer_name,
    transformer_block,
    upsample2x,
)

layers = tf.keras.layers

# Linear layers that absorb the LayerScale after them, and that LayerScale's name.
LAYER_SCALE_FOLDS = {".attn.proj": "ls1", ".mlp.fc2": "ls2"}


class DepthToSpaceConv(layers.Conv2D):
    """``ConvTranspose2d(C, filters, k, stride=k)`` as a 1x1 conv to ``filters * k * k``
    channels and ``depth_to_space(k)``; ``transposed_conv_weights`` gives its weights."""

    def __init__(self, filters: int, factor: int, **kwargs):
        kwargs.pop("kernel_size", None)  # from get_config: always 1
        super().__init__(filters * factor * factor, 1, **kwargs)
        self.factor = factor

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.depth_to_space(super().call(x), self.factor)

    def get_config(self) -> dict:
        config = super().get_config()
        config["filters"] //= self.factor * self.factor
        return {**config, "factor": self.factor}


def transposed_conv_weights(weight: np.ndarray, bias: np.ndarray) -> list[np.ndarray]:
    """``DepthToSpaceConv`` weights from a stride == kernel ``ConvTranspose2d``'s.

    ``out[o, k*y + i, k*x + j] = sum_c in[c, y, x] * weight[c, o, i, j] + bias[o]``, and TF's
    ``depth_to_space`` (DCR) reads channel ``(i*k + j) * out + o`` at offset ``(i, j)``.
    """
    cin, cout, k, k2 = weight.shape
    if k != k2:
        raise ValueError(f"square kernels only, got {k}x{k2}")
    kernel = weight.transpose(0, 2, 3, 1).reshape(1, 1, cin, k * k * cout)
    return [kernel, np.tile(bias, k * k)]


# --- graph ---------------------------------------------------------------------------------------


def reassemble(tokens: tf.Tensor, level: int, grid: tuple[int, int],
               cfg: DepthAnythingConfig) -> tf.Tensor:
    """``depth_head.projects[level]`` and ``resize_layers[level]`` on ``[N, tokens, dim]``."""
    out = cfg.out_channels[level]
    x = tf.reshape(tokens, [-1, grid[0], grid[1], cfg.embed_dim])
    x = layers.Conv2D(out, 1, name=f"depth_head.projects.{level}")(x)
    name = f"depth_head.resize_layers.{level}"
    if level == 0:
        x = DepthToSpaceConv(out, 4, name=name)(x)
    elif level == 1:
        x = DepthToSpaceConv(out, 2, name=name)(x)
    elif level == 3:  # PyTorch pads 1 on every side, TF "SAME" would pad bottom/right only
        x = layers.Conv2D(out, 3, strides=2, name=name)(layers.ZeroPadding2D(1)(x))
    return x


def build_keras_depth_anything(config: DepthAnythingConfig, height: int, width: int,
                               batch_size: int | None = 1) -> tf.keras.Model:
    """The graph for ``[batch, height, width, 3]`` ImageNet-normalised RGB -> depth
    ``[batch, height, width, 1]``, with untrained weights (fill them with ``port_weights``).

    One static size per model (sides multiples of 14): the position embedding is baked in for
    this size's token grid and every resize has a fixed output size.
    """
    cfg = config
    check_input_size(height, width, cfg.patch_size)
    grid = (height // cfg.patch_size, width // cfg.patch_size)
    image = layers.Input((height, width, 3), batch_size=batch_size, name="image")
    x = layers.Conv2D(cfg.embed_dim, cfg.patch_size, strides=cfg.patch_size,
                      name="pretrained.patch_embed.proj")(image)
    x = tf.reshape(x, [-1, grid[0] * grid[1], cfg.embed_dim])
    x = TokenEmbed(grid, name="pretrained")(x)
    norm = LayerNorm(cfg.ln_eps, name="pretrained.norm")  # shared by the four taps
    maps = []
    for i in range(cfg.hooks[-1] + 1):
        x = transformer_block(x, cfg, f"pretrained.blocks.{i}")
        if i in cfg.hooks:
            maps.append(reassemble(norm(x[:, 1:]), len(maps), grid, cfg))

    s, f = "depth_head.scratch", cfg.features
    rn = [layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"{s}.layer{i}_rn")(m)
          for i, m in enumerate(maps, start=1)]
    path = fusion_block(rn[3], None, f, f"{s}.refinenet4", size=rn[2].shape[1:3])
    path = fusion_block(path, rn[2], f, f"{s}.refinenet3", size=rn[1].shape[1:3])
    path = fusion_block(path, rn[1], f, f"{s}.refinenet2", size=rn[0].shape[1:3])
    path = fusion_block(path, rn[0], f, f"{s}.refinenet1")
    y = layers.Conv2D(f // 2, 3, padding="same", name=f"{s}.output_conv1")(path)
    y = upsample2x(y, (height, width))
    y = layers.Conv2D(cfg.head_features, 3, padding="same", name=f"{s}.output_conv2.0")(y)
    y = layers.Conv2D(1, 1, name=f"{s}.output_conv2.2")(tf.nn.relu(y))
    depth = tf.nn.relu(y)
    return tf.keras.Model(image, depth, name=f"depth_anything_v2_{height}x{width}")


# --- weights -------------------------------------------------------------------------------------


def unused_keys(state: Mapping[str, torch.Tensor], cfg: DepthAnythingConfig) -> set[str]:
    """Checkpoint entries inference never reads: DINOv2's mask token, refinenet4's first residual
    unit (no skip input), blocks after the last hook."""
    dead = ("pretrained.mask_token", "depth_head.scratch.refinenet4.resConfUnit1.")
    dead += tuple(f"pretrained.blocks.{i}." for i in range(cfg.hooks[-1] + 1, cfg.depth))
    return {k for k in state if k.startswith(dead)}


def port_weights(keras_model: tf.keras.Model, torch_state_dict: Mapping[str, torch.Tensor],
                 config: DepthAnythingConfig) -> tf.keras.Model:
    """Copy an official-layout Depth Anything V2 state dict into ``build_keras_depth_anything``'s
    model, in place.

    Besides the layouts of ``models.dpt_tf`` (conv OIHW -> HWIO, Linear transposed): the position
    embedding is resized to the model's grid, LayerScale folded into ``attn.proj``/``mlp.fc2``,
    the k4s4/k2s2 transposed convs rewritten for ``DepthToSpaceConv``. Every entry must be used
    (or be one inference never reads) and every Keras weight filled; otherwise
    ``CheckpointError`` names the keys.
    """

    def layer_weights(layer, take) -> list[np.ndarray]:
        fold = next((ls for end, ls in LAYER_SCALE_FOLDS.items() if layer.name.endswith(end)),
                    None)
        if isinstance(layer, TokenEmbed):
            pos = interpolate_pos_embed(take("pos_embed"), *layer.grid, config.interpolate_offset)
            return [_np(take("cls_token")), _np(pos)]
        if isinstance(layer, DepthToSpaceConv):
            return transposed_conv_weights(_np(take("weight")), _np(take("bias")))
        if fold is not None:
            block = layer.name.rsplit(".", 2)[0]
            gamma = _np(take("gamma", f"{block}.{fold}"))
            return [(_np(take("weight")) * gamma[:, None]).T, _np(take("bias")) * gamma]
        return _layer_weights(layer, take, config)

    return port_by_layer_name(keras_model, torch_state_dict, layer_weights,
                              unused_keys(torch_state_dict, config), "Depth Anything V2")


def keras_depth_anything_from_torch(model: DepthAnythingV2, height: int, width: int,
                                    batch_size: int | None = 1) -> tf.keras.Model:
    """The Keras twin of a PyTorch ``DepthAnythingV2`` for one input size."""
    keras_model = build_keras_depth_anything(model.config, height, width, batch_size)
    return port_weights(keras_model, model.state_dict(), model.config)


def keras_depth_anything_from_checkpoint(path: str | Path, height: int, width: int,
                                         config: DepthAnythingConfig | None = None,
                                         batch_size: int | None = 1) -> tf.keras.Model:
    """Keras Depth Anything V2 from an official file (``depth_anything_v2_vits.pth``, strictly
    checked by ``DepthAnythingV2.from_checkpoint``): ``[N, height, width, 3]`` RGB normalised
    with the ImageNet mean and std -> relative inverse depth ``[N, height, width, 1]``."""
    model = DepthAnythingV2.from_checkpoint(path, config)
    return keras_depth_anything_from_torch(model, height, width, batch_size)
