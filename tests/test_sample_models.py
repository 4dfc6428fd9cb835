"""The committed sample models are what models/README.md says they are."""

from __future__ import annotations

import onnx
import pytest
from conftest import accuracy, model_path

from onnxopt.graph import op_histogram, param_count, to_graph


@pytest.mark.parametrize(
    ("name", "minimum"),
    [
        ("digits_mlp", 0.95),
        ("digits_cnn", 0.95),
        ("digits_transformer", 0.90),
        ("digits_mlp_op11_constants", 0.95),
    ],
)
def test_accuracy_in_onnxruntime(name, minimum):
    assert accuracy(model_path(name)) >= minimum


def test_cnn_has_the_structures_passes_need():
    model = onnx.load(str(model_path("digits_cnn")))
    graph = to_graph(model)
    ops = op_histogram(graph)
    for op in (
        "BatchNormalization",
        "Conv",
        "Add",
        "Concat",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    ):
        assert ops.get(op, 0) >= 1, op
    depthwise = [n for n in graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert depthwise and depthwise[0].attrs["group"] == depthwise[0].inputs[1].shape[0]
    assert param_count(graph) == 12778


def test_dynamic_batch_dimension():
    for name in ("digits_mlp", "digits_cnn", "digits_transformer"):
        model = onnx.load(str(model_path(name)))
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param == "batch", name
