"""Running a .tflite: the one place every command opens, verifies and invokes a TFLite model.

Two interpreters run the same file: TensorFlow's own (the converter's version, 2.15) and LiteRT
(the ai-edge-litert package), the runtime TFLite ships as today, with the newer XNNPACK that
phone apps bundle. Results match; speed and delegate coverage differ (docs/benchmarks.md).

TF 2.15's interpreter does not verify the flatbuffer: a truncated or corrupt file crashes the
process. Every file is therefore verified first, by LiteRT's verifier, and refused in one line.
"""

from __future__ import annotations

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
    """``path`` if it is a well-formed TFLite flatbuffer, else a ``UserError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such TFLite file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return path
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise UserError(f"{path}: not a readable TFLite model (no TFL3 flatbuffer identifier)")
    from ai_edge_litert.interpreter import Interpreter

    try:  # LiteRT's loader runs the flatbuffer verifier and raises instead of crashing
        Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        if "unresolved" not in reason.lower():  # Flex ops LiteRT lacks: well-formed, go on
            raise UserError(f"{path}: not a readable TFLite model: corrupt or truncated "
                            f"({reason})") from None
    _VERIFIED[key] = None
    return path


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
