"""Error feedback for codebook indices (GPTQ's column order, codebook snapping).

k-means fits each codebook to the weights; assigning each weight to its *nearest*
centroid then ignores that the errors of different input columns add up or cancel in
the layer's output. As GPTQ does for uniform grids (Frantar et al., 2022), the columns
of ``W`` (rows = output channels, columns = inputs) are snapped one at a time, each to
the nearest value of its row's codebook, and each column's error is pushed onto the
columns not yet snapped through the inverse of ``H = E[x x^T]``, so the layer's output
error ``||(W - Q) X||`` is minimised rather than ``||W - Q||``. The codebooks stay as
k-means made them, *unweighted*: with the feedback, importance-weighted k-means (the
diagonal of ``H``) was worse on the zoo (4-bit worst-output cosine, weighted ->
unweighted: PP-OCR cls 0.9947 -> 1.0000, rec 0.9879 -> 0.9911, det 0.9895 -> 0.9877):
centroids crowded where the loud inputs are leave the other columns, which take the
fed-forward error, on a coarse grid. Only the indices change.

When the weight's bias takes the correction (``calibration.py``), the mean part of the
output error is removed afterwards, so ``H`` is the **covariance** ``E[x x^T] - mu mu^T``
(the mean dominates real activations: spending the feedback on it would be wasted).

``H`` comes from ``passes/quantize/gptq.py``'s accumulator (Gemm/MatMul rows, sampled
Conv patches, one matrix per group, block-diagonal beyond ``MAX_COLUMNS`` inputs), fed
while the calibration statistics are streamed; with fewer than ``MIN_ROWS_PER_INPUT``
rows per input it would describe the calibration samples rather than the data, and
the nearest assignment stays. Exact zeros stay exactly zero (the
error of forcing them is fed forward like any other); a tensor whose every row is
already exact is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.codebook.kmeans import Encoded
from onnxopt.passes.quantize import gptq

DAMP = 0.01  # x the mean of H's diagonal, added to it
BLOCK = 128  # columns per lazy update
MIN_ROWS_PER_INPUT = 2  # H from fewer rows than 2x its inputs: nearest assignment


class Hessian(gptq.Hessian):
    """``gptq.Hessian`` that also sums its rows, for the centred (covariance) form."""

    def __init__(self, node: gs.Node, rng: np.random.Generator) -> None:
        super().__init__(node, rng)
        self.sums: np.ndarray | None = None  # [groups, K]

    def _rows(self, x: np.ndarray) -> np.ndarray:
        rows = super()._rows(x)
        total = rows.sum(axis=1, dtype=np.float64)
        self.sums = total if self.sums is None else self.sums + total
        return rows

    def usable(self) -> bool:
        """Enough rows for ``H`` to describe the data, not the calibration samples."""
        blocks = self.blocks(0)
        return blocks is not None and self.rows >= MIN_ROWS_PER_INPUT * max(map(len, blocks))

    def matrices(self, group: int, centred: bool) -> list[np.ndarray] | None:
        """``H`` (mean over rows) of ``group``, one matrix per column block."""
        blocks = self.blocks(group)
        if blocks is None or not self.usable():
            return None
        mean = self.sums[group] / self.rows
        spans = gptq.column_blocks(mean.size)
        out = []
        for (a, b), block in zip(spans, blocks):
            h = block.astype(np.float64) / self.rows
            if centred:
                h -= np.outer(mean[a:b], mean[a:b])
            out.append(h)
        return out


def supports(node: gs.Node, weight: gs.Constant) -> bool:
    """Whether ``weight`` is the operand ``gptq.Hessian`` describes (input 1)."""
    return len(node.inputs) > 1 and node.inputs[1] is weight and gptq.Hessian.supports(node)


def refine(encoded: Encoded, values: np.ndarray, hessian: Hessian, centred: bool) -> Encoded:
    """``encoded`` with its indices chosen by error feedback (same codebook)."""
    if encoded.exact_rows == encoded.channels:
        return encoded
    node = hessian.node
    matrices = gptq.weight_matrices(node, values, hessian.groups)
    table = _table(encoded, sum(len(m) for m in matrices))  # [out channels, K] values
    if table is None:
        return encoded
    per_group = len(table) // hessian.groups
    chosen = []
    for g, matrix in enumerate(matrices):
        blocks = hessian.matrices(g, centred)
        rows = table[g * per_group : (g + 1) * per_group]
        if blocks is None:
            return encoded
        spans = gptq.column_blocks(matrix.shape[1])
        parts = [_snap(matrix[:, a:b], h, rows) for (a, b), h in zip(spans, blocks)]
        chosen.append(np.concatenate(parts, axis=1))
    indices = gptq.from_matrices(node, chosen, values.shape).astype(np.uint8)
    return Encoded(
        np.ascontiguousarray(indices),
        encoded.codebook,
        encoded.offsets,
        encoded.channels,
        encoded.iterations,
        encoded.exact_rows,
        encoded.seconds,
        encoded.scales,
    )


def _table(encoded: Encoded, channels: int) -> np.ndarray | None:
    """Each output channel's decodable values, ``[channels, K]`` (float64), or None
    when the codebooks are not per output channel."""
    book = encoded.codebook.astype(np.float64)
    if encoded.offsets is not None:
        table = book.reshape(encoded.channels, -1)
    elif encoded.scales is not None:
        table = encoded.scales.reshape(-1, 1).astype(np.float64) * book[None, :]
    else:
        table = np.broadcast_to(book, (channels, book.size))
    return table if len(table) == channels else None


def _snap(w: np.ndarray, h: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Indices ``[out, K]`` into each row of ``table`` for ``w``, by error feedback."""
    w = w.astype(np.float64)
    h = h.copy()
    zeros = w == 0
    k = w.shape[1]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h, zeros = w[:, order], h[np.ix_(order, order)], zeros[:, order]
    h += DAMP * np.mean(np.diag(h)) * np.eye(k)
    zero_slot = np.argmin(np.abs(table), axis=1)
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        upper = np.eye(k)  # no usable H: nearest assignment
    chosen = np.zeros(w.shape, np.int64)
    rows = np.arange(len(w))
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            column = block[:, i]
            index = np.argmin(np.abs(column[:, None] - table), axis=1)
            index = np.where(zeros[:, start + i], zero_slot, index)
            error = (column - table[rows, index]) / upper[start + i, start + i]
            block[:, i:] -= np.outer(error, upper[start + i, start + i : end])
            errors[:, i] = error
            chosen[:, start + i] = index
        w[:, end:] -= errors @ upper[start:end, end:]
    return chosen[:, np.argsort(order)]
