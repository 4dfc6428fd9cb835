"""Samples read from disk when they are used, not all held in memory at once.

An ``.npy`` file, or an ``.npz`` archive written by ``np.savez`` (members stored, not
deflated), holds its arrays as raw bytes at a known offset: sample ``i`` of an array of
shape ``(n, *row)`` is ``prod(row) * itemsize`` bytes at ``offset + i * that``.
:class:`StoredArray` reads one such row with a plain file read into a fresh array
(not a memory map: mapped pages would count towards the process's resident memory
until unmapped, which is what this avoids), and :class:`Samples` is a sequence of
feeds built from rows on each access.

So the memory a job needs no longer grows with the data file: PP-OCRv4 det at 640x640
with 32 calibration and 32 validation samples held 315 MB of inputs before anything
ran; now one sample (4.9 MB) at a time. Re-reading a sample costs a page-cache copy
(about a millisecond per 5 MB), small beside running the model on it.

Archives whose *input* arrays cannot be read this way (deflated members from
``np.savez_compressed``, Fortran-ordered or object arrays) are loaded whole, as before;
other keys (labels, metadata) are never read. Each read checks that the file is the
one opened (device, inode, size, modification time): a data file changed, truncated
or removed during a run is a ``DataError`` that stops the run (exit 2), not a step
failure.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxopt.errors import DataError

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's contents cheaply: a rewrite or truncation changes it."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, f) -> FileStamp:
        st = os.fstat(f.fileno())
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StoredArray:
    """A C-ordered array inside a file, read one leading-index row at a time."""

    path: str  # absolute: a worker process may run in another directory
    offset: int  # byte offset of the first element
    shape: tuple[int, ...]
    dtype: np.dtype
    stamp: FileStamp  # the file as it was when opened

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def row(self, index: int) -> np.ndarray:
        """``array[index]`` as a fresh array that owns its memory."""
        out = np.empty(self.shape[1:], self.dtype)
        size = out.nbytes
        try:
            with open(self.path, "rb") as f:
                if FileStamp.of(f) != self.stamp:
                    raise DataError(
                        f"{self.path}: the data file changed after it was opened (its "
                        "samples are read when used): keep it unchanged during the run"
                    )
                f.seek(self.offset + index * size)
                read = f.readinto(out.reshape(-1).view(np.uint8)) if size else 0
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read sample {index} ({exc})") from None
        if read != size:
            raise DataError(f"{self.path}: sample {index} is cut short ({read} of {size} bytes)")
        return out


def open_npy(path: str | Path) -> StoredArray | None:
    """The array of an ``.npy`` file, or ``None`` when it is not row-readable."""
    with open(path, "rb") as f:
        end = FileStamp.of(f).size
        return _array_at(f, Path(path).resolve(), 0, end)


def open_npz(path: str | Path) -> dict[str, StoredArray | None] | None:
    """The arrays of an ``.npz`` archive by key (``None`` for a member that is not
    row-readable: deflated, Fortran-ordered, object dtype...), or ``None`` when the
    file is not a zip archive the loader can read this way."""
    arrays: dict[str, StoredArray | None] = {}
    where = Path(path).resolve()
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                if info.compress_type != zipfile.ZIP_STORED:
                    arrays[key] = None
                    continue
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER)
                if header[:4] != b"PK\x03\x04":
                    return None
                name_length = int.from_bytes(header[26:28], "little")
                extra_length = int.from_bytes(header[28:30], "little")
                start = info.header_offset + _LOCAL_HEADER + name_length + extra_length
                # the member's own end: a short member must not read its neighbour
                arrays[key] = _array_at(f, where, start, start + info.file_size)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # the eager loader reports what is wrong with the file
    return arrays


def _array_at(f, path: Path, start: int, end: int) -> StoredArray | None:
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
    except ValueError:
        return None
    if fortran or dtype.hasobject or len(shape) == 0 or dtype.itemsize == 0:
        return None
    offset = f.tell()
    if offset + math.prod(shape) * dtype.itemsize > end:
        return None  # truncated: the eager loader says so
    shape = tuple(int(d) for d in shape)
    return StoredArray(str(path), offset, shape, dtype, FileStamp.of(f))


class Samples(Sequence):
    """Feeds built on each access by ``read(index)``; slices and :meth:`take` stay lazy.

    ``read`` must be picklable (a bound method of a dataclass), so that the samples
    travel to worker processes as file offsets, not as arrays.
    """

    def __init__(self, read: Callable[[int], dict[str, np.ndarray]], indices: Sequence[int]):
        self._read = read
        self._indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return Samples(self._read, self._indices[item])
        return self._read(self._indices[item])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        # not Sequence's: it would end quietly at an IndexError raised inside a read
        for index in self._indices:
            yield self._read(index)

    def take(self, positions: Sequence[int]) -> Samples:
        """The samples at ``positions`` of this sequence (still read on use)."""
        return Samples(self._read, [self._indices[int(p)] for p in positions])

    def __repr__(self) -> str:
        return f"Samples({len(self)} read from disk on use)"
