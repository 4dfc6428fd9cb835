"""Data-aware weight rounding (``rounding=gptq``): GPTQ / OBQ error feedback.

Rounding each weight to the nearest int8 level ignores that errors in different
input columns cancel or add up depending on the data. GPTQ (Frantar et al., 2022)
quantizes the columns of ``W`` (rows = output channels, columns = inputs) one at a
time and pushes each column's rounding error onto the columns not yet quantized,
weighted by the inverse of ``H = sum x x^T`` over calibration inputs, so the layer's
*output* error ``||(W - Q) X||`` is minimised rather than ``||W - Q||``. Scales stay
the per-channel symmetric int8 scales; only the integer values change.

``H`` is accumulated while calibrating (:class:`Hessian`, one fixed-size ``K x K``
matrix per node and per group — memory does not grow with the sample count):

- Gemm: the rows of A (columns when ``transA=1``); MatMul: A reshaped to ``[-1, K]``.
- Conv (1-D and 2-D): im2col patches, at most ``POSITIONS_PER_SAMPLE`` output
  positions per sample drawn with the pass's seeded RNG; one ``H`` per group, so
  depthwise convolutions get one small matrix per channel.

Dead inputs (``H[i, i] = 0``) are zeroed; ``H`` is damped by ``DAMP`` times its mean
diagonal; columns go in order of decreasing ``H[i, i]`` ("act-order") in blocks of
``BLOCK`` columns with lazy updates. Layers wider than ``MAX_COLUMNS`` inputs are
split into independent column blocks (a block-diagonal ``H``): the cost stays
``O(K * MAX_COLUMNS^2)`` instead of ``O(K^3)``, and only those diagonal blocks of
``H`` are accumulated. Rows are buffered (at most ``FLUSH_ROWS`` rows or
``FLUSH_ELEMENTS`` floats per node) before being folded into ``H``: bounded memory,
BLAS-sized products. Other layouts (3-D Conv, ConvTranspose, batched
MatMul weights) use nearest rounding.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

POSITIONS_PER_SAMPLE = 64
DAMP = 0.01
BLOCK = 128
FLUSH_ROWS = 2048  # rows buffered before they are folded into H...
FLUSH_ELEMENTS = 1 << 20  # ...or this many floats (4 MB, all groups) per node, whichever first
MAX_COLUMNS = 576  # wider layers: GPTQ on independent column blocks of at most this size


def column_blocks(k: int) -> list[tuple[int, int]]:
    """The independent column ranges GPTQ works on (one when ``k <= MAX_COLUMNS``)."""
    pieces = -(-k // MAX_COLUMNS)
    edges = np.linspace(0, k, pieces + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class Hessian:
    """The diagonal blocks of ``sum x x^T`` over the calibration inputs of one node.

    Only the blocks GPTQ uses are kept (see ``column_blocks``): memory per node is
    ``groups * K * min(K, MAX_COLUMNS)`` floats whatever the number of samples.
    """

    def __init__(self, node: gs.Node, rng: np.random.Generator) -> None:
        self.node = node
        self.op = node.op
        self.rng = rng
        self.groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        self._blocks: list[np.ndarray] | None = None  # per column block: [groups, b, b]
        self._pending: list[np.ndarray] = []  # rows not yet folded in (bounded)
        self._pending_rows = 0
        self.rows = 0

    @staticmethod
    def supports(node: gs.Node) -> bool:
        if node.op in ("Gemm", "MatMul"):
            weight = node.inputs[1]
            return isinstance(weight, gs.Constant) and weight.values.ndim == 2
        if node.op == "Conv":
            weight = node.inputs[1]
            return isinstance(weight, gs.Constant) and weight.values.ndim in (3, 4)
        return False

    def update(self, x: np.ndarray) -> None:
        rows = self._rows(np.asarray(x, np.float32))  # [groups, n, K], owned, contiguous
        self._pending.append(rows)
        self._pending_rows += rows.shape[1]
        self.rows += rows.shape[1]
        # the element bound counts every group: a depthwise Conv's rows are [C, n, K],
        # and without it 200 channels buffered 39 MB per node (PP-OCR cls: 350 MB peak)
        pending = self._pending_rows * rows.shape[2] * rows.shape[0]
        if self._pending_rows >= FLUSH_ROWS or pending >= FLUSH_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        # one big product instead of a rank-n update per sample: a K x K update is
        # memory-bound, so few large ones are much faster
        if not self._pending:
            return
        rows = np.concatenate(self._pending, axis=1)
        self._pending, self._pending_rows = [], 0
        spans = column_blocks(rows.shape[2])
        products = []
        for a, b in spans:
            part = np.ascontiguousarray(rows[:, :, a:b])
            products.append(np.matmul(part.transpose(0, 2, 1), part))
        if self._blocks is None:
            self._blocks = products
        else:
            for total, product in zip(self._blocks, products):
                total += product

    def release(self) -> None:
        """Forget the accumulated ``H`` (``rows`` stays: how many rows it summed)."""
        self._blocks, self._pending, self._pending_rows = None, [], 0

    def blocks(self, group: int) -> list[np.ndarray] | None:
        """``H`` of ``group``, one matrix per column block (None before any update)."""
        self._flush()
        if self._blocks is None:
            return None
        return [block[group] for block in self._blocks]

    def _rows(self, x: np.ndarray) -> np.ndarray:
        # a copy: the caller's activation array is not ours to keep
        if self.op == "Gemm":
            a = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
            return np.array((a.T if int(self.node.attrs.get("transA", 0)) else a)[None])
        if self.op == "MatMul":
            return np.array(x.reshape(-1, x.shape[-1])[None])
        return self._patches(x)

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """im2col rows ``[groups, n * P, per_group * kh * kw]`` at ``P`` seeded output
        positions, gathered straight from ``x`` (padding read as zeros, never built)."""
        weight = self.node.inputs[1].values
        one_d = weight.ndim == 3
        if one_d:
            x, weight = x[:, :, None, :], weight[:, :, None, :]
        kh, kw = weight.shape[2:]
        attrs = self.node.attrs
        strides = list(attrs.get("strides", [1] * (2 - one_d)))
        dilations = list(attrs.get("dilations", [1] * (2 - one_d)))
        pads = _pads(attrs, x.shape[2:], (kh, kw), strides, dilations, one_d)
        if one_d:
            strides, dilations = [1, *strides], [1, *dilations]
        n, c, height, width = x.shape
        span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
        oh = (height + pads[0] + pads[2] - span_h) // strides[0] + 1
        ow = (width + pads[1] + pads[3] - span_w) // strides[1] + 1
        count = oh * ow
        chosen = np.arange(count)
        if count > POSITIONS_PER_SAMPLE:
            chosen = np.sort(self.rng.choice(count, POSITIONS_PER_SAMPLE, replace=False))
        ys, xs = np.divmod(chosen, ow)
        rows = ys[:, None] * strides[0] - pads[0] + np.arange(kh) * dilations[0]  # [P, kh]
        cols = xs[:, None] * strides[1] - pads[1] + np.arange(kw) * dilations[1]  # [P, kw]
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[
            :, None, :
        ]
        rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
        moved = np.moveaxis(x, 1, -1)  # [n, H, W, c]: the gather below lands channel-last
        patches = moved[:, rows[:, :, None], cols[:, None, :]]  # [n, P, kh, kw, c]
        if not inside.all():
            patches[:, ~inside] = 0.0
        per_group = c // self.groups
        patches = patches.reshape(n, len(chosen), kh * kw, self.groups, per_group)
        # [groups, n, P, per_group, kh * kw]: the weight's (in-channel, kernel) order
        grouped = patches.transpose(3, 0, 1, 4, 2)
        return np.ascontiguousarray(grouped).reshape(self.groups, -1, per_group * kh * kw)


def _pads(attrs, spatial, kernel, strides, dilations, one_d: bool) -> list[int]:
    """[top, left, bottom, right] for 2-D (1-D lifted with zero top/bottom)."""
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        dims = spatial[1:] if one_d else spatial
        ks = kernel[1:] if one_d else kernel
        begin, end = [], []
        for size, k, s, d in zip(dims, ks, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(total - small if auto == "SAME_LOWER" else small)
            end.append(total - begin[-1])
        pads = [*begin, *end]
    else:
        pads = list(attrs.get("pads", [0] * (2 if one_d else 4)))
    if one_d:
        return [0, pads[0], 0, pads[1]]
    return pads


# ---------------------------------------------------------------------------- rounding


def weight_matrices(node: gs.Node, weight: np.ndarray, groups: int) -> list[np.ndarray]:
    """Per group ``[out, K]`` matrices whose rows are output channels (float64)."""
    w = weight.astype(np.float64)
    if node.op == "Conv":
        per_group = w.shape[0] // groups
        return [
            w[g * per_group : (g + 1) * per_group].reshape(per_group, -1) for g in range(groups)
        ]
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return [w]
    return [w.T]


def from_matrices(node: gs.Node, matrices: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if node.op == "Conv":
        return np.concatenate(matrices, axis=0).reshape(shape)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return matrices[0]
    return matrices[0].T


def gptq_quantize(
    node: gs.Node, weight: np.ndarray, hessian: Hessian, scale: np.ndarray, levels: int = 127
) -> np.ndarray:
    """int8 weight (same layout as ``weight``) rounded with GPTQ for the given scales,
    within ``[-levels, levels]``."""
    matrices = weight_matrices(node, weight, hessian.groups)
    per_group = len(scale) // hessian.groups
    spans = column_blocks(matrices[0].shape[1])
    items = []
    for g, matrix in enumerate(matrices):
        s = scale[g * per_group : (g + 1) * per_group]
        for (a, b), h in zip(spans, hessian.blocks(g)):
            items.append((matrix[:, a:b], h, s, None))
    pieces = round_many(items, -levels, levels)
    result = [np.concatenate(pieces[g * len(spans) : (g + 1) * len(spans)], axis=1)
              for g in range(len(matrices))]  # fmt: skip
    return from_matrices(node, result, weight.shape).astype(np.int8)


def round_many(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
    qmin: int,
    qmax: int,
) -> list[np.ndarray]:
    """:func:`_gptq` of each ``(w, h, scale, zero)``, the same numbers, but items of one
    shape go through the column sweep together (a depthwise convolution is hundreds of
    9-column problems: one Python loop over 9 columns instead of hundreds)."""
    out: list[np.ndarray | None] = [None] * len(items)
    batches: dict[tuple, list[int]] = {}
    for i, (w, _, scale, zero) in enumerate(items):
        key = (w.shape, np.shape(scale), None if zero is None else np.shape(zero))
        batches.setdefault(key, []).append(i)
    for members in batches.values():
        if len(members) == 1:
            i = members[0]
            out[i] = _gptq(*items[i][:3], qmin, qmax, items[i][3])
            continue
        batch = [items[i] for i in members]
        try:
            results = _gptq_batch(batch, qmin, qmax)
        except np.linalg.LinAlgError:  # one Hessian is not positive definite
            results = [_gptq(w, h, s, qmin, qmax, z) for w, h, s, z in batch]
        for i, q in zip(members, results):
            out[i] = q
    return out  # type: ignore[return-value]


def _prepared(w, h, scale, zero) -> tuple[np.ndarray, ...]:
    """One problem made ready for the sweep: dead inputs zeroed, act-order, damping.
    Returns ``w, h, s, z`` (permuted, float32) and the inverse permutation."""
    w = w.astype(np.float32)
    h = h.astype(np.float32)
    k = w.shape[1]
    s = np.broadcast_to(scale.astype(np.float32).reshape(len(w), -1), w.shape)
    z = (
        np.zeros_like(w)
        if zero is None
        else np.broadcast_to(zero.astype(np.float32).reshape(len(w), -1), w.shape)
    )
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h, s, z = w[:, order], h[np.ix_(order, order)], s[:, order], z[:, order]
    h += np.float32(DAMP * np.mean(np.diag(h))) * np.eye(k, dtype=np.float32)
    return w, h, s, z, np.argsort(order)


def _gptq(
    w: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray,
    qmin: int = -127,
    qmax: int = 127,
    zero: np.ndarray | None = None,
) -> np.ndarray:
    """Integer matrix ``[out, K]`` for one group (see the module docstring).

    ``scale`` is per row (``[out]``) or per element (``[out, K]``, blocked scales);
    ``zero`` (same shapes) is the zero point of asymmetric grids.
    """
    w, h, s, z, restore = _prepared(w, h, scale, zero)
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        log.debug("GPTQ: Hessian not positive definite; nearest rounding")
        return np.clip(np.rint(w / s) + z, qmin, qmax)[:, restore]
    return _sweep(w[None], upper[None], s[None], z[None], qmin, qmax)[0][:, restore]


def _gptq_batch(batch: list[tuple], qmin: int, qmax: int) -> list[np.ndarray]:
    """:func:`_gptq` of problems of one shape, stacked (raises LinAlgError if one fails)."""
    prepared = [_prepared(*item) for item in batch]
    w, h, s, z = (np.stack([p[i] for p in prepared]) for i in range(4))
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    q = _sweep(w, upper, s, z, qmin, qmax)
    return [q[g][:, p[4]] for g, p in enumerate(prepared)]


def _sweep(w, upper, s, z, qmin: int, qmax: int) -> np.ndarray:
    """The column sweep over stacked problems ``w [G, out, K]`` (``upper [G, K, K]``):
    quantize a column, spread its error over the later columns of its block, and the
    block's errors over the columns after the block in one product (lazy batch)."""
    k = w.shape[2]
    q = np.zeros_like(w)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, :, start:end].copy()
        errors = np.zeros_like(block)
        hinv = upper[:, start:end, start:end]
        for i in range(end - start):
            column, col_s, col_z = block[:, :, i], s[:, :, start + i], z[:, :, start + i]
            levels = np.clip(np.rint(column / col_s) + col_z, qmin, qmax)
            q[:, :, start + i] = levels
            error = (column - (levels - col_z) * col_s) / hinv[:, i, i, None]
            block[:, :, i:] -= error[:, :, None] * hinv[:, None, i, i:]
            errors[:, :, i] = error
        w[:, :, end:] -= errors @ upper[:, start:end, end:]
    return q
