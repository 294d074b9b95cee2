"""Run a .tflite file on LiteRT's CPU or GPU accelerator, and judge whether the GPU can run it.

LiteRT 2.3's GPU accelerator is ML Drift over WebGPU (Dawn, ``libLiteRtWebGpuAccelerator.so``).
A machine without a GPU still gets a WebGPU adapter from SwiftShader, the software Vulkan device
the ``chromium`` package ships (``make setup-gpu``); Dawn refuses Mesa's lavapipe. SwiftShader has
no shader-f16, so it computes in fp32 where a phone GPU computes in fp16.

What this module relies on (measured with ai-edge-litert 2.3.0 and Debian 12's chromium 156
SwiftShader):

* The accelerator prints the ops it cannot take to the process's native stderr only ("Following
  operations are not supported by GPU delegate:" then one "OP: reason" line each); with the GPU
  alone it then refuses to compile. Python sees just ``is_fully_accelerated()``, so the op list is
  read from the stderr of a child process (or of file descriptor 2 while compiling here).
* LiteRT waits at most 2 minutes for one GPU inference ("Timed out waiting for future: 2m"); past
  that, reading the output fails with "Failed to lock custom tensor buffer" and the buffer stays
  locked for the life of the process. SwiftShader on one core needs about that long for NAFNet at
  1024x1536, so ``gpu_execution_verdict`` runs the GPU in a child process with its own timeout and
  turns every failure there (error, signal, timeout) into a "failed" verdict.

Besides ``common`` and third-party packages, only ``export.runner`` (the file check) is imported.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from export.runner import verify_tflite

ACCELERATORS = ("cpu", "gpu")
SWIFTSHADER_ICD = Path("/usr/lib/chromium/vk_swiftshader_icd.json")
ICD_DIRS = ("/etc/vulkan/icd.d", "/usr/share/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
SOFTWARE_ICDS = ("swiftshader", "lvp")  # ICD manifests that are not a hardware GPU
GPU_TIMEOUT_S = 600.0  # the child's wall-clock budget: compile, one inference, read-back
LITERT_GPU_WAIT_S = 120  # LiteRT's own limit on waiting for one GPU inference
SETUP_HINT = "install the software Vulkan device: make setup-gpu (apt-get install chromium)"
INPUTS_NOTE = "random uniform [0, 1), seed {seed}"

_UNSUPPORTED_HEADER = "Following operations are not supported by GPU delegate"
_OP_LINE = re.compile(r"^([A-Z][A-Z0-9_]*): (.+)$")
_COVERAGE_LINE = re.compile(r"operations will run on the (GPU|CPU)")
_LOG_LEVELS = {"INFO", "WARNING", "ERROR", "VERBOSE", "DEBUG", "FATAL"}
_ADAPTER_LINE = re.compile(r"Selected adapter: (.+)$", re.M)
_TIMEOUT_MARKS = ("Timed out waiting for future", "Failed to lock custom tensor buffer")
_STATUS = re.compile(r"\b(RESOURCE_EXHAUSTED|INVALID_ARGUMENT|INTERNAL|UNIMPLEMENTED|"
                     r"DEADLINE_EXCEEDED|FAILED_PRECONDITION|OUT_OF_RANGE|UNAVAILABLE|ABORTED|"
                     r"NOT_FOUND|UNKNOWN): (.*)$")
_BARE_ERROR = re.compile(r"ERROR: \[[^\]]*\]")
_CHILD_CODE = "import sys; from export.accelerator import _child_main; _child_main(sys.argv[1])"


class AcceleratorError(RuntimeError):
    """The GPU accelerator refused or failed a model; ``log`` keeps LiteRT's native log."""

    def __init__(self, message: str, log: str = "", seconds: dict | None = None):
        super().__init__(message)
        self.log = log
        self.seconds = seconds or {}  # compile / run seconds reached before it failed


# ---------------------------------------------------------------------------------------------
# The device


def use_software_vulkan() -> dict[str, str]:
    """Point Vulkan at SwiftShader when nothing else is chosen; return the variables it set.

    Sets ``VK_ICD_FILENAMES`` only if neither it nor ``VK_DRIVER_FILES`` is set, SwiftShader's
    manifest exists and no hardware ICD is installed (so a real GPU is never hidden), and
    ``XDG_RUNTIME_DIR`` to a private folder when unset (LiteRT runs without it; Chromium and
    vulkaninfo, used to read the adapter's limits, complain).
    """
    changed = {}
    chosen = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    if not chosen and SWIFTSHADER_ICD.is_file() and not _hardware_icds():
        changed["VK_ICD_FILENAMES"] = str(SWIFTSHADER_ICD)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime_dir = Path(tempfile.gettempdir()) / f"bokehlite-xdg-{os.getuid()}"
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        changed["XDG_RUNTIME_DIR"] = str(runtime_dir)
    os.environ.update(changed)
    return changed


def _hardware_icds() -> list[str]:
    found = []
    for folder in ICD_DIRS:
        with contextlib.suppress(OSError):
            found += [p.name for p in Path(folder).glob("*.json")
                      if not any(s in p.name.lower() for s in SOFTWARE_ICDS)]
    return found


def gpu_device(refresh: bool = False) -> tuple[bool, str]:
    """``(True, adapter description)`` when LiteRT's GPU accelerator finds a WebGPU adapter,
    else ``(False, why not)``. Probed once per Vulkan setting, in a child process (about 2 s)."""
    use_software_vulkan()
    if refresh:
        _probe_gpu.cache_clear()
    return _probe_gpu(os.environ.get("VK_ICD_FILENAMES", ""),
                      os.environ.get("VK_DRIVER_FILES", ""))


@functools.cache
def _probe_gpu(icd: str, driver_files: str) -> tuple[bool, str]:
    import ai_edge_litert

    library = Path(ai_edge_litert.__file__).parent / "libLiteRtWebGpuAccelerator.so"
    if not library.is_file():
        return False, f"LiteRT's GPU accelerator is not installed ({library.name} is missing)"
    with tempfile.TemporaryDirectory(prefix="bokehlite-probe-") as tmp:
        probe = Path(tmp) / "probe.tflite"
        probe.write_bytes(_probe_model())
        result, log, failure = _in_child({"mode": "compile", "path": str(probe), "accel": "gpu"},
                                         Path(tmp), timeout_s=120)
    adapter = _ADAPTER_LINE.search(log)
    if not failure and not result.get("error") and adapter:
        return True, adapter.group(1).strip()
    vulkan = icd or driver_files or "the system's Vulkan drivers"
    if "No adapters found" in log:
        why = f"Dawn found no WebGPU adapter with {vulkan}"
    else:
        why = failure or _error_summary(result.get("error", ""), log) or "unknown failure"
    if not (icd or driver_files) and not SWIFTSHADER_ICD.is_file():
        why += f"; {SETUP_HINT}"
    return False, why


@functools.cache
def _probe_model() -> bytes:
    """A 328-byte .tflite file: y = x + x on [1, 2, 2, 4] float32 (no TensorFlow needed)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    tensors = []
    for name in ("x", "y"):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 2, 2, 4], s.TensorType.FLOAT32, 0, name
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 0], [1]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    graph = s.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs = tensors, [op], [0], [1]
    model = s.ModelT()
    model.version, model.description = 3, "bokehlite GPU probe"
    model.buffers, model.operatorCodes, model.subgraphs = [s.BufferT()], [code], [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# ---------------------------------------------------------------------------------------------
# Compile and run, in this process


def compile_model(path: str | Path, accelerator: str = "cpu", *, cpu_fallback: bool = False,
                  threads: int = 1):
    """A LiteRT ``CompiledModel`` of ``path`` on ``accelerator`` (one of ACCELERATORS).

    "cpu" is XNNPACK with ``threads`` threads. "gpu" is the GPU accelerator alone, so a model
    it cannot take fully raises ``AcceleratorError("not fully accelerated: OPS")``; with
    ``cpu_fallback`` the rest runs on the CPU. A missing or bad file raises ``UserError``.
    """
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator as HA
    from ai_edge_litert.options import CpuOptions, Options

    path = verify_tflite(path)
    _check_accelerator(accelerator)
    accel = HA.CPU
    if accelerator == "gpu":
        use_software_vulkan()
        accel = HA.GPU | HA.CPU if cpu_fallback else HA.GPU
    options = Options(hardware_accelerators=accel, cpu_options=CpuOptions(num_threads=threads))
    with _native_stderr() as log:
        try:
            model = CompiledModel.from_file(str(path), options=options)
            signature = _signature(model)
            model.get_input_tensor_details(signature)  # allocates: lazy failures surface here
            model.get_output_tensor_details(signature)
            return model
        except RuntimeError as exc:
            error = str(exc)
    if accelerator == "cpu" or "Failed to load model" in error:
        raise UserError(f"{path}: LiteRT cannot run it ({_error_summary(error, log.text)})")
    raise AcceleratorError(_gpu_failure(error, log.text), log.text)


def run_compiled(model, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray],
                 accelerator: str = "cpu", *, threads: int = 1) -> dict[str, np.ndarray]:
    """Run ``model`` (a path, compiled on ``accelerator``, or a ``CompiledModel``) once on
    ``inputs`` (in signature order, or by name); return its outputs by name.

    A GPU run here has no protection against LiteRT's failures; ``gpu_execution_verdict`` has.
    """
    if isinstance(model, str | os.PathLike):
        model = compile_model(model, accelerator, threads=threads)
    return _run(model, _feeds(model, inputs))


def _run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    signature = _signature(model)
    outputs = model.get_output_tensor_details(signature)
    in_buffers, out_buffers = _buffers(model, signature, outputs)
    try:
        for name, array in feeds.items():
            in_buffers[name].write(array)
        model.run_by_name(signature, in_buffers, out_buffers)
        results = {}
        for name, detail in outputs.items():
            shape, dtype = detail["shape"], np.dtype(detail["dtype"])
            flat = out_buffers[name].read(int(np.prod(shape)), dtype)
            results[name] = flat.reshape(shape)
        return results
    except RuntimeError:
        # A buffer whose read timed out stays locked, and destroying it kills the process
        # with SIGSEGV (measured): drop it untouched, the next run gets new buffers.
        del model._bokehlite_buffers
        raise


def _buffers(model, signature: str, outputs: dict) -> tuple[dict, dict]:
    """The model's input and output buffers, made once per compiled model and reused: the GPU
    accelerator's buffers are not freed when destroyed (host memory grows by their size on
    every new set, measured), so a set per run would leak."""
    cached = getattr(model, "_bokehlite_buffers", None)
    if cached is None:
        inputs = model.get_input_tensor_details(signature)
        cached = ({n: model.create_input_buffer_by_name(signature, n) for n in inputs},
                  {n: model.create_output_buffer_by_name(signature, n) for n in outputs})
        model._bokehlite_buffers = cached
    return cached


def _signature(model) -> str:
    return next(iter(model.get_signature_list()))


def _feeds(model, inputs, seed: int = 0) -> dict[str, np.ndarray]:
    """``inputs`` checked against the model's signature, by name; ``None``: random [0, 1)."""
    details = model.get_input_tensor_details(_signature(model))
    names = list(details)
    if inputs is None:
        rng = np.random.default_rng(seed)
        return {n: _random(rng, details[n]) for n in names}
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(names))
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise UserError(f"inputs {sorted(inputs)} do not match the model's inputs {names}")
        given = [inputs[n] for n in names]
    else:
        given = list(inputs)
        if len(given) != len(names):
            raise UserError(f"{len(given)} inputs given; the model takes {len(names)}: {names}")
    feeds = {}
    for name, array in zip(names, given, strict=True):
        shape, dtype = list(details[name]["shape"]), np.dtype(details[name]["dtype"])
        array = np.asarray(array)
        if list(array.shape) != shape:
            raise UserError(f"input {name!r} has shape {list(array.shape)}; the model takes "
                            f"{shape}")
        if not np.can_cast(array.dtype, dtype, "same_kind"):
            raise UserError(f"input {name!r} is {array.dtype}; the model takes {dtype}")
        feeds[name] = np.ascontiguousarray(array, dtype=dtype)
    return feeds


def _random(rng: np.random.Generator, detail: dict) -> np.ndarray:
    shape, dtype = detail["shape"], np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(dtype)
    return np.zeros(shape, dtype)


def _check_accelerator(accelerator: str) -> None:
    if accelerator not in ACCELERATORS:
        raise UserError(f"unknown accelerator {accelerator!r}; choose from {ACCELERATORS}")


# ---------------------------------------------------------------------------------------------
# Verdicts, with the GPU in a child process


def fully_accelerated(path: str | Path, *, timeout_s: float = GPU_TIMEOUT_S
                      ) -> tuple[bool, list[str]]:
    """``(True, [])`` when the GPU accelerator takes every op of ``path``; else ``(False,
    ["OP: reason", ...])`` for the ops that fall back to the CPU, or ``(False, [why])`` when
    the GPU could not be asked (no device, a failure)."""
    path = verify_tflite(path)
    ok, device = gpu_device()
    if not ok:
        return False, [f"no GPU device: {device}"]
    with tempfile.TemporaryDirectory(prefix="bokehlite-gpu-") as tmp:
        result, log, failure = _in_child(
            {"mode": "compile", "path": str(path.resolve()), "accel": "gpu+cpu"}, Path(tmp),
            timeout_s)
    if failure or result.get("error"):
        return False, [failure or _error_summary(result["error"], log)]
    ops = unsupported_ops(log)
    if result.get("fully_accelerated") and not ops:
        return True, []
    return False, ops or ["LiteRT reports the model not fully accelerated (no op list)"]


def gpu_execution_verdict(path: str | Path, inputs=None, *, timeout_s: float = GPU_TIMEOUT_S,
                          seed: int = 0) -> dict:
    """Run ``path`` once on the GPU accelerator alone (child process) and once on the CPU;
    never raises for anything the GPU does. Returns one of

    * ``{"status": "ran", "fully_accelerated": True, "max_abs_vs_cpu": float, ...}``
    * ``{"status": "failed", "reason": "not fully accelerated: OPS" | "...", ...}``
    * ``{"status": "not tried", "reason": "no GPU device: ..."}``

    ``inputs`` as for ``run_compiled``; ``None``: random uniform [0, 1) from ``seed``. A missing
    or bad file, or inputs that do not fit, raise ``UserError``.
    """
    path = verify_tflite(path)
    ok, device = gpu_device()
    if not ok:
        return {"status": "not tried", "reason": f"no GPU device: {device}"}
    try:
        cpu_model = compile_model(path, "cpu")
    except UserError as exc:  # a whole file LiteRT's CPU cannot run: no reference
        return {"status": "failed", "device": device,
                "reason": f"no CPU reference: {str(exc).removeprefix(f'{path}: ')}"}
    feeds = _feeds(cpu_model, inputs, seed)
    start = time.perf_counter()
    try:
        reference = _run(cpu_model, feeds)
    except RuntimeError as exc:
        return {"status": "failed", "device": device,
                "reason": f"no CPU reference: LiteRT's CPU failed ({_error_summary(str(exc), '')})"}
    cpu_s = time.perf_counter() - start
    base = {"device": device, "inputs": "given" if inputs is not None
            else INPUTS_NOTE.format(seed=seed), "cpu_seconds": round(cpu_s, 2)}
    try:
        outputs, seconds = _gpu_outputs(path, feeds, timeout_s)
    except AcceleratorError as exc:
        return {"status": "failed", "reason": str(exc), **base, **exc.seconds}
    diffs = {}
    for name, ref in reference.items():
        got = outputs.get(name)
        if got is None or got.shape != ref.shape:
            return {**base, **seconds, "status": "failed",
                    "reason": f"GPU output {name!r} missing or of another shape"}
        bad = int(np.size(got) - np.isfinite(got).sum())
        if bad:
            return {**base, **seconds, "status": "failed",
                    "reason": f"GPU output {name!r} has {bad} NaN/Inf values"}
        diffs[name] = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    return {"status": "ran", "max_abs_vs_cpu": max(diffs.values(), default=0.0),
            "max_abs_by_output": diffs, **base, **seconds}


def _gpu_outputs(path: Path, feeds: dict[str, np.ndarray], timeout_s: float
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """One inference on the GPU accelerator alone, in a child process: outputs by name and the
    compile/run seconds; ``AcceleratorError`` with the reason when the GPU could not run it."""
    with tempfile.TemporaryDirectory(prefix="bokehlite-gpu-") as tmp:
        np.savez(Path(tmp) / "inputs.npz", **feeds)
        result, log, failure = _in_child(
            {"mode": "run", "path": str(path.resolve()), "accel": "gpu"}, Path(tmp), timeout_s)
        outputs_file = Path(tmp) / "outputs.npz"
        outputs = None
        if not failure and not result.get("error") and outputs_file.is_file():
            with np.load(outputs_file) as data:
                outputs = {n: data[n] for n in data.files}
    seconds = {k: result[k] for k in ("compile_seconds", "run_seconds") if k in result}
    if outputs is None:
        reason = failure or _gpu_failure(result.get("error", ""), log)
        if failure and _TIMEOUT_MARKS[0] not in log:
            reason += f" (stage reached: {result.get('stage', 'start')})"
        raise AcceleratorError(reason, log, seconds)
    return outputs, {**seconds, "fully_accelerated": bool(result.get("fully_accelerated"))}


def run_on_gpu(path: str | Path, feeds: Mapping[str, np.ndarray], *,
               timeout_s: float = GPU_TIMEOUT_S) -> dict[str, np.ndarray]:
    """Outputs of one inference of ``path`` on the GPU accelerator alone (no CPU fallback), in a
    child process so a crash or a hang of the native code cannot take this one down."""
    path = verify_tflite(path)
    ok, device = gpu_device()
    if not ok:
        raise UserError(f"no GPU device: {device}; {SETUP_HINT}")
    return _gpu_outputs(path, dict(feeds), timeout_s)[0]


def unsupported_ops(log: str) -> list[str]:
    """``["OP: reason", ...]`` from the GPU accelerator's native log, in its order, deduplicated."""
    ops, inside = [], False
    for line in log.splitlines():
        line = line.strip()
        if _UNSUPPORTED_HEADER in line:
            inside = True
        elif inside and _COVERAGE_LINE.search(line):
            inside = False
        elif inside and (m := _OP_LINE.match(line)) and m.group(1) not in _LOG_LEVELS:
            entry = f"{m.group(1)}: {m.group(2).strip()}"
            if entry not in ops:
                ops.append(entry)
    return ops


def _gpu_failure(error: str, log: str) -> str:
    """One line saying why the GPU accelerator failed, from the exception and native log."""
    if ops := unsupported_ops(log):
        names = ", ".join(dict.fromkeys(op.split(":")[0] for op in ops))
        return f"not fully accelerated: {names} ({'; '.join(ops)})"
    if "No adapters found" in log:
        return "no GPU device: Dawn found no WebGPU adapter"
    summary = _error_summary(error, log)
    if any(mark in log or mark in error for mark in _TIMEOUT_MARKS):
        summary += (f" -- LiteRT waits at most {LITERT_GPU_WAIT_S} s for one GPU inference and "
                    "this device took longer (a software GPU computes on the CPU)")
    return summary


def _error_summary(error: str, log: str) -> str:
    """The most telling error line: the native log's last status error (RESOURCE_EXHAUSTED: ...,
    with its continuation lines), else its last ERROR line, else the exception's last line."""
    flex = ("needs Flex (Select TF) ops, which neither the GPU nor LiteRT's own CPU runtime "
            "has: " if "Select TensorFlow op(s)" in log else "")
    if statuses := _native_statuses(log):
        return flex + statuses[-1]
    errors = [ln.split("]", 1)[1] if ln.startswith("E0000") else ln.removeprefix("ERROR:")
              for ln in log.splitlines()
              if ln.startswith(("ERROR", "E0000")) and "openvino" not in ln.lower()
              and "Select TensorFlow op(s)" not in ln and not _BARE_ERROR.fullmatch(ln.strip())]
    if errors := [e.strip() for e in errors if e.strip()]:
        return flex + errors[-1]
    lines = [ln.strip(" └") for ln in error.splitlines() if ln.strip(" └")]
    specific = [ln for ln in lines if not _BARE_ERROR.fullmatch(ln)]
    return flex + (specific or lines or [""])[-1]


def _native_statuses(log: str) -> list[str]:
    """Status errors in LiteRT's native log ("RESOURCE_EXHAUSTED: Requested allocation ..."),
    each with the "└ ..." lines that follow a bare "ERROR: [file:line]" message."""
    found, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if not (m := _STATUS.search(line)):
            continue
        text = m.group(2).strip()
        for follow in lines[i + 1:i + 4]:
            if not _BARE_ERROR.fullmatch(text.strip(" └")) or not follow.startswith("└"):
                break
            text = follow.strip(" └")
        if "No adapters found" not in text:
            found.append(f"{m.group(1)}: {text}")
    return found


@contextlib.contextmanager
def _native_stderr() -> Iterator[_Captured]:
    """Capture file descriptor 2 (where LiteRT's C++ logs go) for the ``with`` block."""
    captured = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace")


class _Captured:
    text = ""


def _in_child(job: dict, folder: Path, timeout_s: float) -> tuple[dict, str, str | None]:
    """Run ``job`` in a child Python (``_child_main``); return its result, its native log and a
    failure line when it died, was killed or timed out (else None)."""
    job = {**job, "folder": str(folder)}
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    failure = None
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, str(job_file)], env=env,
                              capture_output=True, timeout=timeout_s, check=False)
        log = proc.stderr.decode(errors="replace")
        if proc.returncode < 0:
            failure = f"GPU process killed by {_signal_name(-proc.returncode)}"
        elif proc.returncode:
            failure = f"GPU process exited with status {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        log = (exc.stderr or b"").decode(errors="replace")
        failure = f"GPU process timed out after {timeout_s:g} s"
    result_file = folder / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if failure and (line := _error_summary("", log)):
        failure += f"; last error: {line}"
    return result, log, failure


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _child_main(job_file: str) -> None:
    """The child's side of ``_in_child``: compile (and run) one model, write result.json."""
    job = json.loads(Path(job_file).read_text())
    folder = Path(job["folder"])
    result: dict = {"stage": "start"}

    def save() -> None:
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(folder / "result.json")

    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator as HA

        accel = {"gpu": HA.GPU, "gpu+cpu": HA.GPU | HA.CPU}[job["accel"]]
        start = time.perf_counter()
        model = CompiledModel.from_file(job["path"], hardware_accel=accel)
        result.update(stage="compiled", fully_accelerated=model.is_fully_accelerated(),
                      compile_seconds=round(time.perf_counter() - start, 2))
        save()
        if job["mode"] == "run":
            with np.load(folder / "inputs.npz") as data:
                feeds = {n: data[n] for n in data.files}
            result["stage"] = "running"
            save()
            start = time.perf_counter()
            outputs = _run(model, feeds)
            result["run_seconds"] = round(time.perf_counter() - start, 2)
            np.savez(folder / "outputs.npz", **outputs)
            result["stage"] = "done"
    except Exception as exc:  # the parent turns it into a verdict
        result["error"] = f"{type(exc).__name__}: {exc}"
    save()
    sys.stderr.flush()
