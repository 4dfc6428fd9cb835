"""Fold shape-only ops applied to constants (``Unsqueeze(gamma)`` and the like).

Exporters such as Caffe2's write per-channel parameters as ``Mul(x, Unsqueeze(w))``;
the analysis only slices parameters that are constants, so these small ops are
evaluated first with numpy (exact: they only move or relabel values). Handled:
Unsqueeze, Squeeze, Reshape, Flatten, Identity, Transpose, Cast with all inputs
constant and an output that is not a graph output.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.layout import normalize_axis


def _axes(node: gs.Node, values: list[np.ndarray]) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    return [int(a) for a in values[1]] if len(values) > 1 else None


def _unsqueeze(node, values):
    x = values[0]
    rank = x.ndim + len(_axes(node, values))
    for axis in sorted(normalize_axis(a, rank) for a in _axes(node, values)):
        x = np.expand_dims(x, axis)
    return x


def _squeeze(node, values):
    axes = _axes(node, values)
    x = values[0]
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(normalize_axis(a, x.ndim) for a in axes))


def _reshape(node, values):
    x, shape = values[0], [int(d) for d in values[1]]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node, values):
    x = values[0]
    axis = normalize_axis(int(node.attrs.get("axis", 1)), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _transpose(node, values):
    return np.transpose(values[0], node.attrs.get("perm"))


def _cast(node, values):
    return values[0].astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


FOLDABLE: dict[str, Callable[[gs.Node, list[np.ndarray]], np.ndarray]] = {
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Identity": lambda node, values: values[0],
    "Transpose": _transpose,
    "Cast": _cast,
}


def fold_constant_shape_ops(graph: gs.Graph) -> int:
    """Replace foldable ops on constants by their value; return how many."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        rule = FOLDABLE.get(node.op)
        inputs = [t for t in node.inputs if not t.is_empty()]
        if rule is None or not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
            continue
        if len(node.outputs) != 1 or id(node.outputs[0]) in outputs:
            continue
        if node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.BFLOAT16:
            continue
        try:
            value = rule(node, [t.values for t in inputs])
        except (ValueError, TypeError, KeyError):
            continue  # not a well-formed instance: leave it to onnxruntime
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        out.to_constant(np.ascontiguousarray(value))
        graph.nodes.remove(node)
        folded += 1
    return folded
