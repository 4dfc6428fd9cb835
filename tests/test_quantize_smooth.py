"""SmoothQuant-style scale migration (passes/quantize/smooth.py)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize
from onnxopt.check import Budget
from onnxopt.graph import to_graph, to_model
from onnxopt.passes.quantize import smooth
from onnxopt.pipeline import PassContext

HIDDEN = 32


def layernorm_block(residual: bool, seed: int = 0) -> onnx.ModelProto:
    """LayerNorm whose scale makes 2 of 32 channels 30x wider than the rest (the
    outlier channels of transformer activations) -> two MatMul projections (-> Add
    bias), optionally a residual Add reading the LayerNorm output too."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[[3, 17]] = 30.0
    inits = {
        "gamma": gamma,
        "beta": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        "wq": (rng.standard_normal((HIDDEN, HIDDEN)) * 0.2).astype(np.float32),
        "bq": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        "wv": (rng.standard_normal((HIDDEN, HIDDEN)) * 0.2).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln",
                         axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q_proj"),
        helper.make_node("Add", ["q", "bq"], ["qb"], name="q_bias"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="v_proj"),
        helper.make_node("Add", ["qb", "v"], ["y0"], name="sum"),
    ]  # fmt: skip
    if residual:
        nodes.append(helper.make_node("Add", ["y0", "ln"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "ln_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16, HIDDEN)).astype(np.float32)}
            for _ in range(count)]  # fmt: skip


def _sqnr(reference: list[dict], got: list[dict]) -> float:
    r = np.concatenate([d["y"].ravel() for d in reference]).astype(np.float64)
    g = np.concatenate([d["y"].ravel() for d in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - g) ** 2)))


def test_smoothing_is_exact_in_float_and_folds_into_a_private_layernorm():
    for residual, folded in ((False, 1), (True, 0)):
        model = layernorm_block(residual)
        calibration = feeds(8, seed=1)
        graph = to_graph(model)
        ctx = PassContext(calibration=calibration, rng=np.random.default_rng(0), seed=0,
                          template=model, original=model, budget=Budget.parse("none"))  # fmt: skip
        counts = smooth.smooth(graph, ctx)
        assert counts == {"tensors": 1, "folded": folded, "readers": 2}
        smoothed = to_model(graph, model)
        ops = [n.op_type for n in smoothed.graph.node]
        assert ops.count("Mul") == 1 - folded  # the residual keeps the original tensor
        for ref, got in zip(run(model, calibration), run(smoothed, calibration)):
            np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-4)


def test_no_outlier_channels_no_smoothing():
    model = layernorm_block(True)
    for init in model.graph.initializer:
        if init.name == "gamma":
            init.CopyFrom(numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"))
    graph = to_graph(model)
    ctx = PassContext(calibration=feeds(8, seed=1), rng=np.random.default_rng(0), seed=0,
                      template=model, original=model, budget=Budget.parse("none"))  # fmt: skip
    assert smooth.smooth(graph, ctx)["tensors"] == 0


def test_smoothing_raises_the_int8_sqnr_of_a_layernorm_with_outlier_channels():
    held_out = feeds(16, seed=3)
    for residual in (False, True):
        model = layernorm_block(residual)
        reference = run(model, held_out)
        sqnr = {}
        for flag in ("true", "false"):
            result = onnxopt.optimize(
                model, f"quantize-int8(latency=false,bias_correction=off,smooth={flag})",
                data=feeds(48, seed=2), budget="none",
            )  # fmt: skip
            sqnr[flag] = _sqnr(reference, run(result.model, held_out))
        assert sqnr["true"] > sqnr["false"] + 3.0, (residual, sqnr)  # +5.6 dB without residual
