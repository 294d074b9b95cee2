"""DPT (MiDaS v3.0) in Keras, NHWC, for a fused phone model; weights come from the PyTorch DPT.

Same network as ``models.dpt`` (which names the paper and reference code), built for one static
input size so that it converts to TFLite with builtin ops only and every tensor of rank <= 4,
which is what the phone GPU delegate accepts:
- GroupNorm takes only means over one or two spatial axes (the MEAN forms XNNPACK delegates),
  also for the mean over each group's channels; attention runs as ``[N, heads, tokens, dim]``.
- Every norm and its large means use the fp16-safe forms of
  ``models.fp16_tf`` (a phone GPU computes in fp16; docs/design.md, section 13): exact in fp32.
- Each fusion block's 1x1 ``out_conv`` runs before its bilinear x2 upsampling, on a quarter of
  the pixels: both are linear and the bilinear weights sum to one, so the order does not change
  the result (beyond float rounding).
- Weight standardisation of the hybrid stem is done once, at port time; the graph has plain
  convs with TF "SAME" padding, which is what timm's ``StdConv2dSame`` emulates.
- The position embedding is resized for the model's token grid at port time (a constant).
- The readout projection ``Linear(concat(token, cls))`` is computed as
  ``token @ W_tok + cls @ W_cls + b``: the same sum, without broadcasting the class token.

Keras layer names are the PyTorch module names (``pretrained.model.blocks.3.attn.qkv``...), so
``port_weights`` maps a state dict onto the model in one visible place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
import torch

from common.errors import CheckpointError
from models import fp16_tf
from models.dpt import DPT, DPTConfig, check_input_size, resize_pos_embed, standardize_weight

layers = tf.keras.layers


class LayerNorm(layers.Layer):
    """LayerNorm over the last axis (``fp16_tf.layer_norm``)."""

    def __init__(self, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps
        self.fp16_safe = fp16_tf.fp16_safe()

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(dim,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(dim,), initializer="zeros")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return fp16_tf.layer_norm(x, self.gamma, self.beta, self.eps, self.fp16_safe)


class GroupNorm(layers.Layer):
    """GroupNorm on NHWC, optionally followed by ReLU (timm ``GroupNormAct``).

    Statistics come from spatial means ``[N, 1, 1, C]`` (``fp16_tf.spatial_mean``: staged, rows
    then columns), then a mean over each group's channels
    computed as a spatial mean too (the ``[N, 1, 1, C]`` vector laid out as ``[N, C/G, 1, G]``),
    broadcast back to the channels by a multiply with a ``[1, 1, G, C/G]`` ones tensor (the GPU
    delegate wants one MUL operand to cover the other in every dimension). Every op is one that
    XNNPACK in TF 2.15 delegates (it runs only spatial MEANs: a ``[N, H*W, G, C/G]`` view left
    104 MEANs outside it), and no op has weights, so dynamic-range quantization leaves the
    statistics in float (a constant group-average conv was quantized there, and so were its
    inputs: small variances became 0). The output is ``x * scale + shift`` per channel.
    Its input comes from a ``StdConv2DSame`` whose weights carry ``fp16_tf.norm_input_scale``,
    so ``eps`` is scaled to match (``fp16_tf.group_norm_eps``).
    """

    def __init__(self, groups: int, eps: float = 1e-5, relu: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.relu = groups, relu
        self.fp16_safe = fp16_tf.fp16_safe()
        self.eps = fp16_tf.group_norm_eps(eps, self.fp16_safe)

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def _group_mean(self, x: tf.Tensor) -> tf.Tensor:
        """``[N, H, W, C]`` -> the mean of each channel's group, ``[N, 1, 1, C]``."""
        channels = x.shape[-1]
        size = channels // self.groups
        spatial = fp16_tf.spatial_mean(x, self.fp16_safe)
        per_group = tf.transpose(tf.reshape(spatial, [-1, 1, self.groups, size]), [0, 3, 1, 2])
        group = tf.reshape(tf.reduce_mean(per_group, axis=[1, 2], keepdims=True),
                           [-1, 1, self.groups, 1])
        return tf.reshape(group * tf.ones([1, 1, self.groups, size]), [-1, 1, 1, channels])

    def call(self, x: tf.Tensor) -> tf.Tensor:
        mean = self._group_mean(x)
        variance = self._group_mean(tf.math.squared_difference(x, mean))
        scale = self.gamma / tf.sqrt(variance + self.eps)
        y = x * scale + (self.beta - mean * scale)
        return tf.nn.relu(y) if self.relu else y


class StdConv2DSame(layers.Conv2D):
    """A plain "SAME" conv without bias holding timm ``StdConv2dSame`` weights, standardised by
    ``port_weights`` (a distinct class so the port knows to standardise) and multiplied by
    ``output_scale``: every one feeds a GroupNorm, which takes that scale back exactly."""

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                         **kwargs)
        self.output_scale = fp16_tf.norm_input_scale(fp16_tf.fp16_safe())


class TokenEmbed(layers.Layer):
    """Prepend the class token and add the position embedding (resized at port time)."""

    def __init__(self, grid: tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        self.grid = tuple(grid)

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = int(input_shape[-1])
        tokens = self.grid[0] * self.grid[1]
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, dim), initializer="zeros")
        self.pos_embed = self.add_weight(name="pos_embed", shape=(1, 1 + tokens, dim),
                                         initializer="zeros")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        cls = self.cls_token + self.pos_embed[:, :1]
        if x.shape[0] != 1:  # batch 1 (the phone case) needs no broadcast op
            batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
            cls = tf.broadcast_to(cls, tf.stack([batch, 1, x.shape[-1]]))
        return tf.concat([cls, x + self.pos_embed[:, 1:]], axis=1)


class ProjectReadout(layers.Layer):
    """MiDaS readout "project": GELU(Linear(concat(token, cls))), without broadcasting cls."""

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(2 * dim, dim))
        self.bias = self.add_weight(name="bias", shape=(dim,), initializer="zeros")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        dim = x.shape[-1]
        tokens = tf.matmul(x[:, 1:], self.kernel[:dim])
        readout = tf.matmul(x[:, :1], self.kernel[dim:])
        return tf.nn.gelu(tokens + readout + self.bias, approximate=False)


def upsample2x(x: tf.Tensor, size: tuple[int, int] | None = None) -> tf.Tensor:
    """Bilinear x2 (or to ``size``) with align_corners=True (MiDaS), which converts to builtin
    RESIZE_BILINEAR."""
    _, h, w, _ = x.shape
    size = [2 * h, 2 * w] if size is None else list(size)
    return tf.compat.v1.image.resize_bilinear(x, size, align_corners=True)


# --- backbone ------------------------------------------------------------------------------------


def resnet_stages(x: tf.Tensor, cfg: DPTConfig, prefix: str) -> list[tf.Tensor]:
    """timm ResNetV2 (hybrid stem): the outputs of the three stages."""
    gn = dict(groups=cfg.groups, eps=cfg.gn_eps)
    x = StdConv2DSame(cfg.stem_channels, 7, 2, name=f"{prefix}.stem.conv")(x)
    x = GroupNorm(**gn, name=f"{prefix}.stem.norm")(x)
    x = layers.MaxPool2D(3, 2, padding="same")(x)  # SAME max pool ignores padding, like -inf
    outs = []
    in_ch = cfg.stem_channels
    for i, (depth, out_ch) in enumerate(zip(cfg.resnet_layers, cfg.resnet_channels, strict=True)):
        for j in range(depth):
            p = f"{prefix}.stages.{i}.blocks.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            shortcut = x
            if stride != 1 or in_ch != out_ch:
                shortcut = StdConv2DSame(out_ch, 1, stride, name=f"{p}.downsample.conv")(x)
                shortcut = GroupNorm(**gn, relu=False, name=f"{p}.downsample.norm")(shortcut)
            y = StdConv2DSame(out_ch // 4, 1, name=f"{p}.conv1")(x)
            y = GroupNorm(**gn, name=f"{p}.norm1")(y)
            y = StdConv2DSame(out_ch // 4, 3, stride, name=f"{p}.conv2")(y)
            y = GroupNorm(**gn, name=f"{p}.norm2")(y)
            y = StdConv2DSame(out_ch, 1, name=f"{p}.conv3")(y)
            y = GroupNorm(**gn, relu=False, name=f"{p}.norm3")(y)
            x = tf.nn.relu(y + shortcut)
            in_ch = out_ch
        outs.append(x)
    return outs


def transformer_block(x: tf.Tensor, cfg: DPTConfig, prefix: str) -> tf.Tensor:
    """Pre-norm ViT block; attention on rank-4 ``[N, heads, tokens, dim]`` tensors."""
    tokens, dim, heads = x.shape[1], cfg.embed_dim, cfg.num_heads
    head_dim = dim // heads

    def split_heads(t: tf.Tensor, perm: list[int]) -> tf.Tensor:
        return tf.transpose(tf.reshape(t, [-1, tokens, heads, head_dim]), perm)

    h = LayerNorm(cfg.ln_eps, name=f"{prefix}.norm1")(x)
    q, k, v = tf.split(layers.Dense(3 * dim, name=f"{prefix}.attn.qkv")(h), 3, axis=-1)
    q = split_heads(q, [0, 2, 1, 3]) * (head_dim ** -0.5)
    k = split_heads(k, [0, 2, 3, 1])  # already transposed for q @ k^T
    attn = tf.nn.softmax(tf.matmul(q, k), axis=-1)
    o = tf.matmul(attn, split_heads(v, [0, 2, 1, 3]))
    o = tf.reshape(tf.transpose(o, [0, 2, 1, 3]), [-1, tokens, dim])
    x = x + layers.Dense(dim, name=f"{prefix}.attn.proj")(o)
    h = LayerNorm(cfg.ln_eps, name=f"{prefix}.norm2")(x)
    h = tf.nn.gelu(layers.Dense(int(dim * cfg.mlp_ratio), name=f"{prefix}.mlp.fc1")(h),
                   approximate=False)
    return x + layers.Dense(dim, name=f"{prefix}.mlp.fc2")(h)


def reassemble(tokens: tf.Tensor, level: int, grid: tuple[int, int], cfg: DPTConfig) -> tf.Tensor:
    """MiDaS ``act_postprocess{level}``: readout, tokens -> NHWC grid, 1x1 conv, resample."""
    p = f"pretrained.act_postprocess{level}"
    out = cfg.reassemble[level - 1]
    x = ProjectReadout(name=f"{p}.0.project.0")(tokens)
    x = tf.reshape(x, [-1, grid[0], grid[1], cfg.embed_dim])
    x = layers.Conv2D(out, 1, name=f"{p}.3")(x)
    if level == 1:
        x = layers.Conv2DTranspose(out, 4, strides=4, name=f"{p}.4")(x)
    elif level == 2:
        x = layers.Conv2DTranspose(out, 2, strides=2, name=f"{p}.4")(x)
    elif level == 4:  # PyTorch pads 1 on every side, TF "SAME" would pad bottom/right only
        x = layers.Conv2D(out, 3, strides=2, name=f"{p}.4")(layers.ZeroPadding2D(1)(x))
    return x


# --- decoder -------------------------------------------------------------------------------------


def residual_conv_unit(x: tf.Tensor, features: int, prefix: str) -> tf.Tensor:
    y = layers.Conv2D(features, 3, padding="same", name=f"{prefix}.conv1")(tf.nn.relu(x))
    y = layers.Conv2D(features, 3, padding="same", name=f"{prefix}.conv2")(tf.nn.relu(y))
    return y + x


def fusion_block(x: tf.Tensor, skip: tf.Tensor | None, features: int, prefix: str,
                 size: tuple[int, int] | None = None) -> tf.Tensor:
    if skip is not None:
        x = x + residual_conv_unit(skip, features, f"{prefix}.resConfUnit1")
    x = residual_conv_unit(x, features, f"{prefix}.resConfUnit2")
    return upsample2x(layers.Conv2D(features, 1, name=f"{prefix}.out_conv")(x), size)


def build_keras_dpt(config: DPTConfig, height: int, width: int,
                    batch_size: int | None = 1) -> tf.keras.Model:
    """The DPT graph for ``[batch, height, width, 3]`` normalised RGB -> ``[batch, H, W, 1]``
    disparity, with untrained weights (fill them with ``port_weights``).

    One static size per model: mobile delegates want static shapes, and the position embedding
    is baked in for this size's token grid.
    """
    cfg = config
    check_input_size(height, width)
    grid = (height // cfg.patch_size, width // cfg.patch_size)
    image = layers.Input((height, width, 3), batch_size=batch_size, name="image")
    maps: dict[int, tf.Tensor] = {}
    if cfg.variant == "hybrid":
        stages = resnet_stages(image, cfg, "pretrained.model.patch_embed.backbone")
        maps[1], maps[2] = stages[0], stages[1]
        x = layers.Conv2D(cfg.embed_dim, 1, name="pretrained.model.patch_embed.proj")(stages[-1])
    else:
        x = layers.Conv2D(cfg.embed_dim, cfg.patch_size, strides=cfg.patch_size,
                          name="pretrained.model.patch_embed.proj")(image)
    x = tf.reshape(x, [-1, grid[0] * grid[1], cfg.embed_dim])
    x = TokenEmbed(grid, name="pretrained.model")(x)
    taps = [(hook, level) for level, hook in enumerate(cfg.hooks, start=1) if level not in maps]
    for i in range(max(hook for hook, _ in taps) + 1):
        x = transformer_block(x, cfg, f"pretrained.model.blocks.{i}")
        for level in [lv for hook, lv in taps if hook == i]:
            maps[level] = reassemble(x, level, grid, cfg)

    f = cfg.features
    rn = [layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"scratch.layer{i}_rn")(maps[i])
          for i in range(1, 5)]
    path = fusion_block(rn[3], None, f, "scratch.refinenet4")
    for i in (3, 2, 1):
        path = fusion_block(path, rn[i - 1], f, f"scratch.refinenet{i}")
    head = "scratch.output_conv"
    y = layers.Conv2D(f // 2, 3, padding="same", name=f"{head}.0")(path)
    y = layers.Conv2D(cfg.head_features, 3, padding="same", name=f"{head}.2")(upsample2x(y))
    y = layers.Conv2D(1, 1, name=f"{head}.4")(tf.nn.relu(y))
    disparity = tf.nn.relu(y)
    return tf.keras.Model(image, disparity, name=f"dpt_{cfg.variant}_{height}x{width}")


# --- weights -------------------------------------------------------------------------------------


def unused_keys(state: Mapping[str, torch.Tensor], cfg: DPTConfig) -> set[str]:
    """Checkpoint entries DPT's forward never reads: the ViT's final norm and classifier, the
    first residual unit of refinenet4 (it has no skip input), blocks after the last hook."""
    last = max(h for lv, h in enumerate(cfg.hooks, start=1) if lv > 2 or cfg.variant == "large")
    dead = ("pretrained.model.norm.", "pretrained.model.head.", "scratch.refinenet4.resConfUnit1.")
    dead += tuple(f"pretrained.model.blocks.{i}." for i in range(last + 1, cfg.depth))
    return {k for k in state if k.startswith(dead)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _layer_weights(layer: layers.Layer, take: Callable[[str], torch.Tensor],
                   cfg: DPTConfig) -> list[np.ndarray]:
    """The Keras weights of ``layer`` from PyTorch tensors (``take(suffix)`` reads one)."""
    if isinstance(layer, TokenEmbed):
        pos = resize_pos_embed(take("pos_embed"), *layer.grid)
        return [_np(take("cls_token")), _np(pos)]
    if isinstance(layer, LayerNorm | GroupNorm):
        return [_np(take("weight")), _np(take("bias"))]
    if isinstance(layer, ProjectReadout | layers.Dense):
        return [_np(take("weight")).T, _np(take("bias"))]
    if isinstance(layer, StdConv2DSame):  # OIHW -> HWIO, standardised once here
        kernel = _np(standardize_weight(take("weight"), cfg.std_conv_eps)).transpose(2, 3, 1, 0)
        return [kernel * np.float32(layer.output_scale)]
    if isinstance(layer, layers.Conv2DTranspose):  # [in, out, kh, kw] -> [kh, kw, out, in]
        return [_np(take("weight")).transpose(2, 3, 1, 0), _np(take("bias"))]
    if isinstance(layer, layers.Conv2D):  # OIHW -> HWIO
        kernel = _np(take("weight")).transpose(2, 3, 1, 0)
        return [kernel, _np(take("bias"))] if layer.use_bias else [kernel]
    raise TypeError(f"no PyTorch mapping for Keras layer {layer.name} ({type(layer).__name__})")


def port_weights(keras_model: tf.keras.Model, torch_state_dict: Mapping[str, torch.Tensor],
                 config: DPTConfig) -> tf.keras.Model:
    """Copy a MiDaS-layout PyTorch DPT state dict into ``build_keras_dpt``'s model, in place.

    Conv OIHW -> HWIO, Linear transposed, StdConv weights standardised, the position embedding
    resized to the model's grid. Every state-dict entry must be used (or be one DPT never reads)
    and every Keras weight filled; otherwise ``CheckpointError`` names the keys.
    """
    return port_by_layer_name(
        keras_model, torch_state_dict, lambda layer, take: _layer_weights(layer, take, config),
        unused_keys(torch_state_dict, config), f"DPT-{config.variant.title()}")


def port_by_layer_name(keras_model: tf.keras.Model, torch_state_dict: Mapping[str, torch.Tensor],
                       layer_weights: Callable, unused: set[str], what: str) -> tf.keras.Model:
    """Fill every Keras layer from the PyTorch entries its name points at, in place (every Keras
    port here names its layers by the official state-dict prefixes).

    ``layer_weights(layer, take)`` gives a layer's Keras weights, reading tensors through
    ``take(suffix, prefix=layer.name, needed_by=layer.name)``. Every entry must be used or be in
    ``unused`` (ones the forward never reads), every Keras weight filled; otherwise one
    ``CheckpointError`` names the keys.
    """
    used: set[str] = set()
    for layer in keras_model.layers:
        if not layer.weights:
            continue

        def take(suffix: str, prefix: str = layer.name, needed_by: str = layer.name
                 ) -> torch.Tensor:
            key = f"{prefix}.{suffix}"
            if key not in torch_state_dict:
                raise CheckpointError(f"state dict lacks {key!r}, needed by Keras layer "
                                      f"{needed_by}")
            used.add(key)
            return torch_state_dict[key]

        values = layer_weights(layer, take)
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise CheckpointError(
                f"shapes for Keras layer {layer.name}: state dict gives "
                f"{[v.shape for v in values]}, the Keras {what} needs {expected}"
            )
        layer.set_weights(values)
    leftover = sorted(set(torch_state_dict) - used - unused)
    if leftover:
        raise CheckpointError(f"{len(leftover)} state-dict entries have no place in the Keras "
                              f"{what}: {leftover[:5]}")
    return keras_model


def keras_dpt_from_torch(torch_dpt: DPT, height: int, width: int,
                         batch_size: int | None = 1) -> tf.keras.Model:
    """The Keras twin of a PyTorch ``DPT`` for one input size."""
    model = build_keras_dpt(torch_dpt.config, height, width, batch_size)
    return port_weights(model, torch_dpt.state_dict(), torch_dpt.config)


def from_midas_checkpoint(path: str | Path, height: int, width: int,
                          config: DPTConfig | None = None,
                          batch_size: int | None = 1) -> tf.keras.Model:
    """Keras DPT from an official MiDaS file (strictly checked by ``DPT.from_midas_checkpoint``):
    ``[N, height, width, 3]`` input normalised with mean 0.5 / std 0.5 -> disparity
    ``[N, height, width, 1]``."""
    return keras_dpt_from_torch(DPT.from_midas_checkpoint(path, config), height, width, batch_size)
