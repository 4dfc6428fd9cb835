"""Activation-aware cross-layer equalisation (passes/quantize/equalize.py)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize
from onnxopt.check import Budget
from onnxopt.graph import to_graph, to_model
from onnxopt.passes.quantize import equalize
from onnxopt.pipeline import PassContext


def depthwise_chain(activation: str = "Relu", seed: int = 0) -> onnx.ModelProto:
    """1x1 Conv -> act -> depthwise 3x3 -> act -> 1x1 Conv. The first Conv's channels
    span 1000x in range (gains 0.03..30) and the depthwise filters undo it, so every
    channel matters equally downstream, but one per-tensor scale covers them all."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.03, 30.0, 8).astype(np.float32)
    w1 = rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * gains[:, None, None, None]
    dw = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / gains[:, None, None, None]
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    inits = {"w1": w1, "b1": rng.standard_normal(8).astype(np.float32) * gains,
             "dw": dw, "bdw": np.zeros(8, np.float32), "w3": w3}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
        helper.make_node(activation, ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "dw", "bdw"], ["c2"], name="depthwise", group=8,
                         pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c2"], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="project"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "dw_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sqnr(reference: list[dict], got: list[dict]) -> float:
    r = np.concatenate([d["y"].ravel() for d in reference]).astype(np.float64)
    g = np.concatenate([d["y"].ravel() for d in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - g) ** 2)))


def test_pairs_found_through_homogeneous_activations_only():
    assert [(p.first.name, p.second.name, p.depthwise)
            for p in equalize.find_pairs(to_graph(depthwise_chain()))] == [
        ("expand", "depthwise", True), ("depthwise", "project", False)]  # fmt: skip
    assert equalize.find_pairs(to_graph(depthwise_chain("HardSwish"))) == []


def test_equalisation_keeps_the_float_model_exact():
    model = depthwise_chain()
    feeds = seeded_feeds(model, count=8)
    graph = to_graph(model)
    ctx = PassContext(calibration=feeds, rng=np.random.default_rng(0), seed=0,
                      template=model, original=model, budget=Budget.parse("none"))  # fmt: skip
    assert equalize.equalize(graph, ctx)["pairs"] == 2
    graph.cleanup().toposort()
    scaled = to_model(graph, model)
    for ref, got in zip(run(model, feeds), run(scaled, feeds)):
        np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-4)
    w1 = numpy_helper.to_array(next(t for t in scaled.graph.initializer if t.name == "w1"))
    before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    spread = lambda w: np.ptp(np.log10(np.abs(w).reshape(8, -1).max(1)))  # noqa: E731
    assert spread(w1) < spread(before) - 1.5  # channel ranges now within ~1 decade


def test_equalisation_raises_the_int8_sqnr_of_a_depthwise_chain():
    model = depthwise_chain()
    feeds = seeded_feeds(model, count=48, seed=2)
    reference = run(model, feeds[:16])
    sqnr = {}
    for flag in ("true", "false"):
        result = onnxopt.optimize(model, f"quantize-int8(latency=false,speed=none,equalize={flag})",
                                  data=feeds, budget="none")  # fmt: skip
        sqnr[flag] = _sqnr(reference, run(result.model, feeds[:16]))
        if flag == "true":
            assert any("equalized the channels of 2" in n for n in result.steps[-1]["notes"])
    assert sqnr["true"] > sqnr["false"] + 6.0
