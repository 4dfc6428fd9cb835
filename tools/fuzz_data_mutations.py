"""Picking helpers and tensor-data mutations for tools/fuzz.py: initializer dtypes,
dims, raw and typed data, special values, strings, sparse initializers, external data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = [v for k, v in TensorProto.DataType.items() if k != "UNDEFINED"]


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
