"""Stages 3-4: ONNX -> TensorFlow SavedModel (onnx-tf) -> frozen NHWC GraphDef.

onnx-tf keeps ONNX's NCHW layout. The frozen graph wraps it in one transpose at each end, so every
.tflite this project ships takes and returns NHWC images, as phones and the AI Benchmark app do.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.files import atomic_path
from common.quiet import quiet_tensorflow


def to_tensorflow(src: str | Path, dest: str | Path) -> Path:
    """Convert an ONNX file to a SavedModel folder with onnx-tf."""
    import onnx

    quiet_tensorflow()
    from onnx_tf.backend import prepare

    model = onnx.load(str(src))
    with atomic_path(dest) as tmp, contextlib.redirect_stdout(io.StringIO()):
        prepare(model, logging_level="ERROR").export_graph(str(tmp))
    return Path(dest)


def load_saved_model_fn(path: str | Path) -> tuple[Callable, str, str]:
    """The serving function of a SavedModel with its single input and output names.

    The function keeps a reference to the loaded object (``fn.loaded``): its variables must stay
    alive, and a model that embeds this function must track them to save itself.
    """
    tf = quiet_tensorflow()
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["serving_default"]
    fn.loaded = loaded
    (input_name,) = fn.structured_input_signature[1].keys()
    (output_name,) = fn.structured_outputs.keys()
    return fn, input_name, output_name


def nchw_to_nhwc_function(saved_model: str | Path, input_shape_nhwc: tuple[int, ...]):
    """A tf.function taking NHWC that calls the NCHW onnx-tf graph between two transposes."""
    tf = quiet_tensorflow()
    fn, input_name, output_name = load_saved_model_fn(saved_model)

    @tf.function(input_signature=[tf.TensorSpec(input_shape_nhwc, tf.float32, name="input")])
    def nhwc(x):
        y = fn(**{input_name: tf.transpose(x, [0, 3, 1, 2])})[output_name]
        return tf.transpose(y, [0, 2, 3, 1])

    nhwc.loaded = fn.loaded
    return nhwc


def freeze(fn, dest: str | Path, output_names: tuple[str, ...] = ("output",)) -> tuple[Path, dict]:
    """Freeze a single-signature tf.function into a GraphDef .pb; return the path and its I/O.

    Outputs are renamed with identities so the TFLite converter (and a person reading the graph)
    find them under stable names; the returned dict maps names to static shapes.
    """
    tf = quiet_tensorflow()
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    spec = fn.input_signature
    @tf.function(input_signature=spec)
    def named(*args):
        result = fn(*args)
        result = result if isinstance(result, tuple | list) else (result,)
        return tuple(tf.identity(t, name=n) for t, n in zip(result, output_names, strict=True))

    frozen = convert_variables_to_constants_v2(named.get_concrete_function())
    graph_def = frozen.graph.as_graph_def()
    inputs = {s.name: [int(d) for d in s.shape] for s in spec}
    outputs = {
        n: [int(d) for d in t.shape] for n, t in zip(output_names, frozen.outputs, strict=True)
    }
    with atomic_path(dest) as tmp:
        tmp.write_bytes(graph_def.SerializeToString())
    return Path(dest), {"inputs": inputs, "outputs": outputs}


def run_frozen_graph(path: str | Path, inputs: dict[str, np.ndarray],
                     output_names: tuple[str, ...]) -> list[np.ndarray]:
    """Run a frozen GraphDef by tensor names, the way the TFLite converter will read it."""
    tf = quiet_tensorflow()
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(path).read_bytes())
    fn = tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    pruned = fn.prune([fn.graph.get_tensor_by_name(f"{n}:0") for n in inputs],
                      [fn.graph.get_tensor_by_name(f"{n}:0") for n in output_names])
    result = pruned(*[tf.constant(v, tf.float32) for v in inputs.values()])
    return [t.numpy() for t in result]
