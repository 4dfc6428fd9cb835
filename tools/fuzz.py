"""Seeded fuzzer for onnxopt: mutate valid models, run the CLI and the API on them,
and classify every outcome.

Usage::

    python tools/fuzz.py --cases 5000 --seed 0          # counts, crash groups, reproducers
    python tools/fuzz.py --seed 0 --case 123            # replay one case with its traceback
    python tools/fuzz.py --cases 300 --keep /tmp/crash  # keep crashing cases' files

A *case* is drawn from ``numpy.random.default_rng([seed, index, stream])`` alone, so
``--seed S --case I`` reproduces it anywhere. It takes a seed model (the committed sample models,
tiny ``onnx.helper`` models with If/Loop/Scan bodies, Constant-node weights, opset 1 and
99, empty graphs..., and small onnx backend-test models), applies 1-3 mutations
(initializer dtype / dims / raw_data length, dangling inputs, duplicate names, cycles,
unknown ops and domains, opsets, empty graphs, If/Loop/Scan bodies, missing outputs,
external data pointing at nothing or outside the folder...; sometimes truncated or
flipped bytes), writes the mutant, and runs one command on it:

- ``onnxopt inspect MUTANT``
- ``onnxopt compare ORIGINAL MUTANT``
- ``onnxopt optimize MUTANT -o OUT --passes P`` for every registered pass P (cheap options)
- the Python API ``onnxopt.optimize(MUTANT, P)`` + ``Result.save(OUT)``

The CLI runs in-process (``onnxopt.cli.main``) inside worker processes; a case has a
timeout (SIGALRM, then the worker is killed) and a per-worker address-space limit.

Outcomes:

- **ok**: exit 0; an output file, if any, loads, passes the onnx checker and
  onnxruntime loads it (**ok (input already failed the checker)**: the checker fails
  on the output *and* on the mutant; onnxopt tolerates checks the input already fails);
- **clear error**: exit 2 with exactly one ``onnxopt: error:`` line on stderr, no
  traceback, no output file (API: an ``onnxopt.OnnxoptError``);
- **check failed**: exit 1 (``--on-fail abort`` or ``compare --budget``), no output file
  (API: ``onnxopt.CheckFailed``);
- **crash**: anything else: exit 3 (internal error), an exception other than
  ``OnnxoptError`` from the API, a traceback, a hang, a dead worker, a file left in the
  output folder after an error, or an output that is not a valid model.

Crashes are grouped by signature (exception type and the two innermost onnxopt
frames) and matched against ``KNOWN_BUGS`` (reported core bugs, each with an xfail
regression test in ``tests/test_fuzz.py``); the exit code is 1 when a crash matches
none of them. Steps the PassManager rolled back because the *pass raised* are not
crashes (the run goes on), but they are pass bugs: the summary lists them too.

``--preload MODULE`` imports a module in every worker first (to try a fix, or to
silence a known bug and look past it); ``--determinism-out DIR`` writes every pass's
output on every sample model (``tests/test_fuzz.py`` runs it twice and compares bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------- mutations
#
# A mutation edits a ModelProto in place (or, for the byte-level ones, the serialized
# bytes) and returns a short description, or None when it does not apply to this
# model (the case then draws another one). ``folder`` is where the mutant is written:
# external-data mutations put their files there.


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
                yield from _subgraphs(attr.g)
            for sub in attr.graphs:
                yield sub
                yield from _subgraphs(sub)


def _pick_graph(model: onnx.ModelProto, rng: np.random.Generator, need=None):
    """The main graph or (half the time, when there are any) a subgraph."""
    graphs = [model.graph, *_subgraphs(model.graph)]
    if need is not None:
        graphs = [g for g in graphs if need(g)]
    if not graphs:
        return None
    if len(graphs) > 1 and rng.random() < 0.5:
        return graphs[1 + int(rng.integers(len(graphs) - 1))]
    return graphs[0]


def _where(model: onnx.ModelProto, graph: onnx.GraphProto) -> str:
    return "" if graph is model.graph else f" in subgraph {graph.name!r}"


def _choice(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))] if items else None


def _fresh(prefix: str, rng: np.random.Generator) -> str:
    return f"{prefix}_{int(rng.integers(10**6))}"


def _all_initializers(model):
    return [(g, t) for g in [model.graph, *_subgraphs(model.graph)] for t in g.initializer]


DTYPES = [v for k, v in TensorProto.DataType.items() if k != "UNDEFINED"]


def m_init_dtype(model, rng, folder):
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    old = tensor.data_type
    new = int(_choice(rng, [*DTYPES, 0, 99])) if rng.random() < 0.9 else -3
    if new == old:
        new = TensorProto.DOUBLE if old != TensorProto.DOUBLE else TensorProto.INT8
    tensor.data_type = new
    return f"init-dtype {tensor.name!r}{_where(model, graph)}: {old} -> {new}"


def m_init_dims(model, rng, folder):
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    dims = list(tensor.dims)
    how = _choice(rng, ["drop", "add1", "double", "zero", "negative", "huge", "reverse", "scalar"])
    if how == "drop" and dims:
        dims.pop(int(rng.integers(len(dims))))
    elif how == "add1":
        dims.insert(int(rng.integers(len(dims) + 1)), 1)
    elif how == "double" and dims:
        i = int(rng.integers(len(dims)))
        dims[i] *= 2
    elif how == "zero":
        dims = [*dims[:-1], 0] if dims else [0]
    elif how == "negative":
        dims = [*dims[:-1], -1] if dims else [-1]
    elif how == "huge":
        dims = [2**40, *dims[1:]] if dims else [2**40]
    elif how == "reverse":
        dims = dims[::-1]
    else:
        dims = []
    if dims == list(tensor.dims):
        dims = [*dims, 2]
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return f"init-dims {tensor.name!r}{_where(model, graph)} ({how}): -> {dims}"


def m_raw_data_length(model, rng, folder):
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    if not tensor.HasField("raw_data"):
        array = numpy_helper.to_array(tensor)
        _clear_data(tensor)
        tensor.raw_data = array.tobytes()
    raw = tensor.raw_data
    how = _choice(rng, ["short", "long", "empty", "odd"])
    if how == "short":
        raw = raw[: len(raw) // 2]
    elif how == "long":
        raw = raw + bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
    elif how == "empty":
        raw = b""
    else:
        raw = raw[:-1] if raw else b"\x01"
    tensor.raw_data = raw
    return f"raw-data-length {tensor.name!r}{_where(model, graph)} ({how}): {len(raw)} bytes"


def _clear_data(tensor: TensorProto) -> None:
    for name in (
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
        "raw_data",
    ):
        tensor.ClearField(name)


def m_typed_data_count(model, rng, folder):
    """Move a float tensor's values into float_data with the wrong element count."""
    picked = _choice(
        rng, [(g, t) for g, t in _all_initializers(model) if t.data_type == TensorProto.FLOAT]
    )
    if picked is None:
        return None
    graph, tensor = picked
    values = numpy_helper.to_array(tensor).ravel().tolist()
    _clear_data(tensor)
    keep = (
        values[: max(0, len(values) - 1 - int(rng.integers(3)))]
        if rng.random() < 0.7
        else [*values, 1.0]
    )
    tensor.float_data.extend(keep)
    return f"typed-data-count {tensor.name!r}{_where(model, graph)}: {len(keep)} of {len(values)}"


def m_special_weights(model, rng, folder):
    """NaN / Inf / zeros / one repeated value / huge / denormals in a float weight."""
    picked = _choice(
        rng, [(g, t) for g, t in _all_initializers(model) if t.data_type == TensorProto.FLOAT]
    )
    if picked is None:
        return None
    graph, tensor = picked
    array = numpy_helper.to_array(tensor).copy()
    how = _choice(rng, ["nan", "inf", "zeros", "constant", "huge", "denormal", "one-nan"])
    if how == "nan":
        array[...] = np.nan
    elif how == "inf":
        array[...] = np.inf
    elif how == "zeros":
        array[...] = 0.0
    elif how == "constant":
        array[...] = 0.25
    elif how == "huge":
        array = array * np.float32(3e37)
    elif how == "denormal":
        array[...] = np.float32(1e-42)
    elif array.size:
        array.flat[int(rng.integers(array.size))] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    return f"special-weights {tensor.name!r}{_where(model, graph)}: {how}"


def m_string_initializer(model, rng, folder):
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    _clear_data(tensor)
    tensor.data_type = TensorProto.STRING
    tensor.string_data.extend([b"fuzz"] * min(count, 1000))
    return f"string-initializer {tensor.name!r}{_where(model, graph)}"


def _nodes_with_inputs(graph):
    return [n for n in graph.node if n.input]


def m_dangling_input(model, rng, folder):
    graph = _pick_graph(model, rng, _nodes_with_inputs)
    if graph is None:
        return None
    node = _choice(rng, _nodes_with_inputs(graph))
    i = int(rng.integers(len(node.input)))
    old = node.input[i]
    node.input[i] = "" if rng.random() < 0.2 else _fresh("missing", rng)
    return f"dangling-input {node.name or node.op_type}.input[{i}]{_where(model, graph)}: {old!r} -> {node.input[i]!r}"  # noqa: E501


def m_extra_input(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    node = _choice(rng, graph.node)
    name = _choice(rng, [*graph.node[0].output, _fresh("missing", rng)])
    node.input.append(name)
    return f"extra-input {node.name or node.op_type}{_where(model, graph)}: + {name!r}"


def m_duplicate_node_name(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 1)
    if graph is None:
        return None
    a, b = rng.choice(len(graph.node), 2, replace=False)
    graph.node[int(b)].name = graph.node[int(a)].name or "dup"
    graph.node[int(a)].name = graph.node[int(b)].name
    return f"duplicate-node-name {graph.node[int(a)].name!r}{_where(model, graph)}"


def m_duplicate_output_tensor(model, rng, folder):
    """Two nodes produce a tensor of the same name."""
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 1)
    if graph is None:
        return None
    a, b = sorted(int(i) for i in rng.choice(len(graph.node), 2, replace=False))
    if not graph.node[a].output or not graph.node[b].output:
        return None
    graph.node[b].output[0] = graph.node[a].output[0]
    return f"duplicate-output-tensor {graph.node[a].output[0]!r}{_where(model, graph)}"


def m_duplicate_initializer(model, rng, folder):
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    copy = graph.initializer.add()
    copy.CopyFrom(tensor)
    if rng.random() < 0.5 and tensor.data_type == TensorProto.FLOAT:
        array = numpy_helper.to_array(tensor)
        copy.CopyFrom(numpy_helper.from_array((array * 2 + 1).astype(np.float32), tensor.name))
    return f"duplicate-initializer {tensor.name!r}{_where(model, graph)}"


def m_initializer_shadows_tensor(model, rng, folder):
    """An initializer with the name of a node output or a graph input."""
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0 or len(g.input) > 0)
    if graph is None:
        return None
    names = [o for n in graph.node for o in n.output if o] + [i.name for i in graph.input]
    name = _choice(rng, names)
    if name is None:
        return None
    graph.initializer.append(numpy_helper.from_array(np.ones((2, 2), np.float32), name))
    return f"initializer-shadows-tensor {name!r}{_where(model, graph)}"


def m_duplicate_graph_io(model, rng, folder):
    graph = model.graph
    field = _choice(rng, ["input", "output"])
    entries = getattr(graph, field)
    if not entries:
        return None
    entry = _choice(rng, entries)
    getattr(graph, field).add().CopyFrom(entry)
    return f"duplicate-graph-{field} {entry.name!r}"


def m_cycle(model, rng, folder):
    """A node consumes the output of one of its consumers (or its own output)."""
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    producers = {o: n for n in graph.node for o in n.output}
    pairs = [(producers[i], n) for n in graph.node for i in n.input if i in producers and n.output]
    if pairs and rng.random() < 0.8:
        first, second = _choice(rng, pairs)
    else:
        first = second = _choice(rng, [n for n in graph.node if n.output] or [None])
        if first is None:
            return None
    if not first.input:
        first.input.append(second.output[0])
    else:
        first.input[int(rng.integers(len(first.input)))] = second.output[0]
    return f"cycle {first.name or first.op_type} <- {second.output[0]!r}{_where(model, graph)}"


def m_shuffle_nodes(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 1)
    if graph is None:
        return None
    nodes = list(graph.node)
    order = rng.permutation(len(nodes))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return f"shuffle-nodes{_where(model, graph)}"


def m_remove_node(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    i = int(rng.integers(len(graph.node)))
    node = graph.node[i]
    desc = f"remove-node {node.name or node.op_type}{_where(model, graph)}"
    del graph.node[i]
    return desc


def m_unknown_op(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    node = _choice(rng, graph.node)
    old = node.op_type
    node.op_type = _choice(rng, ["FuzzOp", "", "conv", "Conv2D", "MatMulInteger"])
    return f"unknown-op {node.name or old}{_where(model, graph)}: {old} -> {node.op_type!r}"


def m_unknown_domain(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    node = _choice(rng, graph.node)
    node.domain = _choice(rng, ["com.fuzz", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview"])
    declared = rng.random() < 0.5
    if declared and node.domain not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(node.domain, int(rng.integers(1, 3))))
    return f"unknown-domain {node.name or node.op_type}{_where(model, graph)}: {node.domain}" + (
        " (declared)" if declared else ""
    )


def m_opset(model, rng, folder):
    version = int(_choice(rng, [1, 1, 99, 99, 0, -1, 6, 7, 10, 2**31]))
    how = _choice(rng, ["set", "set", "remove", "duplicate"])
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if how == "remove":
        del model.opset_import[:]
        return "opset: no opset_import"
    if how == "duplicate":
        model.opset_import.append(helper.make_opsetid("", version))
        return f"opset: duplicate default-domain entry {version}"
    for entry in default or [model.opset_import.add()]:
        entry.domain, entry.version = "", version
    return f"opset: default domain -> {version}"


def m_ir_version(model, rng, folder):
    model.ir_version = int(_choice(rng, [0, 1, 2, 3, 4, 11, 12, 99, -1]))
    return f"ir-version -> {model.ir_version}"


def m_empty_graph(model, rng, folder):
    graph = _pick_graph(model, rng)
    how = _choice(rng, ["no-nodes", "nothing", "no-inputs", "no-initializers"])
    if how in ("no-nodes", "nothing"):
        del graph.node[:]
    if how == "nothing":
        del graph.initializer[:]
        del graph.input[:]
        del graph.output[:]
        del graph.value_info[:]
    if how == "no-inputs":
        del graph.input[:]
    if how == "no-initializers":
        del graph.initializer[:]
    return f"empty-graph ({how}){_where(model, graph)}"


def m_missing_output(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: len(g.output) > 0)
    if graph is None:
        return None
    how = _choice(rng, ["remove-one", "remove-all", "rename", "to-input", "to-initializer"])
    i = int(rng.integers(len(graph.output)))
    if how == "remove-one":
        del graph.output[i]
    elif how == "remove-all":
        del graph.output[:]
    elif how == "rename":
        graph.output[i].name = _fresh("nowhere", rng)
    elif how == "to-input" and graph.input:
        graph.output[i].name = graph.input[0].name
    elif how == "to-initializer" and graph.initializer:
        graph.output[i].name = graph.initializer[0].name
    else:
        return None
    return f"missing-output ({how}){_where(model, graph)}"


def m_io_type(model, rng, folder):
    """Change a graph input's / output's element type or shape."""
    graph = _pick_graph(model, rng, lambda g: len(g.input) + len(g.output) > 0)
    if graph is None:
        return None
    value = _choice(rng, [*graph.input, *graph.output])
    how = _choice(
        rng,
        [
            "dtype",
            "dtype",
            "no-type",
            "no-shape",
            "rank",
            "dynamic",
            "zero",
            "huge",
            "neg",
            "sequence",
        ],
    )
    tensor_type = value.type.tensor_type
    dims = tensor_type.shape.dim
    if how == "dtype":
        tensor_type.elem_type = int(_choice(rng, [*DTYPES, 0]))
    elif how == "no-type":
        value.ClearField("type")
    elif how == "no-shape":
        tensor_type.ClearField("shape")
    elif how == "rank":
        if len(dims) and rng.random() < 0.5:
            del dims[-1]
        else:
            dims.add().dim_value = 3
    elif how == "sequence":
        value.type.CopyFrom(helper.make_sequence_type_proto(value.type))
    elif not len(dims):
        return None
    else:
        dim = dims[int(rng.integers(len(dims)))]
        if how == "dynamic":
            dim.dim_param = "fuzz_dim"
        elif how == "zero":
            dim.dim_value = 0
        elif how == "huge":
            dim.dim_value = int(_choice(rng, [2**20, 2**31, 2**40]))
        else:
            dim.dim_value = -2
    return f"io-type {value.name!r}{_where(model, graph)}: {how}"


def m_value_info(model, rng, folder):
    """A value_info entry with a wrong type or shape for an intermediate tensor."""
    graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
    if graph is None:
        return None
    names = [o for n in graph.node for o in n.output if o]
    name = _choice(rng, names)
    if name is None:
        return None
    dtype = int(_choice(rng, [TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT16, 0]))
    dims = [int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 4)))]
    graph.value_info.append(helper.make_tensor_value_info(name, dtype, dims))
    return f"value-info {name!r}{_where(model, graph)}: dtype {dtype} dims {dims}"


def m_attribute(model, rng, folder):
    graph = _pick_graph(model, rng, lambda g: any(n.attribute for n in g.node))
    if graph is None or rng.random() < 0.2:
        graph = _pick_graph(model, rng, lambda g: len(g.node) > 0)
        if graph is None:
            return None
        node = _choice(rng, graph.node)
        node.attribute.append(helper.make_attribute("fuzz_attr", 1))
        return f"attribute {node.name or node.op_type}{_where(model, graph)}: + fuzz_attr"
    node = _choice(rng, [n for n in graph.node if n.attribute])
    i = int(rng.integers(len(node.attribute)))
    attr = node.attribute[i]
    how = _choice(rng, ["remove", "retype", "negative", "zero", "huge", "empty-list"])
    name = attr.name
    if how == "remove":
        del node.attribute[i]
    elif how == "retype":
        attr.CopyFrom(helper.make_attribute(name, "fuzz" if attr.type != 3 else 2.5))
    elif attr.type == onnx.AttributeProto.INT:
        attr.i = {"negative": -7, "zero": 0, "huge": 2**40}.get(how, 0)
    elif attr.type == onnx.AttributeProto.INTS:
        value = {"negative": -3, "zero": 0, "huge": 2**31}.get(how)
        del attr.ints[:]
        if value is not None:
            attr.ints.extend([value] * 2)
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = {"negative": -1.0, "zero": 0.0, "huge": 1e38}.get(how, float("nan"))
    elif attr.type == onnx.AttributeProto.GRAPH:
        attr.g.ClearField("node")
    else:
        del node.attribute[i]
        how = "remove"
    return f"attribute {node.name or node.op_type}.{name}{_where(model, graph)}: {how}"


def m_subgraph(model, rng, folder):
    """Break an If / Loop / Scan body: outputs, inputs, outer references, counts."""
    holders = [
        (g, n)
        for g in [model.graph, *_subgraphs(model.graph)]
        for n in g.node
        if any(a.HasField("g") for a in n.attribute)
    ]
    if not holders:
        return None
    graph, node = _choice(rng, holders)
    attr = _choice(rng, [a for a in node.attribute if a.HasField("g")])
    body = attr.g
    how = _choice(
        rng,
        [
            "drop-output",
            "drop-input",
            "outer-missing",
            "num-scan",
            "drop-attr",
            "swap",
            "extra-output",
        ],
    )
    if how == "drop-output" and body.output:
        del body.output[-1]
    elif how == "drop-input" and body.input:
        del body.input[-1]
    elif how == "outer-missing" and body.node:
        body.node[0].input.append(_fresh("outer_missing", rng))
    elif how == "num-scan" and node.op_type == "Scan":
        for a in node.attribute:
            if a.name == "num_scan_inputs":
                a.i = int(_choice(rng, [0, 2, 5, -1]))
    elif how == "drop-attr":
        node.attribute.remove(attr)
    elif how == "swap" and len(body.output) > 1:
        first = onnx.ValueInfoProto()
        first.CopyFrom(body.output[0])
        body.output[0].CopyFrom(body.output[1])
        body.output[1].CopyFrom(first)
    elif how == "extra-output" and body.output:
        body.output.add().CopyFrom(body.output[0])
    else:
        return None
    return f"subgraph {node.name or node.op_type}.{attr.name}{_where(model, graph)}: {how}"


def m_sparse(model, rng, folder):
    """Turn an initializer into a sparse initializer with bad indices, or break one."""
    if model.graph.sparse_initializer and rng.random() < 0.7:
        sparse = _choice(rng, model.graph.sparse_initializer)
    else:
        dense = _choice(rng, [t for t in model.graph.initializer if t.dims])
        if dense is None:
            return None
        array = numpy_helper.to_array(dense)
        flat = np.flatnonzero(array)[:8]
        sparse = model.graph.sparse_initializer.add()
        sparse.CopyFrom(
            helper.make_sparse_tensor(
                numpy_helper.from_array(array.ravel()[flat], dense.name),
                numpy_helper.from_array(flat.astype(np.int64), dense.name + "_idx"),
                list(dense.dims),
            )
        )
        model.graph.initializer.remove(dense)
    how = _choice(rng, ["out-of-range", "negative", "count", "dims", "unsorted"])
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64).copy()
    if how == "out-of-range" and indices.size:
        indices.flat[-1] = 10**9
    elif how == "negative" and indices.size:
        indices.flat[0] = -5
    elif how == "count":
        indices = np.concatenate([indices.ravel(), [0]])
    elif how == "dims":
        del sparse.dims[:]
        sparse.dims.extend([1])
    elif how == "unsorted" and indices.size > 1:
        indices = indices[::-1].copy()
    sparse.indices.CopyFrom(numpy_helper.from_array(indices, sparse.indices.name))
    return f"sparse {sparse.values.name!r}: {how}"


EXTERNAL_KINDS = (
    "missing-file",
    "dotdot",
    "absolute",
    "symlink-out",
    "offset-past-end",
    "length-past-end",
    "huge-dims",
    "no-location",
    "directory",
    "bad-offset",
    "short-file",
    "valid",
)


def m_external_data(model, rng, folder):
    """Move an initializer to external data that is missing, escapes, or is too short."""
    tensors = [t for t in model.graph.initializer if t.dims]
    tensor = _choice(rng, tensors)
    if tensor is None:
        return None
    array = numpy_helper.to_array(tensor)
    payload = array.tobytes()
    how = _choice(rng, EXTERNAL_KINDS)
    location, info = "weights.bin", {}
    (folder / "outside.bin").write_bytes(payload + bytes(64))
    if how == "missing-file":
        location = "nothing_here.bin"
    elif how == "dotdot":
        location = "../outside.bin"
    elif how == "absolute":
        location = str((folder / "outside.bin").resolve())
    elif how == "symlink-out":
        (folder / "m" / "link.bin").symlink_to(folder / "outside.bin")
        location = "link.bin"
    elif how == "directory":
        (folder / "m" / "adir").mkdir()
        location = "adir"
    elif how == "no-location":
        location = ""
    (folder / "m" / "weights.bin").write_bytes(
        payload[: len(payload) // 2] if how == "short-file" else payload
    )
    if how == "offset-past-end":
        info["offset"] = str(len(payload) + 100)
    elif how == "length-past-end":
        info["length"] = str(len(payload) * 4 + 8)
    elif how == "bad-offset":
        info["offset"] = _choice(rng, ["-8", "abc", "1e3"])
    elif how == "huge-dims":
        del tensor.dims[:]
        tensor.dims.extend([2**20, 2**20])
    _clear_data(tensor)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = {"location": location, **info} if location else info
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return f"external-data {tensor.name!r}: {how}"


def m_function(model, rng, folder):
    """Break or add a model-local function."""
    if model.functions and rng.random() < 0.7:
        function = _choice(rng, model.functions)
        how = _choice(rng, ["drop-node", "rename-output", "unknown-op", "remove"])
        if how == "remove":
            model.functions.remove(function)
        elif how == "drop-node" and function.node:
            del function.node[-1]
        elif how == "rename-output" and function.output:
            function.output[0] = _fresh("fn_missing", rng)
        elif how == "unknown-op" and function.node:
            function.node[0].op_type = "FuzzOp"
        else:
            return None
        return f"function {function.name}: {how}"
    graph = model.graph
    node = _choice(rng, graph.node)
    if node is None:
        return None
    node.domain = "local.fuzz"
    if "local.fuzz" not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid("local.fuzz", 1))
    return f"function: {node.name or node.op_type} calls undefined local.fuzz.{node.op_type}"


# Mutations that keep the model valid but unusual: they send passes down paths that the
# broken models above stop before.


def m_weight_to_input(model, rng, folder):
    """A main-graph weight becomes a graph input (with its initializer as a default,
    or without one: then it is a runtime input the passes must not treat as constant)."""
    tensor = _choice(rng, [t for t in model.graph.initializer if t.dims])
    if tensor is None or tensor.name in {i.name for i in model.graph.input}:
        return None
    model.graph.input.append(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
    )
    keep = rng.random() < 0.5
    if not keep:
        model.graph.initializer.remove(tensor)
    if model.ir_version < 4:
        model.ir_version = 4
    return f"weight-to-input {tensor.name!r}" + (" (with default)" if keep else "")


def m_initializer_to_constant(model, rng, folder):
    """An initializer becomes a Constant node (at the front of its graph)."""
    picked = _choice(rng, _all_initializers(model))
    if picked is None:
        return None
    graph, tensor = picked
    if tensor.name in {i.name for i in graph.input}:
        return None
    graph.initializer.remove(tensor)
    node = helper.make_node("Constant", [], [tensor.name], value=tensor, name=_fresh("const", rng))
    graph.node.insert(0, node)
    return f"initializer-to-constant {tensor.name!r}{_where(model, graph)}"


def m_expose_intermediate(model, rng, folder):
    """An intermediate tensor also becomes a graph output."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    names = [o for n in graph.node for o in n.output if o and o not in outputs]
    name = _choice(rng, names)
    if name is None:
        return None
    graph.output.append(onnx.ValueInfoProto(name=name))
    inferred = None
    with contextlib.suppress(Exception):
        inferred = onnx.shape_inference.infer_shapes(model)
    if inferred is not None:
        known = {v.name: v for v in inferred.graph.value_info}
        if name in known:
            graph.output[-1].CopyFrom(known[name])
    return f"expose-intermediate {name!r}"


def m_insert_identity(model, rng, folder):
    """Identity / Dropout / Cast-to-same-type nodes in front of a node input."""
    graph = _pick_graph(model, rng, _nodes_with_inputs)
    if graph is None:
        return None
    node = _choice(rng, _nodes_with_inputs(graph))
    i = int(rng.integers(len(node.input)))
    if not node.input[i]:
        return None
    op = _choice(rng, ["Identity", "Identity", "Dropout"])
    name = _fresh("pass_through", rng)
    graph.node.insert(
        list(graph.node).index(node), helper.make_node(op, [node.input[i]], [name], name=name)
    )
    node.input[i] = name
    return (
        f"insert-{op.lower()} before {node.name or node.op_type}.input[{i}]{_where(model, graph)}"
    )


def m_dead_code(model, rng, folder):
    """Unused initializers and nodes whose outputs nobody reads."""
    graph = model.graph
    graph.initializer.append(
        numpy_helper.from_array(
            rng.standard_normal((16, 16)).astype(np.float32), _fresh("unused_w", rng)
        )
    )
    source = _choice(rng, [i.name for i in graph.input] + [t.name for t in graph.initializer])
    dead = _fresh("dead", rng)
    graph.node.append(helper.make_node("Relu", [source], [dead], name=dead))
    return f"dead-code: unused initializer + Relu({source!r})"


def m_rename(model, rng, folder):
    """Rename a tensor everywhere to a name with unusual characters."""
    graph = model.graph
    names = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output if o]
    old = _choice(rng, names)
    if old is None:
        return None
    new = _choice(rng, ["a/b:0", "ünï cödé", "x" * 300, "123", "::", "input.1 ", "/", "-"])
    for g in [graph, *_subgraphs(graph)]:
        for t in g.initializer:
            if t.name == old:
                t.name = new
        for n in g.node:
            n.input[:] = [new if x == old else x for x in n.input]
            n.output[:] = [new if x == old else x for x in n.output]
        for v in [*g.input, *g.output, *g.value_info]:
            if v.name == old:
                v.name = new
    return f"rename {old!r} -> {new!r}"


def m_batch_dim(model, rng, folder):
    """Fix or free the first dimension of the inputs and outputs."""
    how = _choice(rng, ["fixed-1", "fixed-3", "dynamic"])
    touched = 0
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not len(dims):
            continue
        touched += 1
        if how == "dynamic":
            dims[0].dim_param = "batch"
        else:
            dims[0].dim_value = int(how[-1])
    return f"batch-dim {how}" if touched else None


def m_metadata(model, rng, folder):
    model.doc_string = "d" * int(rng.integers(1, 100000))
    model.metadata_props.add(key="fuzz", value="ü" * 10)
    model.producer_name, model.producer_version = "fuzz\u0000er", "∞"
    return "metadata: long doc_string, unicode props"


def b_truncate(data: bytes, rng) -> tuple[bytes, str]:
    cut = int(rng.integers(0, max(1, len(data))))
    return data[:cut], f"truncate to {cut} of {len(data)} bytes"


def b_flip(data: bytes, rng) -> tuple[bytes, str]:
    buf = bytearray(data)
    count = int(rng.integers(1, 9))
    for _ in range(count):
        if buf:
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    return bytes(buf), f"flip {count} bits"


def b_splice(data: bytes, rng) -> tuple[bytes, str]:
    i = int(rng.integers(len(data) + 1))
    noise = bytes(rng.integers(0, 256, size=int(rng.integers(1, 32)), dtype=np.uint8))
    return data[:i] + noise + data[i:], f"insert {len(noise)} random bytes at {i}"


def b_garbage(data: bytes, rng) -> tuple[bytes, str]:
    kind = _choice(rng, ["empty", "random", "text", "zeros"])
    if kind == "empty":
        return b"", "empty file"
    if kind == "text":
        return b"ir_version: 8\ngraph { }\n", "text instead of protobuf"
    if kind == "zeros":
        return bytes(len(data)), "all zero bytes"
    return bytes(rng.integers(0, 256, size=256, dtype=np.uint8)), "256 random bytes"


PROTO_MUTATIONS = {
    "init-dtype": m_init_dtype,
    "init-dims": m_init_dims,
    "raw-data-length": m_raw_data_length,
    "typed-data-count": m_typed_data_count,
    "special-weights": m_special_weights,
    "string-initializer": m_string_initializer,
    "dangling-input": m_dangling_input,
    "extra-input": m_extra_input,
    "duplicate-node-name": m_duplicate_node_name,
    "duplicate-output-tensor": m_duplicate_output_tensor,
    "duplicate-initializer": m_duplicate_initializer,
    "initializer-shadows-tensor": m_initializer_shadows_tensor,
    "duplicate-graph-io": m_duplicate_graph_io,
    "cycle": m_cycle,
    "shuffle-nodes": m_shuffle_nodes,
    "remove-node": m_remove_node,
    "unknown-op": m_unknown_op,
    "unknown-domain": m_unknown_domain,
    "opset": m_opset,
    "ir-version": m_ir_version,
    "empty-graph": m_empty_graph,
    "missing-output": m_missing_output,
    "io-type": m_io_type,
    "value-info": m_value_info,
    "attribute": m_attribute,
    "subgraph": m_subgraph,
    "sparse": m_sparse,
    "external-data": m_external_data,
    "function": m_function,
}
# valid but unusual models
VALID_MUTATIONS = {
    "weight-to-input": m_weight_to_input,
    "initializer-to-constant": m_initializer_to_constant,
    "expose-intermediate": m_expose_intermediate,
    "insert-identity": m_insert_identity,
    "dead-code": m_dead_code,
    "rename": m_rename,
    "batch-dim": m_batch_dim,
    "metadata": m_metadata,
}
VALID_SHARE = 0.35  # chance that a drawn mutation is one of VALID_MUTATIONS
BYTE_MUTATIONS = {"truncate": b_truncate, "flip": b_flip, "splice": b_splice, "garbage": b_garbage}


def mutate(
    model: onnx.ModelProto, rng: np.random.Generator, folder: Path
) -> tuple[bytes, list[str]]:
    """1-3 protobuf mutations, then (sometimes) one byte-level mutation."""
    applied: list[str] = []
    wanted = 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)
    for _ in range(20):
        if len(applied) >= wanted:
            break
        table = VALID_MUTATIONS if rng.random() < VALID_SHARE else PROTO_MUTATIONS
        name = _choice(rng, list(table))
        try:
            desc = table[name](model, rng, folder)
        except Exception as exc:  # an earlier mutation left something this one cannot read
            desc = f"{name}: not applied ({type(exc).__name__})"
        if desc:
            applied.append(desc)
    try:
        data = model.SerializeToString()
    except Exception as exc:  # e.g. a string that is not UTF-8
        data, _ = b"", applied.append(f"(serialization failed: {exc})")
    if not applied or rng.random() < 0.15:
        name = _choice(rng, list(BYTE_MUTATIONS))
        data, desc = BYTE_MUTATIONS[name](data, rng)
        applied.append(desc)
    return data, applied


# ---------------------------------------------------------------------------- commands

# Cheap option sets per pass; a pass not listed runs with its defaults.
PASS_VARIANTS: dict[str, tuple[str, ...]] = {
    "prune-initializers": (
        "prune-initializers(sparsity=0.5,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=0.5,min_size=16)",
        "prune-initializers(pattern=2:4,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=0.5,store=sparse,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=auto,reconstruct=false,min_size=1)",
    ),
    "clip-weights": ("clip-weights(percentile=99,min_size=1)", "clip-weights(sigma=3)"),
    "share-weights": (
        "share-weights(bits=4,min_size=1,max_iter=20)",
        "share-weights(bits=2,granularity=channel,min_size=1,max_iter=10)",
        "share-weights(bits=4,materialize=true,min_size=1)",
        "share-weights(bits=4,index_dtype=uint4,upgrade_opset=true,min_size=1)",
    ),
    "remove-neurons": (
        "remove-neurons(ratio=0.3)",
        "remove-neurons(ratio=0.5,compensate=true)",
        "remove-neurons(target_macs=0.7)",
    ),
    "quantize-int8": (
        "quantize-int8(method=minmax,rounding=nearest,fallback=none,latency=false)",
        "quantize-int8(weights_only=true,latency=false)",
        "quantize-int8(method=percentile,activations=int8,rounding=nearest,latency=false)",
    ),
    "dedupe-initializers": ("dedupe-initializers", "dedupe-initializers(min_size=0)"),
    "fold-constants": ("fold-constants", "fold-constants(shapes=false,size_threshold=64)"),
}
# Passes the fuzzer never runs, with the reason.
SKIPPED_PASSES = {"distill": "trains in a separate environment (onnxopt train-env)"}
OPTIONAL_PASS_MODULES = ("onnxopt.passes.quantize",)
SAMPLE_ARGS = ["--calib-samples", "8", "--val-samples", "4"]


def load_passes() -> list[str]:
    """Registered pass names the fuzzer runs (importing optional pass packages first)."""
    for module in OPTIONAL_PASS_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    from onnxopt.pipeline import registry

    return sorted(name for name in registry() if name not in SKIPPED_PASSES)


def pipelines_for(name: str) -> tuple[str, ...]:
    return PASS_VARIANTS.get(name, (name,))


@dataclass
class Case:
    """One fuzz case: a mutant of a seed model and one command run on it."""

    index: int
    seed_model: str
    mutations: list[str]
    kind: str  # inspect | compare | optimize | api
    pipeline: str = ""
    argv: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"inspect": "inspect", "compare": "compare"}.get(self.kind, "")
        what = what or f"{self.kind} --passes {self.pipeline!r}"
        return f"{self.seed_model} + [{'; '.join(self.mutations)}] -> {what}"


def _pick_seed(rng: np.random.Generator) -> str:
    weights = np.array([w if seeds else 0.0 for seeds, w in FAMILIES])
    family = FAMILIES[int(rng.choice(len(FAMILIES), p=weights / weights.sum()))][0]
    return _choice(rng, sorted(family))


def _pick_command(rng: np.random.Generator, passes: list[str]) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.12:
        return "inspect", ""
    if roll < 0.24:
        return "compare", ""
    pipeline = _choice(rng, pipelines_for(_choice(rng, passes)))
    if rng.random() < 0.1:
        pipeline = f"cleanup,{pipeline}"
    return ("api" if roll < 0.4 else "optimize"), pipeline


def build_case(run_seed: int, index: int, folder: Path, passes: list[str]) -> Case:
    """Write ``original.onnx`` and ``m/mutant.onnx`` (+ external files) into ``folder``.

    Everything is drawn from ``default_rng([run_seed, index, stream])``: a case is
    reproducible from the two numbers alone. The mutant and the command use separate
    streams, so a pass registered later changes the commands, never the mutants.
    """
    model_rng = np.random.default_rng([run_seed, index, 0])
    command_rng = np.random.default_rng([run_seed, index, 1])
    seed_model = _pick_seed(model_rng)
    kind, pipeline = _pick_command(command_rng, passes)
    model = all_seeds()[seed_model]()
    (folder / "m").mkdir(parents=True, exist_ok=True)
    (folder / "out").mkdir(exist_ok=True)
    (folder / "original.onnx").write_bytes(model.SerializeToString())
    data, mutations = mutate(model, model_rng, folder)
    (folder / "m" / "mutant.onnx").write_bytes(data)
    case = Case(index, seed_model, mutations, kind, pipeline)
    case.argv = command_argv(case, folder, command_rng)
    return case


def command_argv(case: Case, folder: Path, rng: np.random.Generator) -> list[str]:
    mutant, original = str(folder / "m" / "mutant.onnx"), str(folder / "original.onnx")
    if case.kind == "inspect":
        return ["inspect", mutant] + (["--json"] if rng.random() < 0.3 else [])
    if case.kind == "compare":
        budget = ["--budget", "cosine>=0.99"] if rng.random() < 0.3 else []
        return ["compare", original, mutant, "--samples", "4", *budget]
    argv = [
        "optimize",
        mutant,
        "-o",
        str(folder / "out" / "out.onnx"),
        "--passes",
        case.pipeline,
        *SAMPLE_ARGS,
    ]
    if rng.random() < 0.15:
        argv += ["--on-fail", "abort"]
    if rng.random() < 0.1:
        argv += ["--report", str(folder / "out" / "report.json")]
    return argv


# ---------------------------------------------------------------------------- outcomes

OK, OK_TOLERATED, CLEAR_ERROR, CHECK_FAILED, CRASH = (
    "ok",
    "ok (input already failed the checker)",
    "clear error",
    "check failed",
    "crash",
)
OUTCOMES = (OK, OK_TOLERATED, CLEAR_ERROR, CHECK_FAILED, CRASH)

# Core bugs this fuzzer found and reported (id -> crash-signature regex, summary). Each
# has an xfail(strict=True) regression test in tests/test_fuzz.py; drop the entry when
# the fix lands and that test flips.
# Crash signatures (regex on "<kind> in <file>:<function> <- ...") of reported bugs that
# are not fixed yet, each with a regression test in tests/test_fuzz.py. Empty: the core
# bugs B1-B12 found by the first 5,000-case run are fixed (docs/hardening.md).
KNOWN_BUGS: dict[str, tuple[str, str]] = {}


def known_bug(outcome: Outcome) -> str | None:
    """The KNOWN_BUGS id a crash belongs to, or None for a new crash."""
    for bug, (pattern, _) in KNOWN_BUGS.items():
        if outcome.signature and re.search(pattern, outcome.signature):
            return bug
    return None


@dataclass
class Outcome:
    index: int
    outcome: str
    kind: str  # error kind: the first words of the message, paths and numbers removed
    case: str = ""
    seconds: float = 0.0
    detail: str = ""  # crash: exception line / what was wrong
    signature: str = ""  # crash: exception type and the innermost onnxopt frame
    traceback: str = ""
    raised: list[str] = field(default_factory=list)  # steps rolled back because a pass raised
    command: str = ""  # inspect | compare | the pipeline's last pass (CLI and API)


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case (BaseException: the CLI must not catch it)."""


def _error_kind(message: str, folder: Path) -> str:
    text = message.replace(str(folder.resolve()), "").replace(str(folder), "")
    text = re.sub(r"^onnxopt: (error|check failed|internal error): ", "", text.strip())
    text = re.sub(r"/?m/mutant\.onnx:?|/?original\.onnx:?", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return " ".join(text.split()[:6]) or "(empty message)"


def _stray_files(folder: Path, produced_ok: bool) -> list[str]:
    """Files in the output folder that must not be there."""
    names = sorted(p.name for p in (folder / "out").iterdir())
    allowed = {"out.onnx", "out.onnx.data", "report.json"} if produced_ok else {"report.json"}
    return [n for n in names if n not in allowed]


def _check_output(folder: Path, mutant: Path) -> str | None:
    """None if out.onnx loads, passes the checker and onnxruntime loads it; else why not.
    Returns "tolerated" when only the checker fails and the mutant fails it too."""
    from onnxopt.model import load_model
    from onnxopt.runtime import make_session

    out = folder / "out" / "out.onnx"
    if not out.exists():
        return "exit 0 but no output file"
    try:
        proto = onnx.load(str(out))
    except Exception as exc:
        return f"output does not load: {_first_line(exc)}"
    try:
        make_session(load_model(out).proto)
    except Exception as exc:
        return f"onnxruntime cannot load the output: {_first_line(exc)}"
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        try:
            onnx.checker.check_model(onnx.load(str(mutant)))
        except Exception:
            return "tolerated"
        return f"output fails the onnx checker, the input passed it: {_first_line(exc)}"
    return None


def _bad_output_signature(problem: str) -> str:
    text = re.sub(r"/\S*/", "", problem)
    text = re.sub(r"'[^']*'", "'…'", text)
    return "bad output: " + re.sub(r"\d+", "N", text)[:160]


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:200]}"


def _signature(exc: BaseException) -> str:
    """Exception type and the two innermost onnxopt frames: what groups crashes by bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_CODE_DIRS)]
    ours = [f for f in ours if f.name != "main"] or ours or frames[-1:]
    places = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}" for f in ours]
    name = type(exc).__name__
    if type(exc).__module__.startswith("onnxruntime"):
        name = "onnxruntime error"
    return f"{name} in " + " <- ".join(reversed(places[-2:])) if places else name


def classify_cli(case: Case, folder: Path, rc: int, stderr: str) -> tuple[str, str, str]:
    """(outcome, kind, detail) of a CLI run from its exit code and printed stderr."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    message = lines[-1] if lines else ""
    kind = _error_kind(message, folder)
    if "Traceback" in stderr:
        return CRASH, kind, "traceback on stderr"
    if rc == 0:
        stray = _stray_files(folder, produced_ok=True)
        if stray:
            return CRASH, "stray files", f"left {stray}"
        if case.kind != "optimize":
            return OK, "", ""
        problem = _check_output(folder, folder / "m" / "mutant.onnx")
        if problem == "tolerated":
            return OK_TOLERATED, "", ""
        return (CRASH, "bad output", problem) if problem else (OK, "", "")
    stray = _stray_files(folder, produced_ok=False)
    if stray:
        return CRASH, kind, f"exit {rc} and left {stray}"
    if rc == 2 and len(lines) == 1 and lines[0].startswith("onnxopt: error: "):
        return CLEAR_ERROR, kind, ""
    if rc == 1 and lines and lines[-1].startswith(("onnxopt: check failed", "over budget")):
        return CHECK_FAILED, kind, ""
    if rc == 1 and case.kind == "compare":
        return CHECK_FAILED, "compare over budget", ""
    return CRASH, kind, f"exit {rc}: {message[:300]}"


# ---------------------------------------------------------------------------- running


class _LogCapture(logging.Handler):
    """Root handler installed before the CLI's basicConfig (which then adds none)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


_LOGS = _LogCapture()


def _prepare_process(memory_gb: float, preload: Sequence[str] = ()) -> None:
    for module in preload:
        importlib.import_module(module)
    logging.getLogger().addHandler(_LOGS)
    warnings.simplefilter("ignore")
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    load_passes()


def _call_cli(argv: list[str]) -> tuple[int, str, str, BaseException | None]:
    from onnxopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except CaseTimeout:
            raise
        except BaseException as exc:  # the CLI let something through
            rc, escaped = -1, exc
    return rc, out.getvalue(), err.getvalue(), escaped


_ROLLED_BACK = re.compile(r"^rolled back: step \d+ ([a-z0-9-]+)\S*: (pass raised .*)$", re.M)


def _raised_in_steps(steps: Iterable[tuple[str, str]]) -> list[str]:
    """``pass: ExceptionType: message`` for steps rolled back because the pass raised."""
    found = []
    for step, reason in steps:
        first = reason.splitlines()[0] if reason else ""
        if first.startswith("pass raised "):
            found.append(f"{step.split('(')[0]}: {first.removeprefix('pass raised ')[:200]}")
    return found


def _run_api(case: Case, folder: Path) -> Outcome:
    import onnxopt

    mutant = folder / "m" / "mutant.onnx"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = onnxopt.optimize(
                str(mutant), case.pipeline, seed=0, calibration_samples=8, validation_samples=4
            )
            result.save(folder / "out" / "out.onnx")
    except onnxopt.CheckFailed as exc:
        stray = _stray_files(folder, produced_ok=False)
        if stray:
            return Outcome(case.index, CRASH, "stray files", detail=f"left {stray}")
        steps = [(r.step, r.reason) for r in exc.outcome.steps] if exc.outcome else []
        return Outcome(
            case.index, CHECK_FAILED, _error_kind(str(exc), folder), raised=_raised_in_steps(steps)
        )
    except onnxopt.OnnxoptError as exc:
        stray = _stray_files(folder, produced_ok=False)
        if stray:
            return Outcome(case.index, CRASH, "stray files", detail=f"left {stray}")
        return Outcome(case.index, CLEAR_ERROR, _error_kind(str(exc), folder))
    except CaseTimeout:
        raise
    except BaseException as exc:
        return Outcome(
            case.index,
            CRASH,
            _error_kind(f"{type(exc).__name__}: {exc}", folder),
            detail=_first_line(exc),
            signature=_signature(exc),
            traceback=traceback.format_exc(),
        )
    raised = _raised_in_steps((s["step"], s["reason"]) for s in result.steps)
    problem = _check_output(folder, mutant)
    if problem == "tolerated":
        return Outcome(case.index, OK_TOLERATED, "", raised=raised)
    if problem:
        return Outcome(
            case.index,
            CRASH,
            "bad output",
            detail=problem,
            raised=raised,
            signature=_bad_output_signature(problem),
        )
    return Outcome(case.index, OK, "", raised=raised)


def _run_cli(case: Case, folder: Path) -> Outcome:
    rc, stdout, stderr, escaped = _call_cli(case.argv)
    if escaped is not None:
        return Outcome(
            case.index,
            CRASH,
            _error_kind(f"{type(escaped).__name__}: {escaped}", folder),
            detail=f"escaped the CLI: {_first_line(escaped)}",
            signature=_signature(escaped),
            traceback="".join(traceback.format_exception(escaped)),
        )
    outcome, kind, detail = classify_cli(case, folder, rc, stderr)
    signature = _bad_output_signature(detail) if kind == "bad output" else ""
    raised = [
        f"{m.group(1)}: {m.group(2).removeprefix('pass raised ')[:200]}"
        for m in _ROLLED_BACK.finditer(stdout)
    ]
    result = Outcome(case.index, outcome, kind, detail=detail, raised=raised, signature=signature)
    if outcome == CRASH and rc == 3:
        _explain_internal_error(case, folder, result)
    return result


def _explain_internal_error(case: Case, folder: Path, result: Outcome) -> None:
    """Re-run an exit-3 case with -v (exceptions propagate) to get its traceback."""
    for leftover in (folder / "out").iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    from onnxopt.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*case.argv, "-v"])
        except CaseTimeout:
            raise
        except BaseException as exc:
            result.signature = _signature(exc)
            result.traceback = "".join(traceback.format_exception(exc))


def run_case(run_seed: int, index: int, passes: list[str], timeout: float, keep: Path | None):
    """Build and run one case in this process; return its Outcome."""
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{index}-"))
    started = time.perf_counter()
    case = None
    _LOGS.records.clear()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        case = build_case(run_seed, index, folder, passes)
        outcome = _run_api(case, folder) if case.kind == "api" else _run_cli(case, folder)
    except CaseTimeout as exc:
        outcome = Outcome(index, CRASH, "hang", detail=f"no result after {timeout:g} s")
        outcome.traceback = "".join(traceback.format_exception(exc))
        outcome.signature = "hang in " + _signature(exc).split(" in ", 1)[-1]
    except Exception as exc:  # a fuzzer bug, reported as such
        outcome = Outcome(index, CRASH, "fuzzer error", detail=_first_line(exc))
        outcome.traceback = traceback.format_exc()
        outcome.signature = "fuzzer error: " + _signature(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome.seconds = time.perf_counter() - started
    outcome.case = case.describe() if case else f"case {index} (not built)"
    if case:
        steps = re.findall(r"(?:^|,)([a-z][a-z0-9-]*)(?=\(|,|$)", case.pipeline)
        outcome.command = steps[-1] if steps else case.kind
    if keep is not None and outcome.outcome == CRASH:
        target = keep / f"case-{run_seed}-{index}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, symlinks=True)
        (target / "outcome.txt").write_text(_outcome_text(outcome, case, run_seed))
    shutil.rmtree(folder, ignore_errors=True)
    return outcome


def _on_alarm(signum, frame):
    raise CaseTimeout()


def _outcome_text(outcome: Outcome, case: Case | None, run_seed: int) -> str:
    if case and case.kind == "api":
        command = (
            f"onnxopt.optimize('m/mutant.onnx', {case.pipeline!r}, seed=0, "
            "calibration_samples=8, validation_samples=4).save('out/out.onnx')"
        )
    else:
        argv = " ".join(shlex.quote(a) for a in case.argv) if case else ""
        command = f"onnxopt {argv}"
    return (
        f"case {outcome.index} of seed {run_seed}: {outcome.case}\n"
        f"command: {command}\n{outcome.outcome}: {outcome.kind}: {outcome.detail}\n"
        f"{outcome.signature}\n\n{outcome.traceback}"
    )


# ---------------------------------------------------------------------------- worker pool


def _worker(conn, run_seed, timeout, memory_gb, keep: str | None, preload) -> None:
    _prepare_process(memory_gb, preload)
    passes = load_passes()
    keep_dir = Path(keep) if keep else None
    while True:
        try:
            index = conn.recv()
        except EOFError:
            return
        if index is None:
            return
        outcome = run_case(run_seed, index, passes, timeout, keep_dir)
        conn.send(dataclasses.asdict(outcome))


@dataclass
class _Slot:
    process: Any
    conn: Any
    index: int | None = None
    started: float = 0.0


class Pool:
    """Worker processes that each run one case at a time. A worker that does not answer
    within ``timeout + grace`` seconds (a hang in native code) or dies (a segfault) is
    replaced, and its case is a crash."""

    grace = 15.0

    def __init__(self, workers, run_seed, timeout, memory_gb, keep, preload=()) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.args = (run_seed, timeout, memory_gb, str(keep) if keep else None, tuple(preload))
        self.timeout = timeout
        self.slots = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Slot:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, *self.args), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def run(self, indices: Iterable[int], deadline: float | None) -> Iterator[Outcome]:
        pending = iter(indices)
        for slot in self.slots:
            self._dispatch(slot, pending, deadline)
        while any(slot.index is not None for slot in self.slots):
            busy = [slot for slot in self.slots if slot.index is not None]
            ready = multiprocessing.connection.wait([slot.conn for slot in busy], timeout=1.0)
            for slot in busy:
                outcome, dead = self._collect(slot, ready)
                if outcome is None:
                    continue
                yield outcome
                if dead:
                    self._respawn(slot)
                slot.index = None
                self._dispatch(slot, pending, deadline)

    def _dispatch(self, slot: _Slot, pending: Iterator[int], deadline: float | None) -> None:
        if deadline is not None and time.time() > deadline:
            return
        index = next(pending, None)
        if index is not None:
            slot.index, slot.started = index, time.perf_counter()
            slot.conn.send(index)

    def _collect(self, slot: _Slot, ready) -> tuple[Outcome | None, bool]:
        """(outcome, worker is dead) for a finished, dead or hung worker; (None, False)
        while it is still within its time."""
        if slot.conn in ready:
            try:
                return Outcome(**slot.conn.recv()), False
            except (EOFError, OSError):
                slot.process.join(5)
                code = slot.process.exitcode
                return Outcome(
                    slot.index,
                    CRASH,
                    "worker died",
                    detail=f"worker process died (exit code {code}) during the case",
                    signature=f"worker died (exit code {code})",
                ), True
        if time.perf_counter() - slot.started > self.timeout + self.grace:
            slot.process.kill()
            slot.process.join(5)
            return Outcome(
                slot.index,
                CRASH,
                "hang",
                detail=f"worker killed after {self.timeout + self.grace:g} s",
                signature="hang (killed)",
            ), True
        return None, False

    def _respawn(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            slot.conn.close()
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        fresh = self._spawn()
        slot.process, slot.conn = fresh.process, fresh.conn

    def close(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):
                slot.conn.send(None)
        for slot in self.slots:
            slot.process.join(10)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)


# ---------------------------------------------------------------------------- summary


@dataclass
class Summary:
    seed: int
    cases: int
    seconds: float
    outcomes: list[Outcome]

    def counts(self) -> dict[str, int]:
        counts = {name: 0 for name in OUTCOMES}
        for o in self.outcomes:
            counts[o.outcome] += 1
        return counts

    def kinds(self, outcome: str) -> list[tuple[str, int]]:
        tally: dict[str, int] = {}
        for o in self.outcomes:
            if o.outcome == outcome:
                tally[o.kind] = tally.get(o.kind, 0) + 1
        return sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))

    @property
    def crashes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome == CRASH]

    @property
    def new_crashes(self) -> list[Outcome]:
        """Crashes that match no KNOWN_BUGS entry."""
        return [o for o in self.crashes if known_bug(o) is None]

    def crash_signatures(self) -> list[tuple[str, list[Outcome]]]:
        groups: dict[str, list[Outcome]] = {}
        for o in self.crashes:
            groups.setdefault(o.signature or f"{o.kind}: {o.detail[:80]}", []).append(o)
        return sorted(groups.items(), key=lambda kv: -len(kv[1]))

    def by_command(self) -> str:
        """A table: cases per command (inspect, compare, each pass) and outcome."""
        table: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            row = table.setdefault(o.command or "?", {name: 0 for name in OUTCOMES})
            row[o.outcome] += 1
        short = ["ok", "ok*", "error", "check", "crash"]
        lines = [f"{'command':<22}{'cases':>7}" + "".join(f"{h:>7}" for h in short)]
        for command in sorted(table):
            row = table[command]
            cells = "".join(f"{row[name]:>7}" for name in OUTCOMES)
            lines.append(f"{command:<22}{sum(row.values()):>7}{cells}")
        lines.append("(ok* = ok, input already failed the checker; error = clear error)")
        return "\n".join(lines)

    def raised_groups(self) -> list[tuple[str, list[Outcome]]]:
        groups: dict[str, list[Outcome]] = {}
        for o in self.outcomes:
            for entry in o.raised:
                name, _, rest = entry.partition(": ")
                key = f"{name}: " + " ".join(re.sub(r"\d+", "N", rest).split()[:6])
                groups.setdefault(key, []).append(o)
        return sorted(groups.items(), key=lambda kv: -len(kv[1]))

    def format(self, show_crashes: int = 3) -> str:
        lines = [
            f"{len(self.outcomes)} cases (seed {self.seed}) in {self.seconds:.0f} s",
            "",
            "outcome                                   cases",
        ]
        for name, count in self.counts().items():
            lines.append(f"{name:<40}  {count:>6}")
        lines += ["", self.by_command()]
        for name in (CLEAR_ERROR, CHECK_FAILED):
            kinds = self.kinds(name)
            if kinds:
                lines += ["", f"{name} by kind:"]
                lines += [f"  {count:>6}  {kind}" for kind, count in kinds]
        raised = self.raised_groups()
        if raised:
            lines += ["", "steps rolled back because the pass raised (not crashes; pass bugs):"]
        for key, members in raised:
            lines.append(f"  {len(members):>5} x {key}")
            for o in members[:show_crashes]:
                lines.append(f"          case {o.index}: {o.case}")
        groups = self.crash_signatures()
        if groups:
            lines += ["", f"crashes: {len(self.crashes)} in {len(groups)} groups"]
        for signature, members in groups:
            bug = known_bug(members[0])
            tag = f"  [known {bug}: {KNOWN_BUGS[bug][1]}]" if bug else "  [NEW]"
            lines.append(f"  {len(members):>5} x {signature}{tag}")
            for o in sorted(members, key=lambda o: o.seconds)[:show_crashes]:
                lines.append(f"          case {o.index}: {o.case}")
                lines.append(f"            -> {o.detail or o.kind}")
                lines.append(
                    f"{'':12}reproduce: python tools/fuzz.py --seed {self.seed} --case {o.index}"
                )
        return "\n".join(lines)


def run_fuzz(
    cases: int = 300,
    seed: int = 0,
    *,
    workers: int = 2,
    timeout: float = 60.0,
    time_limit: float | None = None,
    memory_gb: float = 4.0,
    keep: Path | None = None,
    progress: bool = False,
    preload: Sequence[str] = (),
) -> Summary:
    """Run cases ``0..cases-1`` of ``seed`` on ``workers`` processes."""
    started = time.time()
    deadline = started + time_limit if time_limit else None
    pool = Pool(workers, seed, timeout, memory_gb, keep, preload)
    outcomes: list[Outcome] = []
    try:
        for outcome in pool.run(range(cases), deadline):
            outcomes.append(outcome)
            if progress and len(outcomes) % 50 == 0:
                crashes = sum(o.outcome == CRASH for o in outcomes)
                print(
                    f"  {len(outcomes)}/{cases} cases, {crashes} crashes, "
                    f"{time.time() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        pool.close()
    outcomes.sort(key=lambda o: o.index)
    return Summary(seed, cases, time.time() - started, outcomes)


def replay(
    seed: int, index: int, keep: Path | None, preload: Sequence[str] = (), memory_gb: float = 4.0
) -> int:
    """Run one case in this process (same memory limit as a worker) and print
    everything about it."""
    _prepare_process(memory_gb, preload)
    passes = load_passes()
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-replay-{index}-"))
    case = build_case(seed, index, folder, passes)
    shutil.rmtree(folder)
    outcome = run_case(seed, index, passes, 600.0, keep)
    print(_outcome_text(outcome, case, seed))
    if _LOGS.records:
        print("logs:\n  " + "\n  ".join(_LOGS.records[:20]))
    if outcome.raised:
        _print_pass_tracebacks(seed, index, passes)
    return 1 if outcome.outcome == CRASH else 0


def _print_pass_tracebacks(seed: int, index: int, passes: list[str]) -> None:
    """Re-run a case whose steps were rolled back because a pass raised, with the
    manager's debug logging on (it then keeps each traceback in the step's reason)."""
    import onnxopt

    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-replay-{index}-"))
    try:
        case = build_case(seed, index, folder, passes)
        logging.getLogger("onnxopt").setLevel(logging.DEBUG)
        try:
            steps = onnxopt.optimize(
                str(folder / "m" / "mutant.onnx"),
                case.pipeline,
                calibration_samples=8,
                validation_samples=4,
            ).outcome.steps
        except onnxopt.CheckFailed as exc:
            steps = exc.outcome.steps if exc.outcome else []
        for record in steps:
            if record.reason.startswith("pass raised"):
                print(f"\nstep {record.index} {record.step}: {record.reason}")
    finally:
        logging.getLogger("onnxopt").setLevel(logging.WARNING)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- determinism

DETERMINISM_SEED = 7


def determinism_pipelines() -> list[str]:
    """Every fuzzed pass with its default options, plus its first cheap variant."""
    from onnxopt.errors import UsageError
    from onnxopt.pipeline import Pipeline

    pipelines = []
    for name in load_passes():
        for text in dict.fromkeys([name, *pipelines_for(name)[:1]]):
            with contextlib.suppress(UsageError):  # some passes need an option set
                pipelines.append(str(Pipeline.parse(text)) and text)
    return pipelines


def write_determinism_outputs(folder: Path) -> list[str]:
    """Optimize every sample model with every pipeline of ``determinism_pipelines``
    (seed ``DETERMINISM_SEED``, lossy budgets off so lossy results are kept) and save
    the results into ``folder``; return the file names. Two runs, in two processes
    with different hash seeds, must write byte-identical files."""
    import onnxopt

    load_passes()
    names = []
    for model in sorted(MODELS.glob("*.onnx")):
        for index, pipeline in enumerate(determinism_pipelines()):
            result = onnxopt.optimize(
                model,
                pipeline,
                data=MODELS / "digits_train.npz",
                budget="none",
                seed=DETERMINISM_SEED,
            )
            name = f"{model.stem}__{index:02d}.onnx"
            result.save(folder / name)
            statuses = ",".join(step["status"] for step in result.steps)
            (folder / f"{name}.txt").write_text(f"{pipeline}: {statuses}\n")
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds",
    )
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=60.0,
        help="a case running longer is a hang (default 60 s)",
    )
    parser.add_argument(
        "--memory-gb", type=float, default=4.0, help="address-space limit per worker (0: none)"
    )
    parser.add_argument(
        "--case",
        type=int,
        action="append",
        help="replay this case in-process with its traceback (repeatable)",
    )
    parser.add_argument("--keep", type=Path, help="copy crashing cases' files here")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--show", type=int, default=3, help="reproducers shown per crash group")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE in every worker first (e.g. to try a fix before it lands)",
    )
    parser.add_argument(
        "--determinism-out",
        type=Path,
        metavar="DIR",
        help="write every pass's output on every sample model to DIR (determinism check)",
    )
    args = parser.parse_args(argv)
    if args.determinism_out:
        args.determinism_out.mkdir(parents=True, exist_ok=True)
        logging.getLogger("onnxopt").setLevel(logging.ERROR)
        print("\n".join(write_determinism_outputs(args.determinism_out)))
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.case:
        return max(
            replay(args.seed, index, args.keep, args.preload, args.memory_gb) for index in args.case
        )
    summary = run_fuzz(
        args.cases,
        args.seed,
        workers=args.workers,
        timeout=args.case_timeout,
        time_limit=args.time_limit,
        memory_gb=args.memory_gb,
        keep=args.keep,
        progress=True,
        preload=args.preload,
    )
    print(summary.format(args.show))
    if args.json:
        args.json.write_text(
            json.dumps([dataclasses.asdict(o) for o in summary.outcomes], indent=1)
        )
    return 1 if summary.new_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
