"""Stage 4 of the fused model: TensorFlow DPT + the onnx-tf NAFNet in one NHWC tf.function.

The graph is the math of ``models.pipeline.BokehPipeline``, op for op: bilinear resizes with
half-pixel centres (TFLite RESIZE_BILINEAR), per-image min-max (REDUCE_MIN / REDUCE_MAX), concat,
NAFNet, clip. It returns the bokeh photo and the mask, so parity can check both.
"""

from __future__ import annotations

from pathlib import Path

from common.files import atomic_path
from common.quiet import quiet_tensorflow
from export.tf_stages import nchw_to_nhwc_function
from models.pipeline import MASK_EPS

OUTPUT_NAMES = ("bokeh", "mask")


def fused_function(keras_dpt, nafnet_saved_model: str | Path, height: int, width: int,
                   mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                   std: tuple[float, ...] = (0.5, 0.5, 0.5)):
    """photo ``[1,H,W,3]`` in [0,1] -> (bokeh ``[1,H,W,3]``, mask ``[1,H,W,1]``); the depth net
    reads the photo normalised with its own ``mean`` and ``std``."""
    tf = quiet_tensorflow()
    shift = tf.constant([[[[-m / s for m, s in zip(mean, std, strict=True)]]]], tf.float32)
    scale = tf.constant([[[[1.0 / s for s in std]]]], tf.float32)
    dpt_size = tuple(int(d) for d in keras_dpt.input_shape[1:3])
    nafnet = nchw_to_nhwc_function(nafnet_saved_model, (1, height, width, 4))

    def resize(x, size):
        if tuple(x.shape[1:3]) == tuple(size):
            return x
        return tf.compat.v1.image.resize_bilinear(x, size, align_corners=False,
                                                  half_pixel_centers=True)

    @tf.function(input_signature=[tf.TensorSpec([1, height, width, 3], tf.float32, name="photo")])
    def bokeh(photo):
        disparity = keras_dpt(resize(photo, dpt_size) * scale + shift)
        disparity = resize(disparity, (height, width))
        low = tf.reduce_min(disparity, axis=[1, 2, 3], keepdims=True)
        high = tf.reduce_max(disparity, axis=[1, 2, 3], keepdims=True)
        mask = (disparity - low) / tf.maximum(high - low, MASK_EPS)
        out = nafnet(tf.concat([photo, mask], axis=-1))
        return tf.clip_by_value(out, 0.0, 1.0), mask

    bokeh.keras_dpt, bokeh.nafnet = keras_dpt, nafnet  # keep both alive for saving
    return bokeh


def save_fused(fn, dest: str | Path) -> Path:
    """Write the fused tf.function as a SavedModel (serving signature: photo -> bokeh, mask)."""
    tf = quiet_tensorflow()
    module = tf.Module()
    module.dpt = fn.keras_dpt
    module.nafnet = fn.nafnet.loaded
    module.render = fn

    @tf.function(input_signature=fn.input_signature)
    def serve(photo):
        out, mask = fn(photo)
        return {OUTPUT_NAMES[0]: out, OUTPUT_NAMES[1]: mask}

    with atomic_path(dest) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
    return Path(dest)
