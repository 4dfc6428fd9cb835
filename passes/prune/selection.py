"""Which weights go: pure numpy selection over one private copy of a tensor.

Every rewrite here edits a private copy of one tensor in place and streams over it in
slices of ``CHUNK_ELEMENTS``, so that no temporary is tensor-sized: ranking needs no
sort and no index array. "The k smallest |w|" is found by an exact radix select on the
IEEE bit patterns (non-negative floats order like their bits), then zeroed in one more
pass. Ties among equal magnitudes go by position (the first in C order are zeroed,
exactly what a stable sort of ``|w|`` picks).

Also here: :class:`RowLayout` (a weight seen as ``[rows, fan_in]``), the N:M pattern
parser and :func:`lowest_mask` (the exactly-``count`` lowest scores of a block, ties by
position), which the reconstruction sweep uses to pick its masks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

CHUNK_ELEMENTS = 1 << 21  # streaming slice: temporaries stay this small, not tensor-sized
DIGIT_BITS = 16  # radix select: 2^16 counters per pass
COLLECT_LIMIT = 1 << 22  # radix select: partition a bucket once it holds this few keys
PATTERN_COMPARE_MAX = 8  # N:M groups up to this M: ranked by M^2 comparisons, not argsort
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class RowLayout:
    """How a weight tensor maps to ``[rows, fan_in]``: rows are output channels, a row
    holds the weights reduced together (the axis N:M groups run along). The tensor is
    reshaped to ``pre_shape``, transposed by ``perm``, and its first ``row_axes`` axes
    become the rows."""

    shape: tuple[int, ...]
    pre_shape: tuple[int, ...]
    perm: tuple[int, ...]
    row_axes: int = 1

    @property
    def rows(self) -> int:
        moved = [self.pre_shape[p] for p in self.perm]
        return math.prod(moved[: self.row_axes]) if moved else 1

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape) // self.rows if self.rows else 0

    def to_rows(self, values: np.ndarray) -> np.ndarray:
        moved = values.reshape(self.pre_shape).transpose(self.perm)
        return moved.reshape(self.rows, -1)

    def moved(self, values: np.ndarray) -> np.ndarray:
        """``values`` transposed so that rows lead (a view; the rows may span
        ``row_axes`` axes)."""
        return values.reshape(self.pre_shape).transpose(self.perm)

    def row_blocks(self, values: np.ndarray, step: int) -> Iterator[np.ndarray]:
        """Views of ``values`` holding up to ``step`` consecutive rows each (shape
        ``[r, ...]``, a row spanning the trailing axes); writes reach ``values``."""
        moved = values.reshape(self.pre_shape).transpose(self.perm)
        if moved.ndim == 0:
            yield moved.reshape(1)
            return
        outer = [moved] if self.row_axes == 1 else list(moved.reshape(-1, *moved.shape[1:]))
        for part in outer:
            for start in range(0, part.shape[0], step):
                yield part[start : start + step]

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        moved_shape = tuple(self.pre_shape[p] for p in self.perm)
        back = rows.reshape(moved_shape).transpose(np.argsort(self.perm))
        return back.reshape(self.shape)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"N:M"`` -> ``(N, M)`` (keep N of every M)."""
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError(f"pattern={pattern!r}: expected 'unstructured' or N:M such as 2:4")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise ValueError(f"pattern={pattern!r}: need 0 < N < M (keep N of every M)")
    return keep, group


def count_zeros(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(values))  # no boolean temporary


def lowest_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of exactly ``count`` entries of ``scores`` with the lowest values;
    among equal scores the first in C order are taken. O(size): one partition."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, dtype=bool)
    if count >= flat.size:
        mask[:] = True
    elif count > 0:
        cut = np.partition(flat, count - 1)[count - 1]
        mask = flat < cut
        ties = np.flatnonzero(flat == cut)[: count - int(np.count_nonzero(mask))]
        mask[ties] = True
    return mask.reshape(scores.shape)


def chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[start : start + CHUNK_ELEMENTS]


_SIGN_MASK = {np.dtype(f"u{n}"): (1 << (8 * n - 1)) - 1 for n in (2, 4, 8)}


def magnitude_keys(chunk: np.ndarray) -> np.ndarray:
    """Unsigned integers that order like ``|chunk|``: the bit patterns without the sign
    bit. Every NaN gets the same key, just above +inf (a sort puts NaNs last, in order)."""
    unsigned = np.dtype(f"u{chunk.dtype.itemsize}")
    keys = np.ascontiguousarray(chunk).view(unsigned) & unsigned.type(_SIGN_MASK[unsigned])
    inf_bits = np.array(np.inf, dtype=chunk.dtype).view(unsigned)
    np.minimum(keys, inf_bits + unsigned.type(1), out=keys)
    return keys


def select_key(stream: Callable[[], Iterator[np.ndarray]], rank: int, bits: int) -> tuple[int, int]:
    """The key of 0-based ``rank`` among all keys ``stream()`` yields (unsigned, ``bits``
    wide), and how many keys are smaller. MSD radix select: one histogram of
    ``DIGIT_BITS`` per pass over the data, then the bucket's keys are gathered and
    partitioned once there are at most ``COLLECT_LIMIT`` of them. Memory: one slice and
    the counters, whatever the total size."""
    prefix, below, fixed = 0, 0, 0
    while fixed < bits:
        width = min(DIGIT_BITS, bits - fixed)
        shift = bits - fixed - width
        counts = np.zeros(1 << width, dtype=np.int64)
        for keys in _in_bucket(stream, prefix, bits - fixed, bits):
            digits = (keys >> shift) & ((1 << width) - 1)
            counts += np.bincount(digits.astype(np.intp), minlength=1 << width)
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, rank, side="right"))
        smaller = int(cumulative[digit - 1]) if digit else 0
        below, rank = below + smaller, rank - smaller
        prefix, fixed = (prefix << width) | digit, fixed + width
        if fixed < bits and counts[digit] <= COLLECT_LIMIT:
            bucket = np.concatenate(list(_in_bucket(stream, prefix, bits - fixed, bits)))
            key = np.partition(bucket, rank)[rank]
            return int(key), below + int(np.count_nonzero(bucket < key))
    return prefix, below


def _in_bucket(stream, prefix: int, low_bits: int, bits: int) -> Iterator[np.ndarray]:
    """The keys whose high ``bits - low_bits`` bits equal ``prefix``."""
    for keys in stream():
        yield keys if low_bits == bits else keys[(keys >> low_bits) == prefix]


def _zero_ranked(flat: np.ndarray, keys_of: Callable, key: int, ties: int) -> int:
    """Zero every entry of ``flat`` (in place) whose key is below ``key`` and the first
    ``ties`` entries (in position order) whose key equals it; return the ties left."""
    for chunk in chunks(flat):
        keys = keys_of(chunk)
        if ties > 0:
            equal = np.flatnonzero(keys == key)[:ties]
            ties -= equal.size
            chunk[equal] = 0
        chunk[keys < key] = 0
    return ties


def zero_smallest(values: np.ndarray, count: int) -> None:
    """Zero, in place, the ``count`` smallest |w| of the C-contiguous ``values``; among
    equal magnitudes the first in C order go (what a stable argsort would pick)."""
    flat = values.reshape(-1)
    if count <= 0 or flat.size == 0:
        return
    if count >= flat.size:
        flat[:] = 0
        return
    key, below = select_key(lambda: map(magnitude_keys, chunks(flat)), count - 1, 8 * flat.itemsize)
    _zero_ranked(flat, magnitude_keys, key, count - below)


def zero_global(arrays: list[np.ndarray], sparsity: float) -> None:
    """One ranking over all ``arrays`` by ``|w| / rms(tensor)`` (float64), ties by
    (tensor order, position); zero the lowest ``round(s * total)`` in place."""
    flats = [a.reshape(-1) for a in arrays]
    ranked = _global_key(flats, sparsity)
    if ranked is None:
        return
    scorers, key, ties = ranked
    for flat, score in zip(flats, scorers):
        ties = _zero_ranked(flat, score, key, ties)


def _global_key(flats: list[np.ndarray], sparsity: float):
    """``(scorers, key, ties)`` of the global ranking: per tensor ``|w| / rms``, the key
    of the ``round(s * total)``-th weight and how many equal to it are zeroed; None
    when nothing is zeroed."""
    total = sum(f.size for f in flats)
    count = round(sparsity * total)
    if count <= 0:
        return None
    scorers = [_scorer(_rms(f)) for f in flats]

    def stream() -> Iterator[np.ndarray]:
        for flat, score in zip(flats, scorers):
            yield from map(score, chunks(flat))

    key, below = select_key(stream, min(count, total) - 1, 64)
    return scorers, key, count - below


def _rms(flat: np.ndarray) -> float:
    """Root mean square in float64; one pairwise sum when the tensor fits one slice,
    else a sum of per-slice sums (the last bits may differ from numpy's single sum)."""
    if flat.size <= CHUNK_ELEMENTS:
        magnitude = np.abs(flat.astype(np.float64))
        return math.sqrt(float(np.mean(magnitude**2))) if flat.size else 0.0
    squares = sum(float(np.sum(np.square(c, dtype=np.float64))) for c in chunks(flat))
    return math.sqrt(squares / flat.size)


def _scorer(rms: float) -> Callable[[np.ndarray], np.ndarray]:
    def keys(chunk: np.ndarray) -> np.ndarray:
        score = np.abs(chunk.astype(np.float64))
        if rms > 0:  # an all-zero (or NaN) tensor keeps its raw magnitudes
            score /= rms
        return magnitude_keys(score)

    return keys


def zero_below(values: np.ndarray, threshold: float) -> None:
    """Zero every ``|w| < threshold`` in place (compared in the tensor's dtype)."""
    for chunk in chunks(values.reshape(-1)):
        chunk[np.abs(chunk) < threshold] = 0


def zero_pattern(values: np.ndarray, layout: RowLayout, keep: int, group: int) -> None:
    """In place: zero the (M - N) smallest of every M consecutive weights of each row
    (ties by position); a partial last group is padded with virtual zeros, which count
    towards its M - N. Works on blocks of about CHUNK_ELEMENTS weights."""
    if values.size == 0:
        return
    if values.ndim == 2 and layout.perm == (1, 0) and layout.pre_shape == values.shape:
        _zero_pattern_down_columns(values, keep, group)  # Gemm B[K, N], MatMul B[K, N]
        return
    fan_in = layout.fan_in
    for block in layout.row_blocks(values, max(1, CHUNK_ELEMENTS // fan_in)):
        flat = block.reshape(block.shape[0], fan_in)
        keys = _padded_keys(flat, group)  # [rows, groups * M]
        mask = _lowest_in_groups(keys.reshape(-1, group, 1), keep, group)
        block[mask.reshape(keys.shape)[:, :fan_in].reshape(block.shape)] = 0


def _zero_pattern_down_columns(values: np.ndarray, keep: int, group: int) -> None:
    """N:M along axis 0 of a 2-D ``[K, N]`` weight (a row is a column here), on blocks
    of whole groups of rows: contiguous, no transposed copy."""
    fan_in, columns = values.shape
    step = max(1, CHUNK_ELEMENTS // (columns * group)) * group
    for start in range(0, fan_in, step):
        block = values[start : start + step]
        keys = _padded_keys(block.T, group).T  # [groups * M, N], padding rows last
        mask = _lowest_in_groups(keys.reshape(-1, group, columns), keep, group)
        block[mask.reshape(keys.shape)[: block.shape[0]]] = 0


def _padded_keys(rows: np.ndarray, group: int) -> np.ndarray:
    """``magnitude_keys + 1`` of ``rows[r, c]``, the last axis padded with 0 (lower than
    any weight) to a multiple of ``group``."""
    keys = magnitude_keys(np.ascontiguousarray(rows))
    padded = np.zeros((rows.shape[0], -(-rows.shape[1] // group) * group), dtype=keys.dtype)
    padded[:, : rows.shape[1]] = keys
    padded[:, : rows.shape[1]] += 1
    return padded


def _lowest_in_groups(keys: np.ndarray, keep: int, group: int) -> np.ndarray:
    """``keys[a, M, b]``: True for the (M - N) lowest of each group along axis 1, ties by
    position (a stable sort's first M - N)."""
    if group > PATTERN_COMPARE_MAX:
        order = np.argsort(keys, axis=1, kind="stable")[:, : group - keep]
        mask = np.zeros(keys.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=1)
        return mask
    mask = np.empty(keys.shape, dtype=bool)
    for i in range(group):  # rank of slot i: lower keys, plus equal keys before it
        rank = np.zeros(keys[:, i].shape, dtype=np.uint8)
        for j in range(group):
            if j != i:
                rank += keys[:, j] <= keys[:, i] if j < i else keys[:, j] < keys[:, i]
        mask[:, i] = rank < group - keep
    return mask


def global_counts(arrays: list[np.ndarray], sparsity: float) -> list[int]:
    """How many weights of each of ``arrays`` the ranking of :func:`zero_global` would
    zero (the same key and the same ties), without zeroing anything."""
    flats = [a.reshape(-1) for a in arrays]
    ranked = _global_key(flats, sparsity)
    if ranked is None:
        return [0] * len(flats)
    scorers, key, ties = ranked
    counts = []
    for flat, score in zip(flats, scorers):
        found = 0
        for chunk in chunks(flat):
            keys = score(chunk)
            equal = min(ties, int(np.count_nonzero(keys == key)))
            ties -= equal
            found += int(np.count_nonzero(keys < key)) + equal
        counts.append(found)
    return counts


def spread(total: int, parts: int) -> np.ndarray:
    """``total`` split over ``parts`` as evenly as rounding allows (cumulative rounding:
    part ``i`` gets ``round(total * (i + 1) / parts) - round(total * i / parts)``)."""
    edges = np.rint(np.arange(parts + 1) * (total / max(parts, 1))).astype(np.int64)
    return np.diff(edges)


def lowest_per_row(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mask of the ``counts[r]`` lowest ``scores[r]`` of each row (ties by position),
    sorted a block of rows at a time."""
    mask = np.zeros(scores.shape, dtype=bool)
    if scores.size == 0:
        return mask
    step = max(1, CHUNK_ELEMENTS // scores.shape[1])
    for start in range(0, scores.shape[0], step):
        part = scores[start : start + step]
        order = np.argsort(part, axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(part.shape[1])[None, :], axis=1)
        mask[start : start + step] = ranks < counts[start : start + step, None]
    return mask


def pattern_lowest(scores: np.ndarray, keep: int, group: int) -> np.ndarray:
    """Mask of the ``M - N`` lowest of every ``M`` consecutive ``scores`` of each row
    (``[R, K]``, ties by position); a partial last group counts its missing slots as
    its lowest entries (so it zeroes ``r - N`` of its ``r``)."""
    rows, fan_in = scores.shape
    width = -(-fan_in // group) * group
    padded = np.full((rows, width), -np.inf)
    padded[:, :fan_in] = scores
    grouped = padded.reshape(rows, -1, group)
    order = np.argsort(grouped, axis=-1, kind="stable")[..., : group - keep]
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask.reshape(rows, width)[:, :fan_in]
