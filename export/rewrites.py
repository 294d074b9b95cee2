"""Exact ONNX graph rewrites that make the converted graph fit mobile delegates.

Each pass takes and returns an ``onnx.ModelProto``, changes nothing that it cannot prove exact,
and returns how many places it changed so the report can say what happened.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def depth_to_space_crd_to_dcr(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Turn PixelShuffle's DepthToSpace(CRD) into DCR by permuting the producing conv's channels.

    CRD reads input channel ``c*r*r + i*r + j`` for output channel ``c`` at sub-pixel ``(i, j)``;
    DCR reads ``(i*r + j)*C + c``. onnx-tf lowers CRD to a rank-6 reshape/transpose, which no
    mobile GPU delegate runs, and DCR to TensorFlow's rank-4 depth_to_space. Applies only where
    the conv's weights are initializers and the conv feeds nothing but the DepthToSpace.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "DepthToSpace" or _attr(node, "mode", b"DCR") not in (b"CRD", "CRD"):
            continue
        conv = producers.get(node.input[0])
        if (
            conv is None or conv.op_type != "Conv" or len(users[conv.output[0]]) != 1
            or conv.output[0] in outputs or conv.input[1] not in inits
            or any(len(users[name]) != 1 for name in conv.input[1:])
        ):
            continue
        r = int(_attr(node, "blocksize"))
        for name in conv.input[1:]:  # weight, then optional bias: both indexed by out channel
            tensor = inits[name]
            value = numpy_helper.to_array(tensor)
            channels = value.shape[0] // (r * r)
            permuted = value.reshape(channels, r * r, *value.shape[1:]).swapaxes(0, 1)
            tensor.CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(permuted.reshape(value.shape)), name))
        for a in node.attribute:
            if a.name == "mode":
                a.s = b"DCR"
        changed += 1
    return model, changed


class _Graph:
    """An index over one graph (constants, producers, consumers) and helpers to edit it."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producers = {out: n for n in self.graph.node for out in n.output}
        self.users = _consumers(self.graph)
        self.outputs = {o.name for o in self.graph.output}
        self._taken = {n for node in self.graph.node for n in (*node.input, *node.output)}
        self._taken |= set(self.inits) | {i.name for i in self.graph.input}

    def const(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def sole_user(self, name: str) -> onnx.NodeProto | None:
        """The only consumer of ``name``, unless it is also a graph output."""
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def add_const(self, base: str, value: np.ndarray) -> str:
        """A new initializer (never overwrite one: it may be shared by other nodes)."""
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = self.graph.initializer[-1]
        return name

    def drop_unused(self) -> None:
        """Remove initializers nothing reads any more (folded weights leave their old copies)."""
        used = {n for node in self.graph.node for n in node.input} | self.outputs
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def _channel_vector(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A per-channel NCHW constant ((1,C,1,1), (C,1,1), or one value) as C float64s, else None."""
    if value is None or value.dtype != np.float32 or value.ndim > 4:
        return None
    shape = (1,) * (4 - value.ndim) + value.shape
    if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def _plain_conv(g: _Graph, node: onnx.NodeProto | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Float64 weight and bias (zeros if absent) of a Conv with constant parameters, else None."""
    if node is None or node.op_type != "Conv":
        return None
    weight = g.const(node.input[1])
    has_bias = len(node.input) > 2 and node.input[2]
    bias = g.const(node.input[2]) if has_bias else None
    if weight is None or weight.ndim != 4 or (has_bias and bias is None):
        return None
    bias = np.zeros(weight.shape[0]) if bias is None else bias
    return weight.astype(np.float64), bias.astype(np.float64)


def _set_conv_params(g: _Graph, conv: onnx.NodeProto, weight: np.ndarray,
                     bias: np.ndarray) -> None:
    data = conv.input[0]
    w_name = g.add_const(conv.input[1], weight.astype(np.float32))
    b_name = g.add_const(conv.input[1].removesuffix("weight") + "bias", bias.astype(np.float32))
    del conv.input[:]
    conv.input.extend([data, w_name, b_name])


def _split_operands(g: _Graph, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """(activation input, constant input) of a binary node with exactly one constant."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    if (a in g.inits) == (b in g.inits):
        return None
    return (b, g.const(a)) if a in g.inits else (a, g.const(b))


def _finish(model: onnx.ModelProto, g: _Graph, removed: set[int], changed: int):
    """Drop the nodes at the indices in ``removed`` and the constants nobody reads."""
    if changed:
        keep = [n for i, n in enumerate(model.graph.node) if i not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        g.drop_unused()
    return model, changed


def fold_affine_into_next_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold a per-channel ``Mul``/``Add`` by a constant into the unpadded conv that reads it.

    LayerNorm ends in ``y * weight + bias`` and feeds a 1x1 conv in every NAFBlock: the conv
    computes ``W (s*y + t) + b = (W diag(s)) y + (b + W t)``, so both ops vanish. Only for
    group-1 convs without padding (zero padding of ``y*s + t`` would not be zero) whose input is
    read by nothing else; the constants are combined in float64.
    """
    changed = 0
    while True:  # one fold per sweep: a fold makes the node before it foldable in turn
        g = _Graph(model)
        for i, node in enumerate(model.graph.node):
            if node.op_type not in ("Mul", "Add"):
                continue
            operands = _split_operands(g, node)
            conv = g.sole_user(node.output[0])
            params = _plain_conv(g, conv)
            if operands is None or params is None or conv.input[0] != node.output[0]:
                continue
            if _attr(conv, "group", 1) != 1 or any(_attr(conv, "pads", [0])) or _attr(
                    conv, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
                continue
            weight, bias = params
            vec = _channel_vector(operands[1], weight.shape[1])
            if vec is None:
                continue
            if node.op_type == "Mul":
                weight = weight * vec[None, :, None, None]
            else:
                bias = bias + np.einsum("oikl,i->o", weight, vec)
            _set_conv_params(g, conv, weight, bias)
            conv.input[0] = operands[0]
            del model.graph.node[i]
            changed += 1
            break
        else:
            break
    return _finish(model, _Graph(model), set(), changed)


def fold_scale_into_prev_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold a per-channel ``Mul`` by a constant into the conv whose only reader it is.

    NAFBlock scales ``conv3`` by ``beta`` and ``conv5`` by ``gamma``: ``(W x + b) * s`` is
    ``(diag(s) W) x + s b``, so the multiply disappears.
    """
    g = _Graph(model)
    removed: set[int] = set()
    changed = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Mul":
            continue
        operands = _split_operands(g, node)
        if operands is None:
            continue
        conv = g.producers.get(operands[0])
        params = _plain_conv(g, conv)
        if params is None or g.sole_user(conv.output[0]) is not node:
            continue
        weight, bias = params
        vec = _channel_vector(operands[1], weight.shape[0])
        if vec is None:
            continue
        _set_conv_params(g, conv, weight * vec[:, None, None, None], bias * vec)
        conv.output[0] = node.output[0]
        removed.add(index)
        changed += 1
    return _finish(model, g, removed, changed)


def square_as_mul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Pow(x, 2)`` -> ``Mul(x, x)``: the same correctly rounded square, and XNNPACK runs MUL.

    TFLite's POW has no XNNPACK kernel and calls ``pow`` per element on the reference path.
    """
    g = _Graph(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Pow" or len(node.input) != 2:
            continue
        exponent = g.const(node.input[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            continue
        node.op_type = "Mul"
        node.input[1] = node.input[0]
        changed += 1
    return _finish(model, g, set(), changed)


# A power of two: scaling by it is exact in fp32. NAFNet's LayerNorms centre up to 128 channels;
# with the residual stream at 2^-4 of its value, (x - mean)^2 stays finite in fp16 for
# |x - mean| < 4096 (a stream near |x| = 500 reaches ~1000), and squares of centred values near
# 1 stay normal fp16 numbers.
STREAM_SCALE = 2.0 ** -4


def _layer_norms(g: _Graph) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]] | None:
    """LayerNorm input -> (its ``Sub(x, ReduceMean(x))``, the ``Add(variance, eps)``), for every
    channel LayerNorm of the exporter's pattern; None if one has an unexpected shape."""
    norms = {}
    for sub in g.graph.node:
        mean = g.producers.get(sub.input[1]) if sub.op_type == "Sub" else None
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0] \
                or list(_attr(mean, "axes", [])) not in ([1], [-3]):
            continue
        square = next((u for u in g.users[sub.output[0]] if u.op_type in ("Pow", "Mul")), None)
        var = g.sole_user(square.output[0]) if square is not None else None
        add = g.sole_user(var.output[0]) if var is not None else None
        if add is None or add.op_type != "Add" or _split_operands(g, add) is None:
            return None
        norms[sub.input[0]] = (sub, add)
    return norms


def residual_stream_scaled(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Carry NAFNet's residual stream at ``STREAM_SCALE`` times its value, in the weights alone.

    A phone GPU stores LayerNorm's ``(x - mean)^2`` in fp16, which overflows past
    |x - mean| = 256 (docs/design.md, section 13); a trained NAFNet's stream passes that. The
    stream is every tensor a LayerNorm reads and what makes it: the residual Adds, ``intro``,
    ``downs``, ``ups`` (conv + DepthToSpace). Scaling ``intro``'s weights and bias, the ``beta``/
    ``gamma`` Muls and the biases of the convs inside the stream by ``S`` scales every stream
    value by ``S``; LayerNorm is scale invariant with ``eps * S^2``, and ``ending``'s weights
    divided by ``S`` give back the output. ``S`` is a power of two, so in fp32 every value is
    the original times ``S`` (or ``S^2``) exactly and the output does not change by a bit; no op
    is added. Applies only when every producer and reader of the stream is one of those kinds.
    """
    g = _Graph(model)
    norms = _layer_norms(g)
    if not norms:
        return model, 0
    stream, frontier, muls, convs, readers = set(norms), list(norms), [], [], []

    def join(names) -> bool:
        new = [n for n in names if n and n not in stream]
        stream.update(new)
        frontier.extend(new)
        return not any(n in g.inits or n in g.outputs for n in new)

    while frontier:  # the closure: what makes a stream value, and what a stream value makes
        name = frontier.pop()
        p = g.producers.get(name)
        if p is None or p.op_type in ("Add", "DepthToSpace") and not join(p.input):
            return model, 0
        if p.op_type == "Mul" and _split_operands(g, p) is not None:
            muls.append(p)
        elif p.op_type not in ("Add", "DepthToSpace"):
            if _plain_conv(g, p) is None:
                return model, 0
            convs.append(p)
        for u in g.users[name]:
            if u.op_type in ("Add", "DepthToSpace"):
                if not join(u.output):
                    return model, 0
            elif u.op_type == "Conv" and u.input[0] == name and _plain_conv(g, u) is not None:
                readers.append(u)
            elif not (name in norms and (u is norms[name][0] or u.op_type == "ReduceMean")):
                return model, 0
    readers = [c for c in readers if c.output[0] not in stream]
    s = np.float64(STREAM_SCALE)
    for conv in convs:  # makes stream values: from outside the stream, its weights scale too
        weight, bias = _plain_conv(g, conv)
        _set_conv_params(g, conv, weight * (1 if conv.input[0] in stream else s), bias * s)
    for conv in readers:  # reads the stream, writes outside it
        weight, bias = _plain_conv(g, conv)
        _set_conv_params(g, conv, weight / s, bias)
    for mul in muls:
        act, const = _split_operands(g, mul)
        scaled = g.add_const(f"{mul.output[0]}_scale", const * np.float32(s))
        del mul.input[:]
        mul.input.extend([act, scaled])
    for _, add in norms.values():
        act, eps = _split_operands(g, add)
        scaled = g.add_const(f"{add.output[0]}_eps", eps * np.float32(s * s))
        del add.input[:]
        add.input.extend([act, scaled])
    return _finish(model, g, set(), len(norms))


def global_pool_staged(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``GlobalAveragePool`` (NAFNet's channel attention) -> a mean over W, then over H.

    A phone GPU accumulates a mean in fp16: over 1024x1536 pixels the running sum passes 65504
    at a mean of 0.04, and long before that each added pixel is below half a step of the sum.
    Staged, no sum adds more than one row (1536) or column (1024) of values (docs/design.md,
    section 13). The same sum in another order: equal in fp32 to float rounding.
    """
    g = _Graph(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        rows = g.fresh(f"{node.output[0]}_rows")
        nodes = [onnx.helper.make_node("ReduceMean", [node.input[0]], [rows], axes=[3],
                                       keepdims=1, name=g.fresh(f"{node.name or rows}_rows")),
                 onnx.helper.make_node("ReduceMean", [rows], list(node.output), axes=[2],
                                       keepdims=1, name=node.name)]
        index = list(model.graph.node).index(node)
        model.graph.node.insert(index, nodes[0])
        node.CopyFrom(nodes[1])
        changed += 1
    return model, changed


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes (None for unknown dims) of every value shape inference can tell."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {}
    for v in (*graph.value_info, *graph.input, *graph.output):
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in v.type.tensor_type.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _channel_slice(g: _Graph, node: onnx.NodeProto, channels: int) -> tuple[int, int] | None:
    """``(start, end)`` of a Slice that takes a contiguous channel range of an NCHW tensor."""
    if node.op_type != "Slice" or len(node.input) < 3:
        return None
    consts = [g.const(n) if n else None for n in node.input[1:]]
    if any(c is None for c in consts[:2]) or any(
            n and c is None for n, c in zip(node.input[3:], consts[2:], strict=False)):
        return None
    starts, ends = consts[0].reshape(-1), consts[1].reshape(-1)
    axes = consts[2].reshape(-1) if len(consts) > 2 and consts[2] is not None else np.arange(
        len(starts))
    steps = consts[3].reshape(-1) if len(consts) > 3 and consts[3] is not None else None
    if len(starts) != 1 or int(axes[0]) not in (1, -3) or (steps is not None and steps[0] != 1):
        return None
    start, end = (min(max(int(v) + (channels if v < 0 else 0), 0), channels)
                  for v in (starts[0], ends[0]))
    return start, end


def simplegate_as_split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Two channel Slices that cut a tensor in two halves -> one Split (SimpleGate's ``chunk``).

    One op that reads the tensor once instead of two STRIDED_SLICEs. Opset 12 keeps the sizes an
    attribute, which converts to TFLite's builtin SPLIT (docs/design.md, section 3).
    """
    if _opset(model) >= 13:
        return model, 0  # sizes would be an int64 input: onnx-tf makes that a Flex op
    g = _Graph(model)
    shapes = _shapes(model)
    order = {n.output[0]: i for i, n in enumerate(model.graph.node)}
    removed: set[int] = set()
    changed = 0
    for name, users in list(g.users.items()):
        shape = shapes.get(name)
        if len(users) != 2 or name in g.outputs or not shape or len(shape) != 4 or not shape[1]:
            continue
        channels = shape[1]
        cuts = [_channel_slice(g, u, channels) for u in users]
        if any(c is None for c in cuts):
            continue
        (first, lo), (second, hi) = sorted(zip(cuts, users, strict=True), key=lambda p: p[0])
        if first[0] != 0 or first[1] != second[0] or second[1] != channels or first[1] == 0 \
                or first[1] == channels:
            continue
        # Equal halves without sizes become TFLite's SPLIT, which XNNPACK runs; explicit sizes
        # become SPLIT_V, which it does not.
        sizes = {} if 2 * first[1] == channels else {"split": [first[1], channels - first[1]]}
        split = onnx.helper.make_node(
            "Split", [name], [lo.output[0], hi.output[0]], name=g.fresh(f"{lo.name}_split"),
            axis=1, **sizes)
        earlier, later = sorted((lo, hi), key=lambda n: order[n.output[0]])  # topological
        removed.add(order[later.output[0]])
        earlier.CopyFrom(split)
        changed += 1
    return _finish(model, g, removed, changed)


def _conv_halves(g: _Graph, conv: onnx.NodeProto, sizes: list[int], outputs: list[str],
                 inputs: list[str]) -> list[onnx.NodeProto]:
    """``conv`` as one conv per block of output channels (``sizes``), reading ``inputs``."""
    weight, bias = (np.asarray(a, np.float32) for a in _plain_conv(g, conv))
    group = _attr(conv, "group", 1)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    nodes, start = [], 0
    for size, out, inp in zip(sizes, outputs, inputs, strict=True):
        part = slice(start, start + size)
        w = g.add_const(f"{conv.input[1]}_{start}", weight[part])
        b = g.add_const(f"{conv.input[1].removesuffix('weight')}bias_{start}", bias[part])
        if group != 1:
            attrs["group"] = group * size // weight.shape[0]
        nodes.append(onnx.helper.make_node("Conv", [inp, w, b], [out],
                                           name=g.fresh(f"{conv.name or out}_{start}"), **attrs))
        start += size
    return nodes


def _split_sizes(node: onnx.NodeProto, channels: int) -> list[int] | None:
    if node.op_type != "Split" or _attr(node, "axis", 0) not in (1, -3) or len(node.input) != 1:
        return None
    sizes = _attr(node, "split")
    if sizes is None:
        if channels % len(node.output):
            return None
        sizes = [channels // len(node.output)] * len(node.output)
    return list(sizes)


def split_convs_at_gate(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A channel Split right after a conv -> one conv per part, and no Split at all.

    SimpleGate splits the output of ``conv4`` (1x1) and of ``conv2`` (depthwise 3x3 after the 1x1
    ``conv1``). A conv's output channels are independent, so computing each half with its own
    slice of the weights gives the same numbers; a depthwise conv also needs its input halves,
    so the 1x1 conv before it is cut the same way. onnx-tf turns a Split into TFLite's SPLIT_V,
    which XNNPACK (TF 2.15) does not run; the halved convs it does.
    """
    g = _Graph(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    order = {n.output[0]: i for i, n in enumerate(model.graph.node)}
    changed = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Split":
            continue
        conv = g.producers.get(node.input[0])
        params = _plain_conv(g, conv)
        if params is None or g.sole_user(conv.output[0]) is not node:
            continue
        sizes = _split_sizes(node, params[0].shape[0])
        if sizes is None or sum(sizes) != params[0].shape[0]:
            continue
        group = _attr(conv, "group", 1)
        if group == 1:
            replace[order[conv.output[0]]] = _conv_halves(
                g, conv, sizes, list(node.output), [conv.input[0]] * len(sizes))
        else:
            first = g.producers.get(conv.input[0])
            channels = params[0].shape[0]
            if group != channels or params[0].shape[1] != 1 or _plain_conv(g, first) is None \
                    or _attr(first, "group", 1) != 1 or g.sole_user(first.output[0]) is not conv:
                continue
            mids = [g.fresh(f"{first.output[0]}_part{i}") for i in range(len(sizes))]
            replace[order[first.output[0]]] = _conv_halves(
                g, first, sizes, mids, [first.input[0]] * len(sizes))
            replace[order[conv.output[0]]] = _conv_halves(g, conv, sizes, list(node.output), mids)
        replace[index] = []
        changed += 1
    if not changed:
        return model, 0
    nodes = []
    for i, n in enumerate(model.graph.node):
        nodes.extend(replace.get(i, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    g.drop_unused()
    return model, changed


def sqrt_divisor_in_delegate(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Div(x, Sqrt(v))`` -> ``Div(x, Relu(Sqrt(v)))``: keeps LayerNorm inside XNNPACK.

    The TFLite converter rewrites ``x / sqrt(v)`` as ``x * rsqrt(v)``, and XNNPACK (TF 2.15)
    has no RSQRT: every LayerNorm then cuts the delegated graph in two and runs RSQRT on the
    reference kernel. A square root is never negative, so the Relu changes no value (NaN aside);
    it only hides the pattern, and SQRT, RELU and DIV all run in the delegate.
    """
    g = _Graph(model)
    changed = 0
    for node in list(model.graph.node):
        if node.op_type != "Div" or len(node.input) != 2:
            continue
        root = g.producers.get(node.input[1])
        if root is None or root.op_type != "Sqrt":
            continue
        guarded = g.fresh(f"{root.output[0]}_relu")
        relu = onnx.helper.make_node("Relu", [root.output[0]], [guarded],
                                     name=g.fresh(f"{root.name or guarded}_relu"))
        index = list(model.graph.node).index(node)
        model.graph.node.insert(index, relu)
        node.input[1] = guarded
        changed += 1
    return model, changed


def channel_mean_as_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``ReduceMean`` over the channels (LayerNorm) -> a 1x1 conv with weights ``1/C``.

    The converter turns the channel mean into TFLite's MEAN over the innermost NHWC axis, which
    the XNNPACK delegate leaves to a slow reference kernel; a C->1 conv computes the same sum of
    ``x_c / C`` (exactly, for C a power of two, up to summation order) inside the delegate.
    """
    g = _Graph(model)
    shapes = _shapes(model)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or _attr(node, "keepdims", 1) != 1:
            continue
        shape = shapes.get(node.input[0])
        axes = _attr(node, "axes")
        if not shape or len(shape) != 4 or not shape[1] or axes is None or list(axes) not in (
                [1], [-3]):
            continue
        weight = np.full((1, shape[1], 1, 1), 1.0 / shape[1], np.float32)
        w_name = g.add_const(f"{node.name or node.output[0]}_mean_weight", weight)
        conv = onnx.helper.make_node("Conv", [node.input[0], w_name], list(node.output),
                                     name=node.name, kernel_shape=[1, 1])
        node.CopyFrom(conv)
        changed += 1
    return _finish(model, g, set(), changed)


def conv_same_padding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Symmetric ``(k-1)/2`` padding of a stride-1 conv -> ``auto_pad=SAME_UPPER``.

    The same zeros in the same places; onnx-tf then emits a padded convolution instead of an
    explicit PAD op that copies the whole activation before every 3x3 conv.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET",):
            continue
        kernel, pads = _attr(node, "kernel_shape"), _attr(node, "pads")
        strides = _attr(node, "strides", [1] * len(kernel or []))
        dilations = _attr(node, "dilations", [1] * len(kernel or []))
        if not kernel or not pads or any(s != 1 for s in strides):
            continue
        half = [(k - 1) * d // 2 for k, d in zip(kernel, dilations, strict=True)]
        if any((k - 1) * d % 2 for k, d in zip(kernel, dilations, strict=True)) or \
                list(pads) != half + half or not any(half):
            continue
        keep = [a for a in node.attribute if a.name != "pads"]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        changed += 1
    return model, changed


_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # where an NCHW axis lives in NHWC
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sqrt", "Reciprocal", "Relu", "LeakyRelu",
    "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log", "Erf", "Clip", "Identity", "HardSigmoid",
})


class _Relayout:
    """Builds the channels-last graph: original names stay NCHW, ``*__nhwc`` names are NHWC."""

    def __init__(self, model: onnx.ModelProto):
        self.g = _Graph(model)
        self.shapes = _shapes(model)
        self.nodes: list[onnx.NodeProto] = []
        self.nhwc: dict[str, str] = {}
        self.nchw_ready = {i.name for i in model.graph.input} | set(self.g.inits)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def is_activation4(self, name: str) -> bool:
        return bool(name) and name not in self.g.inits and self.rank(name) == 4

    def to_nhwc(self, name: str) -> str:
        if name not in self.nhwc:
            self.nhwc[name] = self.g.fresh(f"{name}__nhwc")
            self.nodes.append(onnx.helper.make_node(
                "Transpose", [name], [self.nhwc[name]], name=self.g.fresh(f"{name}__to_nhwc"),
                perm=_TO_NHWC))
        return self.nhwc[name]

    def to_nchw(self, name: str) -> str:
        if name not in self.nchw_ready:
            self.nodes.append(onnx.helper.make_node(
                "Transpose", [self.nhwc[name]], [name], name=self.g.fresh(f"{name}__to_nchw"),
                perm=_TO_NCHW))
            self.nchw_ready.add(name)
        return name

    def const_nhwc(self, name: str) -> str:
        """A constant operand broadcast against an NCHW tensor, re-laid for NHWC."""
        value = self.g.const(name)
        if value.ndim == 0 or value.size == 1:
            return name
        value = value.reshape((1,) * (4 - value.ndim) + value.shape).transpose(_TO_NHWC)
        return self.g.add_const(f"{name}__nhwc", value)

    def emit_nhwc(self, node: onnx.NodeProto, inputs: list[str], **attrs) -> None:
        outputs = []
        for out in node.output:
            self.nhwc[out] = self.g.fresh(f"{out}__nhwc")
            outputs.append(self.nhwc[out])
        kept = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kept.update(attrs)
        self.nodes.append(onnx.helper.make_node(node.op_type, inputs, outputs,
                                                name=node.name, **kept))

    def emit_nchw(self, node: onnx.NodeProto) -> None:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for i, name in enumerate(node.input):
            if name and name in self.nhwc and name not in self.nchw_ready:
                node.input[i] = self.to_nchw(name)
        self.nodes.append(node)
        self.nchw_ready.update(node.output)

    def relayout(self, node: onnx.NodeProto) -> bool:
        """Emit ``node`` in NHWC if its op allows it; return whether it did."""
        op, ins = node.op_type, list(node.input)
        if not ins or not self.is_activation4(ins[0]) and op not in _ELEMENTWISE:
            return False
        if any(self.rank(o) != 4 for o in node.output):
            return False
        if op in _ELEMENTWISE:
            acts = [n for n in ins if n and n not in self.g.inits]
            if not acts or any(self.rank(n) not in (0, 4) for n in acts) or not any(
                    self.rank(n) == 4 for n in acts):
                return False
            new = [n if not n else self.const_nhwc(n) if n in self.g.inits
                   else self.to_nhwc(n) if self.rank(n) == 4 else n for n in ins]
            self.emit_nhwc(node, new)
            return True
        if op == "GlobalAveragePool":
            node = onnx.helper.make_node("ReduceMean", ins, list(node.output), name=node.name)
            self.emit_nhwc(node, [self.to_nhwc(ins[0])], axes=[1, 2], keepdims=1)
            return True
        if op == "ReduceMean" and _attr(node, "keepdims", 1) == 1 and _attr(node, "axes"):
            axes = [_NHWC_AXIS[a % 4] for a in _attr(node, "axes")]
            self.emit_nhwc(node, [self.to_nhwc(ins[0])], axes=sorted(axes))
            return True
        if op in ("Split", "Concat") and _attr(node, "axis") is not None and (
                op == "Concat" or len(ins) == 1):
            if not all(self.is_activation4(n) for n in ins):
                return False
            self.emit_nhwc(node, [self.to_nhwc(n) for n in ins],
                           axis=_NHWC_AXIS[_attr(node, "axis") % 4])
            return True
        if op == "Slice" and all(n in self.g.inits for n in ins[1:] if n):
            starts = self.g.const(ins[1])
            axes = self.g.const(ins[3]) if len(ins) > 3 and ins[3] else np.arange(len(starts))
            new_axes = np.array([_NHWC_AXIS[int(a) % 4] for a in axes], dtype=np.int64)
            rest = [*ins[1:3], self.g.add_const(f"{ins[0]}__nhwc_axes", new_axes), *ins[4:]]
            self.emit_nhwc(node, [self.to_nhwc(ins[0]), *rest])
            return True
        return False


def channels_last(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Run every layout-free op (elementwise, means, slices, splits) on NHWC tensors.

    onnx-tf computes each conv in NHWC between two transposes and leaves every other op in NCHW,
    so a NAFNet turns into hundreds of TRANSPOSE ops that copy whole activations. Here the ONNX
    graph itself keeps activations channels-last between convs, and only convs (and ops without
    an NHWC form) see NCHW through explicit Transposes. Each of those meets onnx-tf's own
    inverse transpose head-on and the TFLite converter folds the pair away. Only layout moves:
    every value is computed by the same op on the same numbers.
    """
    r = _Relayout(model)
    moved = 0
    for node in model.graph.node:
        if r.relayout(node):
            moved += 1
        else:
            r.emit_nchw(node)
    if not moved:
        return model, 0
    for out in model.graph.output:
        r.to_nchw(out.name)
    del model.graph.node[:]
    model.graph.node.extend(r.nodes)
    del model.graph.value_info[:]
    r.g.drop_unused()
    return model, moved



def max_tensor_rank(model: onnx.ModelProto) -> int:
    """Largest rank among the graph's value infos, inputs and outputs (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return max(len(v.type.tensor_type.shape.dim) for v in infos)




# Order matters: folds first (they look for the NCHW patterns the exporter wrote), then the
# op-for-op substitutions (the fp16 ones before the mean becomes a conv and the square root gets
# its Relu), and the layout change last.
PASSES = (
    residual_stream_scaled,
    depth_to_space_crd_to_dcr,
    fold_affine_into_next_conv,
    fold_scale_into_prev_conv,
    square_as_mul,
    global_pool_staged,
    simplegate_as_split,
    split_convs_at_gate,
    sqrt_divisor_in_delegate,
    channel_mean_as_conv,
    conv_same_padding,
    channels_last,
)
# The passes that make NAFNet fp16-safe (docs/design.md, section 13), and the pass list without
# them: the textbook graph, for tests and benchmarks that show what they fix.
FP16_PASSES = (residual_stream_scaled, global_pool_staged)
NAIVE_FP16_PASSES = tuple(p for p in PASSES if p not in FP16_PASSES)
