"""Disk-backed weights for large models: one copy of the weights in memory, not four.

A run over a large model (``PassManager`` spills when the model's tensors pass
``spill_threshold()``, 32 MiB by default, ``ONNXOPT_SPILL_BYTES`` to change it) keeps
its weights in the data files of a :class:`WeightStore`, a temporary folder owned by
the run. Models are then *light* protos: every large main-graph initializer is a
standard external-data stub whose ``location`` names a store file
(``onnxopt.stored.stored_path`` resolves it). What that buys, measured in
docs/large-models.md:

- the accepted model, the original and the templates the passes see cost a few KB;
- ``to_graph`` imports stubs as lazily loaded constants (:class:`StoredValues`): a
  pass reads a weight from disk only when it touches it, one at a time;
- ``to_model`` first writes the new arrays a pass produced to a store file and drops
  them (:meth:`WeightStore.spill_graph`), so an exported candidate is light too;
- onnxruntime sessions load the light model from the store folder and map the data
  files instead of copying them (``runtime.make_session`` disables weight pre-packing
  for such sessions, which would copy every MatMul weight);
- the onnx checker runs on the light model by path, so models over 2 GB get the same
  structural checks as small ones;
- saving streams the stored bytes into the output (its data file, or the one .onnx file).

Files no model refers to any more are deleted after each step (:meth:`collect`); the
folder goes when the store is closed or garbage-collected, and folders left by killed
processes are removed by the next store created in the same place.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, external_data_helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.model import EXTERNAL_MIN_BYTES, process_alive
from onnxopt.protos import external_stub, tensor_nbytes, without_initializers
from onnxopt.stored import (
    external_file,
    external_range,
    forget_stored_file,
    iter_file_range,
    iter_stored_chunks,
    read_stored_array,
    register_stored_file,
    stored_path,
)

# 32 MiB: below that, in-memory runs are as fast; above it, every step's session
# build and export copied the weights (MiniLM, 67 MB: 50 -> 24 s, 710 -> 255 MB peak)
DEFAULT_SPILL_BYTES = 32 * 2**20
FOLDER_PREFIX = "onnxopt-run-"
ALIGN = 4096  # page-aligned offsets: onnxruntime maps such data instead of reading it


def spill_threshold() -> int:
    """Tensor bytes from which a run keeps its weights on disk (``ONNXOPT_SPILL_BYTES``)."""
    raw = os.environ.get("ONNXOPT_SPILL_BYTES", "")
    try:
        return int(raw) if raw else DEFAULT_SPILL_BYTES
    except ValueError:
        raise UsageError(
            f"ONNXOPT_SPILL_BYTES must be an integer byte count, not {raw!r}"
        ) from None


@contextlib.contextmanager
def in_memory() -> Iterator[None]:
    """Models exported inside keep their weights in the proto (for code that hands
    models to onnx tools needing every byte, e.g. training conversion). There is no
    hidden store to suspend any more — ``to_model`` spills only into a store it is
    given (``PassContext.store``) — so this only marks such code."""
    yield


class StoredValues(LazyValues):
    """Lazily loaded values of a stored tensor (graphsurgeon's own LazyValues cannot
    read external data: it has no folder). Exported as the stub it came from."""

    def load(self) -> np.ndarray:
        return read_stored_array(self.tensor)


def wrap_stored(graph: gs.Graph) -> int:
    """Make the graph's stored constants loadable; return how many there are."""
    count = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if type(values) is LazyValues and stored_path(values.tensor) is not None:
            tensor._values = StoredValues(values.tensor)
            count += 1
    return count


class WeightStore:
    """A temporary folder of weight data files, shared by the models of one run."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        remove_orphaned_stores(where)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=where))
        self._names: set[str] = set()
        self._counter = itertools.count()
        self._finalizer = weakref.finalize(self, _remove, self.folder, self._names)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Delete the folder; models that still refer to it can no longer be read."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def files(self) -> set[str]:
        return set(self._names)

    def _new_file(self) -> tuple[str, Path]:
        name = f"{self.folder.name}-{next(self._counter)}.data"
        register_stored_file(name, self.folder)
        self._names.add(name)
        return name, self.folder / name

    # ------------------------------------------------------------------ writing

    def adopt(self, model: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
        """A light copy of ``model`` whose large main-graph initializers live in this
        store. Tensors are copied one at a time, from memory or from the external data
        files under ``base_dir``; ``model`` itself is not modified."""
        light = without_initializers(model)
        name, path = self._new_file()
        with open(path, "wb") as data:
            for tensor in model.graph.initializer:
                self._adopt_tensor(tensor, light.graph, data, name, base_dir)
        return light

    def _adopt_tensor(self, tensor, graph: onnx.GraphProto, data, name: str, base_dir) -> None:
        if tensor.data_type == TensorProto.STRING or tensor_nbytes(tensor) < EXTERNAL_MIN_BYTES:
            graph.initializer.append(_loaded(tensor, base_dir))
            return
        if stored_path(tensor) is not None:
            chunks: Iterable[bytes] = iter_stored_chunks(tensor)
        elif tensor.data_location == TensorProto.EXTERNAL:
            chunks = _external_chunks(tensor, base_dir)
        elif tensor.HasField("raw_data"):
            chunks = (tensor.raw_data,)
        else:  # typed fields (float_data...): let onnx encode them
            chunks = (numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data,)
        offset = _aligned(data)
        length = 0
        for chunk in chunks:
            data.write(chunk)
            length += len(chunk)
        external_stub(graph.initializer.add(), tensor, name, offset, length)

    def spill_graph(self, graph: gs.Graph, min_bytes: int = EXTERNAL_MIN_BYTES) -> int:
        """Write the graph's in-memory constants of ``min_bytes`` or more to a new store
        file and replace their values by stubs, releasing the arrays; return how many.
        Exports exactly what graphsurgeon would have written (``values.tobytes()``)."""
        spilled = [t for t in graph.tensors().values() if _spillable(t, min_bytes)]
        if not spilled:
            return 0
        name, path = self._new_file()
        with open(path, "wb") as data:
            for tensor in spilled:
                offset = _aligned(data)
                stub = TensorProto()
                if isinstance(tensor._values, LazyValues):  # a TensorProto with raw_data
                    source = tensor._values.tensor
                    data.write(source.raw_data)
                    source.name = tensor.name  # as graphsurgeon's export would name it
                    external_stub(stub, source, name, offset, len(source.raw_data))
                else:
                    values = np.ascontiguousarray(tensor.values)
                    data.write(values.reshape(-1).view(np.uint8))
                    header = TensorProto()
                    header.name, header.data_type = tensor.name, dtype_to_onnx(tensor.dtype)
                    header.dims.extend(int(d) for d in values.shape)
                    external_stub(stub, header, name, offset, values.nbytes)
                    del values
                tensor._values = StoredValues(stub)
        return len(spilled)

    # ------------------------------------------------------------------ housekeeping

    def collect(self, keep: Iterable[onnx.ModelProto]) -> int:
        """Delete the files none of ``keep`` refers to; return how many went."""
        used = set()
        for model in keep:
            for tensor in model.graph.initializer:
                path = stored_path(tensor)
                if path is not None and path.parent == self.folder:
                    used.add(path.name)
        unused = self._names - used
        for name in unused:
            (self.folder / name).unlink(missing_ok=True)
            forget_stored_file(name)
        self._names -= unused
        return len(unused)


def _spillable(tensor: gs.Tensor, min_bytes: int) -> bool:
    if not isinstance(tensor, gs.Constant):
        return False
    values = tensor._values
    if type(values) is LazyValues:  # e.g. packed uint4 a pass built as a TensorProto
        proto = values.tensor
        return (
            isinstance(proto, TensorProto)
            and proto.data_location != TensorProto.EXTERNAL
            and len(proto.raw_data) >= min_bytes
        )
    if not isinstance(values, np.ndarray):
        return False
    if values.dtype.kind not in "biufc" or values.nbytes < min_bytes:
        return False
    try:  # graphsurgeon converts float32 to bfloat16/float8 on export: leave those inline
        return dtype_to_onnx(tensor.dtype) == dtype_to_onnx(tensor.export_dtype)
    except Exception:
        return False


def _aligned(data) -> int:
    offset = data.tell()
    padding = -offset % ALIGN
    if padding:
        data.write(b"\0" * padding)
    return offset + padding


def _external_chunks(tensor: TensorProto, base_dir: Path | None) -> Iterator[bytes]:
    if base_dir is None:
        raise ModelError(
            f"tensor {tensor.name!r} refers to external data but the model has no folder"
        )
    path = external_file(tensor, Path(base_dir))
    yield from iter_file_range(path, *external_range(tensor), what=f"tensor {tensor.name!r}")


def _loaded(tensor: TensorProto, base_dir: Path | None) -> TensorProto:
    """A small tensor, with its data in the proto (read from its file if external)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor
    copy = TensorProto()
    copy.CopyFrom(tensor)
    if stored_path(tensor) is not None:
        copy.raw_data = b"".join(iter_stored_chunks(tensor))
        copy.ClearField("data_location")
        del copy.external_data[:]
        return copy
    try:
        external_data_helper.load_external_data_for_tensor(copy, str(base_dir or ""))
    except Exception as exc:
        raise ModelError(
            f"cannot read external data of {tensor.name!r}: {first_line(exc)}"
        ) from exc
    copy.ClearField("data_location")
    del copy.external_data[:]
    return copy


def _remove(folder: Path, names: set[str]) -> None:
    for name in names:
        forget_stored_file(name)
    names.clear()
    shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_stores(where: Path) -> None:
    """Store folders of processes that are gone (killed runs)."""
    for entry in where.glob(f"{FOLDER_PREFIX}*"):
        pid = entry.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
