"""Multiply-accumulate counts of Conv / ConvTranspose / Gemm / MatMul nodes.

Shapes come from onnx shape inference (``layout.infer_shapes``); a dynamic or unknown
dimension counts as 1 (batch 1). ``estimate`` predicts the MACs after a selection
without rewriting: a node's MACs scale with the kept fraction of its tracked input
channels and of its output channels (spatial sizes never change), which is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.groups import ChannelGraph
from onnxopt.passes.neurons.layout import Dims, infer_shapes

Shapes = dict[str, Dims | None]


def _prod(dims) -> int:
    return int(np.prod([d if d else 1 for d in dims], dtype=np.int64)) if dims else 1


def _dims(tensor: gs.Tensor, shapes: Shapes) -> Dims | None:
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    return shapes.get(tensor.name)


def _conv(node: gs.Node, shapes: Shapes) -> int:
    return _per_weight_row(node, node.outputs[0], shapes)  # every output reads a row


def _conv_transpose(node: gs.Node, shapes: Shapes) -> int:
    return _per_weight_row(node, node.inputs[0], shapes)  # every input spreads over a row


def _per_weight_row(node: gs.Node, tensor: gs.Tensor, shapes: Shapes) -> int:
    """Elements of ``tensor`` times the size of one weight row ``W[0]``."""
    weight = _dims(node.inputs[1], shapes)
    dims = _dims(tensor, shapes)
    if weight is None or dims is None:
        return 0
    return _prod(dims) * _prod(weight[1:])


def _gemm(node: gs.Node, shapes: Shapes) -> int:
    a, b = _dims(node.inputs[0], shapes), _dims(node.inputs[1], shapes)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return 0
    m = a[1] if node.attrs.get("transA", 0) else a[0]
    return _prod([m, *b])


def _matmul(node: gs.Node, shapes: Shapes) -> int:
    a, out = _dims(node.inputs[0], shapes), _dims(node.outputs[0], shapes)
    if a is None or out is None or not a:
        return 0
    return _prod(out) * (a[-1] or 1)


MAC_RULES: dict[str, Callable[[gs.Node, Shapes], int]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


def node_macs(node: gs.Node, shapes: Shapes) -> int:
    rule = MAC_RULES.get(node.op)
    return rule(node, shapes) if rule is not None else 0


def count_macs(graph: gs.Graph, shapes: Shapes | None = None) -> int:
    """Total MACs of the main graph at batch 1."""
    shapes = shapes if shapes is not None else infer_shapes(graph)
    return sum(node_macs(node, shapes) for node in graph.nodes)


class MacEstimator:
    """MACs after keeping ``keep[atom]``, from the analysis alone."""

    def __init__(self, cg: ChannelGraph, total: int) -> None:
        self.total = total
        self.terms = [(node_macs(t.node, cg.shapes), t.inputs, t.output) for t in cg.mac_terms]
        self.fixed = total - sum(macs for macs, _, _ in self.terms)

    def __call__(self, keep: np.ndarray) -> float:
        result = float(self.fixed)
        for macs, inputs, output in self.terms:
            fraction = 1.0
            if inputs is not None:
                fraction *= keep[inputs.atoms].mean()
            if output is not None:
                fraction *= keep[output.atoms].mean()
            result += macs * fraction
        return result
