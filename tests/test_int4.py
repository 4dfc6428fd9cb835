"""quantize-int4 on convolutions: blocked layouts, narrow kernels, scale search, GPTQ,
sizes, no-op reasons. (MatMul/Gemm/Gather int4 tests live in test_quantize.py.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import model_path, run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.quantize
from onnxopt.passes.quantize.int4_grid import (
    Grid,
    Layout,
    choose_scales,
    dequantize,
    round_nearest,
)

NAIVE = "quantize-int4(rounding=nearest,weight_clip=max,symmetric=true)"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """Stem (3 in-channels), 3x3 conv 32->48, depthwise 3x3, ConvTranspose 48->16."""
    rng = np.random.default_rng(seed)

    def heavy(*shape):  # heavy-tailed weights, like trained ones
        return (rng.standard_t(4, shape) * 0.1).astype(np.float32)

    inits = {
        "w_stem": heavy(32, 3, 3, 3),
        "w_main": heavy(48, 32, 3, 3),
        "w_dw": heavy(48, 1, 3, 3),
        "w_up": heavy(48, 16, 2, 2),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_r"]),
        helper.make_node("Conv", ["a_r", "w_main"], ["b"], name="main", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_dw"], ["c"], name="dw", group=48, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "w_up"], ["y"], name="up", strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 24, 24])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(count: int, seed: int) -> np.ndarray:
    """Structured inputs: smooth images with unequal channel scales."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 3, 4, 4)).astype(np.float32)
    images = np.repeat(np.repeat(base, 3, axis=2), 3, axis=3)
    return images * np.array([4.0, 1.0, 0.25], np.float32)[None, :, None, None]


def _sqnr(reference: list[dict], got: list[dict]) -> float:
    ref = np.concatenate([r["y"].ravel() for r in reference]).astype(np.float64)
    err = ref - np.concatenate([g["y"].ravel() for g in got])
    return float(10 * np.log10(ref @ ref / (err @ err)))


@pytest.fixture(scope="module")
def conv_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("int4") / "calib.npz"
    np.savez(path, x=_images(48, seed=1)[:, None])
    return str(path)


@pytest.fixture(scope="module")
def quantized(conv_data):
    return onnxopt.optimize(_conv_model(), "quantize-int4", data=conv_data, budget="none")


@pytest.fixture(scope="module")
def quantized_dq(conv_data):
    return onnxopt.optimize(
        _conv_model(), "quantize-int4(unfused=dq)", data=conv_data, budget="none"
    )


def test_conv_weights_are_blocked_along_input_channels(quantized_dq):
    step = quantized_dq.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    model = quantized_dq.model
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    by_node = {
        n.name: dq[n.input[1]] for n in model.graph.node if n.input[1:2][0:1] and n.input[1] in dq
    }
    assert set(by_node) == {"stem", "main", "dw", "up"}
    # main: [48, 32, 3, 3], blocks of 32 along axis 1 -> scale [48, 1, 3, 3], uint4 + zero point
    main = by_node["main"]
    assert _attrs(main) == {"axis": 1, "block_size": 32}
    assert inits[main.input[0]].data_type == TensorProto.UINT4
    assert list(inits[main.input[1]].dims) == [48, 1, 3, 3]
    assert inits[main.input[2]].data_type == TensorProto.UINT4
    # ConvTranspose [48 in, 16 out, 2, 2]: its input channels are axis 0; 32 does not
    # divide 48, so blocks of 24 tile them exactly
    up = by_node["up"]
    assert _attrs(up) == {"axis": 0, "block_size": 24}
    assert list(inits[up.input[1]].dims) == [2, 16, 2, 2]
    # narrow kernels (depthwise, 3-channel stem): per output channel, symmetric int8
    for name in ("dw", "stem"):
        node = by_node[name]
        assert _attrs(node) == {"axis": 0} and len(node.input) == 2
        assert inits[node.input[0]].data_type == TensorProto.INT8
        assert list(inits[node.input[1]].dims) == [
            numpy_helper.to_array(inits[node.input[0]]).shape[0]
        ]
    assert step["details"]["by_bits"] == {"int4": 2, "int8": 2}
    assert step["counts"]["gptq_weights"] == 3  # ConvTranspose: nearest rounding


def test_default_form_is_folded_by_onnxruntime_and_equals_the_dq_form(
    quantized, quantized_dq, tmp_path
):
    import onnxruntime as ort

    model = quantized.model
    kinds = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" not in kinds and {"Cast", "Sub", "Mul", "Reshape"} <= kinds
    types = {t.data_type for t in model.graph.initializer}
    assert TensorProto.UINT4 in types and TensorProto.INT8 in types
    feeds = [{"x": x[None]} for x in _images(4, seed=3)]
    for a, b in zip(run(model, feeds), run(quantized_dq.model, feeds)):
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-5, atol=1e-6)
    # onnxruntime folds the whole weight expression into float32 Conv weights at load
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    path = tmp_path / "int4.onnx"
    onnx.save(model, path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert sorted(n.op_type for n in optimized.graph.node) == [
        "Conv",
        "Conv",
        "Conv",
        "ConvTranspose",
        "Relu",
    ]


def test_conv_file_shrinks_below_three_tenths(quantized):
    before = len(_conv_model().SerializeToString())
    after = len(quantized.model.SerializeToString())
    assert after <= 0.3 * before
    assert quantized.steps[-1]["counts"]["weight_size_ratio"] < 0.25


def test_default_beats_naive_round_to_nearest(quantized, conv_data):
    naive = onnxopt.optimize(_conv_model(), NAIVE, data=conv_data, budget="none")
    feeds = [{"x": x[None]} for x in _images(16, seed=7)]  # unseen inputs
    reference = run(_conv_model(), feeds)
    ours, theirs = (
        _sqnr(reference, run(quantized.model, feeds)),
        _sqnr(reference, run(naive.model, feeds)),
    )
    assert ours >= theirs + 3.0, (ours, theirs)


def test_second_run_is_a_no_op(quantized, conv_data):
    again = onnxopt.optimize(quantized.model, "quantize-int4", data=conv_data)
    step = again.steps[-1]
    assert step["status"] == "no-op"
    assert "already quantized (Cast of integer weights)" in " ".join(step["notes"])


def test_already_quantized_model_is_a_no_op_with_the_reason():
    rng = np.random.default_rng(0)
    weight = rng.integers(-8, 8, (8, 4, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("ConvInteger", ["xq", "w", "z"], ["acc"], name="conv"),
        helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32(0.1), "s"),
         numpy_helper.from_array(np.int8(0), "z")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(model, "quantize-int4")
    step = result.steps[-1]
    assert step["status"] == "no-op"
    assert "already quantized (ConvInteger)" in " ".join(step["notes"])


@pytest.mark.parametrize(("narrow", "bits"), [("int4", {"int4": 4}), ("float", {"int4": 2})])
def test_narrow_option(narrow, bits, conv_data):
    result = onnxopt.optimize(
        _conv_model(), f"quantize-int4(narrow={narrow})", data=conv_data, budget="none"
    )
    step = result.steps[-1]
    assert step["details"]["by_bits"] == bits
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    if narrow == "float":
        assert types["w_dw"] == TensorProto.FLOAT and types["w_stem"] == TensorProto.FLOAT
    else:
        casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
        assert {types[n.input[0]] for n in casts if n.input[0] in types} == {TensorProto.UINT4}


def test_digits_cnn_after_fold_batchnorm():
    data = str(model_path("digits_mlp").parent / "digits_train.npz")
    result = onnxopt.optimize(model_path("digits_cnn"), "fold-batchnorm,quantize-int4", data=data)
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert step["metrics_vs_original"]["logits"]["top1"] >= 0.99
    size = len(result.model.SerializeToString())
    assert size <= 0.3 * model_path("digits_cnn").stat().st_size


# ---------------------------------------------------------------------------- grid numerics


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((6, 40, 3, 3), Layout(1, 16)),
        ((40, 6, 2, 2), Layout(0, 32)),
        ((6, 1, 3, 3), Layout(0, None)),
    ],
)
def test_layout_round_trips_and_dequantize_layout(shape, layout):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    rows = layout.rows(w)
    np.testing.assert_array_equal(layout.unrows(rows, shape), w)
    grid = Grid(4, False)
    scale, zero = choose_scales(rows, layout.block_rows(rows.shape[0]), grid, search=False)
    assert layout.params_from_rows(scale, shape).shape == layout.param_shape(shape)
    s, z = layout.per_element(scale, shape), layout.per_element(zero, shape)
    restored = dequantize(round_nearest(w, s, z, grid), s, z)
    assert np.all(np.abs(restored - w) <= s / 2 + 1e-6)  # full range: never clipped


def test_onnxruntime_dequantizes_a_4d_blocked_weight_like_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40, 3, 3)).astype(np.float32)
    layout, grid = Layout(1, 16), Grid(4, True)
    scale, _ = choose_scales(layout.rows(w), 16, grid)
    s = layout.per_element(scale, w.shape)
    q = round_nearest(w, s, None, grid)
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1, block_size=16)
    graph = helper.make_graph(
        [node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("q", TensorProto.INT4, q.shape, q.ravel().tolist()),
         numpy_helper.from_array(layout.params_from_rows(scale, w.shape), "s")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (out,) = run(model, [{}])[0].values()
    np.testing.assert_allclose(out, dequantize(q, s, None), rtol=1e-6)


def test_weighted_scale_search_lowers_the_weighted_error():
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (256, 24)) * 0.05).astype(np.float32)
    importance = np.broadcast_to(np.exp(rng.normal(0, 1.5, 256))[:, None], w.shape)
    layout = Layout(0, 32)
    for grid in (Grid(4, True), Grid(4, False)):
        errors = []
        for search in (False, True):
            scale, zero = choose_scales(w, 32, grid, importance, search=search)
            s = layout.per_element(scale, w.shape)
            z = None if zero is None else layout.per_element(zero, w.shape)
            restored = dequantize(round_nearest(w, s, z, grid), s, z)
            errors.append(float(np.sum(importance * (restored - w) ** 2)))
        assert errors[1] < 0.85 * errors[0]


def test_weight_clip_auto_keeps_the_full_range_under_gptq(conv_data):
    """auto = max where GPTQ rounds (every Conv here has calibration inputs), mse elsewhere."""

    def quantize(options: str) -> bytes:
        pipeline = f"quantize-int4(op_types=[Conv]{options})"
        result = onnxopt.optimize(_conv_model(), pipeline, data=conv_data, budget="none")
        return result.model.SerializeToString()

    auto = quantize("")
    assert auto == quantize(",weight_clip=max")
    assert auto != quantize(",weight_clip=mse")
    assert quantize(",rounding=nearest") == quantize(",rounding=nearest,weight_clip=mse")


def test_gather_table_in_cast_form_matches_the_dq_form():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 96)).astype(np.float32)  # 3 blocks of 32 per row
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 96])],
        [numpy_helper.from_array(table, "table")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cast = onnxopt.optimize(model, "quantize-int4", budget="none").model
    dq = onnxopt.optimize(model, "quantize-int4(unfused=dq)", budget="none").model
    assert "DequantizeLinear" not in {n.op_type for n in cast.graph.node}
    assert "DequantizeLinear" in {n.op_type for n in dq.graph.node}
    feeds = [{"ids": np.array([[0, 7, 49, 3, 3]], np.int64)}]
    (a,), (b,) = run(cast, feeds), run(dq, feeds)
    np.testing.assert_array_equal(a["y"], b["y"])
    assert np.abs(a["y"] - table[[0, 7, 49, 3, 3]][None]).max() < 0.5


# ---------------------------------------------------------------------------- fallback=auto


def _outlier_chain(seed: int = 0) -> onnx.ModelProto:
    """Three MatMuls; the middle weight has a large row in each block of 32 along K, on
    an input feature that is nearly always zero. Its int4 blocks spend their 16 levels
    on that row and round every other weight to a step larger than the weights
    themselves (GPTQ cannot help: the scale is shared); int8 resolves them. The output
    goes through a Tanh, so it is not class scores (no top-1 in the budget)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 64)) * 0.15).astype(np.float32)
    w2 = (rng.standard_normal((64, 64)) * 0.15).astype(np.float32)
    w3 = (rng.standard_normal((64, 16)) * 0.15).astype(np.float32)
    quiet = [5, 40]  # one per block of 32 rows of w2
    w1[:, quiet] *= 1e-3
    w2[quiet] = 1.5 * np.sign(rng.standard_normal((2, 64)))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
        helper.make_node("Tanh", ["a"], ["a_t"]),
        helper.make_node("MatMul", ["a_t", "w2"], ["b"], name="outliers"),
        helper.make_node("Tanh", ["b"], ["b_t"]),
        helper.make_node("MatMul", ["b_t", "w3"], ["c"], name="last"),
        helper.make_node("Tanh", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": w1, "w2": w2, "w3": w3}.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def chain_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("int4_chain") / "calib.npz"
    x = np.random.default_rng(7).standard_normal((48, 4, 64)).astype(np.float32)
    np.savez(path, x=x)
    return str(path)


def test_fallback_auto_moves_only_the_weight_that_needs_int8(chain_data):
    model = _outlier_chain()
    without = onnxopt.optimize(model, "quantize-int4(fallback=none)", data=chain_data)
    step = without.steps[-1]
    assert step["status"] == "rolled back"  # every weight in int4 misses cosine >= 0.99
    result = onnxopt.optimize(model, "quantize-int4", data=chain_data)
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    fallback = step["details"]["fallback"]
    assert fallback["int8"] == ["outliers"]  # the noisiest by its own estimate, and enough
    assert fallback["violations_before"] and not fallback["violations_after"]
    noise = fallback["noise_db"]
    assert noise["outliers"] < min(noise["first"], noise["last"]) - 6
    assert step["details"]["by_bits"] == {"int4": 2, "int8": 1}
    assert any("fallback=auto: 1 weight(s) int8" in note for note in step["notes"])
    # the int8 weight: symmetric, one scale per output channel (axis 1 of MatMul's [K, N])
    inits = {t.name: t for t in result.model.graph.initializer}
    node = next(n for n in result.model.graph.node if n.name == "outliers")
    dq = next(n for n in result.model.graph.node if n.output[0] == node.input[1])
    assert inits[dq.input[0]].data_type == TensorProto.INT8
    feeds = [{"x": x} for x in np.random.default_rng(9).standard_normal((8, 4, 64), np.float32)]
    ref = run(model, feeds)
    got = run(result.model, feeds)
    a = np.concatenate([r["y"].ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g["y"].ravel() for g in got]).astype(np.float64)
    assert a @ b / np.sqrt((a @ a) * (b @ b)) >= 0.99
    # the file stays int4-sized: one of three weights at 8 bits
    assert step["counts"]["weight_size_ratio"] < 0.25


def test_fallback_costs_one_measurement_when_int4_meets_the_budget(conv_data):
    result = onnxopt.optimize(_conv_model(), "quantize-int4", data=conv_data)
    step = result.steps[-1]
    assert step["status"] == "accepted", step["reason"]
    assert step["details"]["fallback"]["trials"] == [{"int8": 0, "violations": []}]
    assert step["details"]["by_bits"] == {"int4": 2, "int8": 2}  # only the narrow kernels
