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

Archives that cannot be read this way (deflated members from ``np.savez_compressed``,
Fortran-ordered or object arrays) are loaded whole, as before.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxopt.errors import DataError

Feed = dict[str, np.ndarray]

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class StoredArray:
    """A C-ordered array inside a file, read one leading-index row at a time."""

    path: str
    offset: int  # byte offset of the first element
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def row(self, index: int) -> np.ndarray:
        """``array[index]`` as a fresh array that owns its memory."""
        out = np.empty(self.shape[1:], self.dtype)
        size = out.nbytes
        with open(self.path, "rb") as f:
            f.seek(self.offset + index * size)
            read = f.readinto(out.reshape(-1).view(np.uint8)) if size else 0
        if read != size:
            raise DataError(
                f"{self.path}: sample {index} is cut short ({read} of {size} bytes); "
                "the file changed or was truncated while in use"
            )
        return out


def open_npy(path: str | Path) -> StoredArray | None:
    """The array of an ``.npy`` file, or ``None`` when it is not row-readable."""
    with open(path, "rb") as f:  # absolute: a worker process may run elsewhere
        return _array_at(f, str(Path(path).resolve()), 0)


def open_npz(path: str | Path) -> dict[str, StoredArray] | None:
    """The arrays of an ``.npz`` archive by key, or ``None`` when any member is not
    row-readable (deflated, Fortran-ordered, object dtype...)."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    return None
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER)
                if header[:4] != b"PK\x03\x04":
                    return None
                name_length = int.from_bytes(header[26:28], "little")
                extra_length = int.from_bytes(header[28:30], "little")
                start = info.header_offset + _LOCAL_HEADER + name_length + extra_length
                array = _array_at(f, str(Path(path).resolve()), start)
                if array is None:
                    return None
                arrays[info.filename[: -len(".npy")]] = array
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # the eager loader reports what is wrong with the file
    return arrays


def _array_at(f, path: str, start: int) -> StoredArray | None:
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
    f.seek(0, 2)
    if f.tell() < offset + math.prod(shape) * dtype.itemsize:
        return None  # truncated: the eager loader says so
    return StoredArray(path, offset, tuple(int(d) for d in shape), dtype)


class Samples(Sequence):
    """Feeds built on each access by ``read(index)``; slices and :meth:`take` stay lazy.

    ``read`` must be picklable (a bound method of a dataclass), so that the samples
    travel to worker processes as file offsets, not as arrays.
    """

    def __init__(self, read: Callable[[int], Feed], indices: Sequence[int]):
        self._read = read
        self._indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return Samples(self._read, self._indices[item])
        return self._read(self._indices[item])

    def take(self, positions: Sequence[int]) -> Samples:
        """The samples at ``positions`` of this sequence (still read on use)."""
        return Samples(self._read, [self._indices[int(p)] for p in positions])

    def __repr__(self) -> str:
        return f"Samples({len(self)} read from disk on use)"
