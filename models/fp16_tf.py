"""fp16-safe forms of the Keras depth nets' normalisations and large means.

A phone GPU stores every activation in fp16 (largest finite 65504) and accumulates means and sums
in fp16 (docs/design.md, section 13). Each function here computes, in fp32, what the textbook
formula computes (bit for bit where its docstring says so, else to float rounding), while keeping
every intermediate of an fp16 run in range:
- statistics are taken on values scaled by a power of two ``S`` with ``eps * S^2``: normalisation
  is scale invariant, and a power of two scales every fp32 product, sum, square root and
  quotient exactly, so nothing changes in fp32 while squares stay far below 65504;
- a mean over a large extent is staged (rows, then columns), so no running sum adds up more than
  one row or column of values.

The attention softmax needs no rewrite: TFLite's SOFTMAX kernels subtract the row maximum
themselves, the GPU ones too (delegates/gpu/common/tasks/softmax.cc, ML Drift's softmax1x1), and
sum the exponentials in fp32; an explicit ``x - max`` would cost a pass over every attention
matrix on the CPU for nothing.

``with naive_fp16():`` builds the textbook forms instead: the switch exists so that tests and
benchmarks can show a graph that fails in fp16 next to the one that does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow as tf

# Powers of two (exact scaling in fp32). A ViT LayerNorm sums the squares of up to 1024 channels:
# at 2^-6 an fp16 sum holds an rms of the centred values up to ~500 (massive-activation channels
# near +-4000), while values near 1 keep normal fp16 squares (2.4e-4 > 6.1e-5).
LAYER_NORM_SCALE = 2.0 ** -6
# A GroupNorm's staged spatial mean adds up to one row of squares (288 at DPT's 384x576): at 2^-8
# |x - mean| up to ~3800 stays finite; GroupNorm inputs are weight-standardised conv outputs,
# whose spread is sqrt(fan_in) times their input's (>= 4 in practice), so squares stay normal.
GROUP_NORM_SCALE = 2.0 ** -8

_STATE = {"safe": True}


@contextlib.contextmanager
def naive_fp16() -> Iterator[None]:
    """Build Keras depth nets with the textbook formulas (fp32-equal, not fp16-safe) inside."""
    before = _STATE["safe"]
    _STATE["safe"] = False
    try:
        yield
    finally:
        _STATE["safe"] = before


def fp16_safe() -> bool:
    """Whether graphs built now use the fp16-safe forms (the default)."""
    return _STATE["safe"]


def layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, eps: float,
               safe: bool = True) -> tf.Tensor:
    """LayerNorm over the last axis, statistics on ``x * S`` with ``eps * S^2``.

    Exact in fp32 (bit for bit up to the rsqrt kernel): ``S`` is a power of two, so the scaled
    mean, centred values, squares and variance are the unscaled ones times ``S`` or ``S^2``
    exactly, and ``rsqrt(S^2 (v + eps)) = rsqrt(v + eps) / S``. In fp16 the squares of centred
    values up to 256 / S stay finite (the naive form overflows past |x - mean| = 256, which the
    massive-activation channels of trained ViTs pass).
    """
    scale = LAYER_NORM_SCALE if safe else 1.0
    if safe:
        x = x * scale
    centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
    return centred * tf.math.rsqrt(variance + eps * scale * scale) * gamma + beta


def spatial_mean(x: tf.Tensor, safe: bool = True) -> tf.Tensor:
    """``[N, H, W, C]`` -> its mean over H and W, ``[N, 1, 1, C]``: staged, over W then H.

    Each stage is a MEAN whose fp16 running sum adds up one row (W values) or one column (H
    values) instead of H * W (110,592 for DPT-Hybrid's stem at 384x576, which overflows
    65504 at a mean of 0.6). The same sum in another order: equal in fp32 to float rounding.
    """
    if not safe:
        return tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return tf.reduce_mean(tf.reduce_mean(x, axis=2, keepdims=True), axis=1, keepdims=True)


def norm_input_scale(safe: bool = True) -> float:
    """The power of two a conv feeding a GroupNorm folds into its weights (1 when naive): the
    GroupNorm then takes its statistics on scaled values and uses ``eps * scale^2``
    (``group_norm_eps``), which gives the same output bit for bit in fp32 (a power of two scales
    the conv's products and sums, the mean, the squares and the square root exactly)."""
    return GROUP_NORM_SCALE if safe else 1.0


def group_norm_eps(eps: float, safe: bool = True) -> float:
    """The GroupNorm epsilon for inputs scaled by ``norm_input_scale``."""
    scale = norm_input_scale(safe)
    return eps * scale * scale
