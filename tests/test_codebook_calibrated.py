"""share-weights on real-model patterns: weighted k-means, bias correction, scaled and
per-channel codebooks that decode to what was measured, float16 constants, weights
read through layout ops (torch LSTM exports)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import run
from onnx import numpy_helper

import onnxopt.passes.codebook  # noqa: F401  (registers share-weights)
from onnxopt.check import assert_equivalent, structural_checks
from onnxopt.graph import to_graph, to_model
from onnxopt.passes.codebook.kmeans import encode, encode_scaled, kmeans_1d
from onnxopt.pipeline import PassContext, get_pass, make_options
from onnxopt.runtime import make_session, run_samples, with_outputs


def share(model: onnx.ModelProto, calibration=(), **options):
    """Run share-weights on ``model`` with ``calibration`` feeds; ``(model, result)``
    (4 bits unless told: bits=auto, the default, needs the manager's checks)."""
    options.setdefault("bits", 4)
    cls = get_pass("share-weights")
    ctx = PassContext(
        calibration=list(calibration),
        rng=np.random.default_rng(0),
        seed=0,
        template=model,
        original=model,
        budget=cls.budget(),
    )
    graph = to_graph(model)
    result = cls(make_options(cls, options)).run(graph, ctx)
    return to_model(graph, model), result


def with_initializers(text: str, **arrays: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)
    return model


def folded(model: onnx.ModelProto, tmp_path) -> dict[str, np.ndarray]:
    """The initializers onnxruntime runs after folding the rebuild at load (level BASIC:
    ALL also reorders Conv weights into its blocked layout)."""
    import onnxruntime as ort

    path = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(path))
    ops = {node.op_type for node in optimized.graph.node}
    assert not {"Gather", "Cast", "Split", "Mul"} & ops, ops
    return {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}


def rebuilt(model: onnx.ModelProto, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """The rebuilt tensors ``names`` as onnxruntime computes them."""
    (values,) = run_samples(make_session(with_outputs(model, names)), [feed])
    return {name: values[name] for name in names}


def records(result) -> dict[str, dict]:
    return {r["tensor"]: r for r in result.details["tensors"]}


def outputs(model, feeds) -> np.ndarray:
    return np.stack([sample["y"] for sample in run(model, feeds)])


CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = Relu (c)
}
"""

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, w)
  y = BatchNormalization (c, scale, shift, mean, var)
}
"""


def bn_folded_like(rng, out=32, inputs=16) -> np.ndarray:
    """A Conv weight whose rows differ in scale by 10^3, as after BatchNorm folding."""
    weights = (
        rng.standard_normal((out, inputs, 3, 3)) * np.logspace(-3, 0, out)[:, None, None, None]
    )
    return weights.astype(np.float32)


def conv_bn_model(rng) -> onnx.ModelProto:
    return with_initializers(
        CONV_BN,
        w=bn_folded_like(rng),
        scale=rng.uniform(0.5, 2, 32).astype(np.float32),
        shift=rng.standard_normal(32).astype(np.float32),
        mean=rng.standard_normal(32).astype(np.float32) * 0.1,
        var=rng.uniform(0.5, 2, 32).astype(np.float32),
    )


def positive_feeds(count: int, seed: int) -> list[dict]:
    """Inputs with a large mean, as after a ReLU: the layer error is mostly a shift."""
    rng = np.random.default_rng(seed)
    return [
        {"x": (rng.standard_normal((1, 16, 8, 8)) * 0.3 + 2.0).astype(np.float32)}
        for _ in range(count)
    ]


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("granularity", ["channel", "scaled"])
def test_channel_and_scaled_codebooks_decode_exactly_to_what_was_measured(granularity, tmp_path):
    rng = np.random.default_rng(0)
    weight = bn_folded_like(rng)
    model = with_initializers(CONV, w=weight)
    out, result = share(model, granularity=granularity, bits=3, scope="weights")
    (record,) = result.details["tensors"]
    assert record["granularity"] == granularity and record["codebooks"] == 32
    assert np.array_equal(
        folded(out, tmp_path)["w"], rebuilt(out, ["w"], positive_feeds(1, 0)[0])["w"]
    )
    run_weights = rebuilt(out, ["w"], positive_feeds(1, 0)[0])["w"]  # what onnxruntime runs
    error = (run_weights.astype(np.float64) - weight) ** 2
    assert record["mse"] == pytest.approx(float(error.mean()), rel=1e-9)
    # the reconstruction the pass measured is bit for bit what onnxruntime folds
    encoder = encode if granularity == "channel" else encode_scaled
    expected = encoder(weight, 8, 0).reconstruct()
    assert np.array_equal(run_weights, expected)
    rows = run_weights.reshape(32, -1)
    if granularity == "channel":  # at most 8 values in every row, each row its own
        assert all(np.unique(row).size <= 8 for row in rows)
    else:  # one codebook of 8 values, one float16-exact scale per row
        scales = numpy_helper.to_array(
            next(t for t in out.graph.initializer if t.name.endswith(".sc"))
        ).reshape(-1)
        assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
        assert np.unique(np.round(rows / scales[:, None], 5)).size <= 8
    # every row keeps its relative accuracy: no small-scale channel is crushed
    relative = np.sum((rows - weight.reshape(32, -1)) ** 2, 1) / np.sum(
        weight.reshape(32, -1) ** 2, 1
    )
    assert relative.max() < 0.1
    tensor_form = encode(weight, 8, None).reconstruct().reshape(32, -1)
    crushed = np.sum((tensor_form - weight.reshape(32, -1)) ** 2, 1) / np.sum(
        weight.reshape(32, -1) ** 2, 1
    )
    assert crushed.max() > 0.9  # one codebook for all rows zeroes the smallest ones


def test_scaled_form_structure_and_materialized_outputs():
    rng = np.random.default_rng(1)
    model = conv_bn_model(rng)
    out, _ = share(model, granularity="scaled", scope="weights")
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Mul") == 1 and ops.count("Gather") == 1
    (mul,) = [n for n in out.graph.node if n.op_type == "Mul"]
    assert mul.output[0] == "w"
    scales = next(t for t in out.graph.initializer if t.name == mul.input[1])
    assert list(scales.dims) == [32, 1, 1, 1]
    assert not structural_checks(out)[0].failures
    _, second = share(out, granularity="scaled", scope="weights")
    assert not second.changed


# ---------------------------------------------------------------------------- calibration


def test_weighted_kmeans_beats_plain_on_a_layer_with_skewed_inputs():
    """SqueezeLLM's point: weights that read large inputs move the outputs more. A MatMul
    whose 8 loud input features carry 100x the variance of the other 56."""
    rng = np.random.default_rng(2)
    spread = np.ones(64)
    loud = rng.choice(64, 8, replace=False)
    spread[loud] = 10.0
    # training leaves the weights that read loud inputs small: plain k-means, which
    # counts every weight the same, gives their narrow range few centroids
    weight = (rng.standard_normal((64, 32)) * 0.1 / spread[:, None]).astype(np.float32)

    def samples(count, seed):
        r = np.random.default_rng(seed)
        return (r.standard_normal((count, 64)) * spread).astype(np.float32)

    variance = spread**2
    plain = encode(weight, 8, None).reconstruct()
    weighted = encode(weight, 8, None, weights=variance[:, None]).reconstruct()
    held_out = samples(2000, 3)
    errors = {
        name: float(np.mean((held_out @ (rebuilt - weight)) ** 2))
        for name, rebuilt in (("plain", plain), ("weighted", weighted))
    }
    assert errors["weighted"] < 0.7 * errors["plain"], errors
    # the same through the pass: calibration data gives the importances
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (float[N, 32] y) { y = MatMul(x, w) }
    """
    model = with_initializers(text, w=weight)
    calib = [{"x": row[None, :]} for row in samples(64, 4)]
    feeds = [{"x": row[None, :]} for row in held_out[:256]]
    reference = outputs(model, feeds)
    error = {}
    for calibrate in (True, False):
        out, result = share(model, calib, calibrate=calibrate, bits=3, granularity="tensor")
        assert records(result)["w"]["weighted"] is calibrate
        error[calibrate] = float(np.mean((outputs(out, feeds) - reference) ** 2))
    assert error[True] < 0.7 * error[False], error


def correlated_samples(count: int, seed: int, mixing: np.ndarray) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.standard_normal((count, mixing.shape[0])) @ mixing + 0.5).astype(np.float32)


def test_error_feedback_beats_nearest_assignment_on_correlated_inputs():
    """GPTQ's point: with correlated inputs the columns' errors can cancel. Same
    codebooks, indices chosen by feedback: the layer's output error must drop; pruned
    zeros stay exactly zero."""
    rng = np.random.default_rng(5)
    mixing = rng.standard_normal((64, 64)) * 0.3 + np.eye(64)
    weight = rng.standard_normal((64, 48)).astype(np.float32) * 0.1
    weight[rng.random(weight.shape) < 0.3] = 0.0
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (float[N, 48] y) { y = MatMul(x, w) }
    """
    model = with_initializers(text, w=weight)
    calib = [{"x": rows} for rows in correlated_samples(1024, 6, mixing).reshape(32, 32, 64)]
    feeds = [{"x": row[None, :]} for row in correlated_samples(256, 7, mixing)]
    reference = outputs(model, feeds)
    error, sqnr = {}, {}
    for use in (True, False):
        out, result = share(model, calib, feedback=use, bits=3, granularity="tensor")
        rebuilt_w = rebuilt(out, ["w"], feeds[0])["w"]
        assert np.all(rebuilt_w[weight == 0] == 0)
        error[use] = float(np.mean((outputs(out, feeds) - reference) ** 2))
        sqnr[use] = records(result)["w"]["sqnr_db"]
    assert error[True] < 0.85 * error[False], error  # measured 0.74x
    assert sqnr[True] < sqnr[False]  # worse weight SQNR, better outputs


def test_error_feedback_on_grouped_convolutions_decodes_to_what_was_measured(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {
      y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w)
    }
    """
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    model = with_initializers(text, w=weight)
    calib = [{"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)} for _ in range(8)]
    for granularity in ("tensor", "scaled"):
        out, result = share(model, calib, bits=3, granularity=granularity)
        record = records(result)["w"]
        decoded = folded(out, tmp_path)["w"]
        error = np.mean((decoded.astype(np.float64) - weight) ** 2)
        assert error == pytest.approx(record["mse"], rel=1e-5)


def test_kmeans_weights_move_centroids_to_weighted_means():
    values = np.array([[0.5, 1.0, 2.0, 10.0, 11.0, 12.0]], np.float32)
    weights = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 8.0]])
    book = kmeans_1d(values, 2, init="linear", weights=weights)
    # clusters {.5,1,2} and {10,11,12}; the second mean is pulled toward 12 (weight 8)
    expected = [3.5 / 3, (10 + 11 + 8 * 12) / 10]
    np.testing.assert_allclose(book.centroids[0], expected, rtol=1e-6)
    assert book.indices[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_bias_correction_removes_the_mean_shift_through_batchnorm():
    rng = np.random.default_rng(5)
    model = conv_bn_model(rng)
    calib, held_out = positive_feeds(32, 6), positive_feeds(16, 7)
    reference = outputs(model, held_out)
    shifts = {}
    for calibrate in (True, False):
        out, result = share(model, calib, calibrate=calibrate, scope="weights", bits=3)
        record = records(result)["w"]
        assert record["bias_corrected"] == ("mean" if calibrate else None)
        shift = (outputs(out, held_out) - reference).mean(axis=(0, 1, 3, 4))  # per channel
        shifts[calibrate] = float(np.sqrt(np.mean(shift**2)))
    assert shifts[True] < 0.2 * shifts[False], shifts
    # the Conv had no bias: BN's running mean took the shift, no new tensor
    out, _ = share(model, calib, scope="weights", bits=3)
    assert {t.name for t in out.graph.initializer} >= {"mean", "var"}
    assert all(len(n.input) == 2 for n in out.graph.node if n.op_type == "Conv")


@pytest.mark.parametrize("form", ["conv", "gemm", "matmul_add", "conv_no_bias"])
def test_bias_correction_finds_the_bias(form):
    rng = np.random.default_rng(8)
    texts = {
        "conv": "c = Conv <pads = [1, 1, 1, 1]> (x, w, b)\n y = Relu(c)",
        "conv_no_bias": "c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = Relu(c)",
        "gemm": "f = Flatten(x)\n c = Gemm <transB = 1> (f, w, b)\n y = Relu(c)",
        "matmul_add": "f = Flatten(x)\n m = MatMul(f, w)\n c = Add(m, b)\n y = Relu(c)",
    }
    out_shape = "[N, 32, 8, 8]" if form.startswith("conv") else "[N, 32]"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16, 8, 8] x) => (float{out_shape} y) {{ {texts[form]} }}
    """
    arrays = {"w": bn_folded_like(rng)}
    if form == "gemm":
        arrays["w"] = (rng.standard_normal((32, 1024)) * 0.05).astype(np.float32)
    if form == "matmul_add":
        arrays["w"] = (rng.standard_normal((1024, 32)) * 0.05).astype(np.float32)
    if form != "conv_no_bias":
        arrays["b"] = (rng.standard_normal(32) * 0.1).astype(np.float32)
    model = with_initializers(text, **arrays)
    calib = positive_feeds(32, 9)
    out, result = share(model, calib, scope="weights", bits=3)
    record = records(result)["w"]
    assert record["bias_corrected"] is not None
    if form == "conv_no_bias":  # a bias was added to the Conv
        (conv,) = [n for n in out.graph.node if n.op_type == "Conv"]
        assert len(conv.input) == 3 and conv.input[2] == record["bias_corrected"]
    else:
        assert record["bias_corrected"] == "b"
    pre = {"conv": "c", "conv_no_bias": "c", "gemm": "c", "matmul_add": "c"}[form]
    probe = [pre]
    before = run_samples(make_session(with_outputs(model, probe)), calib)
    after = run_samples(make_session(with_outputs(out, probe)), calib)
    axes = (0, 2, 3) if form.startswith("conv") else (0,)
    shift = np.mean([a[pre] - b[pre] for a, b in zip(after, before)], axis=0).mean(axis=axes[1:])
    scale = np.sqrt(np.mean([b[pre] ** 2 for b in before]))
    assert float(np.max(np.abs(shift))) < 1e-4 * scale + 1e-6  # exact on calibration data


# ---------------------------------------------------------------------------- constants


def test_biases_and_norm_parameters_are_stored_in_float16(tmp_path):
    rng = np.random.default_rng(10)
    model = conv_bn_model(rng)
    out, result = share(model, granularity="tensor")
    (half,) = [r for r in result.details["tensors"] if r["granularity"] == "float16"]
    # and the float16-exact codebooks of weights whose indices went to the sparse stream
    assert {"scale", "shift", "mean", "var"} <= set(half["pool"])
    assert all(n.endswith(".cb") for n in set(half["pool"]) - {"scale", "shift", "mean", "var"})
    assert min(half["member_sqnr_db"].values()) > 60
    stored = next(t for t in out.graph.initializer if t.name.endswith(".h"))
    assert stored.data_type == onnx.TensorProto.FLOAT16 and stored.dims[0] >= 128
    run_weights = rebuilt(out, ["scale", "shift", "mean", "var"], positive_feeds(1, 0)[0])
    for name in ("scale", "shift", "mean", "var"):
        original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        assert np.array_equal(run_weights[name], original.astype(np.float16).astype(np.float32))
    # beyond float16's range: left alone, with the reason
    big = conv_bn_model(rng)
    var = next(t for t in big.graph.initializer if t.name == "var")
    var.CopyFrom(numpy_helper.from_array(np.full(32, 1e6, np.float32), "var"))
    _, result = share(big, granularity="tensor")
    skipped = {s.subject: s.reason for s in result.skipped}
    assert "range" in skipped["var"]
    _, second = share(out, granularity="tensor")
    assert not second.changed


LSTM_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[T, 1, 16] x) => (float[T, 1, 1, 32] y) {
  s0 = Constant <value_ints = [0]> ()
  s64 = Constant <value_ints = [64]> ()
  s128 = Constant <value_ints = [128]> ()
  a = Slice(w_ih, s0, s64, s0)
  b = Slice(w_ih, s64, s128, s0)
  wc = Concat <axis = 0> (b, a)
  W = Unsqueeze(wc, s0)
  R = Unsqueeze(w_hh, s0)
  y, h = LSTM <hidden_size = 32> (x, W, R)
}
"""


def test_recurrent_weights_read_through_layout_ops_are_shared():
    rng = np.random.default_rng(11)
    model = with_initializers(
        LSTM_TEXT,
        w_ih=(rng.standard_normal((128, 16)) * 0.2).astype(np.float32),
        w_hh=(rng.standard_normal((128, 32)) * 0.2).astype(np.float32),
    )
    out, result = share(model)
    shared = records(result)
    assert {"w_ih", "w_hh"} <= set(shared)
    assert shared["w_ih"]["granularity"] in ("tensor", "scaled")
    feeds = [{"x": rng.standard_normal((5, 1, 16)).astype(np.float32)} for _ in range(4)]
    assert_equivalent(run(model, feeds), run(out, feeds), "cosine>=0.99")


def test_default_is_deterministic_and_idempotent():
    rng = np.random.default_rng(12)
    model = conv_bn_model(rng)
    calib = positive_feeds(16, 13)
    first, result = share(model, calib)
    second, _ = share(model, calib)
    assert first.SerializeToString() == second.SerializeToString()
    assert result.changed
    _, again = share(first, calib)
    assert not again.changed
    feeds = positive_feeds(4, 14)  # like the calibration data: bias correction holds
    assert_equivalent(run(model, feeds), run(first, feeds), "cosine>=0.99")


# ---------------------------------------------------------------------------- bits=auto


@pytest.mark.parametrize("budget", [None, "cosine>=0.999,top1>=0.99"])
def test_bits_auto_is_never_above_its_budget_and_beats_8_bits(budget):
    from conftest import MODELS, model_path

    import onnxopt

    data = str(MODELS / "digits_train.npz")
    path = str(model_path("digits_cnn"))
    result = onnxopt.optimize(path, "share-weights(bits=auto)", data=data, budget=budget)
    (step,) = result.steps
    assert step["status"] == "accepted", step["reason"]
    floor = 0.99 if budget is None else 0.999
    assert step["worst_vs_original"]["cosine"] >= floor
    assert step["worst_vs_original"]["top1"] >= 0.99
    searched = step["details"]["auto"]
    assert any(t["within_budget"] for t in searched["trials"])
    assert len(searched["trials"]) <= 5
    # the kept trial is the smallest within budget, and it was measured as the manager does
    kept = min((t for t in searched["trials"] if t["within_budget"]), key=lambda t: t["bytes"])
    assert searched["widths"] == kept["widths"]
    eight = onnxopt.optimize(path, "share-weights(bits=8)", data=data, budget="none")
    assert result.model.ByteSize() < eight.model.ByteSize()
    widths = {label for label in searched["widths"]}
    assert widths and all(label.endswith("bits") or label == "float16" for label in widths)


def test_auto_allocation_spends_bits_where_the_gain_is():
    from onnxopt.passes.codebook.auto import Weight, allocate

    def weight(name, gain):
        w = Weight(name, 1000, gain)
        for bits in (2, 3, 4, 5, 6, 7, 8, 16):
            w.bytes[bits] = 2000 if bits == 16 else 500 if bits <= 4 else 1000
            w.error[bits] = 2.0**-24 if bits == 16 else 0.01 * 4.0 ** (4 - bits)
        return w

    loud, quiet = weight("loud", 10.0), weight("quiet", 0.01)
    widths = allocate([loud, quiet], target=0.01)
    assert widths["loud"] > widths["quiet"]
    total = loud.predicted(widths["loud"]) + quiet.predicted(widths["quiet"])
    assert total <= 0.01
    assert allocate([loud, quiet], target=10.0) == {"loud": 2, "quiet": 2}


def test_auto_granularity_spends_channel_codebooks_only_where_they_are_cheap():
    """A channel's codebook is worth half its indices at 4 bits, an eighth at 8 bits."""
    text = """
    <ir_version: 8, opset_import: ["" : 21]>
    g (float[N, 512] x) => (float[N, 64] y) { y = MatMul(x, w) }
    """
    rng = np.random.default_rng(9)
    model = with_initializers(text, w=rng.standard_normal((512, 64)).astype(np.float32))
    _, low = share(model, bits=4)
    _, high = share(model, bits=8)
    assert records(low)["w"]["granularity"] == "channel"  # 64 codebook bytes, 256 index
    assert records(high)["w"]["granularity"] != "channel"  # 1,024 codebook bytes, 512 index
    assert records(high)["w"]["bytes_after"] < 512 * 64 + 64 * 1024
