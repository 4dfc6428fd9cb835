"""A model's bytes: ``serialize`` (stored tensors inlined), ``write_serialized`` (the
same bytes streamed to a file, stored weights read block by block, never all in
memory), ``proto_nbytes`` (its size, exact or estimated without serializing) and
``compressed_size`` (deflated)."""

from __future__ import annotations

import zlib
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxopt.errors import ModelError, first_line
from onnxopt.protos import (
    GRAPH_FIELD,
    INITIALIZER_FIELD,
    PROTOBUF_LIMIT,
    RAW_DATA_FIELD,
    field_len,
    length_prefix,
    only_fields,
    tensor_nbytes,
)
from onnxopt.stored import (
    external_range,
    has_stored,
    inline_stored,
    iter_stored_chunks,
    stored_model_nbytes,
    stored_path,
)


def write_serialized(model: onnx.ModelProto, path: Path) -> None:
    """Write ``serialize(model)`` to ``path``; a model with stored tensors is streamed
    (the weights are never all in memory: a single-file save of a disk-backed run's
    result would otherwise hold them twice, as a proto and as its bytes).

    Protobuf writes known fields in field-number order, so the message is assembled
    from serialized pieces around the initializers (``tests/test_store.py`` checks
    the bytes against ``serialize``).
    """
    if not has_stored(model):
        path.write_bytes(serialize(model))
        return
    if proto_nbytes(model) > PROTOBUF_LIMIT:
        raise ModelError("model is too large to serialize in one file; save it with external data")
    graph = model.graph
    entries: list[tuple[bytes, TensorProto | None, bytes]] = []
    for tensor in graph.initializer:
        if stored_path(tensor) is None:
            body = tensor.SerializeToString()
            entries.append((length_prefix(INITIALIZER_FIELD, len(body)) + body, None, b""))
            continue
        length = external_range(tensor)[1]
        head = only_fields(tensor, lambda number: number in (1, 2, 8))  # dims, type, name
        tail = only_fields(tensor, lambda number: number == 12)  # doc_string
        body_length = len(head) + field_len(length) + len(tail)
        prefix = length_prefix(INITIALIZER_FIELD, body_length) + head
        entries.append((prefix + length_prefix(RAW_DATA_FIELD, length), tensor, tail))
    graph_head = only_fields(graph, lambda number: number < INITIALIZER_FIELD)
    graph_tail = only_fields(graph, lambda number: number > INITIALIZER_FIELD)
    graph_length = len(graph_head) + len(graph_tail)
    for prefix, tensor, tail in entries:
        graph_length += len(prefix) + len(tail)
        if tensor is not None:
            graph_length += external_range(tensor)[1]
    with open(path, "wb") as out:
        out.write(only_fields(model, lambda number: number < GRAPH_FIELD))
        out.write(length_prefix(GRAPH_FIELD, graph_length))
        out.write(graph_head)
        for prefix, tensor, tail in entries:
            out.write(prefix)
            if tensor is not None:
                for block in iter_stored_chunks(tensor):
                    out.write(block)
            out.write(tail)
        out.write(graph_tail)
        out.write(only_fields(model, lambda number: number > GRAPH_FIELD))


def serialize(model: onnx.ModelProto) -> bytes:
    model = inline_stored(model)
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise ModelError(
            f"model is too large to serialize in one file ({first_line(exc)}); "
            "save it with external data"
        ) from exc


EXACT_SIZE_LIMIT = 256 * 2**20


def proto_nbytes(model: onnx.ModelProto) -> int:
    """Size of the model's protobuf.

    Exact below ~256 MB of tensor data. Above, protobuf's ``ByteSize`` serializes the
    whole message (a transient copy of the model), so the size is the tensors' bytes
    from their dims plus the exact size of everything else.
    """
    if has_stored(model):
        return stored_model_nbytes(model)
    tensor_bytes = sum(tensor_nbytes(t) for t in model.graph.initializer)
    if tensor_bytes <= EXACT_SIZE_LIMIT:
        try:
            return model.ByteSize()
        except Exception:
            pass
    rest = sum(n.ByteSize() for n in model.graph.node)
    return tensor_bytes + rest + 64 * len(model.graph.initializer)


def compressed_size(model: onnx.ModelProto, level: int = 6) -> int:
    """Deflate-compressed size of the serialized model (what zeros and codebooks shrink)."""
    compressor = zlib.compressobj(level)
    data = serialize(model)
    total = 0
    view = memoryview(data)
    for start in range(0, len(data), 1 << 24):
        total += len(compressor.compress(view[start : start + (1 << 24)]))
    return total + len(compressor.flush())
