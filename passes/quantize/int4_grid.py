"""Weight grids for ``quantize-int4``: layouts, per-block scale search, rounding.

Pure numpy, no graph. One weight tensor is cut into *groups* that share one scale
(and, asymmetric, one zero point). A :class:`Layout` says how:

- ``Layout(axis, block)``: blocks of ``block`` consecutive elements along ``axis``
  (the reduction axis: MatMul K, Conv input channels). The scale has the weight's
  rank with ``axis`` divided by ``block`` (rounded up): the ``scale`` input of an ONNX
  blocked ``DequantizeLinear(axis, block_size)``.
- ``Layout(axis, None)``: one scale per index of ``axis`` (per output channel) over
  every other element: a per-axis ``DequantizeLinear(axis)`` with a 1-D scale.

Every layout is worked on through a 2-D *rows view* ``[K, M]``: each column is one
run of elements whose consecutive ``block`` rows share a scale.

A :class:`Grid` is the integer range: ``bits`` 4 or 8, symmetric (``[-8, 7]`` /
``[-128, 127]``, zero point 0) or asymmetric (``[0, 15]`` / ``[0, 255]`` with a zero
point per group).

Scale search (``choose_scales(search=True)``): for each group, the scale (and zero
point) that minimises the group's squared rounding error, optionally weighted per
element by ``importance`` — the mean square of the input that multiplies the weight
(the diagonal of GPTQ's ``H``), so the error that reaches the layer output counts,
not the weight error. Candidates: the range shrunk by each ratio of ``RATIOS`` (1.0 to 0.64)
(clipping the extremes); asymmetric grids also try the zero point one level either
side. ``search=False`` is plain round-to-nearest over the full range (the "RTN"
baseline every 4-bit tool starts from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SCALE = 1e-12
RATIOS = tuple(np.round(np.linspace(1.0, 0.64, 10), 3))  # range kept, first = no clipping
CHUNK_ELEMENTS = 1 << 18  # columns are worked on in chunks of about this many elements


@dataclass(frozen=True)
class Grid:
    bits: int  # 4 or 8
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def carrier(self) -> type:
        return np.int8 if self.symmetric else np.uint8


@dataclass(frozen=True)
class Layout:
    axis: int
    block: int | None  # None: one scale per index of ``axis``

    def rows(self, w: np.ndarray) -> np.ndarray:
        """``[K, M]`` view of ``w`` (a copy when the axis moves)."""
        if self.block is None:
            return np.moveaxis(w, self.axis, -1).reshape(-1, w.shape[self.axis])
        return np.moveaxis(w, self.axis, 0).reshape(w.shape[self.axis], -1)

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`rows` for a tensor of ``shape``."""
        moved = list(shape)
        if self.block is None:
            moved.append(moved.pop(self.axis))
            return np.moveaxis(rows.reshape(moved), -1, self.axis)
        moved.insert(0, moved.pop(self.axis))
        return np.moveaxis(rows.reshape(moved), 0, self.axis)

    def block_rows(self, k: int) -> int:
        return k if self.block is None else self.block

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale / zero point input of the DequantizeLinear."""
        if self.block is None:
            return (shape[self.axis],)
        out = list(shape)
        out[self.axis] = -(-shape[self.axis] // self.block)
        return tuple(out)

    def params_from_rows(self, params: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``[blocks, M]`` per-group values → the DequantizeLinear layout."""
        if self.block is None:
            return params.reshape(-1)
        moved = list(shape)
        moved.insert(0, moved.pop(self.axis))
        moved[0] = params.shape[0]
        return np.moveaxis(params.reshape(moved), 0, self.axis)

    def per_element(self, params: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``[blocks, M]`` per-group values repeated onto every element, layout ``shape``."""
        k = shape[self.axis] if self.block is not None else int(np.prod(shape)) // shape[self.axis]
        repeated = np.repeat(params, self.block_rows(k), axis=0)[:k]
        return self.unrows(repeated, shape)


def _grouped(rows: np.ndarray, block: int) -> np.ndarray:
    k, m = rows.shape
    blocks = -(-k // block)
    if blocks * block == k:
        return rows.reshape(blocks, block, m)
    padded = np.zeros((blocks * block, m), rows.dtype)
    padded[:k] = rows
    return padded.reshape(blocks, block, m)


def choose_scales(
    rows: np.ndarray,
    block: int,
    grid: Grid,
    importance: np.ndarray | None = None,
    search: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group ``scale [blocks, M]`` (float32) and zero point (asymmetric) of a rows view."""
    k, m = rows.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    scales, zeros = [], []
    for start in range(0, m, step):
        cols = slice(start, min(start + step, m))
        w = _grouped(rows[:, cols].astype(np.float32), block)
        imp = None
        if importance is not None:
            imp = _grouped(importance[:, cols].astype(np.float32), block)
        scale, zero = _search(w, grid, imp, RATIOS if search else (1.0,))
        scales.append(scale)
        zeros.append(zero)
    scale = np.concatenate(scales, axis=1).astype(np.float32)
    if grid.symmetric:
        return scale, None
    return scale, np.concatenate(zeros, axis=1).astype(grid.carrier)


def _search(w: np.ndarray, grid: Grid, imp: np.ndarray | None, ratios) -> tuple:
    """Best candidate per group of ``w [blocks, block, M]``: ratios first, then (asymmetric)
    the zero point one level either side of each group's best."""
    hi = np.maximum(w.max(axis=1), 0.0)
    lo = np.minimum(w.min(axis=1), 0.0)
    if grid.symmetric:
        base = np.maximum(np.maximum(hi / grid.qmax, -lo / -grid.qmin), MIN_SCALE)
        center = np.zeros_like(base)
    else:
        base = np.maximum((hi - lo) / (grid.qmax - grid.qmin), MIN_SCALE)
        center = np.clip(np.rint(-lo / base), grid.qmin, grid.qmax)
    best = (np.full(base.shape, np.inf, np.float32), base.copy(), center)
    for ratio in ratios:
        scale = np.maximum(base * np.float32(ratio), MIN_SCALE).astype(np.float32)
        best = _keep_better(best, w, scale, center, grid, imp)
    if not grid.symmetric and len(ratios) > 1:
        for shift in (-1, 1):
            zero = np.clip(center + shift, grid.qmin, grid.qmax)
            best = _keep_better(best, w, best[1], zero, grid, imp)
    return best[1], best[2]


def _keep_better(best, w, scale, zero, grid: Grid, imp) -> tuple:
    err = _error(w, scale, zero, grid, imp)
    better = err < best[0]
    return (
        np.where(better, err, best[0]),
        np.where(better, scale, best[1]),
        np.where(better, zero, best[2]),
    )


def _error(w, scale, zero, grid: Grid, imp) -> np.ndarray:
    s, z = scale[:, None, :], zero[:, None, :]
    diff = (np.clip(np.rint(w / s) + z, grid.qmin, grid.qmax) - z) * s - w
    diff *= diff
    if imp is not None:
        diff *= imp
    return diff.sum(axis=1)


def round_nearest(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, grid: Grid
) -> np.ndarray:
    """Levels of ``w`` for per-element ``scale`` / ``zero`` (same shape as ``w``)."""
    z = 0.0 if zero is None else zero.astype(np.float64)
    q = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64)) + z, grid.qmin, grid.qmax)
    return q.astype(grid.carrier)


def round_rows(
    rows: np.ndarray, block: int, scale: np.ndarray, zero: np.ndarray | None, grid: Grid
) -> np.ndarray:
    """:func:`round_nearest` on a rows view ``[K, M]`` with per-group ``scale`` / ``zero``
    ``[blocks, M]`` (the same numbers, without per-element copies of the parameters)."""
    k, m = rows.shape
    out = np.empty((k, m), grid.carrier)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, m, step):
        cols = slice(start, min(start + step, m))
        s = scale[:, cols].astype(np.float64)[:, None, :]
        z = 0.0 if zero is None else zero[:, cols].astype(np.float64)[:, None, :]
        w = _grouped(rows[:, cols], block).astype(np.float64)
        q = np.clip(np.rint(w / s) + z, grid.qmin, grid.qmax)
        out[:, cols] = q.reshape(-1, q.shape[2])[:k]
    return out


def dequantize_rows(
    q: np.ndarray, block: int, scale: np.ndarray, zero: np.ndarray | None
) -> np.ndarray:
    """:func:`dequantize` on a rows view (see :func:`round_rows`)."""
    k = q.shape[0]
    z = 0.0 if zero is None else zero.astype(np.float64)[:, None, :]
    grouped = (_grouped(q, block).astype(np.float64) - z) * scale.astype(np.float64)[:, None, :]
    return grouped.astype(np.float32).reshape(-1, q.shape[1])[:k]


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """Per-element ``(q - zero) * scale`` (float32)."""
    z = 0.0 if zero is None else zero.astype(np.float64)
    return ((q.astype(np.float64) - z) * scale.astype(np.float64)).astype(np.float32)
