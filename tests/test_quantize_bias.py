"""Bias correction (passes/quantize/bias_correct.py)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize


def skewed_conv(seed: int = 0) -> onnx.ModelProto:
    """x -> 1x1 Conv -> Relu -> 1x1 Conv (no bias) -> Gemm. Fed heavy-tailed
    (log-normal) inputs, the per-tensor MSE range of x clips its tail, so the clipped
    mass is a systematic shift in every output channel whose weights do not sum to
    zero: what bias correction measures and removes."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.uniform(0.0, 1.0, (8, 16, 1, 1)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.uniform(-0.2, 1.0, (8, 8, 1, 1)).astype(np.float32),
        "shape": np.array([1, -1], np.int64),
        "wg": rng.uniform(-0.2, 1.0, (8 * 6 * 6, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "skewed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def skewed_feeds(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.lognormal(0.0, 1.5, (1, 16, 6, 6)).astype(np.float32)}
            for _ in range(count)]  # fmt: skip


def _sqnr(reference: list[dict], got: list[dict]) -> float:
    r = np.concatenate([d["y"].ravel() for d in reference]).astype(np.float64)
    g = np.concatenate([d["y"].ravel() for d in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - g) ** 2)))


def test_bias_correction_raises_the_sqnr_of_a_model_with_clipped_inputs():
    model = skewed_conv()
    feeds = skewed_feeds(64, seed=1)
    held_out = skewed_feeds(32, seed=2)
    reference = run(model, held_out)
    sqnr, results = {}, {}
    for flag in ("auto", "off"):
        text = f"quantize-int8(latency=false,speed=none,bias_correction={flag})"
        result = onnxopt.optimize(model, text, data=feeds, budget="none")
        sqnr[flag] = _sqnr(reference, run(result.model, held_out))
        results[flag] = result
    details = results["auto"].steps[-1]["details"]["bias_correction"]
    assert details["used"] and details["nodes"] >= 2  # auto: measured better, kept
    assert details["sqnr_db"]["with"] > details["sqnr_db"]["without"] + 3.0
    assert sqnr["auto"] > sqnr["off"] + 10.0  # 23.2 -> 40.8 dB on held-out inputs
    assert any("bias correction of" in n for n in results["auto"].steps[-1]["notes"])


def test_auto_bias_correction_is_dropped_when_it_measures_worse(monkeypatch):
    from onnxopt.passes.quantize import bias_correct

    measure = bias_correct.measure

    def harmful(*args):  # a correction that shifts every output channel the wrong way
        return {k: v * 0 + 5.0 for k, v in measure(*args).items()}

    monkeypatch.setattr(bias_correct, "measure", harmful)
    model = skewed_conv()
    feeds = skewed_feeds(64, seed=1)
    plain = onnxopt.optimize(model, "quantize-int8(latency=false,speed=none,bias_correction=off)",
                             data=feeds, budget="none")  # fmt: skip
    auto = onnxopt.optimize(model, "quantize-int8(latency=false,speed=none,bias_correction=auto)",
                            data=feeds, budget="none")  # fmt: skip
    details = auto.steps[-1]["details"]["bias_correction"]
    assert not details["used"]
    assert details["sqnr_db"]["with"] < details["sqnr_db"]["without"]
    assert auto.model.SerializeToString() == plain.model.SerializeToString()
