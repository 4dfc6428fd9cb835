"""remove-neurons / remove-dead-neurons: structure, numbers, equivalence, blockers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, model_path, run, seeded_feeds
from onnx import TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.neurons
from onnxopt.check import assert_equivalent
from onnxopt.errors import UsageError
from onnxopt.graph import to_graph
from onnxopt.passes.neurons.groups import analyze
from onnxopt.runtime import make_session

# ---------------------------------------------------------------------------- helpers

RNG_SEED = 7


class Net:
    """Builds a small float32 model: ``add(op, inputs, **attrs)`` returns the output
    name; ``weight(shape)`` adds a seeded random initializer."""

    def __init__(self, shape=("N", 3, 8, 8), opset: int = 17, seed: int = RNG_SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
        self.opset = opset
        self.count = 0

    def weight(self, shape, scale: float = 0.5, name: str | None = None) -> str:
        name = name or f"w{len(self.inits)}"
        self.inits[name] = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    def const(self, values, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits[name] = np.asarray(values)
        return name

    def add(self, op: str, inputs, outputs: int = 1, **attrs) -> str | list[str]:
        self.count += 1
        names = [f"{op.lower()}{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, list(inputs), names, name=f"{op}{self.count}", **attrs)
        )
        return names[0] if outputs == 1 else names

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias=True, pad=None):
        pad = k // 2 if pad is None else pad
        inputs = [x, self.weight((c_out, c_in // group, k, k))]
        if bias:
            inputs.append(self.weight((c_out,), 0.1))
        return self.add("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, group=group)

    def model(self, output: str, domains=()) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, "net", [self.input], [out], inits)
        opsets = [helper.make_opsetid("", self.opset)] + [
            helper.make_opsetid(d, 1) for d in domains
        ]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        if not domains:
            inferred = onnx.shape_inference.infer_shapes(model)
            model.graph.output[0].CopyFrom(inferred.graph.output[0])
            onnx.checker.check_model(model, full_check=True)
        return model


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def _weights_of(model: onnx.ModelProto, op: str) -> list[np.ndarray]:
    """Input-1 arrays of every ``op`` node, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == op and n.input[1] in inits]
    return [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]


def _with(model: onnx.ModelProto, changes: dict) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers are replaced by ``changes[name](array)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in changes:
            tensor.CopyFrom(
                numpy_helper.from_array(
                    changes[tensor.name](_init(model, tensor.name)), tensor.name
                )
            )
    return out


def _set_rows(indices, value: float = 0.0, axis: int = 0):
    def change(array):
        array = array.copy()
        index = [slice(None)] * array.ndim
        index[axis] = list(indices)
        array[tuple(index)] = value if value == 0.0 else array[tuple(index)] * value
        return array

    return change


def _prune(model, pipeline: str, **kwargs):
    kwargs.setdefault("budget", "none")
    result = onnxopt.optimize(model, pipeline, **kwargs)
    return result, result.steps[0]


def _valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    make_session(model)


def _feeds(model, count=4, shape=None):
    if shape is None:
        return seeded_feeds(model, count)
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


# ---------------------------------------------------------------------------- sample models


def test_mlp_ratio_half_removes_half_of_every_prunable_group():
    result, step = _prune(model_path("digits_mlp"), "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "accepted"
    groups = {g["producers"]: g for g in step["details"]["groups"]}
    assert groups["/fc1/Gemm"]["channels_before"] == 128
    assert groups["/fc1/Gemm"]["channels_after"] == 64
    assert groups["/fc2/Gemm"]["channels_after"] == 32
    assert groups["/fc3/Gemm"]["status"] == "blocked"
    assert "graph output" in groups["/fc3/Gemm"]["reason"]
    # 64x64+64, 64x32+32, 32x10+10 and 64*64 + 64*32 + 32*10 MACs
    assert step["counts"]["params_before"] == 17226
    assert step["counts"]["params_after"] == 4160 + 2080 + 330
    assert step["counts"]["macs_before"] == 17024
    assert step["counts"]["macs_after"] == 4096 + 2048 + 320
    assert [w.shape for w in _weights_of(result.model, "Gemm")] == [(64, 64), (32, 64), (10, 32)]
    _valid(result.model)


def test_cnn_ratio_half_prunes_residual_depthwise_concat_and_flatten_groups():
    result, step = _prune(model_path("digits_cnn"), "remove-neurons(mode=l2,ratio=0.5)")
    assert step["status"] == "accepted"
    by_name = {g["producers"]: g for g in step["details"]["groups"]}
    assert by_name["/stem/stem.0/Conv, /res/res.0/Conv"]["channels_after"] == 8  # residual Add
    assert by_name["/pointwise/pointwise.0/Conv"]["channels_after"] == 8
    assert by_name["/mix/mix.0/Conv"]["channels_after"] == 16
    shapes = [w.shape for w in _weights_of(result.model, "Conv")]
    assert shapes == [(8, 1, 3, 3), (8, 8, 3, 3), (8, 1, 3, 3), (8, 8, 1, 1), (16, 16, 3, 3)]
    depthwise = [n for n in result.model.graph.node if n.op_type == "Conv"][2]
    assert (
        helper.get_attribute_value(
            depthwise.attribute[[a.name for a in depthwise.attribute].index("group")]
        )
        == 8
    )
    assert _weights_of(result.model, "Gemm")[0].shape == (10, 16)
    convs = 72 + 576 + 72 + 64 + 2304
    assert step["counts"]["params_after"] == convs + 4 * (8 + 8 + 8 + 8 + 16) + 170  # 5 BNs
    assert (
        step["counts"]["macs_after"] == 64 * (8 * 9 + 8 * 8 * 9 + 8 * 9 + 8 * 8 + 16 * 16 * 9) + 160
    )
    assert step["counts"]["macs_before"] == 772416
    _valid(result.model)


def test_transformer_ffn_hidden_width_and_attention_head_dims_are_pruned():
    result, step = _prune(model_path("digits_transformer"), "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "accepted"
    widths = {}
    for group in step["details"]["groups"]:
        widths.update(group["widths"])
    assert widths["/layers.0/ff/ff.0/MatMul"] == [64, 32]
    assert widths["/layers.1/ff/ff.0/MatMul"] == [64, 32]
    for head in ("q", "k", "v"):  # 2 heads x 16 dims -> 2 heads x 8 dims
        assert widths[f"/layers.0/attn/{head}/MatMul"] == [32, 16]
    residual = next(g for g in step["details"]["groups"] if "/embed/MatMul" in g["producers"])
    assert residual["status"] == "blocked" and "LayerNormalization" in residual["reason"]
    matmuls = [w.shape for w in _weights_of(result.model, "MatMul") if w.ndim == 2]
    assert matmuls.count((32, 16)) == 6 and matmuls.count((16, 32)) == 2
    assert matmuls.count((32, 32)) == 4 and (8, 32) in matmuls  # FFN in and out, embedding
    assert step["counts"]["params_after"] == 9682
    assert step["counts"]["macs_after"] < 0.55 * step["counts"]["macs_before"]
    _valid(result.model)


def test_transformer_ffn_alone_goes_from_64_to_32():
    pipeline = 'remove-neurons(mode=l1,ratio=0.5,exclude="/layers.*/attn/*")'
    result, step = _prune(model_path("digits_transformer"), pipeline)
    pruned = [g for g in step["details"]["groups"] if g["status"] == "pruned"]
    assert [g["producers"] for g in pruned] == [
        "/layers.0/ff/ff.0/MatMul",
        "/layers.1/ff/ff.0/MatMul",
    ]
    assert all(g["channels_before"] == 64 and g["channels_after"] == 32 for g in pruned)
    excluded = [g for g in step["details"]["groups"] if "exclude=" in g["reason"]]
    assert len(excluded) == 3  # residual stream, the heads (q, k, v) of each layer
    _valid(result.model)


def test_constant_node_weights_at_opset_11_prune_like_initializers():
    _, step17 = _prune(model_path("digits_mlp"), "remove-neurons(mode=l1,ratio=0.5)")
    result11, step11 = _prune(
        model_path("digits_mlp_op11_constants"), "remove-neurons(mode=l1,ratio=0.5)"
    )
    assert step11["status"] == "accepted"
    assert step11["counts"] == step17["counts"]
    result17 = onnxopt.optimize(
        model_path("digits_mlp"), "remove-neurons(mode=l1,ratio=0.5)", budget="none"
    )
    feeds = seeded_feeds(result11.model, 8)
    assert_equivalent(run(result17.model, feeds), run(result11.model, feeds))
    assert result11.model.opset_import[0].version == 11


# ---------------------------------------------------------------------------- options


def test_target_macs_chooses_globally_and_reaches_the_target():
    _, step = _prune(model_path("digits_cnn"), "remove-neurons(mode=l1,target_macs=0.4)")
    counts = step["counts"]
    assert counts["macs_after"] <= 0.4 * counts["macs_before"]
    assert counts["macs_after"] > 0.2 * counts["macs_before"]  # not far beyond the target
    _, loose = _prune(model_path("digits_cnn"), "remove-neurons(mode=l1,target_macs=0.9)")
    assert counts["macs_after"] < loose["counts"]["macs_after"] <= 0.9 * counts["macs_before"]


def test_round_to_and_min_channels():
    _, step = _prune(model_path("digits_mlp"), "remove-neurons(mode=l1,ratio=0.3,round_to=8)")
    after = {g["producers"]: g["channels_after"] for g in step["details"]["groups"]}
    assert after["/fc1/Gemm"] == 96  # 128 - 38 = 90 -> 96
    assert after["/fc2/Gemm"] == 48  # 64 - 19 = 45 -> 48
    _, step = _prune(model_path("digits_mlp"), "remove-neurons(mode=l1,ratio=0.95,min_channels=20)")
    after = {g["producers"]: g["channels_after"] for g in step["details"]["groups"]}
    assert after["/fc1/Gemm"] == 20 and after["/fc2/Gemm"] == 20


@pytest.mark.parametrize(
    "pipeline",
    [
        "remove-neurons(mode=l1)",
        "remove-neurons(mode=l1,ratio=0.5,target_macs=0.5)",
        "remove-neurons(mode=dead,ratio=0.5)",
        "remove-neurons(mode=l1,ratio=1.0)",
        "remove-neurons(mode=l3,ratio=0.5)",
        "remove-neurons(mode=l1,ratio=0.5,round_to=0)",
        "remove-dead-neurons(ratio=0.5)",
    ],
)
def test_bad_options_are_usage_errors(pipeline):
    with pytest.raises(UsageError, match=r"remove-(dead-)?neurons"):
        onnxopt.optimize(model_path("digits_mlp"), pipeline)


def test_nothing_prunable_is_a_no_op():
    net = Net(shape=("N", 4))
    h = net.add("Gemm", ["x", net.weight((4, 6))])
    out = net.add("Softmax", [h], axis=-1)
    _, step = _prune(net.model(out), "remove-neurons(mode=l1,ratio=0.5)")
    assert step["status"] == "no-op"
    assert step["counts"]["groups_blocked"] == 1
    assert "Softmax" in step["details"]["groups"][0]["reason"]


def test_default_budget_rolls_back_aggressive_pruning():
    _, step = _prune(model_path("digits_cnn"), "remove-neurons(mode=l1,ratio=0.9)", budget=None)
    assert step["status"] == "rolled back"
    assert "cosine" in step["reason"] or "top1" in step["reason"]


# ---------------------------------------------------------------------------- focused couplings


def _tiny(model, changes):
    """Make the listed channels nearly zero so the selection is known in advance."""
    return _with(
        model, {name: _set_rows(rows, 1e-4, axis) for name, (rows, axis) in changes.items()}
    )


def _zeroed(model, changes):
    return _with(
        model, {name: _set_rows(rows, 0.0, axis) for name, (rows, axis) in changes.items()}
    )


def _check_kept_path(original, pruned, removed, shape=(2, 3, 8, 8)):
    """The pruned model computes what the original computes with the removed channels
    set to exactly zero (``removed``: initializer -> (indices, axis))."""
    feeds = _feeds(original, 3, shape)
    assert_equivalent(
        run(_zeroed(original, removed), feeds), run(pruned, feeds), "atol=1e-5,rtol=1e-4"
    )


def test_residual_add_joins_both_producers():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 8)])  # w0, w1
    b = net.conv(a, 8, 8)  # w2, w3
    s = net.add("Add", [a, b])
    out = net.add("GlobalAveragePool", [net.conv(s, 8, 4)])
    model = net.model(out)
    planted = {"w0": ([2, 5], 0), "w1": ([2, 5], 0), "w2": ([2, 5], 0), "w3": ([2, 5], 0)}
    consumers = {"w4": ([2, 5], 1)}  # (ConvB's input columns are zeroed with its rows)
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    group = step["details"]["groups"][0]
    assert group["producers"] == "Conv1, Conv3" and group["channels_after"] == 6
    conv = _weights_of(result.model, "Conv")
    assert [w.shape for w in conv] == [(6, 3, 3, 3), (6, 6, 3, 3), (4, 6, 3, 3)]
    _check_kept_path(model, result.model, planted)


def test_concat_maps_channel_offsets():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 4)])  # w0 w1
    b = net.add("Relu", [net.conv("x", 3, 6)])  # w2 w3
    cat = net.add("Concat", [a, b], axis=1)
    out = net.conv(cat, 10, 5)  # w4 w5
    model = net.model(out)
    planted = {"w0": ([1], 0), "w1": ([1], 0), "w2": ([0], 0), "w3": ([0], 0)}
    consumers = {"w4": ([1, 4], 1)}
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    after = {g["producers"]: g["channels_after"] for g in step["details"]["groups"]}
    assert after["Conv1"] == 3 and after["Conv3"] == 5
    consumer = _weights_of(result.model, "Conv")[2]
    assert consumer.shape == (5, 8, 3, 3)
    kept_columns = [0, 2, 3, 5, 6, 7, 8, 9]  # offsets 1 (first input) and 4 + 0 (second)
    np.testing.assert_array_equal(consumer, _init(_tiny(model, consumers), "w4")[:, kept_columns])
    _check_kept_path(model, result.model, planted)


def test_depthwise_conv_couples_its_input_and_output():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 8)])  # w0 w1
    d = net.add("Relu", [net.conv(a, 8, 8, group=8)])  # w2 w3 (depthwise, bias)
    out = net.conv(d, 8, 4, k=1)  # w4 w5
    model = net.model(out)
    planted = {"w0": ([3, 6], 0), "w1": ([3, 6], 0), "w2": ([3, 6], 0), "w3": ([3, 6], 0)}
    consumers = {"w4": ([3, 6], 1)}
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    group = step["details"]["groups"][0]
    assert group["channels_after"] == 6
    nodes = [n for n in result.model.graph.node if n.op_type == "Conv"]
    group_attr = {a.name: a.i for a in nodes[1].attribute}["group"]
    assert group_attr == 6
    assert [w.shape for w in _weights_of(result.model, "Conv")] == [
        (6, 3, 3, 3),
        (6, 1, 3, 3),
        (4, 6, 1, 1),
    ]
    _check_kept_path(model, result.model, planted)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape-1", "Reshape-static", "Reshape-0"])
def test_flatten_into_gemm_maps_one_channel_to_a_block_of_features(flatten):
    net = Net(shape=(2, 3, 4, 4))
    c = net.add("Relu", [net.conv("x", 3, 4)])  # w0 w1
    if flatten == "Flatten":
        f = net.add("Flatten", [c], axis=1)
    else:
        shape = {"Reshape-1": [-1, 64], "Reshape-static": [2, 64], "Reshape-0": [0, -1]}[flatten]
        f = net.add("Reshape", [c, net.const(np.array(shape, np.int64), "shape")])
    out = net.add("Gemm", [f, net.weight((7, 64), name="fc"), net.weight((7,))], transB=1)
    model = net.model(out)
    planted = {"w0": ([1], 0), "w1": ([1], 0)}
    consumers = {"fc": (list(range(16, 32)), 1)}
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    assert step["details"]["groups"][0]["channels_after"] == 3
    gemm = _weights_of(result.model, "Gemm")[0]
    assert gemm.shape == (7, 48)
    kept = [f for f in range(64) if not 16 <= f < 32]  # channel 1 = features 16..31
    np.testing.assert_array_equal(gemm, _init(model, "fc")[:, kept])
    if flatten.startswith("Reshape"):
        new_shape = next(n for n in result.model.graph.node if n.op_type == "Reshape").input[1]
        expected = {"Reshape-1": [-1, 48], "Reshape-static": [2, 48], "Reshape-0": [0, -1]}[flatten]
        assert _init(result.model, new_shape).tolist() == expected
    _check_kept_path(model, result.model, planted, shape=(2, 3, 4, 4))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_and_slice_on_the_channel_axis(opset):
    net = Net(opset=opset)
    c = net.add("Relu", [net.conv("x", 3, 8)])  # w0 w1
    if opset < 13:
        left, right = net.add("Split", [c], outputs=2, axis=1, split=[3, 5])
    else:
        left, right = net.add(
            "Split", [c, net.const(np.array([3, 5], np.int64))], outputs=2, axis=1
        )
    middle = net.add(
        "Slice",
        [
            c,
            net.const(np.array([2], np.int64)),
            net.const(np.array([6], np.int64)),
            net.const(np.array([1], np.int64)),
        ],
    )
    a = net.conv(left, 3, 2, k=1)
    b = net.conv(right, 5, 2, k=1)
    m = net.conv(middle, 4, 2, k=1)
    out = net.add("Concat", [a, b, m], axis=1)
    model = net.model(out)
    planted = {"w0": ([1, 4], 0), "w1": ([1, 4], 0)}
    result, step = _prune(_tiny(model, planted), "remove-neurons(mode=l1,ratio=0.25)")
    assert step["status"] == "accepted" and step["details"]["groups"][0]["channels_after"] == 6
    convs = _weights_of(result.model, "Conv")
    assert [w.shape[1] for w in convs[1:]] == [2, 4, 3]  # split 3->2, 5->4; slice [2:6] -> 3
    _check_kept_path(model, result.model, planted)


def test_grouped_conv_removes_evenly_from_every_channel_group():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 8)])  # w0 w1
    g = net.add("Relu", [net.conv(a, 8, 8, group=2)])  # w2 w3
    out = net.conv(g, 8, 3, k=1)  # w4 w5
    model = net.model(out)
    planted = {"w0": ([1, 6], 0), "w1": ([1, 6], 0), "w2": ([0, 5], 0), "w3": ([0, 5], 0)}
    consumers = {"w4": ([0, 5], 1)}  # the 1x1 conv reading the grouped outputs
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    assert [g["channels_after"] for g in step["details"]["groups"][:2]] == [6, 6]
    grouped = _weights_of(result.model, "Conv")[1]
    assert grouped.shape == (6, 3, 3, 3)  # 2 groups x 3 outputs, 3 inputs per group
    _check_kept_path(model, result.model, planted)


def test_transpose_and_matmul_on_the_last_axis():
    net = Net()
    c = net.add("Relu", [net.conv("x", 3, 6)])  # w0 w1
    t = net.add("Transpose", [c], perm=[0, 2, 3, 1])
    out = net.add("MatMul", [t, net.weight((6, 5))])  # w2
    model = net.model(out)
    planted = {"w0": ([4], 0), "w1": ([4], 0)}
    consumers = {"w2": ([4], 0)}
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.2)")
    assert step["details"]["groups"][0]["channels_after"] == 5
    assert _weights_of(result.model, "MatMul")[0].shape == (5, 5)
    _check_kept_path(model, result.model, planted)


def test_dynamic_spatial_dims_run_at_several_sizes():
    net = Net(shape=("N", 3, "H", "W"))
    c = net.add("Relu", [net.conv("x", 3, 8)])
    p = net.add("GlobalAveragePool", [net.conv(c, 8, 8)])
    out = net.add("Gemm", [net.add("Flatten", [p]), net.weight((4, 8))], transB=1)
    model = net.model(out)
    result, step = _prune(model, "remove-neurons(mode=l1,ratio=0.5)", shapes={"x": "1x3x8x8"})
    assert step["status"] == "accepted" and step["counts"]["channels_removed"] == 8
    session = make_session(result.model)
    for shape in [(1, 3, 8, 8), (2, 3, 5, 11)]:
        (value,) = session.run(None, {"x": np.ones(shape, np.float32)})
        assert value.shape == (shape[0], 4)


# ---------------------------------------------------------------------------- blockers


def _reasons(model) -> dict[str, str]:
    cg = analyze(to_graph(model))
    return {g.describe(): "; ".join(g.reasons) for g in cg.groups}


def test_blockers_are_reported_with_reasons_never_guessed():
    net = Net(shape=("N", 4, 6))
    first = net.add("MatMul", ["x", net.weight((6, 8))])
    ln = net.add("LayerNormalization", [first, net.weight((8,)), net.weight((8,))])
    soft = net.add("Softmax", [net.add("MatMul", [ln, net.weight((8, 8))])], axis=-1)
    red = net.add(
        "ReduceSum",
        [net.add("MatMul", [soft, net.weight((8, 8))]), net.const(np.array([-1], np.int64))],
    )
    custom = helper.make_node(
        "Foo", [net.add("MatMul", [ln, net.weight((8, 8))])], ["foo"], domain="com.example"
    )
    net.nodes.append(custom)
    out = net.add("Add", [red, net.add("ReduceSum", ["foo", net.const(np.array([-1], np.int64))])])
    model = helper.make_model(
        helper.make_graph(
            net.nodes,
            "b",
            [net.input],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in net.inits.items()],
        ),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
    )
    reasons = _reasons(model)
    assert "LayerNormalization" in reasons["MatMul1"] and "channel axis" in reasons["MatMul1"]
    assert "Softmax" in reasons["MatMul3"]
    assert (
        "ReduceSum" in reasons["MatMul5"] and "reduces over the channel axis" in reasons["MatMul5"]
    )
    assert "op com.example.Foo not handled" in reasons["MatMul7"]


def test_graph_output_and_unknown_op_block_but_do_not_crash():
    net = Net()
    c = net.conv("x", 3, 4)
    out = net.add("Relu", [c])
    reasons = _reasons(net.model(out))
    assert reasons == {"Conv1": "reaches graph output 'relu2_0'"}
    net = Net()
    c = net.conv("x", 3, 4)
    lrn = net.add("LRN", [c], size=3)
    reasons = _reasons(net.model(lrn))
    assert "LRN mixes neighbouring channels" in reasons["Conv1"]


# ---------------------------------------------------------------------------- dead channels


def _where(indices, size: int, value: float):
    """Replace entries ``indices`` of a 1-D parameter by ``value``."""
    return lambda b: np.where(np.isin(np.arange(size), indices), value, b).astype(np.float32)


def _planted_cnn() -> onnx.ModelProto:
    """The sample CNN with dead channels planted:
    - mix conv channels 5, 9: zero filters -> BN constant -> ReLU constant -> pooled into
      the Gemm (exact fold into its bias);
    - pointwise conv channel 3: zero filter and BN beta -1, mean 0 -> ReLU gives 0, read
      by the padded 3x3 mix conv (zero needs no fold);
    - pointwise conv channel 7: zero filter but ReLU output 0.5 > 0 into a padded conv:
      constant, yet not exactly foldable -> must stay."""
    model = onnx.load(str(model_path("digits_cnn")))
    changes = {
        "mix.0.weight": _set_rows([5, 9]),
        "pointwise.0.weight": _set_rows([3, 7]),
        "pointwise.1.bias": lambda b: _where([7], 16, 0.5)(_where([3], 16, -1.0)(b)),
        "pointwise.1.running_mean": _where([3, 7], 16, 0.0),
    }
    return _with(model, changes)


def test_remove_dead_neurons_removes_exactly_the_planted_channels_losslessly():
    model = _planted_cnn()
    result, step = _prune(model, "remove-dead-neurons", budget=None)
    assert step["status"] == "accepted" and step["lossless"]
    assert "atol=1e-05" in step["budget"]
    widths = {}
    for group in step["details"]["groups"]:
        widths.update(group["widths"])
    assert widths["/mix/mix.0/Conv"] == [32, 30]
    assert widths["/pointwise/pointwise.0/Conv"] == [16, 15]  # channel 7 (0.5) stays
    assert widths["/stem/stem.0/Conv"] == [16, 16]
    assert step["counts"]["channels_removed"] == 3
    assert step["counts"]["folded_into_bias"] == 1
    feeds = seeded_feeds(model, 8)
    metrics = assert_equivalent(run(model, feeds), run(result.model, feeds), "atol=1e-5,rtol=0")
    assert metrics["logits"].max_abs <= 1e-5
    images = np.load(MODELS / "digits_test.npz")["input"][:64]
    data = [{"input": images}]
    assert_equivalent(run(model, data), run(result.model, data), "atol=1e-5,rtol=0")
    _, step2 = _prune(result.model, "remove-dead-neurons")
    assert step2["status"] == "no-op"  # idempotent


def test_remove_dead_neurons_on_clean_models_is_a_no_op():
    for name in ("digits_mlp", "digits_cnn", "digits_transformer"):
        _, step = _prune(model_path(name), "remove-dead-neurons", budget=None)
        assert step["status"] == "no-op", name


def test_dead_constant_hidden_units_fold_into_gemm_and_matmul():
    # transformer FFN unit 11 of layer 0: zero column -> Add bias 0.7 -> GELU constant
    # -> folded into the second MatMul by inserting an Add after it
    transformer = _with(
        onnx.load(str(model_path("digits_transformer"))),
        {"onnx::MatMul_148": _set_rows([11], axis=1), "layers.0.ff.0.bias": _where([11], 64, 0.7)},
    )
    # MLP units 4, 40: zero rows, bias 0.3 -> ReLU 0.3 -> folded into fc2's bias
    mlp = _with(
        onnx.load(str(model_path("digits_mlp"))),
        {"fc1.weight": _set_rows([4, 40]), "fc1.bias": _where([4, 40], 128, 0.3)},
    )
    cases = ((transformer, 1, "/layers.0/ff/ff.0/MatMul"), (mlp, 2, "/fc1/Gemm"))
    for model, removed, producer in cases:
        result, step = _prune(model, "remove-dead-neurons", budget=None)
        assert step["status"] == "accepted", step["reason"]
        assert step["counts"]["channels_removed"] == removed
        widths = {k: v for g in step["details"]["groups"] for k, v in g["widths"].items()}
        assert widths[producer][1] == widths[producer][0] - removed
        feeds = seeded_feeds(model, 8)
        assert_equivalent(run(model, feeds), run(result.model, feeds), "atol=1e-5,rtol=0")


def test_mode_dead_removes_data_dependent_dead_channels_as_a_lossy_step():
    data = str(MODELS / "digits_train.npz")
    original = onnx.load(str(model_path("digits_mlp")))
    # the trained MLP already has hidden units that never fire on the digits
    _, baseline = _prune(original, "remove-neurons(mode=dead)", data=data)
    base = {k: v for g in baseline["details"]["groups"] for k, v in g["widths"].items()}
    assert base["/fc1/Gemm"][1] < 128 and baseline["worst_vs_original"]["max_abs"] == 0.0
    # fc1 units 7 and 8 (alive before): bias -100 -> ReLU gives 0 on every input seen
    planted = np.isin(np.arange(128), [7, 8])
    model = _with(original, {"fc1.bias": lambda b: np.where(planted, -100.0, b).astype(np.float32)})
    _, provable = _prune(model, "remove-dead-neurons", data=data, budget=None)
    assert provable["status"] == "no-op"  # not provable from the weights
    result, step = _prune(model, "remove-neurons(mode=dead)", data=data, budget=None)
    assert step["status"] == "accepted" and not step["lossless"]
    widths = {k: v for g in step["details"]["groups"] for k, v in g["widths"].items()}
    assert widths["/fc1/Gemm"][1] == base["/fc1/Gemm"][1] - 2
    assert _weights_of(result.model, "Gemm")[0].shape == (base["/fc1/Gemm"][1] - 2, 64)
    images = np.load(MODELS / "digits_test.npz")["input"]
    reference, pruned = run(model, [{"input": images}]), run(result.model, [{"input": images}])
    assert_equivalent(reference, pruned, "cosine>=0.9999,top1>=0.998")


def test_compensate_folds_the_removed_channels_mean():
    data = str(MODELS / "digits_train.npz")
    _, step = _prune(model_path("digits_cnn"), "remove-neurons(mode=l1,ratio=0.25)", data=data)
    _, step_c = _prune(
        model_path("digits_cnn"), "remove-neurons(mode=l1,ratio=0.25,compensate=true)", data=data
    )
    assert step_c["counts"]["folded_into_bias"] > 0 and step["counts"]["folded_into_bias"] == 0
    assert step_c["counts"]["params_after"] >= step["counts"]["params_after"]
    cos = step["worst_vs_original"]["cosine"]
    assert step_c["worst_vs_original"]["cosine"] > cos


# ---------------------------------------------------------------------------- more couplings


def test_conv_transpose_as_consumer_and_producer():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 8)])  # w0 w1
    up = net.add(
        "ConvTranspose", [a, net.weight((8, 6, 2, 2)), net.weight((6,), 0.1)], strides=[2, 2]
    )
    out = net.conv(net.add("Relu", [up]), 6, 2, k=1)  # w4 w5
    model = net.model(out)
    planted = {"w0": ([2, 7], 0), "w1": ([2, 7], 0), "w2": ([2, 7], 0), "w3": ([1, 4], 0)}
    consumers = {"w2": ([1, 4], 1), "w4": ([1, 4], 1)}
    tiny = _tiny(_tiny(model, planted), consumers)
    result, step = _prune(tiny, "remove-neurons(mode=l1,ratio=0.34)")
    assert [g["channels_after"] for g in step["details"]["groups"][:2]] == [6, 4]
    assert _weights_of(result.model, "ConvTranspose")[0].shape == (6, 4, 2, 2)
    zero = {"w0": ([2, 7], 0), "w1": ([2, 7], 0), "w2": ([1, 4], 1), "w3": ([1, 4], 0)}
    _check_kept_path(model, result.model, zero)


def test_channel_shuffle_couples_the_same_channel_of_every_group():
    net = Net()
    a = net.add("Relu", [net.conv("x", 3, 8)])  # w0 w1
    split = net.add("Reshape", [a, net.const(np.array([-1, 2, 4, 8, 8], np.int64), "s1")])
    t = net.add("Transpose", [split], perm=[0, 2, 1, 3, 4])
    merged = net.add("Reshape", [t, net.const(np.array([-1, 8, 8, 8], np.int64), "s2")])
    out = net.conv(merged, 8, 3, k=1)  # w4 w5
    model = net.model(out)
    planted = {"w0": ([1, 5], 0), "w1": ([1, 5], 0)}  # group 0 and group 1 copies of channel 1
    consumers = {"w4": ([2, 3], 1)}  # after the shuffle channels 1, 5 sit at 2, 3
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.25)")
    group = step["details"]["groups"][0]
    assert group["channels_before"] == 4 and group["channels_after"] == 3
    assert group["widths"]["Conv1"] == [8, 6]
    reshapes = [n.input[1] for n in result.model.graph.node if n.op_type == "Reshape"]
    assert [_init(result.model, r).tolist() for r in reshapes] == [[-1, 2, 3, 8, 8], [-1, 6, 8, 8]]
    _check_kept_path(model, result.model, planted)


def test_per_channel_parameters_behind_unsqueeze_are_folded_and_sliced():
    net = Net(opset=11)
    c = net.conv("x", 3, 6)  # w0 w1
    scale = net.add("Unsqueeze", [net.weight((6,), name="gamma")], axes=[1, 2])
    shift = net.add("Unsqueeze", [net.weight((6,), name="beta")], axes=[1, 2])
    y = net.add("Relu", [net.add("Add", [net.add("Mul", [c, scale]), shift])])
    out = net.conv(y, 6, 2, k=1)
    model = net.model(out)
    planted = {"w0": ([0], 0), "w1": ([0], 0), "gamma": ([0], 0), "beta": ([0], 0)}
    consumers = {"w4": ([0], 1)}
    result, step = _prune(_tiny(model, planted | consumers), "remove-neurons(mode=l1,ratio=0.2)")
    assert step["counts"]["constant_ops_folded"] == 2
    assert step["details"]["groups"][0]["channels_after"] == 5
    assert not [n for n in result.model.graph.node if n.op_type == "Unsqueeze"]
    _check_kept_path(model, result.model, planted)


def test_remove_dead_neurons_without_calibration_samples_is_a_usage_error():
    model = _planted_cnn()
    with pytest.raises(UsageError, match="remove-dead-neurons needs calibration samples"):
        _prune(model, "remove-dead-neurons", calibration_samples=0)


@pytest.mark.parametrize("opset", [11, 13])
def test_cnn_at_older_opsets_prunes_like_opset_17(opset):
    model = onnx.load(str(model_path("digits_cnn")))
    model.opset_import[0].version = opset  # every op it uses has the same meaning there
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "training_mode"]  # BN attr from 14
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    reference, step17 = _prune(model_path("digits_cnn"), "remove-neurons(mode=l2,ratio=0.5)")
    result, step = _prune(model, "remove-neurons(mode=l2,ratio=0.5)")
    assert step["status"] == "accepted"
    assert step["counts"] == step17["counts"]
    assert result.model.opset_import[0].version == opset
    feeds = seeded_feeds(model, 4)
    assert_equivalent(run(reference.model, feeds), run(result.model, feeds))
