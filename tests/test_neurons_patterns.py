"""remove-neurons on the patterns of real architectures, one small model each.

Every model plants *zero-importance* channels: their producer rows, biases and
consumer columns are exactly zero (so ``ratio=`` picks them first, and removing them
cannot change anything). Each test asserts the structure after pruning (weight
shapes, rewritten attributes and shape constants, op counts) and that the pruned
model's outputs equal the original's in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run
from onnx import helper, numpy_helper
from test_neurons import Net, _prune, _set_rows, _weights_of, _with

from onnxopt.check import assert_equivalent

EXACT = "atol=1e-5,rtol=1e-4"


def _plant(model: onnx.ModelProto, zeros: dict[str, tuple[list[int], int]]) -> onnx.ModelProto:
    """Zero ``indices`` along ``axis`` of each named initializer."""
    return _with(model, {name: _set_rows(rows, 0.0, axis) for name, (rows, axis) in zeros.items()})


def _same_outputs(original, pruned, shape, count: int = 3) -> None:
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]
    assert_equivalent(run(original, feeds), run(pruned, feeds), EXACT)


def _init(model: onnx.ModelProto, name_part: str) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer if name_part in t.name]


def _node(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _status(step) -> dict[str, str]:
    return {g["producers"]: g["status"] for g in step["details"]["groups"]}


# ---------------------------------------------------------------------------- channel shuffle


def _shuffle_model():
    """Conv(8->12) -> ReLU -> shuffle [2, 6] -> depthwise -> grouped Conv(12->8, g=2)."""
    net = Net(shape=(1, 8, 6, 6))
    a = net.add("Relu", [net.conv("x", 8, 12, k=1)])  # w0 w1
    r = net.add("Reshape", [a, net.const(np.array([1, 2, 6, 6, 6]))])  # c2
    t = net.add("Transpose", [r], perm=[0, 2, 1, 3, 4])
    s = net.add("Reshape", [t, net.const(np.array([1, 12, 6, 6]))])  # c3
    d = net.conv(s, 12, 12, k=3, group=12)  # w4 w5
    b = net.add("Relu", [net.conv(d, 12, 8, k=1, group=2)])  # w6 w7
    return net.model(net.conv(b, 8, 4, k=1)), net  # w8 w9


def test_channel_shuffle_before_a_grouped_conv_prunes_whole_shuffle_positions():
    model, _ = _shuffle_model()
    # producer channel (group g, index j) sits at g*6+j; after the shuffle at j*2+g.
    # Plant j in {1, 4}: one per Conv group of the consumer (positions 2,3 and 8,9).
    planted = _plant(
        model,
        {
            "w0": ([1, 7, 4, 10], 0), "w1": ([1, 7, 4, 10], 0),
            "w4": ([2, 3, 8, 9], 0), "w5": ([2, 3, 8, 9], 0),
            "w6": ([2, 3], 1),  # consumer group 0 reads positions 0..5, group 1 6..11
            "w7": ([0, 4], 0), "w8": ([0, 4], 1),
        },
    )  # fmt: skip
    w6 = _init(planted, "w6")[0].copy()
    w6[4:, 2:4] = 0  # group 1's local columns 2, 3 (positions 8, 9)
    w6[0], w6[4] = 0, 0
    planted = _with(planted, {"w6": lambda _: w6})
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.34)")
    assert step["status"] == "accepted"
    assert step["counts"]["groups_pruned"] == 2
    conv = _weights_of(result.model, "Conv")
    assert [w.shape for w in conv] == [(8, 8, 1, 1), (8, 1, 3, 3), (6, 4, 1, 1), (4, 6, 1, 1)]
    depthwise, grouped = _node(result.model, "Conv")[1:3]
    assert _attr(depthwise, "group") == 8 and _attr(grouped, "group") == 2
    assert [a.tolist() for a in _init(result.model, "c2")] == [[1, 2, 4, 6, 6]]
    assert [a.tolist() for a in _init(result.model, "c3")] == [[1, 8, 6, 6]]
    _same_outputs(planted, result.model, (1, 8, 6, 6))


def test_shuffle_groups_straddling_conv_groups_are_pinned_not_blocked():
    """30 channels shuffled by 2 into a Conv with 2 groups of 15 (like light ShuffleNet's
    136 channels, shuffled by 4, in groups of 34): the class on the group boundary
    (positions 14, 15) is fixed, the others prune evenly from both groups."""
    net = Net(shape=(1, 4, 4, 4))
    a = net.add("Relu", [net.conv("x", 4, 30, k=1)])
    r = net.add("Reshape", [a, net.const(np.array([1, 2, 15, 4, 4]))])
    t = net.add("Transpose", [r], perm=[0, 2, 1, 3, 4])
    s = net.add("Reshape", [t, net.const(np.array([1, 30, 4, 4]))])
    result, step = _prune(net.model(net.conv(s, 30, 4, k=1, group=2)), "remove-neurons(ratio=0.5)")
    (group,) = [g for g in step["details"]["groups"] if g["producers"] == "Conv1"]
    assert group["status"] == "pruned" and group["channels_before"] == 15
    assert group["channels_after"] == 9  # 3 of 7 from each Conv group, the straddler kept
    assert [w.shape for w in _weights_of(result.model, "Conv")] == [(18, 4, 1, 1), (4, 9, 1, 1)]


def test_grouped_convs_cutting_a_group_differently_prune_an_even_subset():
    """A (6 channels, 2 Conv groups of 3) and P (2) concatenated into B (2 groups of 4):
    A's group 1 straddles B's groups. Removing one channel from A[0:3] and one from
    A[4:6] keeps both constraints even; channels 3, 6 and 7 are fixed."""
    net = Net(shape=(1, 4, 4, 4))
    a = net.conv("x", 4, 6, k=1, group=2)  # w0 w1
    p = net.conv("x", 4, 2, k=1)  # w2 w3
    cat = net.add("Relu", [net.add("Concat", [a, p], axis=1)])
    model = net.model(net.conv(cat, 8, 4, k=1, group=2))  # w4 w5
    w4 = _init(model, "w4")[0].copy()
    w4[:2, 1] = 0  # B's group 0 reads positions 0..3: channel 1 is its local column 1
    w4[2:, 0] = 0  # B's group 1 reads positions 4..7: channel 4 is its local column 0
    planted = _with(_plant(model, {"w0": ([1, 4], 0), "w1": ([1, 4], 0)}), {"w4": lambda _: w4})
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "accepted", step["reason"]
    assert [w.shape for w in _weights_of(result.model, "Conv")] == [
        (4, 2, 1, 1), (2, 4, 1, 1), (4, 3, 1, 1)
    ]  # fmt: skip
    _same_outputs(planted, result.model, (1, 4, 4, 4))


# ---------------------------------------------------------------------------- C2f / CSP


def _silu(net: Net, x: str) -> str:
    return net.add("Mul", [x, net.add("Sigmoid", [x])])


def _c2f_model():
    """cv1 -> SiLU -> Split [4, 4] -> bottleneck(residual) -> Concat(y0, y1, y2) -> cv2."""
    net = Net(shape=(1, 4, 8, 8))
    y = _silu(net, net.conv("x", 4, 8, k=1))  # w0 w1
    y0, y1 = net.add("Split", [y, net.const(np.array([4, 4]))], outputs=2, axis=1)  # c2
    h = _silu(net, net.conv(y1, 4, 4))  # w3 w4
    y2 = net.add("Add", [y1, _silu(net, net.conv(h, 4, 4))])  # w5 w6
    cat = net.add("Concat", [y0, y1, y2], axis=1)
    out = net.conv(_silu(net, net.conv(cat, 12, 6, k=1)), 6, 3, k=1)  # w7 w8, w9 w10
    return net.model(out)


def test_c2f_split_concat_block_rewrites_split_sizes():
    # cv1 channels 1 (in y0) and 5 (y1[1], coupled with the bottleneck's output 1 by
    # the residual Add): rows, and the columns of every reader (y0/y1/y2 in the Concat)
    planted = _plant(
        _c2f_model(),
        {
            "w0": ([1, 5], 0), "w1": ([1, 5], 0), "w5": ([1], 0), "w6": ([1], 0),
            "w3": ([1], 1), "w7": ([1, 5, 9], 1),
        },
    )  # fmt: skip
    # the bottleneck's hidden channel 2 and cv2's output 3
    planted = _plant(planted, {"w3": ([2], 0), "w4": ([2], 0), "w5": ([2], 1)})
    planted = _plant(planted, {"w7": ([3], 0), "w8": ([3], 0), "w9": ([3], 1)})
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.25)")
    assert step["status"] == "accepted" and step["counts"]["groups_pruned"] == 3
    conv = _weights_of(result.model, "Conv")
    assert [w.shape for w in conv] == [
        (6, 4, 1, 1), (3, 3, 3, 3), (3, 3, 3, 3), (5, 9, 1, 1), (3, 5, 1, 1)
    ]  # fmt: skip
    (split,) = _node(result.model, "Split")
    sizes = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert sizes[split.input[1]].tolist() == [3, 3]
    _same_outputs(planted, result.model, (1, 4, 8, 8))


# ---------------------------------------------------------------------------- SE, activations, neck


def _mobile_model():
    """Stem -> HardSwish -> depthwise -> Clip -> SE(HardSigmoid) -> Mul -> proj ->
    Resize x2 -> Concat with a full-resolution branch -> head."""
    net = Net(shape=(1, 3, 16, 16))
    stem_inputs = ["x", net.weight((8, 3, 3, 3)), net.weight((8,), 0.1)]  # w0 w1
    stem = net.add("Conv", stem_inputs, kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2])
    stem = net.add("HardSwish", [stem])
    dw = net.add("Clip", [net.conv(stem, 8, 8, k=3, group=8), net.const(np.float32(0)),
                          net.const(np.float32(6))])  # w2 w3, c4 c5  # fmt: skip
    pooled = net.add("GlobalAveragePool", [dw])
    squeeze = net.add("Relu", [net.conv(pooled, 8, 4, k=1)])  # w6 w7
    gate = net.add("HardSigmoid", [net.conv(squeeze, 4, 8, k=1)], alpha=1 / 6, beta=0.5)  # w8 w9
    proj = net.conv(net.add("Mul", [dw, gate]), 8, 6, k=1)  # w10 w11
    scales = net.const(np.array([1, 1, 2, 2], dtype=np.float32))  # c12
    up = net.add("Resize", [proj, "", scales], mode="nearest")
    branch = _silu(net, net.conv("x", 3, 4))  # w13 w14
    cat = net.add("Concat", [up, branch], axis=1)
    return net.model(net.conv(cat, 10, 2, k=1))  # w15 w16


def test_se_gate_hardswish_clip_depthwise_and_resize_concat_neck():
    planted = _plant(
        _mobile_model(),
        {
            "w0": ([2, 5], 0), "w1": ([2, 5], 0), "w2": ([2, 5], 0), "w3": ([2, 5], 0),
            "w8": ([2, 5], 0), "w9": ([2, 5], 0), "w6": ([2, 5], 1), "w10": ([2, 5], 1),
        },
    )  # fmt: skip
    planted = _plant(
        planted,
        {
            "w6": ([1], 0), "w7": ([1], 0), "w8": ([1], 1),  # SE hidden unit 1
            "w10": ([0], 0), "w11": ([0], 0), "w15": ([0, 9], 1),  # proj 0, branch 3
            "w13": ([3], 0), "w14": ([3], 0),
        },
    )  # fmt: skip
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.25)")
    assert step["status"] == "accepted" and step["counts"]["groups_pruned"] == 4
    conv = _weights_of(result.model, "Conv")
    assert [w.shape for w in conv] == [
        (6, 3, 3, 3), (6, 1, 3, 3), (3, 6, 1, 1), (6, 3, 1, 1), (5, 6, 1, 1), (3, 3, 3, 3),
        (2, 8, 1, 1),
    ]  # fmt: skip
    assert _attr(_node(result.model, "Conv")[1], "group") == 6
    assert [n.op_type for n in result.model.graph.node].count("HardSigmoid") == 1
    _same_outputs(planted, result.model, (1, 3, 16, 16))


# ---------------------------------------------------------------------------- transformer


def _attention_model(decomposed_norm: bool):
    """One encoder layer over x [1, S, 16] (S dynamic): Q/K/V with Reshape shapes
    computed from Shape (2 heads of 8), O, residual + LayerNorm, FFN 16->32->16."""
    net = Net(shape=(1, "S", 16))
    batch = net.add("Unsqueeze", [net.add("Gather", [net.add("Shape", ["x"]),
                    net.const(np.array(0))], axis=0), net.const(np.array([0]))])  # fmt: skip
    seq = net.add("Unsqueeze", [net.add("Gather", [net.add("Shape", ["x"]),
                  net.const(np.array(1))], axis=0), net.const(np.array([0]))])  # fmt: skip
    heads = net.add("Concat", [batch, seq, net.const(np.array([2, 8]))], axis=0)
    merged = net.add("Concat", [batch, seq, net.const(np.array([16]))], axis=0)

    def project(x, width, name):
        out = net.add("MatMul", [x, net.weight((16, width), name=f"{name}_w")])
        return net.add("Add", [out, net.weight((width,), 0.1, name=f"{name}_b")])

    def split(x):
        return net.add("Transpose", [net.add("Reshape", [x, heads])], perm=[0, 2, 1, 3])

    q, k, v = (split(project("x", 16, n)) for n in ("q", "k", "v"))
    scores = net.add("MatMul", [q, net.add("Transpose", [k], perm=[0, 1, 3, 2])])
    attn = net.add("Softmax", [net.add("Mul", [scores, net.const(np.float32(8**-0.5))])], axis=-1)
    context = net.add("Transpose", [net.add("MatMul", [attn, v])], perm=[0, 2, 1, 3])
    context = net.add("Reshape", [context, merged])
    out = net.add("MatMul", [context, net.weight((16, 16), name="o_w")])
    hidden = _norm(net, net.add("Add", ["x", out]), decomposed_norm)
    up = net.add("Relu", [net.add("MatMul", [hidden, net.weight((16, 32), name="up_w")])])
    down = net.add("MatMul", [up, net.weight((32, 16), name="down_w")])
    return net.model(_norm(net, net.add("Add", [hidden, down]), decomposed_norm))


def _norm(net: Net, x: str, decomposed: bool) -> str:
    gamma, beta = net.weight((16,), 0.5), net.weight((16,), 0.1)
    if not decomposed:
        return net.add("LayerNormalization", [x, gamma, beta], axis=-1)
    centered = net.add("Sub", [x, net.add("ReduceMean", [x], axes=[-1])])
    var = net.add("ReduceMean", [net.add("Pow", [centered, net.const(np.float32(2))])], axes=[-1])
    std = net.add("Sqrt", [net.add("Add", [var, net.const(np.float32(1e-5))])])
    return net.add("Add", [net.add("Mul", [net.add("Div", [centered, std]), gamma]), beta])


def _plant_attention(model, heads: bool):
    """Zero head 1 (columns 8..15 of Q/K/V, rows of O) and half the FFN (heads=True,
    for ratio=0.5), or head dim 3 of Q/K, dim 5 of V and an eighth of the FFN."""
    if heads:
        qk = vo = list(range(8, 16))
        ffn = list(range(16))
    else:
        qk, vo, ffn = [3, 11], [5, 13], [0, 1, 2, 3]
    return _plant(
        model,
        {
            "q_w": (qk, 1), "q_b": (qk, 0), "k_w": (qk, 1), "k_b": (qk, 0),
            "v_w": (vo, 1), "v_b": (vo, 0), "o_w": (vo, 0),
            "up_w": (ffn, 1), "down_w": (ffn, 0),
        },
    )  # fmt: skip


@pytest.mark.parametrize("decomposed_norm", [False, True], ids=["fused-ln", "decomposed-ln"])
@pytest.mark.parametrize("attention", ["heads", "dims"])
def test_attention_heads_and_ffn_width(attention, decomposed_norm):
    """Heads: Q/K/V lose head 1 together (the head count in the Reshape shapes goes
    2 -> 1); dims: every head loses the same dimension (8 -> 7), Q/K and V apart."""
    planted = _plant_attention(_attention_model(decomposed_norm), attention == "heads")
    ratio = 0.5 if attention == "heads" else 0.125
    pipeline = f"remove-neurons(mode=l1,ratio={ratio},attention={attention})"
    result, step = _prune(planted, pipeline, shapes=["x=1x5x16"])
    assert step["status"] == "accepted", step["reason"]
    assert step["counts"]["shape_parameters_resolved"] == 4
    statuses = sorted(_status(step).values())
    pruned = 2 if attention == "heads" else 3  # heads: Q, K and V are one group
    assert statuses == ["blocked"] * 2 + ["pruned"] * pruned  # the hidden width is blocked
    weights = {t.name.split("_pruned")[0]: numpy_helper.to_array(t)
               for t in result.model.graph.initializer}  # fmt: skip
    width, ffn = (8, 16) if attention == "heads" else (14, 28)
    assert weights["q_w"].shape == weights["k_w"].shape == weights["v_w"].shape == (16, width)
    assert weights["o_w"].shape == (width, 16)
    assert weights["up_w"].shape == (16, ffn) and weights["down_w"].shape == (ffn, 16)
    assert len(_node(result.model, "Shape")) == 0  # the runtime shape computation is gone
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    reshapes = [inits[n.input[1]] for n in _node(result.model, "Reshape")]
    split = [1, 0, 1, 8] if attention == "heads" else [1, 0, 2, 7]
    assert reshapes == [split] * 3 + [[1, 0, width]]
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, s, 16)).astype(np.float32)} for s in (3, 5, 9)]
    assert_equivalent(run(planted, feeds), run(result.model, feeds), EXACT)


# ---------------------------------------------------------------------------- recurrent


def _recurrent_model():
    """Bidirectional LSTM(6 -> 4) with a zero initial state built by Expand (as torch
    exports it) -> [T, 1, 8] -> GRU(8 -> 4) -> MatMul(4 -> 2)."""
    net = Net(shape=(5, 1, 6))
    zeros = net.add("Expand", [net.const(np.zeros((1, 1, 4), np.float32)),
                               net.const(np.array([2, 1, 4]))])  # fmt: skip
    lstm_w, lstm_r = net.weight((2, 16, 6), name="lstm_w"), net.weight((2, 16, 4), name="lstm_r")
    y = net.add("LSTM", ["x", lstm_w, lstm_r, net.weight((2, 32), 0.1, name="lstm_b"), "",
                         zeros, zeros], hidden_size=4, direction="bidirectional")  # fmt: skip
    seq = net.add("Reshape", [net.add("Transpose", [y], perm=[0, 2, 1, 3]),
                              net.const(np.array([5, 1, 8]))])  # fmt: skip
    gru = net.add("GRU", [seq, net.weight((1, 12, 8), name="gru_w"),
                          net.weight((1, 12, 4), name="gru_r"),
                          net.weight((1, 24), 0.1, name="gru_b")], hidden_size=4)  # fmt: skip
    squeezed = net.add("Squeeze", [gru, net.const(np.array([1]))])
    return net.model(net.add("MatMul", [squeezed, net.weight((4, 2), name="head_w")]))


def test_lstm_and_gru_hidden_units():
    unit = 1  # LSTM unit 1 in both directions; GRU unit 2
    lstm_rows = [g * 4 + unit for g in range(4)]
    gru_rows = [g * 4 + 2 for g in range(3)]
    planted = _plant(
        _recurrent_model(),
        {
            "lstm_w": (lstm_rows, 1), "lstm_r": (lstm_rows, 1),
            "lstm_b": (lstm_rows + [16 + r for r in lstm_rows], 1),
            "gru_w": (gru_rows, 1), "gru_r": (gru_rows, 1),
            "gru_b": (gru_rows + [12 + r for r in gru_rows], 1), "head_w": ([2], 0),
        },
    )  # fmt: skip
    planted = _plant(planted, {"lstm_r": ([unit], 2), "gru_r": ([2], 2), "gru_w": ([1, 5], 2)})
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.25)")
    assert step["status"] == "accepted", step["reason"]
    lstm, gru = _node(result.model, "LSTM")[0], _node(result.model, "GRU")[0]
    assert _attr(lstm, "hidden_size") == 3 and _attr(gru, "hidden_size") == 3
    assert lstm.input[5] == "" and lstm.input[6] == ""  # zero state: the default
    weights = {t.name.split("_pruned")[0]: numpy_helper.to_array(t).shape
               for t in result.model.graph.initializer}  # fmt: skip
    assert weights["lstm_w"] == (2, 12, 6) and weights["lstm_r"] == (2, 12, 3)
    assert weights["lstm_b"] == (2, 24) and weights["gru_w"] == (1, 9, 6)
    assert weights["gru_r"] == (1, 9, 3) and weights["head_w"] == (3, 2)
    _same_outputs(planted, result.model, (5, 1, 6))


def test_recurrent_state_computed_at_run_time_is_blocked_with_its_reason():
    net = Net(shape=(5, 1, 6))
    h0 = net.add("Slice", ["x", net.const(np.array([0, 0])), net.const(np.array([1, 4])),
                           net.const(np.array([0, 2]))])  # fmt: skip
    y = net.add("GRU", ["x", net.weight((1, 12, 6)), net.weight((1, 12, 4)), "", "", h0],
                hidden_size=4)  # fmt: skip
    out = net.add("MatMul", [net.add("Squeeze", [y, net.const(np.array([1]))]),
                             net.weight((4, 2))])  # fmt: skip
    _, step = _prune(net.model(out), "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "no-op"
    (group,) = [g for g in step["details"]["groups"] if g["producers"].startswith("GRU")]
    assert group["status"] == "blocked"
    assert f"initial state {h0!r} is computed at run time" in group["reason"]


# ---------------------------------------------------------------------------- chunk by Shape


def test_chunk_with_bounds_computed_from_shape_is_resolved():
    """torch's ``x.chunk(2, 1)`` at opset 17: Slice bounds from Shape -> Gather ->
    Add -> Div -> Mul (ShuffleNet v2's exports)."""
    net = Net(shape=(1, 3, 6, 6))
    a = net.add("Relu", [net.conv("x", 3, 8, k=1)])  # w0 w1
    count = net.add("Gather", [net.add("Shape", [a]), net.const(np.array([1]))], axis=0)
    half = net.add("Div", [net.add("Add", [count, net.const(np.array([1]))]),
                           net.const(np.array([2]))])  # fmt: skip
    axes = net.const(np.array([1]))
    first = net.add("Slice", [a, net.const(np.array([0])), half, axes])
    second = net.add("Slice", [a, half, net.const(np.array([2**62])), axes])
    branch = net.add("Relu", [net.conv(second, 4, 4, k=1)])
    cat = net.add("Concat", [first, branch], axis=1)
    model = net.model(net.conv(cat, 8, 2, k=1))  # w10 w11
    # first half loses 0, 1; second half 4, 5 (branch input 0, 1); the branch its 2, 3
    planted = _plant(model, {"w0": ([0, 1, 4, 5], 0), "w1": ([0, 1, 4, 5], 0),
                             "w8": ([0, 1], 1), "w10": ([0, 1, 6, 7], 1)})  # fmt: skip
    planted = _plant(planted, {"w8": ([2, 3], 0), "w9": ([2, 3], 0)})
    result, step = _prune(planted, "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "accepted", step["reason"]
    assert step["counts"]["shape_parameters_resolved"] == 2
    assert len(_node(result.model, "Shape")) == 0
    assert [w.shape for w in _weights_of(result.model, "Conv")] == [
        (4, 3, 1, 1), (2, 2, 1, 1), (2, 4, 1, 1)
    ]  # fmt: skip
    _same_outputs(planted, result.model, (1, 3, 6, 6))


def test_flatten_reshape_with_an_unnamed_dynamic_batch_is_resolved():
    """Paddle2ONNX heads: ``Reshape(x, Concat(Shape(x)[0:1], [C]))`` with a batch dim
    that has neither a value nor a name: the entry copies axis 0 of the same tensor,
    so it becomes ``0`` and the channel count is rewritten."""
    net = Net(shape=(None, 3, 4, 4))
    pooled = net.add("GlobalAveragePool", [net.add("Relu", [net.conv("x", 3, 8, k=1)])])
    batch = net.add("Slice", [net.add("Shape", [pooled]), net.const(np.array([0])),
                              net.const(np.array([1]))])  # fmt: skip
    shape = net.add("Concat", [batch, net.const(np.array([8]))], axis=0)
    flat = net.add("Reshape", [pooled, shape])
    model = net.model(net.add("MatMul", [flat, net.weight((8, 3))]))
    result, step = _prune(model, "remove-neurons(mode=l1,ratio=0.5)", shapes=["x=2x3x4x4"])
    assert step["status"] == "accepted", step["reason"]
    assert step["counts"]["shape_parameters_resolved"] == 1
    (reshape,) = _node(result.model, "Reshape")
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    assert inits[reshape.input[1]] == [0, 4]
    assert len(_node(result.model, "Shape")) == 0


# ---------------------------------------------------------------------------- If branches


def _branch(net: Net, prefix: str, width: int) -> onnx.GraphProto:
    """x -> Conv(3->width) -> Relu -> Conv(width->2): weights as Constant nodes."""
    w1 = net.rng.standard_normal((width, 3, 1, 1)).astype(np.float32)
    w1[[1, 3]] = 0  # planted: channels 1 and 3 have zero rows and zero readers
    w2 = net.rng.standard_normal((2, width, 1, 1)).astype(np.float32)
    w2[:, [1, 3]] = 0
    nodes = [
        helper.make_node("Constant", [], [f"{prefix}_w1"], value=numpy_helper.from_array(w1)),
        helper.make_node("Constant", [], [f"{prefix}_w2"], value=numpy_helper.from_array(w2)),
        helper.make_node("Conv", ["x", f"{prefix}_w1"], [f"{prefix}_a"], name=f"{prefix}_conv1"),
        helper.make_node("Relu", [f"{prefix}_a"], [f"{prefix}_r"]),
        helper.make_node("Conv", [f"{prefix}_r", f"{prefix}_w2"], [f"{prefix}_out"]),
    ]
    out = helper.make_tensor_value_info(f"{prefix}_out", onnx.TensorProto.FLOAT, None)
    return helper.make_graph(nodes, prefix, [], [out])


def _if_model() -> onnx.ModelProto:
    net = Net(shape=(1, 3, 4, 4))
    flag = helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])
    node = helper.make_node(
        "If", ["flag"], ["y"], name="pick",
        then_branch=_branch(net, "then", 8), else_branch=_branch(net, "else", 4),
    )  # fmt: skip
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "if", [net.input, flag], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_if_branches_are_pruned_as_graphs_of_their_own():
    model = _if_model()
    feeds = [{"x": np.random.default_rng(s).standard_normal((1, 3, 4, 4)).astype(np.float32),
              "flag": np.array(s % 2 == 0)} for s in range(4)]  # fmt: skip
    result, step = _prune(model, "remove-neurons(mode=l1,ratio=0.25)", data=feeds)
    assert step["status"] == "accepted", step["reason"]
    pruned = [g for g in step["details"]["groups"] if g["status"] == "pruned"]
    assert sorted((g["branch"], g["channels_after"]) for g in pruned) == [
        ("pick.else_branch", 3), ("pick.then_branch", 6)
    ]  # fmt: skip
    then = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    shapes = sorted(tuple(t.dims) for t in then.initializer)
    assert shapes == [(2, 6, 1, 1), (6, 3, 1, 1)]
    assert step["counts"]["params_before"] == 8 * 3 + 2 * 8 + 4 * 3 + 2 * 4
    assert step["counts"]["params_after"] == 6 * 3 + 2 * 6 + 3 * 3 + 2 * 3
    assert_equivalent(run(model, feeds), run(result.model, feeds), EXACT)


# ---------------------------------------------------------------------------- inspect --prunable


def test_inspect_prunable_lists_groups_sizes_and_reasons(tmp_path, capsys):
    import json

    from onnxopt.cli import main

    path = tmp_path / "c2f.onnx"
    onnx.save(_c2f_model(), str(path))
    assert main(["inspect", str(path), "--prunable", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    units = sorted((r["status"], r["units"]) for r in info["groups"])
    assert units == [("blocked", 3), ("prunable", 4), ("prunable", 6), ("prunable", 8)]
    (blocked,) = [r for r in info["groups"] if r["status"] == "blocked"]
    assert blocked["reasons"] == ["reaches graph output 'conv16_0'"]
    assert info["prunable"] == 3 and info["units"] == 18
    assert main(["inspect", str(path), "--prunable"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("channel groups  4: 3 prunable (18 units), 1 blocked")
    assert "reaches graph output" in text
