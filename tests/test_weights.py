"""The weight-role table (onnxopt.weights) and the passes that read it agree."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt.passes.codebook.selection import Candidate
from onnxopt.passes.prune.weights import row_layout
from onnxopt.passes.quantize import int8
from onnxopt.weights import WeightRef, eligible_weights, output_axis, reduction_axes, role_of


def _node(op: str, shapes: list[tuple[int, ...]], **attrs) -> gs.Node:
    inputs = [
        gs.Constant(f"w{i}", np.zeros(shape, np.float32)) if shape else gs.Variable(f"x{i}")
        for i, shape in enumerate(shapes)
    ]
    return gs.Node(op, name=op.lower(), attrs=attrs, inputs=inputs, outputs=[gs.Variable("y")])


# (op, attrs, input index, weight shape, output axis, reduction axes)
TABLE = [
    ("Conv", {}, 1, (8, 3, 3, 3), 0, (1, 2, 3)),
    ("ConvTranspose", {}, 1, (3, 8, 3, 3), 1, (0, 2, 3)),
    ("Gemm", {}, 1, (6, 10), 1, (0,)),
    ("Gemm", {"transB": 1}, 1, (10, 6), 0, (1,)),
    ("Gemm", {}, 0, (4, 6), 0, (1,)),
    ("Gemm", {"transA": 1}, 0, (6, 4), 1, (0,)),
    ("MatMul", {}, 1, (12, 5), 1, (0,)),
    ("MatMul", {}, 1, (2, 12, 5), 2, (1,)),
    ("MatMul", {}, 0, (4, 12), 0, (1,)),
    ("Gather", {}, 0, (9, 4), 0, (1,)),
    ("Gather", {"axis": 1}, 0, (9, 4), 1, (0,)),
]


@pytest.mark.parametrize(("op", "attrs", "index", "shape", "axis", "reduced"), TABLE)
def test_output_and_reduction_axes(op, attrs, index, shape, axis, reduced):
    shapes: list[tuple[int, ...]] = [(), ()]
    shapes[index] = shape
    node = _node(op, shapes, **attrs)
    assert output_axis(node, index, len(shape)) == axis
    assert reduction_axes(node, index, len(shape)) == reduced
    ref = WeightRef(node, index, role_of(node, index))
    assert ref.output_axis() == axis
    # share-weights' per-channel codebooks run along the same axis
    candidate = Candidate(node.inputs[index], [(node, index)])
    assert candidate.row_axis(len(shape)) == axis
    # prune's rows: the output axis leads, the reduction axes make a row
    layout = row_layout(node, index, shape)
    if op != "ConvTranspose":
        assert layout.perm[-1 - len(reduced)] == axis
        assert layout.perm[len(layout.perm) - len(reduced) :] == reduced


def test_int8_weight_only_axis_is_the_output_axis():
    for op, attrs, shape, axis in [
        ("Conv", {}, (8, 3, 3, 3), 0),
        ("ConvTranspose", {}, (3, 8, 3, 3), 1),
        ("Gemm", {"transB": 1}, (10, 6), 0),
        ("Gemm", {}, (6, 10), 1),
        ("MatMul", {}, (12, 5), 1),
    ]:
        assert int8._weight_only_axis(_node(op, [(), shape], **attrs)) == axis
    assert int8._weight_only_axis(_node("MatMul", [(), (2, 12, 5)])) is None
    assert int8._weight_only_axis(_node("Gather", [(9, 4), ()])) is None


def test_eligible_weights_lists_constant_inputs_by_role():
    conv = _node("Conv", [(), (8, 3, 3, 3), (8,)])
    gemm = _node("Gemm", [(), (6, 10)])
    gemm.inputs[0].name = "a"
    graph = gs.Graph(nodes=[conv, gemm])
    found = [(r.node.op, r.index, r.role) for r in eligible_weights(graph)]
    assert found == [("Conv", 1, "weight"), ("Conv", 2, "bias"), ("Gemm", 1, "weight")]
    no_bias = [(r.node.op, r.index) for r in eligible_weights(graph, roles=("weight",))]
    assert no_bias == [("Conv", 1), ("Gemm", 1)]
    assert [r.node.op for r in eligible_weights(graph, op_types=("Gemm",))] == ["Gemm"]
    assert role_of(conv, 0) is None and output_axis(conv, 0, 4) is None
