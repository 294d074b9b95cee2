"""Tiny .tflite files the tools must refuse: one needing a Flex op, one with a dynamic shape.

Not a test module: test_tools_*.py import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from common.files import write_json


def _convert(fn, dest: Path, flex: bool = False) -> Path:
    from export.tf_stages import quiet_tensorflow

    tf = quiet_tensorflow()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if flex else [])
    dest.write_bytes(converter.convert())
    return dest


def fake_manifest(tflite: Path, shape: list[int]) -> Path:
    """The few manifest entries the tools read, as bokeh-export would write them."""
    io = {"shape": shape, "dtype": "float32", "layout": "NHWC", "range": [0.0, 1.0]}
    return write_json(tflite.with_suffix(".manifest.json"), {
        "model": "bokeh", "variant": "fp16", "stages": [], "report": "report.json",
        "inputs": [{"name": "photo", **io}],
        "outputs": [{"name": "bokeh", **io}, {"name": "mask", **{**io, "shape": shape[:3] + [1]}}],
    })


def flex_tflite(folder: Path) -> Path:
    """[1,8,8,3] in; Cumprod has no TFLite builtin, so the file needs the Flex delegate."""
    from export.tf_stages import quiet_tensorflow

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32, name="photo")])
    def fn(photo):
        return {"bokeh": tf.math.cumprod(photo, axis=1) * tf.raw_ops.Atan2(y=photo, x=photo + 1.0),
                "mask": tf.reduce_mean(photo, axis=-1, keepdims=True)}

    path = _convert(fn, folder / "flex_fp16.tflite", flex=True)
    fake_manifest(path, [1, 8, 8, 3])
    return path


def dynamic_tflite(folder: Path) -> Path:
    """Builtin ops only, but height and width are dynamic ([1,-1,-1,3])."""
    from export.tf_stages import quiet_tensorflow

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32, name="photo")])
    def fn(photo):
        return {"bokeh": photo * 0.5, "mask": tf.reduce_mean(photo, axis=-1, keepdims=True)}

    path = _convert(fn, folder / "dynamic_fp16.tflite")
    fake_manifest(path, [1, 1, 1, 3])
    return path
