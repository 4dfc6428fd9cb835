"""quantize-int8's lossless preparation (passes/quantize/prepare.py): per-channel
Mul/Add after a Conv folded into it before int8 placement."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from conftest import run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize
from onnxopt.graph import to_graph, to_model
from onnxopt.passes.quantize import prepare


def affine_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Mul(scalar) -> Add([1, C, 1, 1]) -> Relu -> Conv, like Paddle's exports
    of PP-LCNetV3 "learnable affine" blocks and separate bias Adds."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.5
    inits = {
        "w1": w1, "w2": w2, "b2": np.zeros(4, np.float32),
        "scale": np.array([1.7], np.float32),
        "shift": rng.standard_normal((1, 8, 1, 1)).astype(np.float32),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "scale"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "shift"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sqnr(reference: list[dict], got: list[dict]) -> float:
    r = np.concatenate([d["y"].ravel() for d in reference]).astype(np.float64)
    g = np.concatenate([d["y"].ravel() for d in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - g) ** 2)))


def test_fold_affine_is_exact_and_removes_the_mul_and_add():
    model = affine_model()
    graph = to_graph(model)
    assert prepare.fold_affine(graph) == 2
    graph.cleanup().toposort()
    folded = to_model(graph, model)
    assert Counter(n.op_type for n in folded.graph.node) == {"Conv": 2, "Relu": 1}
    feeds = seeded_feeds(model, count=3)
    for ref, got in zip(run(model, feeds), run(folded, feeds)):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-5)
    assert prepare.fold_affine(graph) == 0  # idempotent


def test_fold_affine_leaves_a_widening_constant_alone():
    model = affine_model()
    shift = next(t for t in model.graph.initializer if t.name == "shift")
    shift.CopyFrom(numpy_helper.from_array(np.ones((1, 8, 12, 12), np.float32), "shift"))
    graph = to_graph(model)
    assert prepare.fold_affine(graph) == 1  # the Mul folds, the full-size Add does not


def test_prepared_quantization_has_one_rounding_and_a_higher_sqnr():
    model = affine_model()
    feeds = seeded_feeds(model, count=48, seed=1)
    reference = run(model, feeds[:16])
    results = {}
    for flag in ("true", "false"):
        # equalize=false: only prepare differs (it also opens a Conv->Relu->Conv pair)
        pipeline = f"quantize-int8(latency=false,speed=none,equalize=false,prepare={flag})"
        out = onnxopt.optimize(model, pipeline, data=feeds, budget="none")
        results[flag] = out
    prepared, plain = results["true"].model, results["false"].model
    ops = Counter(n.op_type for n in prepared.graph.node)
    # x, conv1 (Relu absorbed) and conv2 outputs; without the fold conv1's output is
    # rounded before the Mul/Add and again, after the Relu, as conv2's input
    assert ops["Mul"] == 0 and ops["Add"] == 0 and ops["QuantizeLinear"] == 3
    assert Counter(n.op_type for n in plain.graph.node)["QuantizeLinear"] == 4
    assert _sqnr(reference, run(prepared, feeds[:16])) > _sqnr(reference, run(plain, feeds[:16]))
    notes = results["true"].steps[-1]["notes"]
    assert any("folded 2 per-channel Mul/Add" in n for n in notes)
