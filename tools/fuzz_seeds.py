"""Seed models for tools/fuzz.py: the committed samples, tiny ``onnx.helper`` models
for what the samples do not cover, and small onnx backend-test models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------------------- seed models
#
# SAMPLE_SEEDS: the committed digits models; TINY_SEEDS: onnx.helper models covering
# what the samples do not (If / Loop / Scan with outer-scope weights, Constant-node
# weights, opset 1 and 99, graphs without nodes or inputs, an int64-indexed
# embedding, an overridable initializer, several inputs and outputs, float16, QDQ,
# a sparse initializer, a shared weight, a model-local function); BACKEND_SEEDS:
# small models of onnx's backend test data. Builders return fresh protos.

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
_CODE_DIRS = (str(ROOT / "onnxopt") + "/", str(ROOT / "passes") + "/")
BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
BACKEND_SUITES = ("simple", "pytorch-converted")
BACKEND_MAX_BYTES = 256 * 1024

F = TensorProto.FLOAT
Builder = Callable[[], onnx.ModelProto]


def _w(name: str, *shape: int, seed: int = 0, scale: float = 0.5) -> TensorProto:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _model(
    nodes, inputs, outputs, inits=(), opset: int = 17, ir: int = 8, **graph_kw
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fuzz_seed", inputs, outputs, list(inits), **graph_kw)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz-seed"
    )
    model.ir_version = ir
    return model


def _vi(name: str, dims, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


# ---------------------------------------------------------------------------- tiny seeds


def tiny_mlp(opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        _w("W1", 4, 16, seed=1),
        _w("b1", 16, seed=2),
        _w("W2", 3, 16, seed=3),
        _w("b2", 3, seed=4),
    ]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], inits, opset, ir)


def tiny_conv() -> onnx.ModelProto:
    bn = [
        numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(np.linspace(-0.2, 0.2, 8).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(np.linspace(-0.1, 0.1, 8).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(np.linspace(0.5, 2.0, 8).astype(np.float32), "bn_var"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["bn"],
            name="bn",
        ),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [
        _w("Wc", 8, 2, 3, 3, seed=5),
        _w("bc", 8, seed=6),
        *bn,
        _w("Wf", 5, 8, seed=7),
        _w("bf", 5, seed=8),
    ]
    return _model(nodes, [_vi("x", [1, 2, 6, 6])], [_vi("y", [1, 5])], inits, opset=13)


def constant_weights() -> onnx.ModelProto:
    """Weights in Constant nodes (value tensor, value_floats, value_ints), opset 13."""
    nodes = [
        helper.make_node("Constant", [], ["W"], value=_w("W_t", 4, 8, seed=9), name="const_w"),
        helper.make_node("Constant", [], ["b"], value_floats=[0.1] * 8, name="const_b"),
        helper.make_node("Constant", [], ["shape"], value_ints=[-1, 8], name="const_shape"),
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["a"], name="add"),
        helper.make_node("Reshape", ["a", "shape"], ["y"], name="reshape"),
    ]
    return _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 8])], opset=13, ir=7)


def if_model() -> onnx.ModelProto:
    """If whose branches use an outer-scope weight and an inner initializer."""
    then_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W_outer"], ["t0"], name="then_mm"),
            helper.make_node("Relu", ["t0"], ["t_out"], name="then_relu"),
        ],
        "then_body",
        [],
        [_vi("t_out", [1, 8])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_inner"], ["e_out"], name="else_mm")],
        "else_body",
        [],
        [_vi("e_out", [1, 8])],
        [_w("W_inner", 4, 8, seed=11)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node(
            "If", ["cond"], ["h"], name="if", then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = [
        _w("W_outer", 4, 8, seed=10),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        _w("W2", 3, 8, seed=12),
        _w("b2", 3, seed=13),
    ]
    return _model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 3])], inits)


def loop_model() -> onnx.ModelProto:
    """Loop (3 trips) carrying v = tanh(v @ W + b), W and b from the outer scope."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("MatMul", ["v_in", "W"], ["v0"], name="body_mm"),
            helper.make_node("Add", ["v0", "b"], ["v1"], name="body_add"),
            helper.make_node("Tanh", ["v1"], ["v_out"], name="body_tanh"),
        ],
        "loop_body",
        [
            _vi("iter", [], TensorProto.INT64),
            _vi("cond_in", [], TensorProto.BOOL),
            _vi("v_in", [1, 6]),
        ],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [1, 6])],
    )
    nodes = [helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="loop", body=body)]
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "keep_going"),
        _w("W", 6, 6, seed=14),
        _w("b", 6, seed=15),
    ]
    return _model(nodes, [_vi("x", [1, 6])], [_vi("y", [1, 6])], inits)


def scan_model() -> onnx.ModelProto:
    """Scan over the first axis: s' = tanh(s @ W + x_t); outputs final s and all s'."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["s_in", "W"], ["m"], name="scan_mm"),
            helper.make_node("Add", ["m", "x_t"], ["a"], name="scan_add"),
            helper.make_node("Tanh", ["a"], ["s_out"], name="scan_tanh"),
            helper.make_node("Identity", ["s_out"], ["y_t"], name="scan_copy"),
        ],
        "scan_body",
        [_vi("s_in", [4]), _vi("x_t", [4])],
        [_vi("s_out", [4]), _vi("y_t", [4])],
    )
    nodes = [
        helper.make_node(
            "Scan", ["s0", "x"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1
        ),
    ]
    inits = [_w("W", 4, 4, seed=16), numpy_helper.from_array(np.zeros(4, np.float32), "s0")]
    return _model(nodes, [_vi("x", [5, 4])], [_vi("s_final", [4]), _vi("ys", [5, 4])], inits)


def opset1_model() -> onnx.ModelProto:
    """Opset 1, IR 3: every initializer is also listed as a graph input."""
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["a"], name="add", broadcast=1),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["y"], name="sigmoid"),
    ]
    bias = _w("bias", 4, seed=17)
    return _model(
        nodes, [_vi("x", [2, 4]), _vi("bias", [4])], [_vi("y", [2, 4])], [bias], opset=1, ir=3
    )


def opset99_model() -> onnx.ModelProto:
    return tiny_mlp(opset=99, ir=10)


def empty_identity() -> onnx.ModelProto:
    """No nodes: the output is the input."""
    return _model([], [_vi("x", [1, 3])], [_vi("x", [1, 3])])


def empty_constant() -> onnx.ModelProto:
    """No nodes and no inputs: the output is an initializer."""
    return _model([], [], [_vi("c", [2, 2])], [_w("c", 2, 2, seed=18)])


def embedding_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("ReduceMean", ["e"], ["m"], name="mean", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["y"], name="head"),
    ]
    inits = [_w("table", 20, 6, seed=19), _w("W", 6, 4, seed=20)]
    return _model(
        nodes, [_vi("ids", [1, 5], TensorProto.INT64)], [_vi("y", [1, 4])], inits, opset=13
    )


def overridable_initializer() -> onnx.ModelProto:
    """A graph input with an initializer (a default the caller may override)."""
    model = tiny_mlp(opset=13, ir=7)
    model.graph.input.append(_vi("b1", [16]))
    return model


def multi_io() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["ab"], name="concat", axis=1),
        helper.make_node("Gemm", ["ab", "W", "bias"], ["scores"], name="fc", transB=1),
        helper.make_node("ArgMax", ["scores"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    inits = [_w("W", 4, 5, seed=21), _w("bias", 4, seed=22)]
    return _model(
        nodes,
        [_vi("a", ["N", 2]), _vi("b", ["N", 3])],
        [_vi("scores", ["N", 4]), _vi("label", ["N"], TensorProto.INT64)],
        inits,
    )


def float16_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(
        (np.random.default_rng(23).standard_normal((4, 6)) * 0.5).astype(np.float16), "W"
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    fp16 = TensorProto.FLOAT16
    return _model(nodes, [_vi("x", [1, 4], fp16)], [_vi("y", [1, 6], fp16)], [w])


def qdq_model() -> onnx.ModelProto:
    """Already quantized: int8 weight DequantizeLinear, QDQ on the activation."""
    wq = np.random.default_rng(24).integers(-127, 127, size=(4, 6)).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["Wq", "w_scale"], ["W"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm"),
    ]
    return _model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 6])], inits, opset=13)


def sparse_initializer_model() -> onnx.ModelProto:
    dense = np.zeros((4, 6), np.float32)
    dense[0, 1], dense[2, 3], dense[3, 5] = 1.0, -2.0, 0.5
    flat = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[flat], "W"),
        numpy_helper.from_array(flat.astype(np.int64), "W_indices"),
        [4, 6],
    )
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return _model(
        nodes, [_vi("x", [1, 4])], [_vi("y", [1, 6])], opset=13, sparse_initializer=[sparse]
    )


def shared_weight() -> onnx.ModelProto:
    """One weight used by two MatMuls and by an Add."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["b"], name="mm2"),
        helper.make_node("Add", ["b", "W"], ["y"], name="add_w"),
    ]
    return _model(nodes, [_vi("x", [8, 8])], [_vi("y", [8, 8])], [_w("W", 8, 8, seed=25)])


def model_function() -> onnx.ModelProto:
    """A node that calls a model-local function."""
    function = helper.make_function(
        "local.fuzz",
        "LinearRelu",
        ["X", "W"],
        ["Y"],
        [helper.make_node("MatMul", ["X", "W"], ["M"]), helper.make_node("Relu", ["M"], ["Y"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [helper.make_node("LinearRelu", ["x", "W"], ["y"], name="call", domain="local.fuzz")]
    model = _model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 5])], [_w("W", 4, 5, seed=26)])
    model.opset_import.append(helper.make_opsetid("local.fuzz", 1))
    model.functions.append(function)
    return model


TINY_SEEDS: dict[str, Builder] = {
    "tiny-mlp": tiny_mlp,
    "tiny-conv": tiny_conv,
    "constant-weights": constant_weights,
    "if": if_model,
    "loop": loop_model,
    "scan": scan_model,
    "opset1": opset1_model,
    "opset99": opset99_model,
    "empty-identity": empty_identity,
    "empty-constant": empty_constant,
    "embedding": embedding_model,
    "overridable-initializer": overridable_initializer,
    "multi-io": multi_io,
    "float16": float16_model,
    "qdq": qdq_model,
    "sparse-initializer": sparse_initializer_model,
    "shared-weight": shared_weight,
    "model-function": model_function,
}


def _file_builder(path: Path) -> Builder:
    return lambda: onnx.load(str(path))


SAMPLE_SEEDS: dict[str, Builder] = {
    f"sample/{p.stem}": _file_builder(p) for p in sorted(MODELS.glob("*.onnx"))
}


def _backend_seeds() -> dict[str, Builder]:
    seeds = {}
    for suite in BACKEND_SUITES:
        folder = BACKEND_DATA / suite
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            model = entry / "model.onnx"
            if model.is_file() and model.stat().st_size <= BACKEND_MAX_BYTES:
                seeds[f"{suite}/{entry.name}"] = _file_builder(model)
    return seeds


BACKEND_SEEDS: dict[str, Builder] = _backend_seeds()

# (family, weight) — a case first picks a family, then a seed in it
FAMILIES: tuple[tuple[dict[str, Builder], float], ...] = (
    (SAMPLE_SEEDS, 0.3),
    (TINY_SEEDS, 0.45),
    (BACKEND_SEEDS, 0.25),
)


def all_seeds() -> dict[str, Builder]:
    return {**SAMPLE_SEEDS, **TINY_SEEDS, **BACKEND_SEEDS}
