"""Mutations for tools/fuzz.py: protobuf-level edits of a model (initializer dtypes,
dims and data, duplicate names, cycles, unknown ops, opsets, subgraph bodies, external
data...) and byte-level damage of its file; ``mutate`` draws 1-3 of them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from fuzz_data_mutations import (
    DTYPES,
    _all_initializers,
    _choice,
    _fresh,
    _pick_graph,
    _subgraphs,
    _where,
    m_external_data,
    m_init_dims,
    m_init_dtype,
    m_raw_data_length,
    m_sparse,
    m_special_weights,
    m_string_initializer,
    m_typed_data_count,
)
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------------------- mutations
#
# A mutation edits a ModelProto in place (or, for the byte-level ones, the serialized
# bytes) and returns a short description, or None when it does not apply to this
# model (the case then draws another one). ``folder`` is where the mutant is written:
# external-data mutations put their files there.


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
