"""quantize-int8 / quantize-int4 / upgrade-opset: placement, fusion in onnxruntime,
calibration, GPTQ, fallback, numerics."""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import MODELS, accuracy, digits, model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize
from onnxopt.check import LOSSY_BUDGET, compare_outputs
from onnxopt.errors import UsageError
from onnxopt.graph import to_graph
from onnxopt.passes.quantize import calibrate, fallback, gptq, numerics, qdq, speed
from onnxopt.passes.quantize.speed import runtime_ops
from onnxopt.pipeline import PassContext, Pipeline

TRAIN = str(model_path("digits_mlp").parent / "digits_train.npz")
FAST = "latency=false,speed=none"  # every node the table allows (speed=rule: own tests)


def quantize(name_or_model, options: str = FAST, prefix: str = "", **kwargs):
    pipeline = f"{prefix}quantize-int8({options})" if options else f"{prefix}quantize-int8"
    source = model_path(name_or_model) if isinstance(name_or_model, str) else name_or_model
    kwargs.setdefault("data", TRAIN)
    return onnxopt.optimize(source, pipeline, **kwargs)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    return None


def dequantized_constants(model: onnx.ModelProto, dtype) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes reading a constant of ``dtype`` (weights, biases)."""
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            values = initializer(model, node.input[0])
            if values is not None and values.dtype == dtype:
                found.append(node)
    return found


def assert_no_qdq_chain(model: onnx.ModelProto) -> None:
    """No QuantizeLinear reads a DequantizeLinear output (a redundant Q->DQ->Q) and
    every tensor is quantized at most once."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    quantized = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(producers.get(name) != "DequantizeLinear" for name in quantized)
    assert len(quantized) == len(set(quantized))


# ---------------------------------------------------------------------------- sample models


def test_mlp_fuses_into_qgemm_and_keeps_accuracy():
    result = quantize("digits_mlp")
    step = result.steps[-1]
    assert step["status"] == "accepted"
    model = result.model
    graph_ops = ops(model)
    assert graph_ops["Relu"] == 0  # both Relus absorbed into the Q of their Gemm
    # input, Flatten output (same parameters: onnxruntime drops that pair), fc1, fc2
    assert graph_ops["Gemm"] == 3 and graph_ops["QuantizeLinear"] == 4
    weights = dequantized_constants(model, np.int8)
    assert len(weights) == 3
    for node in weights:  # per output channel: one scale per row of B (transB=1)
        scale = initializer(model, node.input[1])
        assert scale.ndim == 1 and helper.get_attribute_value(node.attribute[0]) == 0
    assert len(dequantized_constants(model, np.int32)) == 3
    # onnxruntime runs three QGemm and only quantizes the input: no DQ left at all
    runtime = runtime_ops(model)
    assert runtime.get("QGemm") == 3
    assert runtime.get("DequantizeLinear", 0) == 0 and runtime.get("QuantizeLinear") == 1
    assert_no_qdq_chain(model)
    fp32 = accuracy(model_path("digits_mlp"))
    assert abs(accuracy(model) - fp32) <= 0.01
    assert step["metrics_vs_original"]["logits"]["cosine"] >= 0.999


def test_cnn_every_op_runs_integer_after_fold_batchnorm():
    result = quantize("digits_cnn", prefix="fold-batchnorm,")
    assert [s["status"] for s in result.steps] == ["accepted", "accepted"]
    runtime = runtime_ops(result.model)
    assert runtime.get("QLinearConv") == 5
    for op in ("QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"):
        assert runtime.get(op) == 1, (op, runtime)
    assert "Conv" not in runtime and runtime.get("DequantizeLinear", 0) == 0
    assert_no_qdq_chain(result.model)
    counts = result.steps[-1]["counts"]
    assert counts["relu_absorbed"] == 5 and counts["int8_ops"] == 3
    assert abs(accuracy(result.model) - accuracy(model_path("digits_cnn"))) <= 0.01


def test_transformer_matmuls_run_integer_and_attention_stays_float():
    result = quantize("digits_transformer")
    step = result.steps[-1]
    assert step["status"] == "accepted"
    runtime = runtime_ops(result.model)
    assert runtime.get("MatMulIntegerToFloat") == 13 and runtime.get("QGemm") == 1
    assert_no_qdq_chain(result.model)
    skipped = {d["subject"] for d in step["skipped"]}
    assert {"/layers.0/attn/MatMul", "/layers.1/attn/MatMul_1"} <= skipped
    assert abs(accuracy(result.model) - accuracy(model_path("digits_transformer"))) <= 0.01


def test_constant_node_model_at_opset_11_is_upgraded_first():
    result = quantize("digits_mlp_op11_constants")
    step = result.steps[-1]
    (upgrade,) = step["prerequisites"]  # the opset quantize-int8 declares: a checked step
    assert upgrade["step"] == "upgrade-opset" and upgrade["status"] == "accepted"
    assert upgrade["required_by"].startswith("quantize-int8")
    assert step["status"] == "accepted"
    opset = {o.domain: o.version for o in result.model.opset_import}[""]
    assert opset == 13
    assert runtime_ops(result.model).get("QGemm") == 3


def test_upgrade_false_refuses_old_opset_with_a_clear_reason():
    with pytest.raises(UsageError, match=r"quantize-int8: opset 11 < 13.*upgrade-opset"):
        quantize("digits_mlp_op11_constants", f"{FAST},upgrade=false")


def test_upgrade_opset_pass_is_lossless_and_a_noop_when_current():
    result = onnxopt.optimize(model_path("digits_mlp_op11_constants"), "upgrade-opset")
    assert result.steps[0]["status"] == "accepted"
    assert {o.domain: o.version for o in result.model.opset_import}[""] == 13
    again = onnxopt.optimize(result.model, "upgrade-opset")
    assert again.steps[0]["status"] == "no-op"


def test_second_run_is_a_noop():
    first = quantize("digits_mlp").model
    second = quantize(first)
    assert second.steps[-1]["status"] == "no-op"


def test_same_seed_same_model():
    first = quantize("digits_cnn", prefix="fold-batchnorm,").model
    second = quantize("digits_cnn", prefix="fold-batchnorm,").model
    assert first.SerializeToString() == second.SerializeToString()


def test_model_without_quantizable_ops_is_a_noop():
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    result = quantize(model, data=None)
    assert result.steps[-1]["status"] == "no-op"


def test_exclude_and_op_types_keep_nodes_float():
    result = quantize("digits_mlp", f"{FAST},exclude=[/fc3/*]")
    model = result.model
    fc3 = next(n for n in model.graph.node if n.name == "/fc3/Gemm")
    assert fc3.input[1] == "fc3.weight"  # float weight, no DequantizeLinear
    skipped = result.steps[-1]["skipped"]
    fc3_skip = {"subject": "/fc3/Gemm", "kind": "node", "op": "Gemm", "reason": "matches exclude="}
    assert fc3_skip in skipped
    cnn = quantize("digits_cnn", f"{FAST},op_types=[Conv]", prefix="fold-batchnorm,")
    runtime = runtime_ops(cnn.model)
    assert runtime.get("QLinearConv") == 5 and "QGemm" not in runtime


def test_unknown_op_type_is_a_usage_error_listing_valid_ones():
    with pytest.raises(UsageError, match=r"unknown op type.*NoSuchOp.*valid:.*Conv"):
        Pipeline.parse("quantize-int8(op_types=[NoSuchOp])")


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_methods_all_meet_the_default_budget_on_the_cnn(method):
    result = quantize("digits_cnn", f"{FAST},method={method},fallback=none",
                      prefix="fold-batchnorm,")  # fmt: skip
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert step["metrics_vs_original"]["logits"]["sqnr"] > 30


def test_gptq_rounding_beats_nearest_rounding():
    def sqnr(rounding: str) -> float:
        result = quantize("digits_mlp", f"{FAST},rounding={rounding},fallback=none")
        return result.steps[-1]["metrics_vs_original"]["logits"]["sqnr"]

    assert sqnr("gptq") > sqnr("nearest") + 1.0


def test_int8_symmetric_activations_keep_relu_and_run():
    result = quantize("digits_mlp", f"{FAST},activations=int8")
    model = result.model
    assert result.steps[-1]["status"] == "accepted"
    assert ops(model)["Relu"] == 2
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    zero_points = [initializer(model, n.input[2]) for n in q]
    assert all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    assert abs(accuracy(model) - accuracy(model_path("digits_mlp"))) <= 0.01


def test_weights_only_has_int8_weights_and_no_activation_quantization():
    result = quantize("digits_transformer", f"{FAST},weights_only=true")
    model = result.model
    assert ops(model)["QuantizeLinear"] == 0
    assert result.steps[-1]["counts"]["weights_quantized"] == 14  # 13 MatMul + the Gemm
    before = result.steps[-1]["before"]["size"] if "before" in result.steps[-1] else None
    assert model.ByteSize() < onnx.load(model_path("digits_transformer")).ByteSize() * 0.5
    assert before is None or model.ByteSize() < before
    feeds = seeded_feeds(model)
    metrics = compare_outputs(run(model_path("digits_transformer"), feeds), run(model, feeds))
    assert metrics["logits"].cosine > 0.999


# ---------------------------------------------------------------------------- small graphs


def _linear_model(nodes, inits, shape=(1, 16), out_shape=(1, 4), opset=17):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _planted_outlier_model() -> onnx.ModelProto:
    """x * gain -> Gemm A -> Relu -> Gemm B. One input channel of A is scaled by 1000
    but A barely uses it: per-tensor activation quantization of A's input crushes the
    channels that matter. A is the planted sensitive node; B is harmless."""
    rng = np.random.default_rng(3)
    gain = np.ones(16, np.float32)
    gain[5] = 1000.0
    a = rng.standard_normal((16, 32)).astype(np.float32)
    a[5] = 1e-4
    b = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "A", "bias_a"], ["h"], name="gemm_a"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "B", "bias_b"], ["y"], name="gemm_b"),
    ]
    inits = {"gain": gain, "A": a, "bias_a": np.zeros(32, np.float32), "B": b,
             "bias_b": np.zeros(4, np.float32)}  # fmt: skip
    return _linear_model(nodes, inits)


def test_fallback_auto_keeps_the_planted_sensitive_node_float():
    model = _planted_outlier_model()
    plain = quantize(model, f"{FAST},method=minmax,fallback=none", data=None)
    assert plain.steps[-1]["status"] == "rolled back"  # plain quantization misses
    assert "cosine" in plain.steps[-1]["reason"] or "top1" in plain.steps[-1]["reason"]
    # 8-bit weights: with 7-bit ones the harmless gemm_b alone is at the budget's edge
    result = quantize(model, f"{FAST},method=minmax,fallback=auto,weight_bits=8", data=None)
    step = result.steps[-1]
    assert step["status"] == "accepted"
    fallback = step["details"]["fallback"]
    assert fallback["violations_before"]
    assert [d["node"] for d in fallback["kept_float"]] == ["gemm_a"]
    assert "SQNR" in fallback["kept_float"][0]["reason"]
    kept = [d for d in step["skipped"] if d["reason"].startswith("kept float")]
    assert [(d["subject"], d["kind"], d["op"]) for d in kept] == [("gemm_a", "node", "Gemm")]
    assert fallback["sensitivity_sqnr_db"]["gemm_a"] < fallback["sensitivity_sqnr_db"]["gemm_b"]
    assert any("gemm_a" in note for note in step["notes"])
    gemm_a = next(n for n in result.model.graph.node if n.name == "gemm_a")
    assert gemm_a.input[1] == "A"  # float weight
    assert runtime_ops(result.model).get("QGemm") == 1  # gemm_b still integer


def test_relu_absorbed_after_a_float_op_still_applies_to_float_readers():
    """x + c -> Relu -> (Gemm, Neg): after absorbing the Relu into the Q, the float
    reader (Neg) must read the DequantizeLinear, not the pre-Relu tensor."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Add", ["x", "c"], ["s"], name="shift"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W"], ["g"], name="gemm"),
        helper.make_node("Neg", ["r"], ["n"], name="neg"),
        helper.make_node("ReduceSum", ["n"], ["m"], name="sum", keepdims=1),
        helper.make_node("Add", ["g", "m"], ["y"], name="out"),
    ]
    inits = {"c": np.full(16, -0.5, np.float32),
             "W": rng.standard_normal((16, 4)).astype(np.float32)}  # fmt: skip
    model = _linear_model(nodes, inits)
    result = quantize(model, f"{FAST},fallback=none", data=None)
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert ops(result.model)["Relu"] == 0
    assert step["metrics_vs_original"]["y"]["cosine"] > 0.999


def test_conv_producing_a_graph_output_keeps_the_name_and_fuses():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(4).astype(np.float32)}  # fmt: skip
    model = _linear_model(nodes, inits, shape=(1, 3, 8, 8), out_shape=(1, 4, 8, 8))
    result = quantize(model, FAST, data=None)
    assert result.steps[-1]["status"] == "accepted"
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert runtime_ops(result.model).get("QLinearConv") == 1


# ---------------------------------------------------------------------------- placement table


def test_rule_table_is_explicit_and_rejects_duplicates():
    assert qdq.QDQ_RULES["Conv"].kind == "core" and qdq.QDQ_RULES["Conv"].output == "required"
    assert qdq.QDQ_RULES["Gemm"].output == "optional"
    assert qdq.QDQ_RULES["Reshape"].kind == "passthrough"
    assert qdq.QDQ_RULES["Relu"].kind == "absorbed"
    assert qdq.QDQ_RULES["Add"].kind == "int8"
    with pytest.raises(ValueError, match="duplicate"):
        qdq.qdq_rule("Conv", "core", "x")(lambda node: None)


def test_plan_moves_q_through_passthrough_and_shares_its_parameters():
    graph = to_graph(onnx.load(model_path("digits_mlp")))
    placement = qdq.plan(graph, qdq.Selection())
    flatten_out = "/flatten/Flatten_output_0"
    assert placement.nodes["/flatten/Flatten"] == "passthrough"
    assert placement.tensors[flatten_out].share == "input"
    assert set(placement.absorbed) == {"/relu/Relu", "/relu_1/Relu"}
    assert "logits" not in placement.tensors  # the last Gemm keeps a float output


# ---------------------------------------------------------------------------- calibration


def test_streaming_histogram_matches_the_data_and_stays_bounded():
    rng = np.random.default_rng(0)
    stats = calibrate.TensorStats()
    chunks = [rng.standard_normal(500) * (1 + i) for i in range(40)]  # range keeps growing
    for chunk in chunks:
        stats.update(chunk)
    everything = np.concatenate(chunks)
    assert stats.min == everything.min() and stats.max == everything.max()
    assert stats.counts.sum() == everything.size and len(stats.counts) <= calibrate.BINS
    assert len(stats.counts) > calibrate.BINS // 2  # resolution kept after re-binning
    # every value lies in the bin the histogram counted it in: compare the CDF
    for q in (0.1, 0.5, 0.9):
        assert abs(stats.quantile(q) - np.quantile(everything, q)) <= 2 * stats.width


def test_a_tensor_larger_than_one_binning_slice_is_counted_exactly(monkeypatch):
    # a large feature map is binned in slices (bounded temporaries): the counts are
    # those of binning it in one go
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(10_000) * 3).astype(np.float32)
    monkeypatch.setattr(calibrate, "ADD_SLICE", 1 << 20)
    whole = calibrate.TensorStats()
    whole.update(values)
    monkeypatch.setattr(calibrate, "ADD_SLICE", 999)  # 11 slices, the last one short
    sliced = calibrate.TensorStats()
    sliced.update(values)
    assert (sliced.start, sliced.width) == (whole.start, whole.width)
    np.testing.assert_array_equal(sliced.counts, whole.counts)
    assert sliced.counts.sum() == values.size


def test_range_methods():
    rng = np.random.default_rng(1)
    stats = calibrate.TensorStats()
    values = np.abs(rng.laplace(size=100000))  # long tail: clipping pays off
    stats.update(values)
    top = float(values.max())
    assert calibrate.choose_range(stats, "minmax") == (0.0, top)
    assert calibrate.choose_range(stats, "percentile", percentile=99.9)[1] < 0.6 * top
    assert calibrate.choose_range(stats, "mse")[1] < top
    assert 0 < calibrate.choose_range(stats, "entropy")[1] < top
    signed = calibrate.TensorStats()
    signed.update(rng.standard_normal(1000))
    lo, hi = calibrate.choose_range(signed, "mse")
    assert lo < 0 < hi


def test_collect_streams_one_sample_at_a_time():
    """Each sample's activations are released before the next sample is computed."""
    model = onnx.load(model_path("digits_mlp"))
    graph = to_graph(model)
    images, _ = digits("train")
    seen: list[list[weakref.ref]] = []
    alive_before = []

    class Ctx(PassContext):
        def activations(self, graph, names, desc=""):
            for sample in super().activations(graph, names, desc):
                seen.append([weakref.ref(v) for v in sample.values()])
                yield sample
                del sample
                gc.collect()
                alive_before.append(sum(r() is not None for refs in seen[:-1] for r in refs))

    samples = [{"input": images[i : i + 1]} for i in range(20)]
    ctx = Ctx(samples, np.random.default_rng(0), 0, model, model, LOSSY_BUDGET)
    stats = calibrate.collect(ctx, graph, ["/relu/Relu_output_0", "input"])
    assert len(seen) == 20 and max(alive_before) == 0
    assert stats["input"].count == 20 * 64 and stats["/relu/Relu_output_0"].min == 0.0


# ---------------------------------------------------------------------------- numerics


def test_activation_params_include_zero_and_bound_the_error():
    params = numerics.activation_params(0.5, 4.0)
    assert params.zero_point.dtype == np.uint8 and int(params.zero_point) == 0
    x = np.linspace(0, 4, 101, dtype=np.float32)
    assert np.max(np.abs(numerics.fake_quantize(x, params) - x)) <= float(params.scale) / 2 + 1e-7
    signed = numerics.activation_params(-1.0, 3.0, "int8")
    assert int(signed.zero_point) == 0 and np.isclose(float(signed.scale), 3.0 / 127)


def test_bias_scale_is_input_times_weight_scale_and_overflow_raises_weight_scale():
    weight = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    params = numerics.weight_params(weight, axis=0)
    q, bias_params, weight_scale = numerics.quantize_bias(np.array([0.3, -0.1]), 0.02, params)
    assert q.dtype == np.int32
    np.testing.assert_allclose(bias_params.scale, 0.02 * params.scale, rtol=1e-6)
    np.testing.assert_array_equal(weight_scale, params.scale)
    huge = np.array([1e9, 0.0])
    _, _, raised = numerics.quantize_bias(huge, 1e-6, params)
    assert raised[0] > params.scale[0] and raised[1] == params.scale[1]


def test_gptq_lowers_output_error_and_matches_explicit_im2col():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    inputs = [gs.Variable("x"), gs.Constant("W", weight)]
    node = gs.Node("Conv", "conv", attrs, inputs=inputs, outputs=[gs.Variable("y")])
    hessian = gptq.Hessian(node, np.random.default_rng(0))
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    x[:, 1] = x[:, 0] * 0.9 + 0.1 * x[:, 1]  # correlated inputs: where GPTQ helps
    hessian.update(x)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack([padded[0, :, i : i + 3, j : j + 3].ravel()
                        for i in range(0, 6, 2) for j in range(0, 6, 2)])  # fmt: skip
    np.testing.assert_allclose(hessian.blocks(0)[0], patches.T @ patches, rtol=1e-4, atol=1e-4)
    scale = numerics.weight_params(weight, 0).scale
    rounded = gptq.gptq_quantize(node, weight, hessian, scale)
    nearest = numerics.requantize_weight(weight, 0, scale)[0]
    assert rounded.dtype == np.int8 and np.abs(rounded).max() <= 127
    w = weight.reshape(8, -1)

    def error(q):
        return np.sum(((q.reshape(8, -1) * scale[:, None] - w) @ patches.T) ** 2)

    assert error(rounded) < error(nearest)


def test_hessian_buffer_is_bounded_for_every_group():
    """A depthwise Conv's pending rows are [C, n, K]: the flush bound counts all C
    groups (200 channels once buffered 39 MB per node, 350 MB peak on PP-OCR cls)."""
    rng = np.random.default_rng(0)
    channels = 200
    weight = rng.standard_normal((channels, 1, 5, 5)).astype(np.float32)
    attrs = {"pads": [2, 2, 2, 2], "group": channels}
    inputs = [gs.Variable("x"), gs.Constant("W", weight)]
    node = gs.Node("Conv", "dw", attrs, inputs=inputs, outputs=[gs.Variable("y")])
    hessian = gptq.Hessian(node, np.random.default_rng(0))
    x = rng.standard_normal((1, channels, 8, 8)).astype(np.float32)  # 64 rows per update
    reference = np.zeros((25, 25), np.float32)
    for _ in range(32):
        hessian.update(x)
        pending = sum(p.size for p in hessian._pending)
        assert pending <= gptq.FLUSH_ELEMENTS + channels * 64 * 25  # one update over at most
        patches = np.lib.stride_tricks.sliding_window_view(np.pad(x[0, 3], 2), (5, 5))
        rows = patches.reshape(64, 25)
        reference += rows.T @ rows
    np.testing.assert_allclose(hessian.blocks(3)[0], reference, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------- int4


def _matmul_weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """(float32 bytes of the original MatMul weights, bytes the int4 form stores)."""
    original = onnx.load(model_path("digits_transformer"))
    inits = {t.name: t for t in original.graph.initializer}
    before = sum(
        numpy_helper.to_array(inits[n.input[1]]).nbytes
        for n in original.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
    )
    after = 0
    stored = {t.name: t for t in model.graph.initializer}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        feeds_matmul = node.op_type == "MatMulNBits" or (
            node.op_type == "DequantizeLinear"
            and any(c.op_type == "MatMul" for c in consumers.get(node.output[0], []))
        )
        if feeds_matmul:
            names = node.input[1:4] if node.op_type == "MatMulNBits" else node.input
            after += sum(
                len(stored[n].raw_data) or stored[n].ByteSize() for n in names if n in stored
            )
    return before, after


@pytest.mark.parametrize("form", ["dq", "matmulnbits"])
def test_int4_transformer_size_and_cosine(form):
    result = onnxopt.optimize(
        model_path("digits_transformer"), f"quantize-int4(format={form},unfused=dq)", data=TRAIN
    )
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert step["metrics_vs_original"]["logits"]["cosine"] >= 0.99
    before, after = _matmul_weight_bytes(result.model)
    assert after <= 0.165 * before  # 4 bits + (32-bit scale + 4-bit zero point) / 32
    runtime = runtime_ops(result.model)
    assert runtime.get("MatMulNBits") == 13  # the DQ form is fused by onnxruntime too
    graph_ops = ops(result.model)
    if form == "dq":
        assert graph_ops["DequantizeLinear"] == 14 and "MatMulNBits" not in graph_ops
        opset = {o.domain: o.version for o in result.model.opset_import}[""]
        assert opset == 21
        dq = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear")
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs["block_size"] == 32
    else:
        # the embedding MatMul has K=8 < block: kept in the exact-size DQ form
        assert graph_ops["MatMulNBits"] == 12 and graph_ops["DequantizeLinear"] == 2
    again = onnxopt.optimize(result.model, f"quantize-int4(format={form},unfused=dq)", data=TRAIN)
    assert again.steps[-1]["status"] == "no-op"


def test_int4_asymmetric_blocks_and_gather_embeddings():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    weight = rng.standard_normal((64, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(model, "quantize-int4(symmetric=false,block_size=64,unfused=dq)")
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert step["details"]["by_op"] == {"Gather": 1, "MatMul": 1}
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    dqs = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and all(len(n.input) == 3 for n in dqs)  # with zero points
    assert all(types[n.input[0]] == TensorProto.UINT4 for n in dqs)
    assert step["metrics_vs_original"]["y"]["cosine"] > 0.99


def test_int4_blocked_roundtrip_and_packing():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((70, 5)).astype(np.float32)  # K not a multiple of the block
    for symmetric in (True, False):
        q, scale, zero = numerics.quantize_blocked(weight, 32, symmetric)
        assert scale.shape == (3, 5) and (zero is None) == symmetric
        restored = numerics.dequantize_blocked(q, scale, zero, 32)
        step = np.repeat(scale, 32, axis=0)[:70]
        assert np.all(np.abs(restored - weight) <= step / 2 + 1e-6)
    packed = numerics.pack_int4(np.array([1, -1, 7], np.int8))
    assert packed == bytes([0xF1, 0x07])


def test_int4_rejects_unknown_op_types():
    with pytest.raises(UsageError, match=r"unknown op type.*LSTM; valid: MatMul, Gemm, Gather"):
        Pipeline.parse("quantize-int4(op_types=[LSTM])")


# ---------------------------------------------------------------------------- speed=auto


def test_speed_auto_keeps_float_what_the_profiler_finds_slower(monkeypatch):
    """Profiles are faked (timing must not decide a test): fc3 costs 9 us in int8 and
    2 us in fp32 (named like onnxruntime's fused float kernels), fc1/fc2 are cheaper in
    int8. fc3 must come back float, the others stay integer."""

    def fake_profile(model, feed, runs=speed.PROFILE_RUNS):
        names = {n.name for n in model.graph.node}
        if "/fc3/Gemm" in names and any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            return {"/fc1/Gemm": ("QGemm", 1.0), "/fc2/Gemm": ("QGemm", 1.0),
                    "/fc3/Gemm": ("QGemm", 9.0)}  # fmt: skip
        return {"/relu/Relu_output_0_nchwc": ("FusedGemm", 5.0),  # fc1 fused with its Relu
                "/fc2/Gemm_token_3": ("FusedGemm", 5.0), "/fc3/Gemm": ("Gemm", 2.0)}  # fmt: skip

    monkeypatch.setattr(speed, "profile_nodes", fake_profile)
    timings = iter([1.5, 0.8])  # slower as placed: profiled; faster once fc3 is float
    monkeypatch.setattr(speed, "latency_ratio", lambda ctx, a, b: {"ratio_1_thread": next(timings)})
    result = quantize("digits_mlp", "speed=auto")
    step = result.steps[-1]
    assert step["status"] == "accepted"
    kept = step["details"]["speed"]["kept_float"]
    assert [d["node"] for d in kept] == ["/fc3/Gemm"]
    assert kept[0]["int8_us"] == 9.0 and kept[0]["fp32_us"] == 2.0
    assert [d["subject"] for d in step["skipped"] if "kept float" in d["reason"]] == ["/fc3/Gemm"]
    fc3 = next(n for n in result.model.graph.node if n.name == "/fc3/Gemm")
    assert fc3.input[1] == "fc3.weight"
    assert step["counts"]["core_quantized"] == 2


def test_speed_auto_profiles_nothing_when_int8_is_faster(monkeypatch):

    def no_profile(model, feed, runs=0):
        raise AssertionError("profiled although int8 was faster")

    timings = []

    def timing(ctx, a, b):
        timings.append(1)
        return {"ratio_1_thread": 0.7, "fp32_ms": 1.0, "int8_ms": 0.7}

    monkeypatch.setattr(speed, "profile_nodes", no_profile)
    monkeypatch.setattr(speed, "latency_ratio", timing)
    step = quantize("digits_mlp", "speed=auto").steps[-1]
    assert step["status"] == "accepted"
    assert step["details"]["speed"]["profiled"] is False
    assert step["counts"]["int8_fp32_latency"] == 0.7
    assert len(timings) == 1  # the report reuses speed=auto's timing
    # latency=false: no timing at all, hence no speed placement
    step = quantize("digits_mlp", "speed=auto,latency=false").steps[-1]
    assert "speed" not in step["details"] and len(timings) == 1


def test_slow_reasons_name_what_onnxruntime_adds_to_the_int8_graph():
    fp32 = {"Conv": 20, "ReorderInput": 3, "ReorderOutput": 3, "Transpose": 1, "Add": 2}
    int8 = {"QLinearConv": 20, "Transpose": 23, "QuantizeLinear": 9, "DequantizeLinear": 9,
            "HardSigmoid": 4, "Mul": 8, "Add": 2}  # fmt: skip
    why = speed.slow_reasons(fp32, int8)
    assert "20 integer kernel(s)" in why
    assert "22 more layout Transpose(s)" in why
    assert "18 Quantize/DequantizeLinear between them and 14 float op(s)" in why
    assert "NCHWc" in why


def test_speed_auto_leaves_the_model_float_when_int8_stays_slower(monkeypatch):

    monkeypatch.setattr(speed, "profile_nodes", lambda model, feed, runs=0: {})
    monkeypatch.setattr(speed, "latency_ratio", lambda ctx, a, b: {"ratio_1_thread": 1.5})
    result = quantize("digits_mlp", "speed=auto")
    step = result.steps[-1]
    assert step["status"] == "no-op"
    assert any("1.50x fp32" in note and "left float" in note for note in step["notes"])
    assert any("integer kernel(s)" in note for note in step["notes"])  # and why


def test_speed_auto_says_why_when_every_node_profiled_slower(monkeypatch):
    """The profiler reverts every quantized node: the reason names that, with the
    measured ratio (it once printed an empty list of causes)."""

    def fake_profile(model, feed, runs=0):
        if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            return {n.name: ("QGemm", 9.0) for n in model.graph.node if n.op_type == "Gemm"}
        return {n.name: ("Gemm", 1.0) for n in model.graph.node if n.op_type == "Gemm"}

    monkeypatch.setattr(speed, "profile_nodes", fake_profile)
    monkeypatch.setattr(speed, "latency_ratio", lambda ctx, a, b: {"ratio_1_thread": 1.4})
    step = quantize("digits_mlp", "speed=auto").steps[-1]
    assert step["status"] == "no-op"
    reason = next(n for n in step["notes"] if "left float" in n)
    assert "whole model 1.40x fp32" in reason
    assert "each of the 3 quantized node(s) profiled slower" in reason
    assert "): ;" not in reason


def _rule_model() -> onnx.ModelProto:
    """stem 3x3 Conv (1 -> 16, reduces 9) -> depthwise 3x3 (group 16) -> 3x3 Conv (16 ->
    64, reduces 144) -> SE gate: GlobalAveragePool -> 1x1 Conv (64 -> 64) -> Sigmoid -> Mul."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3)

    inits = {"ws": w(16, 1, 3, 3), "wd": w(16, 1, 3, 3), "wc": w(64, 16, 3, 3)}
    inits["wg"] = w(64, 64, 1, 1)
    for name, tensor in inits.items():
        tensor.name = name
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["s"], name="stem", **pads),
        helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        helper.make_node("Conv", ["sr", "wd"], ["d"], name="dw", group=16, **pads),
        helper.make_node("Relu", ["d"], ["dr"], name="dw_relu"),
        helper.make_node("Conv", ["dr", "wc"], ["c"], name="wide", **pads),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "wg"], ["g"], name="gate"),
        helper.make_node("Sigmoid", ["g"], ["gs"], name="gate_sigmoid"),
        helper.make_node("Mul", ["c", "gs"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes, "rule",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 16, 16])],
        list(inits.values()),
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_speed_rule_keeps_float_the_convs_int8_kernels_run_slower():
    """Decided from the graph alone: grouped, narrow (reduces < 64) and pooled-gate
    Convs stay float with their reason; the wide Conv is quantized. speed=none
    quantizes all four."""
    outcome = speed.slow_by_rule(gs.import_onnx(_rule_model()))
    kept = {d["node"]: d["kind"] for d in outcome.kept_float}
    assert kept == {"stem": "narrow", "dw": "grouped", "gate": "pooled"}
    assert "1 narrow, 1 grouped, 1 pooled" in outcome.notes()[0]
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 1, 16, 16)).astype(np.float32)}
             for i in range(8)]  # fmt: skip
    ruled = quantize(_rule_model(), "latency=false", data=feeds, budget="none").steps[-1]
    assert ruled["counts"]["core_quantized"] == 1
    reasons = {d["subject"]: d["reason"] for d in ruled["skipped"]}
    assert "grouped Conv (group=16)" in reasons["dw"]
    assert "reduces 9 inputs per output (< 64)" in reasons["stem"]
    assert "GlobalAveragePool" in reasons["gate"]
    assert ruled["details"]["speed_rule"]["min_reduction"] == 64
    every = quantize(_rule_model(), "latency=false,speed=none", data=feeds, budget="none")
    assert every.steps[-1]["counts"]["core_quantized"] == 4


# ---------------------------------------------------------------------------- vs the tool


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_transformer"])
def test_sqnr_at_least_onnxruntime_quantize_static(name, tmp_path):
    """Same calibration samples; the tool gets its own preprocessing (BN folding)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxopt.data import prepare_samples
    from onnxopt.runtime import make_session

    source = model_path(name)
    samples = prepare_samples(onnx.load(source), TRAIN, seed=0).calibration

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    quant_pre_process(str(source), str(tmp_path / "pre.onnx"))
    quantize_static(
        str(tmp_path / "pre.onnx"), str(tmp_path / "tool.onnx"), Reader(),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )  # fmt: skip
    ours = quantize(name, prefix="fold-batchnorm," if name == "digits_cnn" else "").model
    images, _ = digits("test")

    def outputs(model):
        return make_session(model, optimize=True).run(None, {"input": images})[0]

    reference = outputs(onnx.load(source))

    def sqnr(model):
        got = outputs(model)
        return 10 * np.log10(np.sum(reference**2) / np.sum((got - reference) ** 2))

    assert sqnr(ours) >= sqnr(onnx.load(tmp_path / "tool.onnx")) + 3.0


# ---------------------------------------------------------------------------- weight grid


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - got) ** 2))
    return 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


@pytest.mark.parametrize("bits, limit", [(7, 63), (8, 127)])
def test_weight_bits_bound_the_int8_weights(bits, limit):
    result = quantize("digits_mlp", f"{FAST},weight_bits={bits}")
    weights = [initializer(result.model, n.input[0]) for n in
               dequantized_constants(result.model, np.int8)]  # fmt: skip
    assert len(weights) == 3
    assert max(int(np.abs(w).max()) for w in weights) == limit


def test_default_weights_run_exactly_in_onnxruntimes_fused_kernels():
    """With 7-bit weights onnxruntime's fused QGemm computes what the QDQ graph says on
    any x86 CPU (no int16 saturation without VNNI): deployed == checked numerics."""
    import onnxruntime as ort

    result = quantize("digits_mlp")
    images, _ = digits("test")
    outputs = []
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(result.model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        outputs.append(session.run(None, {"input": images})[0])
    assert runtime_ops(result.model).get("QGemm") == 3
    assert _sqnr(outputs[0], outputs[1]) > 45  # only requantization rounding differs


def test_already_quantized_models_are_a_no_op_with_the_reason(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    dynamic = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(model_path("digits_mlp")), str(dynamic))
    result = quantize(onnx.load(dynamic))
    step = result.steps[-1]
    assert step["status"] == "no-op"
    assert any("already quantized (" in n and "MatMulInteger" in n for n in step["notes"])
    once = quantize("digits_mlp").model
    again = quantize(once).steps[-1]
    assert again["status"] == "no-op" and "QuantizeLinear" in " ".join(again["notes"])


def test_huge_range_masks_never_enter_a_calibrated_range():
    """MatMul B reads x where m is set and -3.4e38 elsewhere (an attention-mask fill):
    quantizing its input would stretch the scale over 1e38. It stays float with the
    reason; MatMul A, on the plain input, is quantized."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "WA"], ["a"], name="matmul_a"),
        helper.make_node("Greater", ["x", "zero"], ["m"], name="mask"),
        helper.make_node("Where", ["m", "x", "fill"], ["masked"], name="fill_mask"),
        helper.make_node("MatMul", ["masked", "WB"], ["b"], name="matmul_b"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="concat", axis=1),
    ]
    inits = {"WA": rng.standard_normal((16, 2)).astype(np.float32),
             "WB": rng.standard_normal((16, 2)).astype(np.float32),
             "zero": np.array(-1.0, np.float32), "fill": np.array(-3.4e38, np.float32)}  # fmt: skip
    model = _linear_model(nodes, inits, out_shape=(1, 4))
    result = quantize(model, f"{FAST},fallback=none", data=None, budget="none")
    step = result.steps[-1]
    skipped = {d["subject"]: d["reason"] for d in step["skipped"]}
    assert "matmul_b" in skipped and "calibrated range" in skipped["matmul_b"]
    assert step["counts"]["core_quantized"] == 1
    scales = [initializer(result.model, n.input[1]) for n in result.model.graph.node
              if n.op_type == "QuantizeLinear"]  # fmt: skip
    assert scales and max(float(s) for s in scales) < 1.0


def test_lazy_ranking_finds_the_sensitive_nodes_with_few_measurements():
    """fallback's best-first ranking: noise adds up over a set, so splitting the noisiest
    set finds the most sensitive node in ~2 log2(n) measurements, and the full order
    (all n ranked) costs at most 2n - 2 and equals the order of single measurements."""
    rng = np.random.default_rng(0)
    units = [f"conv{i}" for i in range(64)]
    noise = dict(zip(units, rng.uniform(1e-5, 1e-4, 64)))
    noise["conv17"], noise["conv40"] = 3e-2, 1e-2  # two layers carry the error
    calls = []

    def measure(group: frozenset[str]) -> float:
        calls.append(group)
        return -10 * np.log10(sum(noise[u] for u in group))

    ranking = fallback.Ranking(units, measure)
    assert ranking.top(1) == ["conv17"]
    assert len(calls) <= 2 * 6 + 1
    assert ranking.top(2) == ["conv17", "conv40"]
    assert ranking.alone["conv17"] < ranking.alone["conv40"]
    assert len(calls) <= 2 * 2 * 6
    everything = ranking.top(64)
    assert everything == sorted(units, key=lambda u: -noise[u])
    assert len(calls) <= 2 * 64 - 2
    assert sorted(ranking.alone) == sorted(units)
    noise["only"] = 1e-3
    single = fallback.Ranking(["only"], measure)
    assert single.top(3) == ["only"] and np.isfinite(single.alone["only"])


def test_calibration_fetches_in_bounded_runs_with_the_same_statistics(monkeypatch):
    """A run fetches at most FETCH_BYTES of activations: with a bound smaller than one
    tensor, every tensor gets its own run over the samples, and the quantized model is
    the same bytes (statistics do not depend on how tensors are grouped in runs)."""
    pipeline = f"{FAST},rounding=nearest,fallback=none,equalize=false"
    whole = quantize("digits_cnn", pipeline)
    runs = []
    original = calibrate.PassContext.activations

    def counted(self, graph, names, desc="calibrating"):
        runs.append(list(names))
        return original(self, graph, names, desc)

    monkeypatch.setattr(calibrate, "FETCH_BYTES", 1)
    monkeypatch.setattr(calibrate.PassContext, "activations", counted)
    split = quantize("digits_cnn", pipeline)
    assert len(runs) > 3 and all(len(names) == 1 for names in runs)
    assert split.model.SerializeToString() == whole.model.SerializeToString()


def test_each_node_kept_float_is_reported_once_with_its_own_reason():
    result = onnxopt.optimize(
        model_path("digits_cnn"), "quantize-int8(latency=false)",
        data=MODELS / "digits_train.npz", seed=0,
    )  # fmt: skip
    skipped = result.steps[-1]["skipped"]
    subjects = [entry["subject"] for entry in skipped]
    assert len(subjects) == len(set(subjects)) == 3
    assert all(entry["reason"].startswith("kept float: speed=rule: ") for entry in skipped)
