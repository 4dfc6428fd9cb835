"""1-D k-means for ``share-weights`` and the index encoding built on it.

``kmeans_1d`` clusters each row of a ``[C, N]`` matrix into ``K`` shared values (the
algorithm, initialisations and guarantees are described in the pass's docstring,
``onnxopt.passes.codebook``); ``encode`` turns a tensor into indices + a flat codebook
numbered by use; ``pack_uint4`` writes indices as a packed UINT4 TensorProto.

Memory: one sorted float64 copy of a row plus its float64 prefix sums; every
per-element step (assignment, renumbering, reconstruction, statistics) runs in
``CHUNK``-element pieces, so no tensor-sized int64 or float64 temporary is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

# ---------------------------------------------------------------------------- k-means


@dataclass
class Codebook:
    """Result of clustering the rows of a ``[C, N]`` matrix into ``K`` values per row."""

    centroids: np.ndarray  # [C, K], ascending per row, in the weight's dtype
    indices: np.ndarray  # [C, N] uint8
    iterations: int
    exact_rows: int  # rows whose distinct values fit the codebook (encoded without loss)


INITS = ("linear", "density")


CHUNK = 1 << 22  # elements per piece in the per-element loops (bounds temporaries)


def kmeans_1d(rows: np.ndarray, k: int, *, init: str = "best", max_iter: int = 100) -> Codebook:
    """Cluster each row of ``rows`` ([C, N], float) into ``k`` shared values.

    ``init="linear"``: centroids evenly spaced over each row's nonzero [min, max];
    ``"density"``: at the quantiles (j + 1/2) / k of its nonzero values; ``"best"``: run
    both and keep, per row, the codebook with the smaller squared error (ties: linear).
    A row with exact zeros keeps a centroid fixed at 0.0 and its zeros map to it; a row
    with <= ``k`` distinct values gets exactly those values. Deterministic.
    """
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"kmeans_1d expects a non-empty [C, N] matrix, got {rows.shape}")
    if not 2 <= k <= 256:
        raise ValueError(f"kmeans_1d: k must be in [2, 256], got {k}")
    if init not in (*INITS, "best"):
        raise ValueError(f"kmeans_1d: init must be linear, density or best, got {init!r}")
    sums = _PrefixSums.of(rows)
    runs = []
    for start in INITS if init == "best" else (init,):
        centroids, fixed, exact = _initial_centroids(sums.ordered, k, start)
        iterations = _lloyd(sums, centroids, fixed, max_iter)
        runs.append((centroids.astype(rows.dtype), iterations))
    stored = runs[0][0]
    if len(runs) > 1:
        errors = [sums.squared_error(book) for book, _ in runs]
        stored = np.where((errors[1] < errors[0])[:, None], runs[1][0], runs[0][0])
    indices = assign(rows, stored)
    return Codebook(stored, indices, max(i for _, i in runs), int(exact.sum()))


@dataclass
class _PrefixSums:
    """Sorted rows with prefix sums of the values and of their squares, from which a
    cluster's count, mean and squared error come in O(1) given its edges."""

    ordered: np.ndarray  # [C, N] float64, ascending
    sums: np.ndarray  # [C, N+1]

    @classmethod
    def of(cls, rows: np.ndarray) -> _PrefixSums:
        ordered = rows.astype(np.float64)  # cast, then sort in place: one float64 copy
        ordered.sort(axis=1)
        return cls(ordered, _prefix(ordered))

    def totals(self, rows: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(count, sum)`` of the clusters between consecutive ``edges`` of ``rows``."""
        sums = np.diff(self.sums[rows[:, None], edges], axis=1)  # gathers only the edges
        return np.diff(edges, axis=1), sums

    def squared_error(self, centroids: np.ndarray) -> np.ndarray:
        """Squared error of each row against its nearest (stored) centroids, summed
        chunk by chunk (no row-sized temporaries: rows can hold 10^8 weights)."""
        exact = centroids.astype(np.float64)
        bounds = (exact[:, :-1] + exact[:, 1:]) / 2
        errors = np.zeros(len(self.ordered))
        for row, values in enumerate(self.ordered):
            for start in range(0, values.size, CHUNK):
                part = values[start : start + CHUNK]
                nearest = exact[row][np.searchsorted(bounds[row], part, side="left")]
                errors[row] += float(np.dot(part - nearest, part - nearest))
        return errors


def _prefix(values: np.ndarray) -> np.ndarray:
    prefix = np.zeros((values.shape[0], values.shape[1] + 1))
    np.cumsum(values, axis=1, out=prefix[:, 1:])
    return prefix


def _edges(counts_le: np.ndarray, n: int) -> np.ndarray:
    """Cluster boundaries in a sorted row: 0, the counts <= each bound, n."""
    rows = len(counts_le)
    return np.concatenate(
        [np.zeros((rows, 1), np.int64), counts_le, np.full((rows, 1), n, np.int64)], axis=1
    )


def _initial_centroids(
    ordered: np.ndarray, k: int, init: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroids [C, K], fixed [C, K] bool, exact [C] bool)`` for sorted rows."""
    n = ordered.shape[1]
    negative = np.count_nonzero(ordered < 0, axis=1)[:, None]
    zeros = np.count_nonzero(ordered == 0, axis=1)
    has_zero = zeros > 0
    nonzero = np.maximum(n - zeros, 1)[:, None]
    if init == "linear":
        # Sorted rows hold [negatives, zeros, positives]: the nonzero ends are easy to find.
        first = np.where(negative[:, 0] > 0, 0, np.minimum(zeros, n - 1))
        last = np.where(zeros + negative[:, 0] < n, n - 1, np.maximum(negative[:, 0] - 1, 0))
        low = np.take_along_axis(ordered, first[:, None], axis=1)
        high = np.take_along_axis(ordered, last[:, None], axis=1)
        centroids = low + (high - low) * (np.arange(k) / (k - 1))[None, :]
    else:  # density: quantiles of the nonzero values
        rank = np.floor((np.arange(k)[None, :] + 0.5) / k * nonzero).astype(np.int64)
        position = np.minimum(rank + np.where(rank >= negative, zeros[:, None], 0), n - 1)
        centroids = np.take_along_axis(ordered, position, axis=1)
    fixed = np.zeros(centroids.shape, dtype=bool)
    rows_with_zero = np.flatnonzero(has_zero)
    nearest = np.argmin(np.abs(centroids[rows_with_zero]), axis=1)
    # Snapping the grid point nearest zero keeps the row sorted and reserves one centroid.
    centroids[rows_with_zero, nearest] = 0.0
    fixed[rows_with_zero, nearest] = True
    distinct = 1 + np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1)
    exact = distinct <= k
    for row in np.flatnonzero(exact):
        values = np.unique(ordered[row])
        centroids[row] = np.concatenate([values, np.full(k - values.size, values[-1])])
        fixed[row] = True  # already optimal: every value is its own centroid
    return centroids, fixed, exact


def _lloyd(sums: _PrefixSums, centroids: np.ndarray, fixed: np.ndarray, max_iter: int) -> int:
    """Lloyd iterations in place on ``centroids``; returns the most updates any row made.

    A row whose assignment did not change is at a fixed point and leaves the active set.
    """
    ordered = sums.ordered
    active = np.arange(len(ordered))
    previous = np.full((len(ordered), centroids.shape[1] - 1), -1, np.int64)
    for iteration in range(max_iter):
        bounds = (centroids[active, :-1] + centroids[active, 1:]) / 2
        counts_le = _count_le(ordered, active, bounds)
        moved = np.any(counts_le != previous[active], axis=1)
        active, counts_le = active[moved], counts_le[moved]
        if not active.size:
            return iteration
        previous[active] = counts_le
        _update(sums, active, counts_le, centroids, fixed)
    return max_iter


def _update(sums: _PrefixSums, active, counts_le, centroids, fixed) -> None:
    """Move the free centroids of the ``active`` rows to the means of their clusters."""
    counts, totals = sums.totals(active, _edges(counts_le, sums.ordered.shape[1]))
    rows = centroids[active]
    update = (counts > 0) & ~fixed[active]
    rows[update] = totals[update] / counts[update]
    flags = fixed[active]
    if np.any(np.diff(rows, axis=1) < 0):  # round-off only; keep rows sorted
        order = np.argsort(rows, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        flags = np.take_along_axis(flags, order, axis=1)
    centroids[active], fixed[active] = rows, flags


def _count_le(ordered: np.ndarray, active: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For each active row ``r``, how many of ``ordered[r]`` are <= each bound."""
    counts = np.empty(bounds.shape, np.int64)
    for i, row in enumerate(active):  # one C-level binary search per row
        counts[i] = ordered[row].searchsorted(bounds[i], side="right")
    return counts


def assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ties to the lower one); exact zeros to a 0 centroid."""
    exact = centroids.astype(np.float64)
    bounds = (exact[:, :-1] + exact[:, 1:]) / 2
    indices = np.empty(rows.shape, dtype=np.uint8)
    for row in range(rows.shape[0]):
        zero_slots = np.flatnonzero(exact[row] == 0)
        for start in range(0, rows.shape[1], CHUNK):  # int64 search results, chunk-sized
            part, out = rows[row, start : start + CHUNK], indices[row, start : start + CHUNK]
            out[...] = np.searchsorted(bounds[row], part, side="left")
            if zero_slots.size:  # a free centroid may sit next to the reserved one
                out[part == 0] = zero_slots[0]
    return indices


# ---------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """A tensor as indices (its own shape) plus a flat codebook [C*K] (or fewer entries:
    a single codebook keeps only the centroids some index uses)."""

    indices: np.ndarray  # uint8, shape of the tensor
    codebook: np.ndarray  # flat, tensor dtype
    offsets: np.ndarray | None  # int32 c*K broadcastable along the channel axis, or None
    channels: int
    iterations: int
    exact_rows: int
    seconds: float

    def stored_bytes(self, index_bits: int) -> int:
        """Bytes of indices (packed at ``index_bits``), codebook and offsets."""
        offsets = self.offsets.nbytes if self.offsets is not None else 0
        return (self.indices.size * index_bits + 7) // 8 + self.codebook.nbytes + offsets

    def reconstruct(self) -> np.ndarray:
        if self.offsets is not None:
            return self.codebook[self.indices.astype(np.int64) + self.offsets]
        flat = self.indices.reshape(1, -1)
        shared = np.empty(flat.shape, self.codebook.dtype)
        for _, start, part in iter_chunks(flat):  # no tensor-sized int64 index array
            shared[0, start : start + part.size] = self.codebook[part]
        return shared.reshape(self.indices.shape)


def encode(
    values: np.ndarray, k: int, axis: int | None, *, init: str = "best", max_iter: int = 100
) -> Encoded:
    """Cluster ``values`` per tensor (``axis=None``) or per slice along ``axis``."""
    started = time.perf_counter()
    if axis is None:
        rows = values.reshape(1, -1)
    else:
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    book = kmeans_1d(rows, k, init=init, max_iter=max_iter)
    centroids, by_use, used = _by_use(book.centroids, book.indices)
    channels = rows.shape[0]
    if axis is None:
        codebook = centroids[0, :used]  # the unused centroids come last: drop them
        indices, offsets = by_use.reshape(values.shape), None
    else:
        codebook = centroids.reshape(-1)
        moved = np.moveaxis(values, axis, 0).shape
        indices = np.ascontiguousarray(np.moveaxis(by_use.reshape(moved), 0, axis))
        shape = [1] * values.ndim
        shape[axis] = channels
        offsets = (np.arange(channels, dtype=np.int32) * k).reshape(shape)
    return Encoded(
        indices,
        np.ascontiguousarray(codebook),
        offsets,
        channels,
        book.iterations,
        book.exact_rows,
        time.perf_counter() - started,
    )


def _by_use(centroids: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Renumber each row's centroids by how many values use them, most used first.

    Same values, but deflate codes the index bytes better when the common ones are small
    numbers (80 %-pruned MLP: 5,608 -> 5,388 bytes; zero, the most used centroid there,
    becomes index 0). Returns ``(centroids, indices, most centroids any row uses)``.
    """
    rows, k = centroids.shape
    counts = np.zeros((rows, k), np.int64)
    for row, _start, part in iter_chunks(indices):
        counts[row] += np.bincount(part, minlength=k)
    order = np.argsort(-counts, axis=1, kind="stable")
    rank = np.argsort(order, axis=1, kind="stable").astype(np.uint8)
    renumbered = np.empty_like(indices)
    for row, start, part in iter_chunks(indices):
        renumbered[row, start : start + part.size] = rank[row][part]
    used = int(np.count_nonzero(counts, axis=1).max())
    return np.take_along_axis(centroids, order, axis=1), renumbered, used


def iter_chunks(matrix: np.ndarray):
    """``(row, start, piece)`` over a 2-D array in pieces of ``CHUNK`` elements (index
    arithmetic on a piece makes int64 temporaries of the piece's size only)."""
    for row in range(matrix.shape[0]):
        for start in range(0, matrix.shape[1], CHUNK):
            yield row, start, matrix[row, start : start + CHUNK]


def pack_uint4(indices: np.ndarray, name: str) -> onnx.TensorProto:
    """A UINT4 TensorProto, two values per byte, first value in the low nibble (ONNX)."""
    flat = indices.reshape(-1).astype(np.uint8)
    if flat.size and int(flat.max()) > 15:
        raise ValueError(f"{name}: index {int(flat.max())} does not fit in uint4")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(
        name, onnx.TensorProto.UINT4, list(indices.shape), packed.tobytes(), raw=True
    )
