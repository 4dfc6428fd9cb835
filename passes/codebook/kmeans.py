"""1-D k-means for ``share-weights`` and the index encoding built on it.

``kmeans_1d`` clusters each row of a ``[C, N]`` matrix into ``K`` shared values,
optionally weighting each element by an importance (``weights``: the activation-aware,
Hessian-diagonal weights of SqueezeLLM-style sensitivity-weighted k-means); ``encode``
turns a tensor into indices + a flat codebook numbered by use; ``pack_uint4`` writes
indices as a packed UINT4 TensorProto.

Algorithm (per row, all rows at once):

- the row is sorted once, with prefix sums of the weights and of weight x value; a
  cluster is a contiguous run of the sorted row, so its weight, mean and squared error
  come from the prefix sums given its two edges;
- one Lloyd iteration finds the edges between neighbouring centroids by binary search
  (a vectorised search over every active row: O(rows x K x log N)), then moves each free
  centroid to its cluster's weighted mean; a row whose edges did not move is at a fixed
  point and leaves the loop;
- starts (``init``): ``linear`` evenly over the row's nonzero [min, max];
  ``density`` at the (weighted) quantiles of its nonzero values; ``cuberoot`` at the
  quantiles of the (weighted) density raised to the power 1/3 — the point density of
  the MSE-optimal quantizer at high rate (Panter-Dite), which lands within ~0.3 dB of
  the converged optimum before any iteration and fixes the slow drift of a linear start
  on heavy-tailed rows (8 bits, PP-OCR rec ``conv2d_170``: 27 dB -> 39 dB); ``best``
  runs ``linear``, ``density`` and ``cuberoot`` and keeps, per row, the codebook with
  the smallest weighted squared error (computed from the prefix sums, in O(K) a row).

Guarantees: exact zeros stay exactly zero (a row with zeros keeps a centroid fixed at
0.0 and every zero maps to it); a row with at most ``K`` distinct values gets exactly
those values; centroids are rounded to the weight's dtype and every index points to the
nearest *stored* centroid, so the reported error is the file's; nothing is random.

Memory: one sorted float64 copy of a row block and its float64 prefix sums (plus the
weights' prefix sums when weighted); every per-element step (assignment, renumbering,
reconstruction, statistics) runs in ``CHUNK``-element pieces.
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


INITS = ("linear", "density", "cuberoot")
CHUNK = 1 << 22  # elements per piece in the per-element loops (bounds temporaries)
ROW_BLOCK = 1 << 21  # elements of a block of rows clustered together (rows are
# independent: the block size moves memory, never a result; 1 << 23 held ~8 float64
# temporaries of 67 MB at once on MiniLM's embedding table, 949 MB peak against 688)
CUBEROOT_BINS = 256  # equal-count bins of the density estimate behind init=cuberoot
# A single row longer than this (one codebook for a whole large tensor, such as MiniLM's
# 30522x384 embedding table) is fitted on an evenly strided sample of at most this many
# values, then every value is assigned: fitting the whole row held six float64 copies of
# it (MiniLM share-weights: 32.5 s / 1.22 GB -> 26.8 s / 1.03 GB, same file size).
ROW_SAMPLE = 1 << 21


def kmeans_1d(
    rows: np.ndarray,
    k: int,
    *,
    init: str = "best",
    max_iter: int = 100,
    weights: np.ndarray | None = None,
) -> Codebook:
    """Cluster each row of ``rows`` ([C, N], float) into ``k`` shared values.

    ``weights`` (same shape, >= 0, or None for all ones) is each element's importance:
    centroids are weighted means and ``best`` compares weighted squared errors. See the
    module docstring for ``init`` and the guarantees. Deterministic.
    """
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"kmeans_1d expects a non-empty [C, N] matrix, got {rows.shape}")
    if not 2 <= k <= 256:
        raise ValueError(f"kmeans_1d: k must be in [2, 256], got {k}")
    if init not in (*INITS, "best"):
        raise ValueError(f"kmeans_1d: init must be linear, density, cuberoot or best, got {init!r}")
    if weights is not None and weights.shape != rows.shape:
        raise ValueError(f"kmeans_1d: weights {weights.shape} do not match rows {rows.shape}")
    fit, fit_weights = _sample(rows, weights)
    per_block = max(1, ROW_BLOCK // fit.shape[1])
    books, iterations, exact = [], 0, 0
    for start in range(0, fit.shape[0], per_block):
        block = slice(start, start + per_block)
        part = None if fit_weights is None else fit_weights[block]
        centroids, its, ex = _cluster_block(fit[block], k, init, max_iter, part)
        books.append(centroids)
        iterations, exact = max(iterations, its), exact + ex
    stored = np.concatenate(books) if len(books) > 1 else books[0]
    return Codebook(stored, assign(rows, stored), iterations, exact)


def _sample(rows: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rows, weights)`` to fit on: a single row over ``ROW_SAMPLE`` values becomes
    every ``stride``-th value, plus one exact zero when the row has zeros the sample
    missed (zeros keep their reserved centroid)."""
    if rows.shape[0] != 1 or rows.shape[1] <= ROW_SAMPLE:
        return rows, weights
    stride = -(-rows.shape[1] // ROW_SAMPLE)
    fit = rows[:, ::stride]
    part = None if weights is None else weights[:, ::stride]
    if not np.any(fit == 0) and np.any(rows == 0):
        fit = np.concatenate([fit, np.zeros((1, 1), rows.dtype)], axis=1)
        if part is not None:
            part = np.concatenate([part, part.mean(axis=1, keepdims=True)], axis=1)
    return np.ascontiguousarray(fit), None if part is None else np.ascontiguousarray(part)


def _cluster_block(
    rows: np.ndarray, k: int, init: str, max_iter: int, weights: np.ndarray | None
) -> tuple[np.ndarray, int, int]:
    """``(stored centroids [C, K], iterations, exact rows)`` for one block of rows."""
    sums = _PrefixSums.of(rows, weights)
    runs = []
    for start in INITS if init == "best" else (init,):
        centroids, fixed, exact = _initial_centroids(sums, k, start)
        iterations = _lloyd(sums, centroids, fixed, max_iter)
        runs.append((centroids.astype(rows.dtype), iterations))
    stored = runs[0][0]
    if len(runs) > 1:
        errors = np.stack([sums.squared_error(book) for book, _ in runs])
        choice = np.argmin(errors, axis=0)  # ties: the earlier start
        stored = np.stack([book for book, _ in runs])[choice, np.arange(len(choice))]
    return stored, max(i for _, i in runs), int(exact.sum())


@dataclass
class _PrefixSums:
    """Sorted rows with prefix sums of the weights and of weight x value, from which a
    cluster's weight, mean and squared error come in O(1) given its edges."""

    ordered: np.ndarray  # [C, N] float64, ascending
    sums: np.ndarray  # [C, N+1] prefix sums of weight * value
    mass: np.ndarray | None  # [C, N+1] prefix sums of the weights; None: all weights 1
    total: np.ndarray  # [C] sum of weight * value^2

    @classmethod
    def of(cls, rows: np.ndarray, weights: np.ndarray | None = None) -> _PrefixSums:
        if weights is None:
            ordered = rows.astype(np.float64)  # cast, then sort in place: one float64 copy
            ordered.sort(axis=1)
            total = np.einsum("ij,ij->i", ordered, ordered)
            return cls(ordered, _prefix(ordered), None, total)
        order = np.argsort(rows, axis=1)  # ties: their order only moves round-off
        ordered = np.take_along_axis(rows, order, axis=1).astype(np.float64)
        mass = np.take_along_axis(weights, order, axis=1).astype(np.float64)
        del order
        weighted = mass * ordered
        total = np.einsum("ij,ij->i", weighted, ordered)
        sums = _prefix(weighted)
        del weighted
        return cls(ordered, sums, _prefix(mass), total)

    @property
    def n(self) -> int:
        return self.ordered.shape[1]

    def totals(self, rows: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(weight, weighted sum)`` of the clusters between consecutive ``edges``."""
        sums = np.diff(self.sums[rows[:, None], edges], axis=1)  # gathers only the edges
        if self.mass is None:
            return np.diff(edges, axis=1).astype(np.float64), sums
        return np.diff(self.mass[rows[:, None], edges], axis=1), sums

    def squared_error(self, centroids: np.ndarray) -> np.ndarray:
        """Weighted squared error of each row against its nearest (stored) centroids:
        sum(w v^2) - sum_j c_j (2 S_j - c_j W_j), from the prefix sums."""
        exact = centroids.astype(np.float64)
        everyone = np.arange(len(exact))
        counts_le = _count_le(self.ordered, everyone, (exact[:, :-1] + exact[:, 1:]) / 2)
        weight, total = self.totals(everyone, _edges(counts_le, self.n))
        error = self.total - np.sum(exact * (2 * total - exact * weight), axis=1)
        return np.maximum(error, 0.0)


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
    sums: _PrefixSums, k: int, init: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroids [C, K], fixed [C, K] bool, exact [C] bool)`` for sorted rows."""
    ordered = sums.ordered
    n = ordered.shape[1]
    negative = np.count_nonzero(ordered < 0, axis=1)
    zeros = np.count_nonzero(ordered == 0, axis=1)
    if init == "linear":
        # Sorted rows hold [negatives, zeros, positives]: the nonzero ends are easy to find.
        first = np.where(negative > 0, 0, np.minimum(zeros, n - 1))
        last = np.where(zeros + negative < n, n - 1, np.maximum(negative - 1, 0))
        low = np.take_along_axis(ordered, first[:, None], axis=1)
        high = np.take_along_axis(ordered, last[:, None], axis=1)
        centroids = low + (high - low) * (np.arange(k) / (k - 1))[None, :]
    elif init == "density":
        centroids = _quantile_start(sums, k, negative, zeros)
    else:
        centroids = _cuberoot_start(sums, k)
    fixed = np.zeros(centroids.shape, dtype=bool)
    rows_with_zero = np.flatnonzero(zeros > 0)
    nearest = np.argmin(np.abs(centroids[rows_with_zero]), axis=1)
    # Snapping the start nearest zero keeps the row sorted and reserves one centroid.
    centroids[rows_with_zero, nearest] = 0.0
    fixed[rows_with_zero, nearest] = True
    distinct = 1 + np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1)
    exact = distinct <= k
    for row in np.flatnonzero(exact):
        values = np.unique(ordered[row])
        centroids[row] = np.concatenate([values, np.full(k - values.size, values[-1])])
        fixed[row] = True  # already optimal: every value is its own centroid
    order = np.argsort(centroids, axis=1, kind="stable")
    return (
        np.take_along_axis(centroids, order, axis=1),
        np.take_along_axis(fixed, order, axis=1),
        exact,
    )


def _quantile_start(sums: _PrefixSums, k: int, negative, zeros) -> np.ndarray:
    """Centroids at the (weighted) quantiles (j + 1/2) / k of each row's nonzero values."""
    ordered, n = sums.ordered, sums.n
    if sums.mass is None:
        nonzero = np.maximum(n - zeros, 1)[:, None]
        rank = np.floor((np.arange(k)[None, :] + 0.5) / k * nonzero).astype(np.int64)
        position = np.minimum(rank + np.where(rank >= negative[:, None], zeros[:, None], 0), n - 1)
        return np.take_along_axis(ordered, position, axis=1)
    mass = sums.mass.copy()
    # remove the zeros' weight: they get the reserved centroid, not a quantile
    rows = np.arange(len(mass))
    zero_mass = mass[rows, negative + zeros] - mass[rows, negative]
    after = np.arange(n + 1)[None, :] >= (negative + zeros)[:, None]
    mass -= np.where(after, zero_mass[:, None], 0.0)
    targets = (np.arange(k)[None, :] + 0.5) / k * mass[:, -1:]
    position = np.minimum(_search_rows(mass[:, 1:], targets), n - 1)
    return np.take_along_axis(ordered, position, axis=1)


def _cuberoot_start(sums: _PrefixSums, k: int) -> np.ndarray:
    """Centroids spread with point density ~ p(x)^(1/3) of each row (p: the weighted
    density, estimated on equal-count bins of the sorted row)."""
    ordered, n = sums.ordered, sums.n
    bins = min(CUBEROOT_BINS, n)
    edges = (np.arange(bins + 1) * n) // bins
    low = ordered[:, edges[:-1]]
    high = ordered[:, edges[1:] - 1]
    if sums.mass is None:
        mass = np.broadcast_to(np.diff(edges).astype(np.float64), low.shape)
    else:
        mass = np.diff(sums.mass[:, edges], axis=1)
    span = ordered[:, -1:] - ordered[:, :1]
    floor = np.maximum(span, 1e-30) / (16.0 * bins)  # a bin of one repeated value
    width = np.maximum(high - low, floor)
    share = np.cbrt(np.maximum(mass, 0.0)) * width ** (2.0 / 3.0)  # centroids per bin
    cumulative = np.concatenate([np.zeros((len(share), 1)), np.cumsum(share, axis=1)], axis=1)
    cumulative /= np.maximum(cumulative[:, -1:], 1e-300)
    targets = np.broadcast_to((np.arange(k) + 0.5) / k, (len(share), k))
    j = np.clip(_search_rows(cumulative, targets) - 1, 0, bins - 1)
    before = np.take_along_axis(cumulative, j, axis=1)
    after = np.take_along_axis(cumulative, j + 1, axis=1)
    fraction = (targets - before) / np.maximum(after - before, 1e-300)
    start = np.take_along_axis(low, j, axis=1)
    stop = np.take_along_axis(high, j, axis=1)
    return start + np.clip(fraction, 0.0, 1.0) * (stop - start)


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
    """Move the free centroids of the ``active`` rows to the weighted means of their
    clusters (an empty or weightless cluster keeps its centroid)."""
    weight, totals = sums.totals(active, _edges(counts_le, sums.n))
    rows = centroids[active]
    update = (weight > 0) & ~fixed[active]
    rows[update] = totals[update] / weight[update]
    flags = fixed[active]
    if np.any(np.diff(rows, axis=1) < 0):  # round-off only; keep rows sorted
        order = np.argsort(rows, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        flags = np.take_along_axis(flags, order, axis=1)
    centroids[active], fixed[active] = rows, flags


def _count_le(ordered: np.ndarray, active: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For each active row ``r``, how many of ``ordered[r]`` are <= each bound."""
    if len(active) <= 8:  # few (long) rows: numpy's own binary search, row by row
        counts = np.empty(bounds.shape, np.int64)
        for i, row in enumerate(active):
            counts[i] = ordered[row].searchsorted(bounds[i], side="right")
        return counts
    return _search_rows(ordered, bounds, active, side="right")


def _search_rows(
    ordered: np.ndarray, targets: np.ndarray, rows: np.ndarray | None = None, side: str = "left"
) -> np.ndarray:
    """``searchsorted`` of each row of ``targets`` in the matching sorted row of
    ``ordered`` (``rows`` selects them), all rows at once: a vectorised, branch-free
    binary search, O(rows x targets x log N) with no per-row Python loop."""
    if rows is None:
        rows = np.arange(len(ordered))
    n = ordered.shape[1]
    flat = np.ascontiguousarray(ordered).reshape(-1)
    base = (rows.astype(np.int64) * n - 1)[:, None]
    found = np.zeros(targets.shape, np.int64)
    step = 1 << (int(n).bit_length() - 1)
    while step:
        candidate = found + step
        probe = flat.take(base + np.minimum(candidate, n))
        below = (probe <= targets) if side == "right" else (probe < targets)
        found += step * (below & (candidate <= n))
        step >>= 1
    return found


def assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ties to the lower one); exact zeros to a 0 centroid."""
    exact = centroids.astype(np.float64)
    bounds = (exact[:, :-1] + exact[:, 1:]) / 2
    indices = np.empty(rows.shape, dtype=np.uint8)
    zero_slot = np.argmax(exact == 0, axis=1)
    has_zero = np.any(exact == 0, axis=1)
    if rows.shape[0] > 8 and rows.shape[1] <= CHUNK and bounds.shape[1] < 32:
        for block in _row_blocks(rows):  # many short rows, few centroids: count the
            part = rows[block]  # bounds below each value, one comparison per bound
            found = np.zeros(part.shape, np.uint8)
            for j in range(bounds.shape[1]):
                found += part > bounds[block, j : j + 1]
            zeros = (part == 0) & has_zero[block, None]
            indices[block] = np.where(zeros, zero_slot[block, None], found)
        return indices
    for row in range(rows.shape[0]):
        for start in range(0, rows.shape[1], CHUNK):  # int64 search results, chunk-sized
            part, out = rows[row, start : start + CHUNK], indices[row, start : start + CHUNK]
            out[...] = np.searchsorted(bounds[row], part, side="left")
            if has_zero[row]:  # a free centroid may sit next to the reserved one
                out[part == 0] = zero_slot[row]
    return indices


# ---------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """A tensor as indices (its own shape) plus a flat codebook [C*K] (or fewer entries:
    a single codebook keeps only the centroids some index uses), and for the scaled form
    one scale per channel: ``W = codebook[indices] * scales``."""

    indices: np.ndarray  # uint8, shape of the tensor
    codebook: np.ndarray  # flat, tensor dtype
    offsets: np.ndarray | None  # int32 c*K broadcastable along the channel axis, or None
    channels: int
    iterations: int
    exact_rows: int
    seconds: float
    scales: np.ndarray | None = None  # tensor dtype, broadcastable along the channel axis

    @property
    def granularity(self) -> str:
        if self.scales is not None:
            return "scaled"
        return "channel" if self.offsets is not None else "tensor"

    def stored_bytes(self, index_bits: int) -> int:
        """Bytes of indices (packed at ``index_bits``), codebook, offsets and scales."""
        extra = sum(a.nbytes for a in (self.offsets, self.scales) if a is not None)
        return (self.indices.size * index_bits + 7) // 8 + self.codebook.nbytes + extra

    def reconstruct(self) -> np.ndarray:
        """The decoded tensor, computed as onnxruntime computes the rebuild (the same
        dtype for the Gather and for the product with the scales)."""
        if self.offsets is not None:
            return self.codebook[self.indices.astype(np.int64) + self.offsets]
        flat = self.indices.reshape(1, -1)
        shared = np.empty(flat.shape, self.codebook.dtype)
        for _, start, part in iter_chunks(flat):  # no tensor-sized int64 index array
            shared[0, start : start + part.size] = self.codebook[part]
        shared = shared.reshape(self.indices.shape)
        if self.scales is not None:
            shared *= self.scales
        return shared


def encode(
    values: np.ndarray,
    k: int,
    axis: int | None,
    *,
    init: str = "best",
    max_iter: int = 100,
    weights: np.ndarray | None = None,
) -> Encoded:
    """Cluster ``values`` per tensor (``axis=None``) or per slice along ``axis``;
    ``weights`` (broadcastable to ``values``) are the elements' importances."""
    started = time.perf_counter()
    rows = _rows(values, axis)
    importance = None
    if weights is not None:
        importance = _rows(np.broadcast_to(weights, values.shape), axis)
    book = kmeans_1d(rows, k, init=init, max_iter=max_iter, weights=importance)
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


def encode_scaled(
    values: np.ndarray,
    k: int,
    axis: int,
    *,
    init: str = "best",
    max_iter: int = 100,
    weights: np.ndarray | None = None,
) -> Encoded:
    """One codebook for the whole tensor, one scale per slice along ``axis``: each slice
    is divided by its largest magnitude (its extreme weight lands on +-1 of the shared
    grid, its small weights are not crushed by another slice's range), and the k-means
    weighs each value by importance x scale^2, so the error it minimises is the error
    of the decoded weights."""
    started = time.perf_counter()
    rows = _rows(values, axis)
    scales = np.max(np.abs(rows), axis=1).astype(values.dtype)
    # float16-representable scales: stored in a float16 pool, they stay exact
    half = scales.astype(np.float16)
    normal = (np.abs(scales) >= np.finfo(np.float16).tiny) & np.isfinite(half)
    scales = np.where(normal, half.astype(values.dtype), scales)
    divisor = np.where(scales > 0, scales, 1).astype(np.float64)[:, None]
    normalised = (rows.astype(np.float64) / divisor).astype(values.dtype)
    importance = np.broadcast_to(divisor**2, rows.shape)
    if weights is not None:
        importance = importance * _rows(np.broadcast_to(weights, values.shape), axis)
    flat = normalised.reshape(1, -1)
    book = kmeans_1d(flat, k, init=init, max_iter=max_iter, weights=importance.reshape(1, -1))
    centroids, by_use, used = _by_use(book.centroids, book.indices)
    shape = [1] * values.ndim
    shape[axis] = rows.shape[0]
    moved = np.moveaxis(values, axis, 0).shape
    return Encoded(
        np.ascontiguousarray(np.moveaxis(by_use.reshape(moved), 0, axis)),
        np.ascontiguousarray(centroids[0, :used]),
        None,
        rows.shape[0],
        book.iterations,
        book.exact_rows,
        time.perf_counter() - started,
        scales.reshape(shape),
    )


def _rows(values: np.ndarray, axis: int | None) -> np.ndarray:
    """``values`` as ``[C, N]``: one row (axis None) or one row per slice along ``axis``."""
    if axis is None:
        return values.reshape(1, -1)
    return np.ascontiguousarray(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1))


def _by_use(centroids: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Renumber each row's centroids by how many values use them, most used first.

    Same values, but deflate codes the index bytes better when the common ones are small
    numbers (80 %-pruned MLP: 5,608 -> 5,388 bytes; zero, the most used centroid there,
    becomes index 0). Returns ``(centroids, indices, most centroids any row uses)``.
    """
    rows, k = centroids.shape
    short = rows > 8 and indices.shape[1] <= CHUNK  # many short rows: blocks of rows
    counts = np.zeros((rows, k), np.int64)
    if short:
        for block in _row_blocks(indices):
            part = indices[block].astype(np.int64)
            flat = (np.arange(part.shape[0])[:, None] * k + part).ravel()
            counts[block] = np.bincount(flat, minlength=part.shape[0] * k).reshape(-1, k)
    else:
        for row, _start, part in iter_chunks(indices):
            counts[row] += np.bincount(part, minlength=k)
    order = np.argsort(-counts, axis=1, kind="stable")
    rank = np.argsort(order, axis=1, kind="stable").astype(np.uint8)
    if short:
        renumbered = np.empty_like(indices)
        for block in _row_blocks(indices):
            renumbered[block] = np.take_along_axis(rank[block], indices[block].astype(np.int64), 1)
    else:
        renumbered = np.empty_like(indices)
        for row, start, part in iter_chunks(indices):
            renumbered[row, start : start + part.size] = rank[row][part]
    used = int(np.count_nonzero(counts, axis=1).max())
    return np.take_along_axis(centroids, order, axis=1), renumbered, used


def _row_blocks(matrix: np.ndarray):
    """Slices of whole rows holding at most ``CHUNK`` elements (at least one row)."""
    per_block = max(1, CHUNK // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], per_block):
        yield slice(start, start + per_block)


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
