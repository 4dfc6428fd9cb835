"""Stored weights: tensors whose bytes live in a run's data files (onnxopt.store).

A large model's weights live in data files of a run-scoped folder instead of in
memory: its initializers are standard external-data stubs whose ``location`` is a
file name that is unique in the process and registered here with its folder.
Everything that reads tensor bytes (sessions, saving, sizes, graph import) resolves
stubs through this registry (``stored_path``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxopt.errors import ModelError
from onnxopt.protos import (
    SUB_BYTE_BITS,
    copy_header,
    field_len,
    tensor_nbytes,
    without_initializers,
)

_STORED_FILES: dict[str, Path] = {}  # data file name -> folder holding it


def register_stored_file(name: str, folder: Path) -> None:
    _STORED_FILES[name] = folder


def forget_stored_file(name: str) -> None:
    _STORED_FILES.pop(name, None)


def stored_path(tensor: TensorProto) -> Path | None:
    """The data file of a stored tensor's stub, or None for any other tensor."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            folder = _STORED_FILES.get(entry.value)
            return folder / entry.value if folder is not None else None
    return None


def external_range(tensor: TensorProto) -> tuple[int, int]:
    """(offset, length) of an external tensor; length defaults to the dims' size."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info.get("offset") or 0)
    length = int(info["length"]) if info.get("length") else tensor_nbytes(tensor)
    return offset, length


def iter_stored_chunks(tensor: TensorProto) -> Iterator[bytes]:
    path = stored_path(tensor)
    if path is None:
        raise ValueError(f"tensor {tensor.name!r} is not a stored tensor")
    yield from iter_file_range(path, *external_range(tensor), what=f"tensor {tensor.name!r}")


def iter_file_range(
    path: Path, offset: int, length: int, *, what: str, chunk: int = 1 << 24
) -> Iterator[bytes]:
    """``length`` bytes of ``path`` from ``offset``, in blocks of at most ``chunk``."""
    with open(path, "rb") as file:
        file.seek(offset)
        while length > 0:
            block = file.read(min(chunk, length))
            if not block:
                raise ModelError(f"data of {what} is truncated ({path})")
            length -= len(block)
            yield block


def read_stored_array(tensor: TensorProto) -> np.ndarray:
    """A stored tensor's values as a new, writable array (one copy, straight from disk)."""
    path = stored_path(tensor)
    if path is None:
        raise ValueError(f"tensor {tensor.name!r} is not a stored tensor")
    return read_external_array(tensor, path)


def read_external_array(tensor: TensorProto, path: Path) -> np.ndarray:
    """The values of an external-data tensor whose data file is ``path`` (already
    validated: ``validate_external_data``), read in one copy."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    dims = tuple(int(d) for d in tensor.dims)
    offset, length = external_range(tensor)
    if dtype.kind in "biuf" and tensor.data_type not in SUB_BYTE_BITS:
        with open(path, "rb") as file:
            file.seek(offset)
            array = np.fromfile(file, dtype=dtype, count=length // dtype.itemsize)
        return array.reshape(dims)
    full = TensorProto()  # packed sub-byte and ml_dtypes types: onnx decodes them
    copy_header(full, tensor)
    full.raw_data = b"".join(iter_file_range(path, offset, length, what=f"tensor {tensor.name!r}"))
    return np.array(numpy_helper.to_array(full))


def external_file(tensor: TensorProto, base_dir: Path) -> Path:
    """The data file of an external tensor of a model loaded from ``base_dir``."""
    location = next(e.value for e in tensor.external_data if e.key == "location")
    return base_dir / location


def _inlined(tensor: TensorProto) -> TensorProto:
    full = TensorProto()
    copy_header(full, tensor)
    full.raw_data = b"".join(iter_stored_chunks(tensor))
    return full


def stored_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's stored (on-disk) initializers."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer if stored_path(t) is not None)


def has_stored(model: onnx.ModelProto) -> bool:
    return any(stored_path(t) is not None for t in model.graph.initializer)


def stored_folder(model: onnx.ModelProto) -> Path | None:
    """The one folder the model's stored tensors live in (None if it has none)."""
    folders = {p.parent for t in model.graph.initializer if (p := stored_path(t)) is not None}
    if len(folders) > 1:
        raise ValueError(f"model's stored weights span several folders: {sorted(folders)}")
    return folders.pop() if folders else None


def inline_stored(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself if it has no stored tensors, else a copy with their bytes read
    back into ``raw_data`` (an ordinary in-memory model)."""
    if not has_stored(model):
        return model
    full = without_initializers(model)
    for tensor in model.graph.initializer:
        full.graph.initializer.append(_inlined(tensor) if stored_path(tensor) else tensor)
    return full


def stored_model_nbytes(model: onnx.ModelProto) -> int:
    """Exact size the model would serialize to with its stored tensors inlined."""
    graph_size = model.graph.ByteSize()
    full_graph = graph_size
    for tensor in model.graph.initializer:
        if stored_path(tensor) is None:
            continue
        bare = TensorProto()
        copy_header(bare, tensor)
        inlined = bare.ByteSize() + field_len(external_range(tensor)[1])
        full_graph += field_len(inlined) - field_len(tensor.ByteSize())
    return model.ByteSize() - field_len(graph_size) + field_len(full_graph)
