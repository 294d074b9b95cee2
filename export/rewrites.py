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


def max_tensor_rank(model: onnx.ModelProto) -> int:
    """Largest rank among the graph's value infos, inputs and outputs (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return max(len(v.type.tensor_type.shape.dim) for v in infos)


PASSES = (depth_to_space_crd_to_dcr,)
