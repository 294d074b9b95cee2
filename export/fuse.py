"""Stage 4 of the fused model: TensorFlow DPT + the onnx-tf NAFNet in one NHWC tf.function.

The graph is the math of ``models.pipeline.BokehPipeline``, op for op: bilinear resizes with
half-pixel centres (TFLite RESIZE_BILINEAR), per-image min-max (REDUCE_MIN / REDUCE_MAX), concat,
NAFNet, clip. It returns the bokeh photo and the mask, so parity can check both.

With ``controls`` the same graph also takes ``focus`` and ``strength`` (``[1,1,1,1]`` each,
clamped to [0, 1] inside the graph) and applies them as ``BokehPipeline`` does: NAFNet reads
``min(mask + (1 - focus), (1 + focus) - mask)`` (= ``1 - |mask - focus|``) and the output is
``strength * bokeh + (1 - strength) * photo``; at (1, 1) both are exact identities, so the
controlled model computes the plain one's numbers (docs/design.md, section 11).
"""

from __future__ import annotations

from pathlib import Path

from common.files import atomic_path
from common.quiet import quiet_tensorflow
from export.tf_stages import nchw_to_nhwc_function
from models.pipeline import CONTROLS, MASK_EPS

OUTPUT_NAMES = ("bokeh", "mask")
CONTROL_NAMES = tuple(CONTROLS)  # ("focus", "strength"): inputs after the photo, [1,1,1,1] each


def fused_function(keras_depth, nafnet_saved_model: str | Path, height: int, width: int,
                   mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                   std: tuple[float, ...] = (0.5, 0.5, 0.5), controls: bool = False):
    """photo ``[1,H,W,3]`` in [0,1] -> (bokeh ``[1,H,W,3]``, mask ``[1,H,W,1]``); the depth net
    reads the photo normalised with its own ``mean`` and ``std``. With ``controls`` the function
    takes (photo, focus, strength), the two controls ``[1,1,1,1]``."""
    tf = quiet_tensorflow()
    shift = tf.constant([[[[-m / s for m, s in zip(mean, std, strict=True)]]]], tf.float32)
    scale = tf.constant([[[[1.0 / s for s in std]]]], tf.float32)
    depth_size = tuple(int(d) for d in keras_depth.input_shape[1:3])
    nafnet = nchw_to_nhwc_function(nafnet_saved_model, (1, height, width, 4))

    def resize(x, size):
        if tuple(x.shape[1:3]) == tuple(size):
            return x
        return tf.compat.v1.image.resize_bilinear(x, size, align_corners=False,
                                                  half_pixel_centers=True)

    def render(photo, focus=None, strength=None):
        disparity = keras_depth(resize(photo, depth_size) * scale + shift)
        disparity = resize(disparity, (height, width))
        low = tf.reduce_min(disparity, axis=[1, 2, 3], keepdims=True)
        high = tf.reduce_max(disparity, axis=[1, 2, 3], keepdims=True)
        mask = (disparity - low) / tf.maximum(high - low, MASK_EPS)
        guide = mask
        if focus is not None:
            focus = tf.clip_by_value(focus, 0.0, 1.0)
            guide = tf.minimum(mask + (1.0 - focus), (1.0 + focus) - mask)
        out = tf.clip_by_value(nafnet(tf.concat([photo, guide], axis=-1)), 0.0, 1.0)
        if strength is not None:
            strength = tf.clip_by_value(strength, 0.0, 1.0)
            out = strength * out + (1.0 - strength) * photo
        return out, mask

    photo_spec = tf.TensorSpec([1, height, width, 3], tf.float32, name="photo")
    if controls:
        bokeh = tf.function(render, input_signature=[photo_spec] + [
            tf.TensorSpec([1, 1, 1, 1], tf.float32, name=n) for n in CONTROL_NAMES])
    else:
        bokeh = tf.function(lambda photo: render(photo), input_signature=[photo_spec])

    bokeh.keras_depth, bokeh.nafnet = keras_depth, nafnet  # keep both alive for saving
    return bokeh


def save_fused(fn, dest: str | Path) -> Path:
    """Write the fused tf.function as a SavedModel (serving signature: photo [, focus,
    strength] -> bokeh, mask)."""
    tf = quiet_tensorflow()
    module = tf.Module()
    module.depth = fn.keras_depth
    module.nafnet = fn.nafnet.loaded
    module.render = fn

    @tf.function(input_signature=fn.input_signature)
    def serve(*inputs):
        out, mask = fn(*inputs)
        return {OUTPUT_NAMES[0]: out, OUTPUT_NAMES[1]: mask}

    with atomic_path(dest) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
    return Path(dest)
