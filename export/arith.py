"""An op-by-op evaluator of a .tflite under named arithmetic policies (docs/design.md, section 12).

A phone GPU (the TFLite GPU delegate, LiteRT's ML Drift) with precision loss allowed stores and
computes activations in fp16 whatever dtype the file has; nothing on this machine computes that
way (XNNPACK and SwiftShader compute in fp32). This module runs the file's own graph, read from
its flatbuffer with TensorFlow's schema module and independent of TFLite's kernels, in numpy:

- ``fp32``: float32 storage and math; matches LiteRT's CPU run (its self-check, tested);
- ``fp16``: every float tensor stored as fp16 (overflow -> inf), constants too; elementwise math
  rounded to fp16 after each operation; reductions summed in fp16 (``_sum16``); CONV_2D,
  DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED and BATCH_MATMUL accumulated in fp32 and
  stored as fp16 (LiteRT's fp16 storage with fp32 accumulation);
- ``fp16-acc16``: the same with those convolutions and matmuls accumulated in fp16 as well
  (``_matmul_acc16``), the worst case of older delegates.

Every op kind the project's float exports contain is implemented; any other kind is an error
naming it, never a silent skip. Quantized (int8) tensors are refused: the policy is about float
files (fp32, and fp16 files whose weights come through DEQUANTIZE).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from export.runner import verify_tflite

POLICIES = ("fp32", "fp16", "fp16-acc16")
FP16_MAX = 65504.0
# Work-group lanes of a GPU reduction: TFLite's GPU reduce kernel (delegates/gpu/common/tasks/
# reduce.cc) uses 64 threads a work group on current Mali GPUs, each summing a strided share.
REDUCE_LANES = 64
# fp16-acc16: products are summed exactly (fp32) in blocks of this many terms, each block rounded
# to fp16 and added to an fp16 accumulator, block after block (``_matmul_acc16``).
ACC16_BLOCK = 32
# fp16 verdict: PSNR floors (dB) per output against the same file in fp32 (issue 19's targets);
# an output not named here gets the default.
FP16_MIN_PSNR = {"mask": 35.0}
FP16_DEFAULT_MIN_PSNR = 40.0
WORST_OPS = 5

_F32 = np.float32
_F16 = np.float16
# TFLite schema enums (schema.fbs): ActivationFunctionType, Padding, TensorType.
_ACTIVATIONS = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}
_INT_TYPES = {2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
              10: np.float64, 12: np.uint64, 15: np.uint32, 16: np.uint16}


@dataclass
class OpRecord:
    """One op of a run: what it is, the ranges it read and wrote, and (with a reference run)
    how far its output is from the reference and how many dB it lost itself."""

    index: int
    name: str
    kind: str
    input_ranges: list[list[float] | None]
    output_range: list[float]
    nonfinite: int
    psnr: float | None = None
    db_lost: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None or k == "psnr"}


@dataclass
class ArithmeticRun:
    """The outputs of one run (float32, by the model's output names) and its per-op records."""

    tflite: str
    policy: str
    outputs: dict[str, np.ndarray]
    ops: list[OpRecord]
    seconds: float
    reference_policy: str | None = None
    reference_outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def first_nonfinite(self) -> OpRecord | None:
        """The first op (in execution order) whose output holds an inf or a NaN."""
        return next((op for op in self.ops if op.nonfinite), None)


# --- reading the flatbuffer ---------------------------------------------------------------------

@dataclass
class _Graph:
    tensors: list
    operators: list
    kinds: list[str]
    inputs: list[int]
    outputs: list[int]
    constants: dict[int, np.ndarray]


def _schema():
    from common.quiet import quiet_tensorflow

    quiet_tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _read_graph(path: Path) -> _Graph:
    """Subgraph 0 of ``path`` as objects, with its constant tensors as numpy arrays."""
    schema = _schema()
    data = path.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    if len(model.subgraphs) != 1:
        raise UserError(f"{path}: has {len(model.subgraphs)} subgraphs; the arithmetic "
                        "evaluator runs single-graph models only")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    kinds = []
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        kinds.append(code.customCode.decode() if builtin == schema.BuiltinOperator.CUSTOM
                     else names.get(builtin, f"BUILTIN_{builtin}"))
    graph = model.subgraphs[0]
    constants = {}
    for i, tensor in enumerate(graph.tensors):
        buffer = model.buffers[tensor.buffer]
        if buffer.offset > 1:
            raw = np.frombuffer(data, np.uint8, buffer.size, buffer.offset)
        elif buffer.data is not None and len(buffer.data):
            raw = np.asarray(buffer.data, np.uint8)
        else:
            continue
        dtype = _F32 if tensor.type == 0 else _F16 if tensor.type == 1 else _INT_TYPES.get(
            tensor.type)
        if dtype is None:
            raise UserError(f"{path}: tensor {tensor.name.decode()!r} has TFLite type "
                            f"{tensor.type}, which the arithmetic evaluator does not read")
        shape = [] if tensor.shape is None else [int(s) for s in tensor.shape]
        constants[i] = raw.view(dtype).reshape(shape)
    return _Graph(graph.tensors, graph.operators,
                  [kinds[op.opcodeIndex] for op in graph.operators],
                  [int(i) for i in graph.inputs], [int(i) for i in graph.outputs], constants)


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _is_float(tensor) -> bool:
    return tensor.type in (0, 1)


def _quantized(tensor) -> bool:
    q = tensor.quantization
    return q is not None and q.scale is not None and len(q.scale) > 0


# --- the arithmetic of one policy ---------------------------------------------------------------

class _Arith:
    """Storage dtype, sums and matmuls of one policy; every op implementation goes through it."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise UserError(f"unknown arithmetic policy {policy!r}; choose from "
                            f"{', '.join(POLICIES)}")
        self.policy = policy
        self.store = _F32 if policy == "fp32" else _F16

    def sum(self, x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
        """Sum over ``axes``: float64 then float32 under fp32, the fp16 model otherwise."""
        if self.store is _F32:
            return np.sum(x, axis=axes, dtype=np.float64, keepdims=keepdims).astype(_F32)
        return _sum16(x, axes, keepdims)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a @ b`` (float32 in): fp32 accumulation, or the fp16-acc16 model."""
        if self.policy == "fp16-acc16":
            return _matmul_acc16(a, b)
        return np.matmul(a, b)

    def accumulate(self, acc: np.ndarray | None, term: np.ndarray) -> np.ndarray:
        """``acc + term`` for tap-by-tap accumulations (convolutions): rounded to fp16 after
        every addition under fp16-acc16, exact float32 otherwise."""
        out = term if acc is None else acc + term
        return out.astype(_F16).astype(_F32) if self.policy == "fp16-acc16" else out


def _round16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, _F32).astype(_F16)


def _sum16(x: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """A sum in fp16 arithmetic, as a GPU reduction computes it.

    Modelled order (TFLite's GPU reduce kernel, delegates/gpu/common/tasks/reduce.cc): the N
    values of each output are shared among ``REDUCE_LANES`` lanes (one thread each), lane ``t``
    adding values ``t, t + L, t + 2L, ...`` one after another into its own fp16 accumulator; the
    lane results are then added one after another in fp16. Every addition is rounded to fp16
    (overflow -> inf). A sum passes 65504 in it exactly when some partial sum does, which for
    values of one sign is when the total does: the overflow the issue reports does not depend
    on the order; the rounding error does, and this order (N/L + L additions a value) is the
    one a GPU uses, far gentler than one sequential sum of N and harsher than a pairwise tree.
    The kernel above declares its accumulator float4; LiteRT issue 9249 shows ML Drift on Mali
    summing in fp16, and fp16 is the case a model must survive.
    """
    keep_shape = [1 if i in axes else s for i, s in enumerate(x.shape)]
    rest = [i for i in range(x.ndim) if i not in axes]
    flat = np.transpose(x, rest + list(axes)).reshape(-1, int(np.prod([x.shape[a] for a in axes],
                                                                       dtype=np.int64)))
    m, n = flat.shape
    lanes = min(REDUCE_LANES, max(n, 1))
    steps = -(-n // lanes)
    padded = np.zeros((m, steps * lanes), _F16)
    padded[:, :n] = _round16(flat)
    padded = padded.reshape(m, steps, lanes)
    acc = np.zeros((m, lanes), _F16)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(steps):
            acc = acc + padded[:, s, :]
        total = acc[:, 0].copy()
        for t in range(1, lanes):
            total = total + acc[:, t]
    out = total.reshape([x.shape[i] for i in rest])
    return out.reshape(keep_shape) if keepdims else out


def _matmul_acc16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with fp16 accumulation, modelled in blocks of ``ACC16_BLOCK`` terms.

    A GPU convolution thread adds its K products one after another into an fp16 register; an
    exact sequential fp16 sum costs K numpy passes over the output, far too slow at 1024x1536.
    Here each block of ``ACC16_BLOCK`` products is summed in fp32 BLAS and rounded to fp16, and
    the blocks are added one after another in fp16. It catches a running sum passing 65504 (at
    block boundaries) and the rounding of the long accumulation; it understates the rounding
    error of a fully sequential fp16 sum by about sqrt(ACC16_BLOCK) (the error inside a block
    is one rounding instead of ACC16_BLOCK).
    """
    k = a.shape[-1]
    acc = None
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, k, ACC16_BLOCK):
            stop = start + ACC16_BLOCK
            part = np.matmul(a[..., start:stop], b[..., start:stop, :])
            acc = part.astype(_F16) if acc is None else (acc.astype(_F32) + part).astype(_F16)
    return acc.astype(_F32)


# --- op implementations -------------------------------------------------------------------------
# Each takes (arith, inputs as float32 / int arrays, options, output shapes) and returns its
# outputs in float32 (or int); the runner stores float outputs in the policy's dtype.

def _activation(x: np.ndarray, code: int, kind: str) -> np.ndarray:
    if code not in _ACTIVATIONS:
        raise UserError(f"{kind}: fused activation {code} is not evaluated")
    bounds = _ACTIVATIONS[code]
    if bounds is None:
        return x
    return np.clip(x, bounds[0], bounds[1]) if bounds[1] is not None else np.maximum(x, bounds[0])


def _same_pads(size: int, kernel: int, stride: int, dilation: int, out: int) -> tuple[int, int]:
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_taps(x: np.ndarray, kh: int, kw: int, opts, out_hw: tuple[int, int]):
    """(i, j, window) per kernel tap: the strided input window ``[1,OH,OW,C]`` the tap reads."""
    sh, sw = opts.strideH, opts.strideW
    dh, dw = getattr(opts, "dilationHFactor", 1) or 1, getattr(opts, "dilationWFactor", 1) or 1
    oh, ow = out_hw
    if opts.padding == 0:  # SAME
        ph = _same_pads(x.shape[1], kh, sh, dh, oh)
        pw = _same_pads(x.shape[2], kw, sw, dw, ow)
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i * dh:i * dh + (oh - 1) * sh + 1:sh,
                          j * dw:j * dw + (ow - 1) * sw + 1:sw, :]


def _conv2d(ar: _Arith, ins, opts, shapes):
    x, w = ins[0], ins[1]
    out_shape = shapes[0]
    cout, kh, kw, cin = w.shape
    acc = None
    for i, j, patch in _conv_taps(x, kh, kw, opts, out_shape[1:3]):
        acc = ar.accumulate(acc, ar.matmul(patch.reshape(-1, cin), w[:, i, j, :].T))
    if len(ins) > 2 and ins[2] is not None:
        acc = acc + ins[2]
    return [_activation(acc.reshape(out_shape), opts.fusedActivationFunction, "CONV_2D")]


def _depthwise(ar: _Arith, ins, opts, shapes):
    x, w = ins[0], ins[1]
    out_shape = shapes[0]
    _, kh, kw, cout = w.shape
    mult = opts.depthMultiplier or cout // x.shape[3]
    if mult != 1:
        x = np.repeat(x, mult, axis=3)
    acc = None
    for i, j, patch in _conv_taps(x, kh, kw, opts, out_shape[1:3]):
        acc = ar.accumulate(acc, patch * w[0, i, j, :])
    if len(ins) > 2 and ins[2] is not None:
        acc = acc + ins[2]
    return [_activation(acc.reshape(out_shape), opts.fusedActivationFunction,
                        "DEPTHWISE_CONV_2D")]


def _transpose_conv(ar: _Arith, ins, opts, shapes):
    """TRANSPOSE_CONV (inputs: output shape, weights [O,kh,kw,I], x, optional bias): each input
    pixel scatters ``x @ w[:, i, j, :].T`` into the output, then the padding is cropped."""
    w, x = ins[1], ins[2]
    out_shape = shapes[0]
    cout, kh, kw, cin = w.shape
    sh, sw = opts.strideH, opts.strideW
    n, h, wd, _ = x.shape
    full_h, full_w = (h - 1) * sh + kh, (wd - 1) * sw + kw
    full = np.zeros((n, full_h, full_w, cout), _F32)
    flat = x.reshape(-1, cin)
    for i in range(kh):
        for j in range(kw):
            part = ar.matmul(flat, w[:, i, j, :].T).reshape(n, h, wd, cout)
            region = full[:, i:i + (h - 1) * sh + 1:sh, j:j + (wd - 1) * sw + 1:sw, :]
            region[...] = ar.accumulate(region, part)
    oh, ow = out_shape[1:3]
    top = (full_h - oh) // 2 if opts.padding == 0 else 0
    left = (full_w - ow) // 2 if opts.padding == 0 else 0
    out = full[:, top:top + oh, left:left + ow, :]
    if len(ins) > 3 and ins[3] is not None:
        out = out + ins[3]
    return [_activation(out, getattr(opts, "fusedActivationFunction", 0), "TRANSPOSE_CONV")]


def _fully_connected(ar: _Arith, ins, opts, shapes):
    x, w = ins[0], ins[1]
    out = ar.matmul(x.reshape(-1, w.shape[1]), w.T)
    if len(ins) > 2 and ins[2] is not None:
        out = out + ins[2]
    out = _activation(out, opts.fusedActivationFunction, "FULLY_CONNECTED")
    return [out.reshape(shapes[0])]


def _batch_matmul(ar: _Arith, ins, opts, shapes):
    a, b = ins
    if opts.adjX:
        a = np.swapaxes(a, -1, -2)
    if opts.adjY:
        b = np.swapaxes(b, -1, -2)
    return [ar.matmul(a, b).reshape(shapes[0])]


def _axes(ins, ndim: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) % ndim for a in np.atleast_1d(ins[1])}))


def _mean(ar: _Arith, ins, opts, shapes):
    x = ins[0]
    axes = _axes(ins, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    total = ar.sum(x, axes, True).astype(_F32)
    if ar.store is _F32:
        return [(total / _F32(n)).reshape(shapes[0])]
    return [(total * _F32(_F16(1.0 / n))).reshape(shapes[0])]  # the GPU multiplies by 1/N


def _reduce_sum(ar: _Arith, ins, opts, shapes):
    return [ar.sum(ins[0], _axes(ins, ins[0].ndim), True).astype(_F32).reshape(shapes[0])]


def _reduce(fn):
    def run(ar: _Arith, ins, opts, shapes):
        return [fn(ins[0], axis=_axes(ins, ins[0].ndim), keepdims=True).reshape(shapes[0])]
    return run


def _binary(fn):
    def run(ar: _Arith, ins, opts, shapes):
        out = fn(ins[0], ins[1])
        code = getattr(opts, "fusedActivationFunction", 0) if opts is not None else 0
        return [_activation(out, code, fn.__name__)]
    return run


def _squared_difference(ar: _Arith, ins, opts, shapes):
    d = ins[0] - ins[1]
    if ar.store is _F16:  # the difference is an fp16 value before it is squared
        d = _round16(d).astype(_F32)
    return [d * d]


def _unary(fn):
    def run(ar: _Arith, ins, opts, shapes):
        return [fn(ins[0])]
    return run


def _gelu(ar: _Arith, ins, opts, shapes):
    x = ins[0].astype(np.float64)
    if opts is not None and opts.approximate:
        out = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    else:
        from scipy.special import erf

        out = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    return [out.astype(_F32)]


def _softmax(ar: _Arith, ins, opts, shapes):
    """exp(beta (x - max)) / sum, in float32 and rounded once: TFLite's GPU softmax kernels
    (delegates/gpu/common/tasks/softmax.cc) subtract the row maximum and sum in fp32
    (docs/design.md, section 13)."""
    x = ins[0]
    beta = opts.beta if opts is not None else 1.0
    e = np.exp(beta * (x - x.max(axis=-1, keepdims=True)))
    return [e / np.sum(e, axis=-1, keepdims=True, dtype=np.float64).astype(_F32)]


def _reshape(ar: _Arith, ins, opts, shapes):
    return [ins[0].reshape(shapes[0])]


def _transpose(ar: _Arith, ins, opts, shapes):
    return [np.transpose(ins[0], [int(p) for p in ins[1]])]


def _concatenation(ar: _Arith, ins, opts, shapes):
    out = np.concatenate(ins, axis=opts.axis)
    return [_activation(out, opts.fusedActivationFunction, "CONCATENATION")]


def _split(ar: _Arith, ins, opts, shapes):
    axis = int(np.asarray(ins[0]).reshape(()))
    x = ins[1]
    return list(np.split(x, len(shapes), axis=axis % x.ndim))


def _split_v(ar: _Arith, ins, opts, shapes):
    x, axis = ins[0], int(np.asarray(ins[2]).reshape(())) % ins[0].ndim
    return list(np.split(x, np.cumsum([s[axis] for s in shapes])[:-1], axis=axis))


def _strided_slice(ar: _Arith, ins, opts, shapes):
    x, begin, end, strides = ins
    if opts.ellipsisMask or opts.newAxisMask:
        raise UserError("STRIDED_SLICE with an ellipsis or new-axis mask is not evaluated")
    index = []
    for d in range(len(begin)):
        b = None if opts.beginMask >> d & 1 else int(begin[d])
        e = None if opts.endMask >> d & 1 else int(end[d])
        if getattr(opts, "offset", False) and e is not None:
            e = (b or 0) + e
        if opts.shrinkAxisMask >> d & 1:
            index.append(slice(b, None if b in (-1, None) else b + 1) if b is not None
                         else slice(0, 1))
            continue
        index.append(slice(b, e, int(strides[d])))
    return [x[tuple(index)].reshape(shapes[0])]


def _slice(ar: _Arith, ins, opts, shapes):
    x, begin, size = ins
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                  for b, s in zip(begin, size, strict=True))
    return [x[index]]


def _pad(ar: _Arith, ins, opts, shapes):
    value = float(np.asarray(ins[2]).reshape(())) if len(ins) > 2 and ins[2] is not None else 0
    return [np.pad(ins[0], [(int(a), int(b)) for a, b in ins[1]], constant_values=value)]


def _mirror_pad(ar: _Arith, ins, opts, shapes):
    mode = "reflect" if opts.mode == 0 else "symmetric"
    return [np.pad(ins[0], [(int(a), int(b)) for a, b in ins[1]], mode=mode)]


def _resize_bilinear(ar: _Arith, ins, opts, shapes):
    """RESIZE_BILINEAR as XNNPACK computes it (bit for bit in LiteRT's CPU run, measured): the
    source position ``o * scale + offset`` in float32 (scale (in-1)/(out-1) with align_corners,
    else in/out; offset 0.5 scale - 0.5 with half_pixel_centers, else 0), the lower index
    clamped at 0 and the upper at in - 1, and a lerp along columns, then rows."""
    x = ins[0]
    oh, ow = shapes[0][1:3]

    def axis(n_in: int, n_out: int):
        scale = (_F32(n_in - 1) / _F32(n_out - 1) if opts.alignCorners and n_out > 1
                 else _F32(n_in) / _F32(n_out))
        offset = _F32(0.5) * scale - _F32(0.5) if opts.halfPixelCenters else _F32(0)
        pos = np.arange(n_out, dtype=_F32) * scale + offset
        lo = np.maximum(np.floor(pos).astype(np.int64), 0)
        hi = np.minimum(np.ceil(pos).astype(np.int64), n_in - 1)
        return lo, hi, (pos - lo).astype(_F32)

    y0, y1, dy = axis(x.shape[1], oh)
    x0, x1, dx = axis(x.shape[2], ow)
    # interpolated as XNNPACK does (a + (b - a) * t, columns then rows): LiteRT's CPU run
    left, right = x[:, :, x0], x[:, :, x1]
    cols = left + (right - left) * dx[None, None, :, None]
    top, bottom = cols[:, y0], cols[:, y1]
    return [top + (bottom - top) * dy[None, :, None, None]]


def _resize_nearest(ar: _Arith, ins, opts, shapes):
    x = ins[0]
    oh, ow = shapes[0][1:3]

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = ((n_in - 1) / (n_out - 1) if opts.alignCorners and n_out > 1 else n_in / n_out)
        o = np.arange(n_out, dtype=np.float64)
        pos = (o + 0.5) * scale if opts.halfPixelCenters else o * scale
        pos = np.round(pos) if opts.alignCorners else np.floor(pos)
        return np.minimum(pos.astype(np.int64), n_in - 1)

    return [x[:, index(x.shape[1], oh)][:, :, index(x.shape[2], ow)]]


def _depth_to_space(ar: _Arith, ins, opts, shapes):
    x = ins[0]
    n, h, w, c = x.shape
    bs = opts.blockSize
    out = x.reshape(n, h, w, bs, bs, c // (bs * bs)).transpose(0, 1, 3, 2, 4, 5)
    return [out.reshape(n, h * bs, w * bs, c // (bs * bs))]


def _space_to_depth(ar: _Arith, ins, opts, shapes):
    x = ins[0]
    n, h, w, c = x.shape
    bs = opts.blockSize
    out = x.reshape(n, h // bs, bs, w // bs, bs, c).transpose(0, 1, 3, 2, 4, 5)
    return [out.reshape(n, h // bs, w // bs, bs * bs * c)]


def _pool(fn):
    def run(ar: _Arith, ins, opts, shapes):
        x = ins[0]
        kh, kw = opts.filterHeight, opts.filterWidth
        windows, counts = [], []
        fill = -np.inf if fn is np.max else 0.0
        sh, sw, oh, ow = opts.strideH, opts.strideW, *shapes[0][1:3]
        if opts.padding == 0:
            ph = _same_pads(x.shape[1], kh, sh, 1, oh)
            pw = _same_pads(x.shape[2], kw, sw, 1, ow)
        else:
            ph = pw = (0, 0)
        xp = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=fill)
        ones = np.pad(np.ones(x.shape[1:3], _F32), (ph, pw))
        for i in range(kh):
            for j in range(kw):
                windows.append(xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :])
                counts.append(ones[i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw])
        if fn is np.max:
            out = np.max(np.stack(windows), axis=0)
        else:  # TFLite's average pool divides by the number of in-image taps
            out = np.sum(np.stack(windows), axis=0) / np.sum(counts, axis=0)[None, :, :, None]
        return [_activation(out.astype(_F32), opts.fusedActivationFunction, "POOL_2D")]
    return run


def _dequantize(ar: _Arith, ins, opts, shapes):
    return [np.asarray(ins[0], _F32)]


def _cast(ar: _Arith, ins, opts, shapes):
    return [ins[0]]  # the runner casts to the output tensor's type


def _pack(ar: _Arith, ins, opts, shapes):
    return [np.stack(ins, axis=opts.axis)]


def _unpack(ar: _Arith, ins, opts, shapes):
    return [np.squeeze(a, axis=opts.axis) for a in np.split(ins[0], opts.num, axis=opts.axis)]


def _gather(ar: _Arith, ins, opts, shapes):
    return [np.take(ins[0], ins[1].astype(np.int64), axis=opts.axis)]


def _tile(ar: _Arith, ins, opts, shapes):
    return [np.tile(ins[0], [int(m) for m in ins[1]])]


def _broadcast_to(ar: _Arith, ins, opts, shapes):
    return [np.broadcast_to(ins[0], shapes[0]).copy()]


def _leaky_relu(ar: _Arith, ins, opts, shapes):
    return [np.where(ins[0] >= 0, ins[0], ins[0] * _F32(opts.alpha))]


def _with_inf(fn):
    """An elementwise op whose float32 result may overflow or divide by zero (inf, as a GPU)."""
    def run(*args):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return fn(*args)
    run.__name__ = fn.__name__
    return run


OPS: dict[str, Callable] = {
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "TRANSPOSE_CONV": _transpose_conv,
    "FULLY_CONNECTED": _fully_connected,
    "BATCH_MATMUL": _batch_matmul,
    "MEAN": _mean,
    "SUM": _reduce_sum,
    "REDUCE_MAX": _reduce(np.max),
    "REDUCE_MIN": _reduce(np.min),
    "ADD": _binary(_with_inf(np.add)),
    "SUB": _binary(_with_inf(np.subtract)),
    "MUL": _binary(_with_inf(np.multiply)),
    "DIV": _binary(_with_inf(np.divide)),
    "MAXIMUM": _binary(np.maximum),
    "MINIMUM": _binary(np.minimum),
    "POW": _binary(_with_inf(np.power)),
    "SQUARED_DIFFERENCE": _squared_difference,
    "RSQRT": _unary(_with_inf(lambda x: 1 / np.sqrt(x))),
    "SQRT": _unary(_with_inf(np.sqrt)),
    "SQUARE": _unary(_with_inf(np.square)),
    "EXP": _unary(_with_inf(np.exp)),
    "LOG": _unary(_with_inf(np.log)),
    "ABS": _unary(np.abs),
    "NEG": _unary(np.negative),
    "TANH": _unary(np.tanh),
    "LOGISTIC": _unary(_with_inf(lambda x: 1 / (1 + np.exp(-x)))),
    "RELU": _unary(lambda x: np.maximum(x, 0)),
    "RELU6": _unary(lambda x: np.clip(x, 0, 6)),
    "RELU_N1_TO_1": _unary(lambda x: np.clip(x, -1, 1)),
    "HARD_SWISH": _unary(lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "LEAKY_RELU": _leaky_relu,
    "GELU": _gelu,
    "SOFTMAX": _softmax,
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "EXPAND_DIMS": _reshape,
    "TRANSPOSE": _transpose,
    "CONCATENATION": _concatenation,
    "SPLIT": _split,
    "SPLIT_V": _split_v,
    "STRIDED_SLICE": _strided_slice,
    "SLICE": _slice,
    "PAD": _pad,
    "PADV2": _pad,
    "MIRROR_PAD": _mirror_pad,
    "RESIZE_BILINEAR": _resize_bilinear,
    "RESIZE_NEAREST_NEIGHBOR": _resize_nearest,
    "DEPTH_TO_SPACE": _depth_to_space,
    "SPACE_TO_DEPTH": _space_to_depth,
    "MAX_POOL_2D": _pool(np.max),
    "AVERAGE_POOL_2D": _pool(np.mean),
    "DEQUANTIZE": _dequantize,
    "CAST": _cast,
    "PACK": _pack,
    "UNPACK": _unpack,
    "GATHER": _gather,
    "TILE": _tile,
    "BROADCAST_TO": _broadcast_to,
}


# --- running a graph ----------------------------------------------------------------------------

def _range(x: np.ndarray) -> list[float] | None:
    if x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        return None
    return [float(np.fmin.reduce(x, axis=None)), float(np.fmax.reduce(x, axis=None))]


def _range_and_nonfinite(raw: np.ndarray, stored: np.ndarray
                         ) -> tuple[list[float] | None, int]:
    """The range of a stored op output (ignoring NaN) and how many of its values are inf or NaN.

    Read from the op's float32 result where that is finite: rounding to the storage dtype is
    monotonic, so the stored range is the rounded range of the result, and numpy's min/max on
    float32 is some 30x faster than on fp16. The stored values themselves are scanned only when
    the result, or its rounding, is not finite.
    """
    if stored.size == 0 or not np.issubdtype(stored.dtype, np.floating):
        return None, 0
    raw = np.asarray(raw)
    lo, hi = np.min(raw), np.max(raw)  # NaN propagates: finite bounds mean no NaN
    if math.isfinite(lo) and math.isfinite(hi):
        with np.errstate(over="ignore"):
            bounds = [float(stored.dtype.type(lo)), float(stored.dtype.type(hi))]
        if math.isfinite(bounds[0]) and math.isfinite(bounds[1]):
            return bounds, 0
    return _range(stored), int(np.count_nonzero(~np.isfinite(stored)))


def _store(x: np.ndarray, tensor, store) -> np.ndarray:
    """An op result as its tensor holds it: floats in the policy's dtype (fp16 rounds, and a
    value past 65504 becomes inf), other types in the tensor's own."""
    if _is_float(tensor):
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(x).astype(store, copy=False)
    return np.asarray(x).astype(_INT_TYPES[tensor.type], copy=False)


class _Executor:
    """One policy's state while the graph runs: the live tensors, as that policy stores them."""

    def __init__(self, graph: _Graph, policy: str, path: Path):
        self.graph, self.arith, self.path = graph, _Arith(policy), path
        self.values: dict[int, np.ndarray] = {}

    def feed(self, index: int, value: np.ndarray) -> None:
        self.values[index] = _store(value, self.graph.tensors[index], self.arith.store)

    def get(self, index: int) -> np.ndarray | None:
        if index < 0:
            return None
        if index in self.values:
            return self.values[index]
        if index in self.graph.constants:
            tensor = self.graph.tensors[index]
            const = self.graph.constants[index]
            # fp16 constants stay fp16 (what DEQUANTIZE reads); fp32 ones are stored as the
            # policy stores them (a GPU in fp16 holds its weights in fp16).
            value = const if tensor.type == 1 else _store(const, tensor, self.arith.store)
            self.values[index] = value
            return value
        raise UserError(f"{self.path}: tensor {_name(self.graph.tensors[index])!r} is read "
                        "before any op writes it")

    def run_op(self, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Run op ``k``: its outputs as stored, and as the op computed them (before storing)."""
        op, kind = self.graph.operators[k], self.graph.kinds[k]
        ins = []
        for i in op.inputs:
            value = self.get(int(i))
            if value is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(_F32, copy=False)
            ins.append(value)
        shapes = [tuple(int(s) for s in self.graph.tensors[o].shape) for o in op.outputs]
        with np.errstate(over="ignore", invalid="ignore"):
            results = OPS[kind](self.arith, ins, op.builtinOptions, shapes)
        stored = []
        for o, r in zip(op.outputs, results, strict=True):
            tensor = self.graph.tensors[o]
            value = _store(r, tensor, self.arith.store)
            if value.shape != tuple(int(s) for s in tensor.shape):
                raise UserError(f"{self.path}: op {k} ({kind}) made {list(value.shape)} for "
                                f"{_name(tensor)!r}, which the model declares "
                                f"{[int(s) for s in tensor.shape]}")
            self.values[int(o)] = value
            stored.append(value)
        return stored, results

    def free(self, index: int) -> None:
        self.values.pop(index, None)


def _check_supported(graph: _Graph, path: Path) -> None:
    unknown = sorted({k for k in graph.kinds if k not in OPS})
    if unknown:
        raise UserError(f"{path}: op kinds the arithmetic evaluator does not implement: "
                        f"{', '.join(unknown)}")
    for k, op in enumerate(graph.operators):
        for i in list(op.inputs) + list(op.outputs):
            if i >= 0 and _quantized(graph.tensors[i]) and not (
                    graph.kinds[k] == "DEQUANTIZE" and graph.tensors[i].type == 1):
                raise UserError(f"{path}: op {k} ({graph.kinds[k]}) uses the quantized tensor "
                                f"{_name(graph.tensors[i])!r}; the arithmetic evaluator runs "
                                "float models only (fp32 and fp16 files)")


def _peak(ref: np.ndarray) -> float:
    """The peak a tensor's PSNR is taken against: its peak-to-peak range (its largest magnitude
    for a constant tensor, 1 for zeros)."""
    lo, hi = float(np.min(ref)), float(np.max(ref))
    return (hi - lo) or max(abs(lo), abs(hi)) or 1.0


def _psnr(out: np.ndarray, ref: np.ndarray, peak: float) -> float:
    """PSNR in dB of ``out`` against ``ref`` (float32) with ``peak``; -inf when ``out`` is not
    finite."""
    diff = np.subtract(out, ref, dtype=_F32).ravel()
    mse = float(np.dot(diff, diff)) / max(diff.size, 1)
    if not math.isfinite(mse):
        return -math.inf
    return 200.0 if mse == 0 else min(200.0, 10 * math.log10(peak * peak / mse))


def run_arithmetic(tflite: str | Path, inputs: dict[str, np.ndarray], policy: str,
                   reference: str | None = None) -> ArithmeticRun:
    """Run ``tflite`` op by op under ``policy`` (see POLICIES) on ``inputs`` (by input name).

    With ``reference`` (another policy, usually "fp32") both run in lockstep and every op record
    gets its output's PSNR against the reference and ``db_lost``: how many dB the op itself
    lost, the worse of its inputs' PSNR (capped at what storing the op's reference output in
    the policy's dtype alone would give) minus its output's.
    """
    return run_policies(tflite, inputs, (policy,), reference)[0]


def run_policies(tflite: str | Path, inputs: dict[str, np.ndarray], policies: Sequence[str],
                 reference: str | None = None) -> list[ArithmeticRun]:
    """``run_arithmetic`` under each of ``policies`` at once, in lockstep with one shared
    ``reference`` run: n policies cost n + 1 runs, not 2n."""
    path = verify_tflite(tflite)
    graph = _read_graph(path)
    _check_supported(graph, path)
    names = [_name(graph.tensors[i]) for i in graph.inputs]
    if set(inputs) != set(names):
        raise UserError(f"{path}: takes inputs {names}, given {sorted(inputs)}")
    runs = [_Executor(graph, policy, path) for policy in policies]
    if reference is not None:
        runs.append(_Executor(graph, reference, path))
    for index, name in zip(graph.inputs, names, strict=True):
        want = tuple(int(s) for s in graph.tensors[index].shape)
        if tuple(np.shape(inputs[name])) != want:
            raise UserError(f"{path}: input {name!r} is {list(want)}, given "
                            f"{list(np.shape(inputs[name]))}")
        for run in runs:
            run.feed(index, np.asarray(inputs[name], _F32))
    last_use = {}
    for k, op in enumerate(graph.operators):
        for i in op.inputs:
            last_use[int(i)] = k
    keep = set(graph.outputs)
    # per policy: ranges of the activations (constants: None), kept from when each was
    # written, and their PSNR against the reference
    range_of = [{i: _range_and_nonfinite(run.values[i], run.values[i])[0] for i in graph.inputs}
                for run in runs[:len(policies)]]
    psnr_of: list[dict[int, float]] = [{} for _ in policies]
    records: list[list[OpRecord]] = [[] for _ in policies]
    start = time.perf_counter()
    for k, op in enumerate(graph.operators):
        kind = graph.kinds[k]
        try:
            outs = [run.run_op(k) for run in runs]
        except UserError:
            raise
        except Exception as exc:  # a shape or option the implementation does not take
            raise UserError(f"{path}: op {k} ({kind}, output "
                            f"{_name(graph.tensors[op.outputs[0]])!r}) cannot be evaluated: "
                            f"{type(exc).__name__}: {exc}") from None
        ref = [(o, r) for o, r in zip(op.outputs, outs[-1][0], strict=True)
               if np.issubdtype(r.dtype, np.floating)] if reference is not None else []
        peaks = [_peak(r) for _, r in ref]
        floors: dict[type, float] = {}  # PSNR of the reference stored in a policy's dtype
        for p, (stored, computed) in enumerate(outs[:len(policies)]):
            in_ranges = [range_of[p].get(int(i)) for i in op.inputs]
            nonfinite = 0
            for o, v, c in zip(op.outputs, stored, computed, strict=True):
                range_of[p][int(o)], bad = _range_and_nonfinite(c, v)
                nonfinite += bad
            ranges = [r for r in (range_of[p][int(o)] for o in op.outputs) if r is not None]
            record = OpRecord(k, _name(graph.tensors[op.outputs[0]]), kind, in_ranges,
                              [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges
                              else [0.0, 0.0], nonfinite)
            if ref:
                by_index = dict(zip(op.outputs, stored, strict=True))
                out_psnr = min(_psnr(by_index[o], r, peak)
                               for (o, r), peak in zip(ref, peaks, strict=True))
                dtype = runs[p].arith.store
                if dtype not in floors:
                    floors[dtype] = min(_psnr(_store(r, graph.tensors[o], dtype), r, peak)
                                        for (o, r), peak in zip(ref, peaks, strict=True))
                worst_in = min([psnr_of[p].get(int(i), math.inf) for i in op.inputs if i >= 0],
                               default=math.inf)
                for o in op.outputs:
                    psnr_of[p][int(o)] = out_psnr
                record.psnr = round(out_psnr, 2) if math.isfinite(out_psnr) else None
                lost = min(worst_in, floors[dtype]) - out_psnr
                record.db_lost = round(lost, 2) if math.isfinite(lost) else None
            records[p].append(record)
        for i in op.inputs:
            if i >= 0 and last_use.get(int(i)) == k and int(i) not in keep:
                for run in runs:
                    run.free(int(i))
    seconds = time.perf_counter() - start

    def outputs(run: _Executor) -> dict[str, np.ndarray]:
        return {_name(graph.tensors[i]): run.get(i).astype(_F32) for i in graph.outputs}

    reference_outputs = outputs(runs[-1]) if reference is not None else {}
    return [ArithmeticRun(str(path), policy, outputs(run), ops, seconds, reference,
                          reference_outputs)
            for policy, run, ops in zip(policies, runs[:len(policies)], records, strict=True)]


def op_kinds(tflite: str | Path) -> dict[str, int]:
    """The op kinds of a file and how many of each (what the evaluator must implement)."""
    from collections import Counter

    return dict(Counter(_read_graph(verify_tflite(tflite)).kinds).most_common())


# --- the verdict --------------------------------------------------------------------------------

def min_psnr(output: str) -> float:
    """The PSNR floor (dB) of ``output`` under fp16 against fp32 (issue 19's targets)."""
    return FP16_MIN_PSNR.get(output, FP16_DEFAULT_MIN_PSNR)


def _op_entry(op: OpRecord) -> dict:
    entry = {"index": op.index, "name": op.name, "kind": op.kind,
             "input_ranges": op.input_ranges, "output_range": op.output_range,
             "nonfinite": op.nonfinite}
    if op.psnr is not None or op.db_lost is not None:
        entry["psnr_db"] = op.psnr
        entry["db_lost"] = op.db_lost
    return entry


def arithmetic_report(tflite: str | Path, inputs: dict[str, np.ndarray], policy: str = "fp16",
                      worst: int = WORST_OPS) -> dict:
    """The arithmetic verdict of ``tflite`` under ``policy``, JSON-ready.

    Runs the file under ``policy`` and under fp32 in lockstep on ``inputs``; per output the
    non-finite count and PSNR (peak 1: outputs in [0, 1]) against the fp32 run, the first op
    that made an inf or NaN, the ``worst`` ops by dB lost, and a verdict: passed when no op
    made a non-finite value and every output is at or above its PSNR floor (``FP16_MIN_PSNR``).
    """
    return arithmetic_reports(tflite, inputs, (policy,), worst)[policy]


def arithmetic_reports(tflite: str | Path, inputs: dict[str, np.ndarray],
                       policies: Sequence[str], worst: int = WORST_OPS) -> dict[str, dict]:
    """``arithmetic_report`` under each of ``policies``, sharing one fp32 run."""
    from common.metrics import psnr

    reports = {}
    for run in run_policies(tflite, inputs, policies, reference="fp32"):
        outputs = {}
        for name, value in run.outputs.items():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            db = None if bad else round(psnr(run.reference_outputs[name], value), 2)
            outputs[name] = {"nonfinite": bad, "psnr_db": db, "min_psnr_db": min_psnr(name),
                             "passed": bad == 0 and db is not None and db >= min_psnr(name)}
        first = run.first_nonfinite()
        ranked = sorted((op for op in run.ops if op.db_lost is not None),
                        key=lambda op: -op.db_lost)
        reports[run.policy] = {
            "policy": run.policy, "against": "the same file in fp32 arithmetic (export/arith.py)",
            "passed": first is None and all(o["passed"] for o in outputs.values()),
            "outputs": outputs,
            "threshold": {"nonfinite_values": 0,
                          "min_psnr_db": {n: min_psnr(n) for n in outputs}},
            "nonfinite_ops": sum(1 for op in run.ops if op.nonfinite),
            "first_nonfinite": _op_entry(first) if first else None,
            "worst_ops": [_op_entry(op) for op in ranked[:worst]],
            "ops": len(run.ops), "seconds": round(run.seconds, 2),
        }
    return reports


def _fmt_range(r: list[float] | None) -> str:
    return "-" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def verdict_line(report: dict) -> str:
    """One line: PASS, or FAIL naming the first op that made an inf/NaN or the weakest output."""
    head = f"{report['policy']} arithmetic: "
    if report["passed"] is None:
        return head + (report.get("error") or "not evaluated: " + report["not_evaluated"])
    if report["passed"]:
        return head + "PASS (" + ", ".join(
            f"{n} {o['psnr_db']:.1f} dB" for n, o in report["outputs"].items()) + " vs fp32)"
    first = report["first_nonfinite"]
    if first:
        return (head + f"FAIL: first inf/NaN at {first['kind']} {first['name']!r} (inputs "
                + ", ".join(_fmt_range(r) for r in first["input_ranges"] if r is not None)
                + f" -> {_fmt_range(first['output_range'])})")
    low = [f"{n} {o['psnr_db']:.1f} dB < {o['min_psnr_db']:.0f}"
           for n, o in report["outputs"].items() if not o["passed"]]
    return head + "FAIL: " + ", ".join(low) + " vs fp32"


def format_arithmetic_report(report: dict) -> str:
    """The report as a short text: the verdict line, one line per output, the worst ops."""
    lines = [verdict_line(report)]
    for name, o in report["outputs"].items():
        db = "not finite" if o["psnr_db"] is None else f"{o['psnr_db']:.2f} dB"
        lines.append(f"  {name:<10} {db:>12} vs fp32 (floor {o['min_psnr_db']:.0f} dB), "
                     f"{o['nonfinite']} non-finite values")
    if report["nonfinite_ops"]:
        lines.append(f"  {report['nonfinite_ops']} of {report['ops']} ops made inf/NaN")
    if report["worst_ops"]:
        lines.append(f"  ops losing the most ({report['policy']} vs fp32, dB the op itself "
                     "lost; output PSNR against its fp32 value):")
        lines.append(f"    {'op':>5}  {'kind':<20} {'lost':>7} {'psnr':>7}  {'output range':<24}"
                     " name")
        for op in report["worst_ops"]:
            lost = "-" if op.get("db_lost") is None else f"{op['db_lost']:.1f}"
            psnr_db = "-inf" if op.get("psnr_db") is None else f"{op['psnr_db']:.1f}"
            lines.append(f"    {op['index']:>5}  {op['kind']:<20} {lost:>7} {psnr_db:>7}  "
                         f"{_fmt_range(op['output_range']):<24} {op['name']}")
    lines.append(f"  ({report['ops']} ops in {report['seconds']:.1f} s)")
    return "\n".join(lines)


# --- the export's verdict -----------------------------------------------------------------------

def random_inputs(tflite: str | Path, seed: int = 0,
                  fixed: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """One seeded input per model input, by name: smooth random images in [0, 1] (low-resolution
    noise upsampled, plus a little pixel noise, so a depth net sees structure), and the inputs
    named in ``fixed`` (the controls) filled with their value."""
    from export.runner import make_interpreter

    rng = np.random.default_rng(seed)
    feeds = {}
    for d in make_interpreter(tflite, allocate=False).get_input_details():
        shape = tuple(int(s) for s in d["shape"])
        if fixed and d["name"] in fixed:
            feeds[d["name"]] = np.full(shape, fixed[d["name"]], _F32)
        elif len(shape) == 4 and min(shape[1:3]) > 1:
            coarse = rng.random((8, 12, shape[3]))
            ry, rx = (_linear_upsampling(n, size) for n, size in ((8, shape[1]), (12, shape[2])))
            smooth = np.einsum("hy,yxc,wx->hwc", ry, coarse, rx)[None]
            feeds[d["name"]] = (0.8 * smooth + 0.2 * rng.random(shape)).astype(_F32)
        else:
            feeds[d["name"]] = rng.random(shape).astype(_F32)
    return feeds


def _linear_upsampling(n: int, size: int) -> np.ndarray:
    """The ``[size, n]`` matrix of linear interpolation from n samples to size (corners kept)."""
    return np.stack([np.interp(np.linspace(0, n - 1, size), np.arange(n), e)
                     for e in np.eye(n)], axis=1)


def fp16_verdict(tflite: str | Path, fixed: dict[str, float] | None = None,
                 seed: int = 0) -> dict:
    """The fp16-arithmetic verdict the export writes into a float file's manifest and
    report.json: ``arithmetic_report`` under fp16 on one seeded random input (the worst three
    ops kept), or ``{"passed": None, "error": ...}`` when the file cannot be evaluated."""
    try:
        report = arithmetic_report(tflite, random_inputs(tflite, seed, fixed), "fp16", worst=3)
    except UserError as exc:
        return {"policy": "fp16", "passed": None, "error": str(exc)}
    return {**report, "input": f"one seeded random input (seed {seed})"}
