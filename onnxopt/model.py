"""Loading and saving ONNX models safely.

- ``load_model`` accepts a path or a ``ModelProto``. External data is validated
  *before* any of it is read: a ``location`` that is absolute, contains ``..``, or
  resolves (through symlinks) outside the model's folder is refused, and so is an
  offset/length that runs past the end of its file or a tensor whose declared shape
  needs more bytes than the file holds.
- ``save_model`` writes atomically (temporary name in the destination folder, then
  ``os.replace``), never over the model it was loaded from, and switches to external
  data automatically when the protobuf would pass the 2 GB limit.

Beside it: ``protos.py`` (tensor sizes, field-level copies, external-data stubs),
``stored.py`` (tensors whose bytes live in a run's weight store) and ``wire.py`` (a
model's bytes: serialized, streamed to a file, sized, deflated).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxopt.errors import ModelError, first_line
from onnxopt.protos import (
    EXTERNAL_DATA_THRESHOLD,
    SUB_BYTE_BITS,
    external_stub,
    is_external,
    tensor_nbytes,
    without_initializers,
)
from onnxopt.stored import external_range, iter_stored_chunks, stored_folder, stored_path
from onnxopt.wire import proto_nbytes, serialize, write_serialized


@dataclass
class LoadedModel:
    """A model plus where it came from (``path`` is None for in-memory models)."""

    proto: onnx.ModelProto
    path: Path | None = None
    external_files: list[Path] = field(default_factory=list)
    lazy: bool = False  # main-graph external initializers left on disk (see load_model)

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None


# ---------------------------------------------------------------------------- load


def load_model(
    source: str | os.PathLike | onnx.ModelProto | LoadedModel, *, lazy_over: int | None = None
) -> LoadedModel:
    """Load ``source`` with its external data, refusing unsafe or inconsistent files.

    ``lazy_over``: when the main graph's external initializers hold at least this many
    bytes, leave them on disk (their stubs stay in ``proto``, relative to
    ``base_dir``; ``lazy`` is set). ``PassManager.run(base_dir=)`` streams them into
    its weight store instead of holding a second copy in memory.
    """
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, onnx.ModelProto):
        _check_model_header(source, "<in-memory model>")
        validate_tensors(source, "<in-memory model>")
        if any(is_external(t) and stored_path(t) is None for t in iter_tensors(source)):
            raise ModelError(
                "in-memory model refers to external data but has no folder to read it from; "
                "pass the model's path instead"
            )
        return LoadedModel(proto=source)
    path = Path(source)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, expected an .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    _check_model_header(proto, str(path))
    validate_tensors(proto, str(path))
    external = validate_external_data(proto, path.parent, where=str(path))
    lazy = False
    if external:
        lazy = lazy_over is not None and (
            sum(tensor_nbytes(t) for t in proto.graph.initializer if is_external(t)) >= lazy_over
        )
        try:
            for tensor in _non_initializer_tensors(proto) if lazy else iter_tensors(proto):
                if is_external(tensor):
                    onnx.external_data_helper.load_external_data_for_tensor(
                        tensor, str(path.parent)
                    )
                    tensor.ClearField("data_location")
                    del tensor.external_data[:]
        except Exception as exc:
            raise ModelError(f"{path}: cannot read external data ({first_line(exc)})") from exc
    return LoadedModel(proto=proto, path=path.resolve(), external_files=external, lazy=lazy)


def _check_model_header(proto: onnx.ModelProto, where: str) -> None:
    # Random bytes often parse as a protobuf message; a real model has these.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelError(f"{where}: not an ONNX model (no IR version or no graph)")
    if not proto.opset_import and proto.ir_version >= 3:
        raise ModelError(f"{where}: ONNX model declares no opset_import")
    if not proto.graph.output:
        raise ModelError(f"{where}: ONNX graph has no outputs")


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers, sparse values, attributes, subgraphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _non_initializer_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """``iter_tensors`` without the main graph's initializers."""
    for sparse in model.graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in model.graph.node:
        yield from _node_tensors(node)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


# TensorProto field holding each data type's values, and values per element.
_TYPED_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1),
    TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1),
    TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1),
}
_VALID_DATA_TYPES = {v for k, v in TensorProto.DataType.items() if k != "UNDEFINED"}


def validate_tensors(model: onnx.ModelProto, where: str) -> None:
    """Refuse tensors whose data cannot be what their dims and data type declare.

    Checked before any pass or onnxruntime touches the model, so a lying tensor is a
    clear :class:`ModelError`, not a crash deep inside numpy or graphsurgeon.
    """
    try:
        for tensor in iter_tensors(model):
            _validate_tensor(tensor, where)
        for sparse in _sparse_tensors(model):
            _validate_sparse(sparse, where)
    except UnicodeDecodeError as exc:
        raise ModelError(f"{where}: contains names or strings that are not valid UTF-8") from exc


def _validate_tensor(tensor: TensorProto, where: str) -> None:
    name = tensor.name or "<unnamed>"
    if tensor.data_type not in _VALID_DATA_TYPES:
        raise ModelError(
            f"{where}: tensor {name!r} has an undefined data type ({tensor.data_type})"
        )
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}: tensor {name!r} has negative dims {list(tensor.dims)}")
    if is_external(tensor):
        return  # checked against its file by validate_external_data
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    if tensor.HasField("raw_data"):
        if tensor.data_type == TensorProto.STRING:
            raise ModelError(f"{where}: string tensor {name!r} stores raw_data, which ONNX forbids")
        have, need = len(tensor.raw_data), tensor_nbytes(tensor)
        if have != need:
            raise ModelError(
                f"{where}: tensor {name!r} holds {have} bytes of data, but dims "
                f"{list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)} need {need}"
            )
        return
    field_name, per_element = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
    have = len(getattr(tensor, field_name))
    if tensor.data_type in SUB_BYTE_BITS:  # packed several values per int32
        per_element, count = 1, (count * SUB_BYTE_BITS[tensor.data_type] + 7) // 8
        have = min(have * 4, count)
    if have != count * per_element:
        raise ModelError(
            f"{where}: tensor {name!r} holds {have} values, but dims {list(tensor.dims)} need "
            f"{count * per_element}"
        )


def _sparse_tensors(model: onnx.ModelProto) -> Iterator[onnx.SparseTensorProto]:
    yield from model.graph.sparse_initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor


def _validate_sparse(sparse: onnx.SparseTensorProto, where: str) -> None:
    name = sparse.values.name or "<unnamed sparse>"
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims) or len(sparse.values.dims) != 1:
        raise ModelError(f"{where}: sparse tensor {name!r} has invalid dims")
    nnz = int(sparse.values.dims[0])
    indices = numpy_helper.to_array(sparse.indices)
    total = 1
    for d in dims:
        total *= d
    if indices.shape == (nnz,):
        bad = indices.size and (indices.min() < 0 or indices.max() >= total)
    elif indices.shape == (nnz, len(dims)):
        bad = indices.size and bool(np.any((indices < 0) | (indices >= np.array(dims))))
    else:
        raise ModelError(
            f"{where}: sparse tensor {name!r}: indices shape {indices.shape} fits neither "
            f"[{nnz}] nor [{nnz}, {len(dims)}]"
        )
    if bad:
        raise ModelError(f"{where}: sparse tensor {name!r} has indices outside dims {dims}")


def validate_external_data(model: onnx.ModelProto, base_dir: Path, where: str) -> list[Path]:
    """Refuse unsafe or inconsistent external data; return the files it refers to."""
    base = base_dir.resolve()
    files: dict[Path, int] = {}
    for tensor in iter_tensors(model):
        if not is_external(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        file = _safe_external_path(location, base, f"{where}: tensor {name!r}")
        size = files.setdefault(file, file.stat().st_size)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as exc:
            raise ModelError(
                f"{where}: tensor {name!r} has a non-integer external offset/length"
            ) from exc
        if offset < 0 or (length is not None and length < 0):
            raise ModelError(f"{where}: tensor {name!r} has a negative external offset/length")
        needed = tensor_nbytes(tensor)
        span = length if length is not None else needed
        if offset + max(span, needed) > size:
            raise ModelError(
                f"{where}: tensor {name!r} needs bytes {offset}..{offset + max(span, needed)} of "
                f"{location!r}, but that file has only {size} bytes"
            )
    return sorted(files)


def _safe_external_path(location: str, base: Path, where: str) -> Path:
    if not location:
        raise ModelError(f"{where}: external data without a 'location'")
    loc = Path(location)
    if loc.is_absolute() or location.startswith(("/", "\\")) or ":" in loc.parts[0]:
        raise ModelError(
            f"{where}: external data location {location!r} is an absolute path; "
            "only paths relative to the model's folder are allowed"
        )
    if ".." in Path(location.replace("\\", "/")).parts:
        raise ModelError(
            f"{where}: external data location {location!r} contains '..'; "
            "it must stay inside the model's folder"
        )
    resolved = (base / loc).resolve()
    if resolved != base and base not in resolved.parents:
        raise ModelError(
            f"{where}: external data location {location!r} resolves to {resolved}, "
            f"outside the model's folder {base} (symlink?)"
        )
    if not resolved.is_file():
        raise ModelError(f"{where}: external data file {location!r} not found in {base}")
    return resolved


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Decode a COO SparseTensorProto (linear ``[NNZ]`` or ``[NNZ, rank]`` indices),
    keeping the stored dtype."""
    values = numpy_helper.to_array(sparse.values).ravel()
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices[:, 0]
    dense[indices.ravel()] = values
    return dense.reshape(dims)


def densify_sparse_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its main graph's ``sparse_initializer`` entries as dense initializers.

    onnx's shape inference (1.23) types a sparse initializer as ``sparse_tensor(T)``,
    which no dense op accepts, while onnxruntime densifies sparse initializers when it
    loads a model; so shapes are inferred on the dense equivalent. Returns ``model``
    itself when it has none.
    """
    if not model.graph.sparse_initializer:
        return model
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    for sparse in dense.graph.sparse_initializer:
        dense.graph.initializer.append(
            numpy_helper.from_array(sparse_to_dense(sparse), sparse.values.name)
        )
    del dense.graph.sparse_initializer[:]
    return dense


# ---------------------------------------------------------------------------- save


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: list[Path] | tuple[Path, ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically and return the resolved path.

    ``external_data=None`` switches to external data automatically above ~2 GB.
    ``protect`` lists files (typically the input model and its data) never to overwrite.
    """
    target = Path(path).resolve()
    guarded = {Path(p).resolve() for p in protect}
    if target in guarded:
        raise ModelError(
            f"refusing to overwrite the input file {target}; choose another output path"
        )
    if target.is_dir():
        raise ModelError(f"output path {target} is a directory")
    if not target.parent.is_dir():
        raise ModelError(f"output folder {target.parent} does not exist")
    if external_data is None:
        external_data = proto_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    _remove_orphaned_temp_folders(target.parent)
    prefix = f"{TEMP_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=target.parent) as tmp:
        tmp_model = Path(tmp) / target.name
        data_name = write_external(model, tmp_model) if external_data else None
        if data_name:
            os.replace(Path(tmp) / data_name, target.with_name(data_name))
        else:
            write_serialized(model, tmp_model)
        os.replace(tmp_model, target)  # the commit point: the new model appears whole
    _remove_stale_data_files(target, keep=data_name, guarded=guarded)
    return target


def _remove_stale_data_files(target: Path, keep: str | None, guarded: set[Path]) -> None:
    """Data files of earlier saves to the same path (``NAME.<hash>.data``)."""
    for old in target.parent.glob(f"{glob.escape(target.name)}.*.data"):
        stem = old.name[len(target.name) + 1 : -len(".data")]
        if old.name != keep and len(stem) == 12 and old.resolve() not in guarded:
            old.unlink(missing_ok=True)


TEMP_PREFIX = ".onnxopt-"


def _remove_orphaned_temp_folders(folder: Path) -> None:
    """A save killed mid-way (SIGKILL, power loss) leaves its hidden temporary folder
    (never a partial output: the output appears by rename). Remove those whose
    process is gone; folders of live processes (concurrent saves) are left alone."""
    for entry in folder.glob(f"{TEMP_PREFIX}*"):
        pid = entry.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not entry.is_dir() or not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file


def initializers_as_inputs(model: onnx.ModelProto, pick) -> tuple[onnx.ModelProto, list, set]:
    """For onnx tools that would read (or serialize) every initializer: ``(view, moved,
    added)``, a light copy of ``model`` whose initializers ``pick`` accepts are typed
    graph inputs instead (same name, dtype and dims, no data), the moved initializers,
    and the names of the inputs that were added. ``(model, [], set())`` if none is."""
    moved = [t for t in model.graph.initializer if pick(t)]
    if not moved:
        return model, [], set()
    moved_names = {t.name for t in moved}
    view = without_initializers(model)
    view.graph.initializer.extend(t for t in model.graph.initializer if t.name not in moved_names)
    declared = {v.name for v in view.graph.input}
    view.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in moved
        if t.name not in declared
    )
    return view, moved, moved_names - declared


def write_external(model: onnx.ModelProto, path: Path) -> str:
    """Write ``model`` to ``path`` with its main-graph initializers in a data file next
    to it; return the data file's name, ``<model name>.<content hash>.data``.

    The name depends on the content, so a run that replaces an earlier output never
    pairs the new .onnx with the old data (or the reverse) if it is killed between the
    two renames, and the same model always gets the same bytes. The model is never
    modified or copied whole: tensor bytes are streamed one at a time and the .onnx is
    serialized from a light proto (``onnx.save_model(save_as_external_data=True)``
    converts in place, so it would need a full copy first).
    """
    light = without_initializers(model)
    graph, source = light.graph, model.graph
    digest = hashlib.sha256()
    partial = path.with_name(path.name + ".data.partial")
    locations = []
    with open(partial, "wb") as data:
        for tensor in source.initializer:
            stored = stored_path(tensor)
            if stored is None and (
                not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_MIN_BYTES
            ):
                graph.initializer.append(tensor)
                continue
            offset = data.tell()
            if stored is None:
                length = len(tensor.raw_data)
                chunks: Iterator[bytes] = iter((tensor.raw_data,))
            else:
                length = external_range(tensor)[1]
                chunks = iter_stored_chunks(tensor)
            for chunk in chunks:
                data.write(chunk)
                digest.update(chunk)
            padding = b"\0" * (-length % 4096)  # page-aligned offsets (mmap-friendly)
            data.write(padding)
            digest.update(padding)
            locations.append(external_stub(graph.initializer.add(), tensor, "", offset, length))
    data_name = f"{path.name}.{digest.hexdigest()[:12]}.data"
    os.replace(partial, path.with_name(data_name))
    for entry in locations:
        entry.value = data_name
    path.write_bytes(light.SerializeToString())
    return data_name


@contextlib.contextmanager
def materialized(model: onnx.ModelProto) -> Iterator[str | bytes]:
    """Yield something ``onnxruntime.InferenceSession`` accepts: bytes, or a temp path
    with external data for models over the protobuf limit. A model with stored weights
    is written (without them) next to its data files: onnxruntime maps those."""
    folder = stored_folder(model)
    if folder is not None:
        descriptor, name = tempfile.mkstemp(prefix="model-", suffix=".onnx", dir=folder)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(model.SerializeToString())
            yield name
        finally:
            os.unlink(name)
        return
    if proto_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        yield serialize(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        yield str(path)


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return None
