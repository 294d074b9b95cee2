"""Tiny .tflite files the tools must refuse: one needing a Flex op, one with a dynamic shape.

Not a test module: test_tools_*.py import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from common.files import write_json


def _convert(fn, dest: Path, flex: bool = False) -> Path:
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if flex else [])
    dest.write_bytes(converter.convert())
    return dest


def fake_manifest(tflite: Path, shape: list[int]) -> Path:
    """The manifest entries the tools read, as the export writes them: inputs and outputs as the
    file has them (``shape`` stands in when the file cannot be read)."""
    import numpy as np

    from common.errors import UserError
    from export.runner import make_interpreter

    io = {"dtype": "float32", "layout": "NHWC", "range": [0.0, 1.0]}
    try:
        interpreter = make_interpreter(tflite, allocate=False)
        inputs, outputs = ([{"name": d["name"], "shape": [int(x) for x in d["shape"]], **io,
                             "dtype": np.dtype(d["dtype"]).name} for d in details]
                           for details in (interpreter.get_input_details(),
                                           interpreter.get_output_details()))
    except UserError:
        inputs = [{"name": "photo", "shape": shape, **io}]
        outputs = [{"name": "bokeh", "shape": shape, **io}]
    return write_json(tflite.with_suffix(".manifest.json"), {
        "model": "bokeh", "variant": "fp16", "stages": [], "report": "report.json",
        "tolerance": {outputs[0]["name"]: {"min_psnr": 45.0}},
        "inputs": inputs, "outputs": outputs,
    })


def flex_tflite(folder: Path) -> Path:
    """[1,8,8,3] in; Cumprod has no TFLite builtin, so the file needs the Flex delegate."""
    from common.quiet import quiet_tensorflow

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
    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32, name="photo")])
    def fn(photo):
        return {"bokeh": photo * 0.5, "mask": tf.reduce_mean(photo, axis=-1, keepdims=True)}

    path = _convert(fn, folder / "dynamic_fp16.tflite")
    fake_manifest(path, [1, 1, 1, 3])
    return path
