"""compact: short names, dropped value_info, same outputs, signature kept, idempotence,
options, subgraph bodies, and the previous model left untouched."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import onnx
import onnx.shape_inference
from conftest import MODELS, apply_pass, model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.compact  # registers compact
from onnxopt.check import assert_equivalent, structural_checks
from onnxopt.graph import to_graph, to_model
from onnxopt.passes.compact import short_names

TRAIN = str(MODELS / "digits_train.npz")


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(model_path(name)))


def compact(model: onnx.ModelProto, **options):
    return apply_pass("compact", model, **options)


def tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(n for n in (*node.input, *node.output) if n)
    return names - {v.name for v in (*graph.input, *graph.output)}


def op_types(model: onnx.ModelProto) -> list[str]:
    """Node ops, without the Constant nodes every import lifts into initializers."""
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


def signature(model: onnx.ModelProto) -> list[bytes]:
    return [v.SerializeToString() for v in (*model.graph.input, *model.graph.output)]


def assert_same(original: onnx.ModelProto, compacted: onnx.ModelProto) -> None:
    report, _ = structural_checks(compacted)
    assert not report.failures, report.failures
    feeds = seeded_feeds(original, 4)
    assert_equivalent(run(original, feeds), run(compacted, feeds), "atol=0, rtol=0")


def test_short_names_are_c_identifiers_shortest_first():
    names = list(itertools.islice(short_names({"b", "aa"}), 60))
    assert names[:3] == ["a", "c", "d"]
    assert names[51] == "_" and names[52] == "ab"  # 52 one-letter names, then two letters
    everything = list(itertools.islice(short_names(set()), 4000))
    assert "do" not in everything and "if" not in everything  # C keywords
    assert len(set(everything)) == len(everything)
    assert all(n[0].isalpha() or n[0] == "_" for n in everything)


def test_transformer_gets_short_names_and_the_same_outputs():
    model = load("digits_transformer")
    out, result = compact(model)
    assert result.changed
    assert op_types(out) == op_types(model)
    assert signature(out) == signature(model)  # input/output names, types and shapes
    names = tensor_names(out)
    assert len(names) == len(tensor_names(model)) and max(map(len, names)) <= 2
    assert all(len(n.name) <= 2 for n in out.graph.node)
    assert not out.graph.value_info
    assert out.ByteSize() <= 0.9 * model.ByteSize()  # measured 0.89x
    counts = result.counts
    assert counts["tensors_renamed"] == len(names) and counts["nodes_renamed"] == 73
    assert counts["name_bytes_saved"] > 8000
    initial = {numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert {numpy_helper.to_array(t).tobytes() for t in out.graph.initializer} <= initial | {
        numpy_helper.to_array(n.attribute[0].t).tobytes()
        for n in model.graph.node
        if n.op_type == "Constant"  # lifted into initializers by the import
    }
    assert_same(model, out)


def test_compact_is_idempotent():
    model = load("digits_cnn")
    once, first = compact(model)
    twice, second = compact(once)
    assert first.changed and not second.changed
    assert twice.SerializeToString() == once.SerializeToString()


def test_options_keep_initializers_nodes_and_value_info():
    model = onnx.shape_inference.infer_shapes(load("digits_mlp"))
    assert model.graph.value_info  # the intermediate shapes to keep or drop
    kept, result = compact(model, names="activations", nodes="keep", value_info="keep")
    assert {t.name for t in kept.graph.initializer} == {t.name for t in model.graph.initializer}
    assert [n.name for n in kept.graph.node] == [n.name for n in model.graph.node]
    assert len(kept.graph.value_info) == len(model.graph.value_info)
    assert result.counts["value_info_dropped"] == 0 and result.counts["nodes_renamed"] == 0
    dropped, result = compact(model, nodes="drop", keep=["fc2.*"])
    assert not dropped.graph.value_info and result.counts["value_info_dropped"] == 5
    assert all(n.name == "" for n in dropped.graph.node)
    assert {"fc2.weight", "fc2.bias"} <= {t.name for t in dropped.graph.initializer}
    assert "fc1.weight" not in {t.name for t in dropped.graph.initializer}
    assert_same(model, kept)
    assert_same(model, dropped)


def test_the_previous_model_is_not_renamed_in_place():
    # graphsurgeon exports an imported initializer by renaming its source proto
    model = load("digits_mlp")
    before = model.SerializeToString()
    graph = to_graph(model)
    get_pass = onnxopt.pipeline.get_pass
    cls = get_pass("compact")
    cls(cls.Options()).run(graph, None)
    out = to_model(graph, model)
    assert model.SerializeToString() == before
    assert {t.name for t in out.graph.initializer} != {t.name for t in model.graph.initializer}


def test_names_read_inside_subgraph_bodies_are_kept():
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "outer_weight"
    )
    branches = [
        helper.make_graph(
            [helper.make_node("MatMul", ["hidden_state", "outer_weight"], [f"{b}_out"])],
            f"{b}_body",
            [],
            [helper.make_tensor_value_info(f"{b}_out", TensorProto.FLOAT, [1, 8])],
        )
        for b in ("then", "else")
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["hidden_state"], name="relu_node"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum_node"),
        helper.make_node("Greater", ["total", "zero"], ["condition"], name="greater_node"),
        helper.make_node(
            "If", ["condition"], ["y"], then_branch=branches[0], else_branch=branches[1]
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [weight, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, result = compact(model)
    names = tensor_names(out)
    assert {"hidden_state", "outer_weight"} <= names  # read by name inside the bodies
    assert "condition" not in names and "total" not in names
    assert result.counts["tensors_renamed"] == 3  # total, zero, condition
    assert_same(model, out)


def test_compact_as_a_pipeline_step():
    result = onnxopt.optimize(str(model_path("digits_transformer")), "compact", data=TRAIN)
    (step,) = result.steps
    assert step["status"] == "accepted" and step["lossless"], step["reason"]
    assert step["after"]["size"] < 0.9 * step["before"]["size"]
    assert Counter(op_types(result.model)) == Counter(op_types(load("digits_transformer")))


def test_sparse_initializers_keep_their_names():
    # graphsurgeon exports a sparse constant as its original proto: renaming only the
    # graph tensor would leave the consumer reading a name nothing defines
    dense = np.zeros((4, 3), np.float32)
    dense[1, 2], dense[3, 0] = 1.5, -2.0
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense[dense != 0], "weights_with_a_long_name"),
        numpy_helper.from_array(np.flatnonzero(dense).astype(np.int64), "idx"),
        [4, 3],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weights_with_a_long_name"], ["hidden_out"]),
            helper.make_node("Relu", ["hidden_out"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(model, "compact")
    assert result.steps[0]["status"] == "accepted", result.steps[0]["reason"]
    out = result.model
    assert [s.values.name for s in out.graph.sparse_initializer] == ["weights_with_a_long_name"]
    assert out.graph.node[0].input[1] == "weights_with_a_long_name"
    assert out.graph.node[0].output[0] == "a"  # the activation is still renamed
    assert structural_checks(out)[0].ok
