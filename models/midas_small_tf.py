"""MiDaS v2.1 Small in Keras, NHWC, for phones; weights come from the PyTorch ``MidasSmall``.

Same network as ``models.midas_small`` (which names the paper and reference code), built for one
static input size so that it converts to TFLite with builtin ops only, every tensor of rank <= 4:
- Each BatchNorm is folded into the conv before it at port time (``kernel * gamma / sqrt(var +
  eps)``, bias ``beta - mean * gamma / sqrt(var + eps)``), so the graph has only convs with bias.
- Every encoder conv uses TensorFlow "SAME" padding: that is the padding the "tf_" EfficientNet
  emulates in PyTorch (the strided convs pad 0 before / 1 after for 3x3, 1 / 2 for 5x5 on the
  even sizes seen here), so no PAD op is needed. Depthwise convs are ``DepthwiseConv2D``.
- Each fusion block's 1x1 ``out_conv`` runs before its bilinear x2 upsampling, on a quarter of
  the pixels (and, with ``expand``, the upsampling then moves half the channels): both are linear
  and the bilinear weights sum to one, so the order does not change the result beyond rounding.
- Bilinear x2 upsampling is ``resize_bilinear`` with align_corners=True in the fusion blocks and
  half-pixel centres in the head (PyTorch align_corners=False): both are builtin RESIZE_BILINEAR.
- ``scratch.refinenet4.resConfUnit1`` and the BatchNorm ``num_batches_tracked`` counters are
  not used.

Keras layer names are the PyTorch module names of the convs (``pretrained.layer2.0.1.conv_dw``);
a folded conv also records the name of its BatchNorm, so ``port_weights`` maps a state dict onto
the model in one visible place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf
import torch

from models.dpt_tf import port_by_layer_name, residual_conv_unit, upsample2x
from models.midas_small import (
    MidasSmall,
    MidasSmallConfig,
    check_input_size,
    make_divisible,
    stage_prefix,
)

layers = tf.keras.layers


class FoldedConv2D(layers.Conv2D):
    """A "SAME" conv whose kernel and bias hold a bias-free PyTorch conv followed by the eval-mode
    BatchNorm named ``bn`` (folded by ``port_weights``)."""

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, bn: str = "", **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding="same", use_bias=True,
                         **kwargs)
        self.bn = bn

    def get_config(self) -> dict:
        return {**super().get_config(), "bn": self.bn}


class FoldedDepthwiseConv2D(layers.DepthwiseConv2D):
    """A "SAME" depthwise conv holding a PyTorch depthwise conv and its BatchNorm ``bn``."""

    def __init__(self, kernel_size: int, strides: int = 1, bn: str = "", **kwargs):
        super().__init__(kernel_size, strides=strides, padding="same", use_bias=True, **kwargs)
        self.bn = bn

    def get_config(self) -> dict:
        return {**super().get_config(), "bn": self.bn}


def upsample2x_half_pixel(x: tf.Tensor) -> tf.Tensor:
    """Bilinear x2 with half-pixel centres (PyTorch align_corners=False): builtin
    RESIZE_BILINEAR with half_pixel_centers."""
    _, h, w, _ = x.shape
    return tf.compat.v1.image.resize_bilinear(x, [2 * h, 2 * w], half_pixel_centers=True)


# --- encoder -------------------------------------------------------------------------------------


def depthwise_separable(x: tf.Tensor, out_ch: int, kernel: int, stride: int,
                        prefix: str) -> tf.Tensor:
    in_ch = x.shape[-1]
    y = FoldedDepthwiseConv2D(kernel, stride, bn=f"{prefix}.bn1", name=f"{prefix}.conv_dw")(x)
    y = FoldedConv2D(out_ch, 1, bn=f"{prefix}.bn2", name=f"{prefix}.conv_pw")(tf.nn.relu6(y))
    return y + x if stride == 1 and in_ch == out_ch else y


def inverted_residual(x: tf.Tensor, out_ch: int, kernel: int, stride: int, expansion: int,
                      prefix: str) -> tf.Tensor:
    in_ch = x.shape[-1]
    mid = make_divisible(in_ch * expansion)
    y = FoldedConv2D(mid, 1, bn=f"{prefix}.bn1", name=f"{prefix}.conv_pw")(x)
    y = FoldedDepthwiseConv2D(kernel, stride, bn=f"{prefix}.bn2",
                              name=f"{prefix}.conv_dw")(tf.nn.relu6(y))
    y = FoldedConv2D(out_ch, 1, bn=f"{prefix}.bn3", name=f"{prefix}.conv_pwl")(tf.nn.relu6(y))
    return y + x if stride == 1 and in_ch == out_ch else y


def encoder(image: tf.Tensor, cfg: MidasSmallConfig) -> list[tf.Tensor]:
    """EfficientNet-Lite stem and stages 0-6: the outputs of stages 1, 2, 4 and 6 (strides 4, 8,
    16, 32), which are MiDaS's ``pretrained.layer1..4``."""
    x = FoldedConv2D(cfg.stem_channels, 3, 2, bn="pretrained.layer1.1",
                     name="pretrained.layer1.0")(image)
    x = tf.nn.relu6(x)
    outs = []
    for stage, spec in enumerate(cfg.stage_specs()):
        for i in range(spec.repeats):
            prefix, stride = f"{stage_prefix(stage)}.{i}", spec.stride if i == 0 else 1
            if spec.kind == "ds":
                x = depthwise_separable(x, spec.channels, spec.kernel, stride, prefix)
            else:
                x = inverted_residual(x, spec.channels, spec.kernel, stride, spec.expansion,
                                      prefix)
        if stage in (1, 2, 4, 6):
            outs.append(x)
    return outs


# --- decoder -------------------------------------------------------------------------------------


def fusion_block(x: tf.Tensor, skip: tf.Tensor | None, out_features: int,
                 prefix: str) -> tf.Tensor:
    """MiDaS ``FeatureFusionBlock_custom`` with the 1x1 ``out_conv`` moved before the x2
    upsampling (align_corners=True)."""
    features = x.shape[-1]
    if skip is not None:
        x = x + residual_conv_unit(skip, features, f"{prefix}.resConfUnit1")
    x = residual_conv_unit(x, features, f"{prefix}.resConfUnit2")
    return upsample2x(layers.Conv2D(out_features, 1, name=f"{prefix}.out_conv")(x))


def build_keras_midas_small(config: MidasSmallConfig, height: int, width: int,
                            batch_size: int | None = 1) -> tf.keras.Model:
    """The MiDaS Small graph for ``[batch, height, width, 3]`` ImageNet-normalised RGB ->
    ``[batch, height, width, 1]`` disparity, with untrained weights (fill them with
    ``port_weights``). One static size per model, as mobile delegates want."""
    cfg = config
    check_input_size(height, width)
    image = layers.Input((height, width, 3), batch_size=batch_size, name="image")
    levels = encoder(image, cfg)
    widths = cfg.level_features()
    rn = [layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"scratch.layer{i}_rn")(x)
          for i, (f, x) in enumerate(zip(widths, levels, strict=True), start=1)]
    path = None
    for i in (4, 3, 2, 1):
        out = widths[i - 1] // 2 if cfg.expand and i > 1 else widths[i - 1]
        skip = rn[i - 1]
        path = fusion_block(skip if path is None else path, None if path is None else skip, out,
                            f"scratch.refinenet{i}")
    head = "scratch.output_conv"
    y = layers.Conv2D(cfg.features // 2, 3, padding="same", name=f"{head}.0")(path)
    y = layers.Conv2D(cfg.head_features, 3, padding="same",
                      name=f"{head}.2")(upsample2x_half_pixel(y))
    y = layers.Conv2D(1, 1, name=f"{head}.4")(tf.nn.relu(y))
    disparity = tf.nn.relu(y)
    return tf.keras.Model(image, disparity, name=f"midas_small_{height}x{width}")


# --- weights -------------------------------------------------------------------------------------


def unused_keys(state: Mapping[str, torch.Tensor]) -> set[str]:
    """Entries the forward never reads: refinenet4's first residual unit (refinenet4 has no skip
    input) and the BatchNorm batch counters."""
    return {k for k in state if k.startswith("scratch.refinenet4.resConfUnit1.")
            or k.endswith(".num_batches_tracked")}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def fold_batchnorm(weight: torch.Tensor, take_bn: Callable[[str], torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free conv ``weight`` (OIHW) followed by an eval-mode BatchNorm, as one conv's
    weight and bias (computed in float64)."""
    scale = take_bn("weight").double() / torch.sqrt(take_bn("running_var").double() + eps)
    shift = take_bn("bias").double() - take_bn("running_mean").double() * scale
    return weight.double() * scale.view(-1, 1, 1, 1), shift


def _layer_weights(layer: layers.Layer, take: Callable[..., torch.Tensor],
                   cfg: MidasSmallConfig) -> list[np.ndarray]:
    """The Keras weights of ``layer`` from PyTorch tensors (``take(suffix[, prefix])``)."""
    if isinstance(layer, FoldedConv2D | FoldedDepthwiseConv2D):
        kernel, bias = fold_batchnorm(take("weight"), lambda s: take(s, layer.bn), cfg.bn_eps)
        # conv OIHW -> HWIO; depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]
        perm = (2, 3, 0, 1) if isinstance(layer, FoldedDepthwiseConv2D) else (2, 3, 1, 0)
        return [_np(kernel).transpose(perm), _np(bias)]
    if isinstance(layer, layers.Conv2D):  # OIHW -> HWIO
        kernel = _np(take("weight")).transpose(2, 3, 1, 0)
        return [kernel, _np(take("bias"))] if layer.use_bias else [kernel]
    raise TypeError(f"no PyTorch mapping for Keras layer {layer.name} ({type(layer).__name__})")


def port_weights(keras_model: tf.keras.Model, torch_state_dict: Mapping[str, torch.Tensor],
                 config: MidasSmallConfig) -> tf.keras.Model:
    """Copy a ``MidasNet_small``-layout state dict into ``build_keras_midas_small``'s model, in
    place: convs OIHW -> HWIO, BatchNorms folded into the convs before them. Every state-dict
    entry must be used (or be one the forward never reads) and every Keras weight filled;
    otherwise ``CheckpointError`` names the keys."""
    return port_by_layer_name(
        keras_model, torch_state_dict, lambda layer, take: _layer_weights(layer, take, config),
        unused_keys(torch_state_dict), "MiDaS Small")


def keras_midas_small_from_torch(model: MidasSmall, height: int, width: int,
                                 batch_size: int | None = 1) -> tf.keras.Model:
    """The Keras twin of a PyTorch ``MidasSmall`` for one input size."""
    keras_model = build_keras_midas_small(model.config, height, width, batch_size)
    return port_weights(keras_model, model.state_dict(), model.config)


def keras_midas_small_from_checkpoint(path: str | Path, height: int, width: int,
                                      config: MidasSmallConfig | None = None,
                                      batch_size: int | None = 1) -> tf.keras.Model:
    """Keras MiDaS Small from ``midas_v21_small_256.pt`` (strictly checked by
    ``MidasSmall.from_checkpoint``): ``[N, height, width, 3]`` RGB in [0, 1] normalised with the
    ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) -> disparity
    ``[N, height, width, 1]``."""
    return keras_midas_small_from_torch(MidasSmall.from_checkpoint(path, config), height, width,
                                        batch_size)
