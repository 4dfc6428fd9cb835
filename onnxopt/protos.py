"""Protobuf-level facts and helpers shared by model IO, stored weights and the wire
writer: tensor byte sizes from dims, field numbers, copying set fields only (proto2
serializes a field that was set, even to its default), tags and varints, external-data
stubs."""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import TensorProto

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom under the hard protobuf limit for graph structure and metadata.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

SUB_BYTE_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
}
for _name in ("FLOAT4E2M1", "INT2", "UINT2"):
    if hasattr(TensorProto, _name):
        SUB_BYTE_BITS[getattr(TensorProto, _name)] = 4 if _name.startswith("FLOAT4") else 2


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def main_graph_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """The main graph's initializers, then the tensor attributes of its nodes (Constant
    values); not subgraphs, sparse tensors or tensor lists."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes the tensor's declared dims and dtype need in raw (external) form."""
    count = 1
    for dim in tensor.dims:
        count *= max(int(dim), 0)
    if tensor.data_type in SUB_BYTE_BITS:
        return (count * SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type == TensorProto.STRING:
        return 0  # variable length: cannot be checked from dims
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return 0
    return count * itemsize


GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number  # 7
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number  # 5
RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number  # 9


def copy_fields(source, target, keep) -> None:
    """Copy the set fields of ``source`` whose number ``keep`` accepts into ``target``."""
    for descriptor, value in source.ListFields():
        if not keep(descriptor.number):
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            try:
                setattr(target, descriptor.name, value)
            except UnicodeDecodeError:  # proto2 text that is not UTF-8 comes back as bytes
                setattr(target, descriptor.name, value.decode("utf-8", errors="replace"))


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main-graph initializers, built field by field so
    the weights are never copied (``CopyFrom`` would copy them all). Only fields that
    are set are copied: proto2 serializes a field set to its default."""
    light = onnx.ModelProto()
    copy_fields(model, light, lambda number: number != GRAPH_FIELD)
    copy_fields(model.graph, light.graph, lambda number: number != INITIALIZER_FIELD)
    return light


def copy_header(target: TensorProto, tensor: TensorProto) -> None:
    """Name, type, dims and doc string, setting only the fields ``tensor`` has (proto2
    serializes a field that was set, even to its default)."""
    target.name, target.data_type = tensor.name, tensor.data_type
    target.dims.extend(tensor.dims)
    if tensor.HasField("doc_string"):
        target.doc_string = tensor.doc_string


def external_stub(
    stub: TensorProto, tensor: TensorProto, location: str, offset: int, length: int
) -> onnx.StringStringEntryProto:
    """Fill ``stub`` as ``tensor`` stored at ``location[offset:offset+length]``; return
    its ``location`` entry (the caller may rename the file afterwards)."""
    copy_header(stub, tensor)
    stub.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = stub.external_data.add()
        entry.key, entry.value = key, str(value)
    return stub.external_data[0]


def field_len(payload: int) -> int:
    """Serialized size of a length-delimited field (tag, length, payload)."""
    return len(length_prefix(1, payload)) + payload


def only_fields(message, keep) -> bytes:
    """``message`` serialized with only the set fields whose number ``keep`` accepts."""
    part = type(message)()
    copy_fields(message, part, keep)
    return part.SerializeToString()


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_prefix(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (field numbers below 16)."""
    return bytes([number << 3 | 2]) + varint(length)
