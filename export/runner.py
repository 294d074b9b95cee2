"""Running a .tflite: the one place every command opens, verifies and invokes a TFLite model.

Two interpreters run the same file: TensorFlow's own (the converter's version, 2.15) and LiteRT
(the ai-edge-litert package), the runtime TFLite ships as today, with the newer XNNPACK that
phone apps bundle. Results match; speed and delegate coverage differ (docs/benchmarks.md).

TF 2.15's interpreter does not verify the flatbuffer: a truncated or corrupt file crashes the
process. Every file is therefore verified first, by LiteRT's verifier, and refused in one line.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.quiet import quiet_tensorflow

RUNTIMES = ("tensorflow", "litert")
_VERIFIED: dict[tuple[str, int, int], None] = {}



def runtime_label(runtime: str) -> str:
    """A table label naming the interpreter and its version."""
    if runtime == "litert":
        from importlib.metadata import version

        return f"LiteRT {version('ai-edge-litert')}"
    return f"TF {quiet_tensorflow().__version__} interpreter"


def verify_tflite(path: str | Path) -> Path:
    """``path`` if it is a whole, well-formed TFLite flatbuffer, else a ``UserError`` naming it.

    Neither TF 2.15's interpreter nor LiteRT's CompiledModel verifies what it loads: a truncated
    file kills the process (SIGSEGV, measured). Every table and vector they follow is read here
    first, where a bad offset only raises.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such TFLite file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UserError(f"{path}: not a readable TFLite model (not a TFLite model: no TFL3 "
                        "flatbuffer identifier)")
    if problem := _flatbuffer_problem(data):
        raise UserError(f"{path}: not a readable TFLite model (broken TFLite model: {problem})")
    _VERIFIED[key] = None
    return path


def _flatbuffer_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole TFLite flatbuffer, or None. LiteRT does not verify what it
    loads: a truncated file kills the process with SIGSEGV (measured, CPU and GPU alike), so
    every table and vector it will follow is read here first, where a bad offset only raises."""
    from ai_edge_litert import schema_py_generated as s

    try:
        model = s.Model.GetRootAs(data, 0)
        n_codes, n_buffers = model.OperatorCodesLength(), model.BuffersLength()
        for i in range(n_codes):
            model.OperatorCodes(i).BuiltinCode()
        for i in range(n_buffers):
            buffer = model.Buffers(i)
            if buffer.Offset() > 1 and buffer.Offset() + buffer.Size() > len(data):
                return f"buffer {i} ends past the end of the file"
            if not buffer.DataIsNone():
                buffer.DataAsNumpy()
        if not model.SubgraphsLength():
            return "no subgraph"
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            n_tensors = graph.TensorsLength()
            for t in range(n_tensors):
                tensor = graph.Tensors(t)
                if not tensor.ShapeIsNone():
                    tensor.ShapeAsNumpy()
                if not 0 <= tensor.Buffer() < max(n_buffers, 1):
                    return f"tensor {t} names buffer {tensor.Buffer()} of {n_buffers}"
            indices = [graph.InputsAsNumpy(), graph.OutputsAsNumpy()]
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                if not 0 <= op.OpcodeIndex() < n_codes:
                    return f"operator {o} names op code {op.OpcodeIndex()} of {n_codes}"
                indices += [op.InputsAsNumpy(), op.OutputsAsNumpy()]
            for index in indices:
                if isinstance(index, np.ndarray) and index.size and (
                        index.min() < -1 or index.max() >= n_tensors):
                    return f"subgraph {g} names a tensor outside its {n_tensors}"
    except (IndexError, ValueError, TypeError, struct.error) as exc:
        return (f"truncated or corrupt flatbuffer: {type(exc).__name__} while reading it, "
                f"the file has {len(data)} bytes")
    return None


def make_interpreter(path: str | Path, threads: int | None = None, xnnpack: bool = True,
                     runtime: str = "tensorflow", allocate: bool = True):
    """A verified interpreter of ``runtime`` (see RUNTIMES), XNNPACK on or off."""
    verify_tflite(path)
    if runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    elif runtime == "tensorflow":
        tf = quiet_tensorflow()
        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    else:
        raise UserError(f"unknown TFLite runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    resolver = (OpResolverType.AUTO if xnnpack
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter = Interpreter(model_path=str(path), num_threads=threads,
                              experimental_op_resolver_type=resolver)
    if allocate:
        interpreter.allocate_tensors()
    return interpreter


class TFLiteRunner:
    """One model ready to run: arrays (model order, or by input name) in, outputs by name out."""

    def __init__(self, path: str | Path, threads: int | None = None, xnnpack: bool = True,
                 runtime: str = "tensorflow"):
        self.path = Path(path)
        self.interpreter = make_interpreter(path, threads, xnnpack, runtime)
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    def __call__(self, *arrays: np.ndarray, **named: np.ndarray) -> dict[str, np.ndarray]:
        values = _by_input(self.inputs, arrays, named, self.path)
        for detail, value in zip(self.inputs, values, strict=True):
            self.interpreter.set_tensor(detail["index"], np.asarray(value, detail["dtype"]))
        self.interpreter.invoke()
        return {d["name"]: self.interpreter.get_tensor(d["index"]).copy() for d in self.outputs}


def _by_input(details: list[dict], arrays: Sequence[np.ndarray], named: Mapping[str, np.ndarray],
              path: Path) -> list[np.ndarray]:
    """Inputs in the model's order, checked against its names and shapes."""
    names = [d["name"] for d in details]
    if named:
        if arrays or set(named) != set(names):
            raise UserError(f"{path}: takes inputs {names}, given {sorted(named)}")
        arrays = [named[n] for n in names]
    if len(arrays) != len(details):
        raise UserError(f"{path}: takes {len(details)} inputs {names}, given {len(arrays)}")
    for d, a in zip(details, arrays, strict=True):
        if tuple(np.shape(a)) != tuple(int(s) for s in d["shape"]):
            raise UserError(f"{path}: input {d['name']!r} is {list(d['shape'])}, given "
                            f"{list(np.shape(a))}")
    return list(arrays)


def run_tflite(path: str | Path, *arrays: np.ndarray, threads: int | None = None,
               xnnpack: bool = True, runtime: str = "tensorflow",
               **named: np.ndarray) -> dict[str, np.ndarray]:
    """One forward pass: outputs by name."""
    return TFLiteRunner(path, threads, xnnpack, runtime)(*arrays, **named)
