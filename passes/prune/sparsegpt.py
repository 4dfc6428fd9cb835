"""Reconstruction: the SparseGPT sweep (pure numpy, batched over groups of rows).

Problem, per output row ``w`` of a layer whose calibration input rows are ``X``::

    min (w' - w)ᵀ Hd (w' - w)    over w' with the pruned entries at 0,
    Hd = XᵀX + λI,  λ = mean(diag XᵀX) * max(DAMPING, SHRINK * K / rows)

i.e. the layer's output error ``||X (w' - w)||²`` plus a ridge towards the old weights.
Every row shares one matrix ``Hd``.

The sweep (Frantar & Alistarh, SparseGPT, 2023) factors ``Hd⁻¹ = UᵀU`` once (``U``
upper triangular) and walks the columns in order. Zeroing column ``i`` of a row costs
``w_i² / U_ii²`` of output error (the OBS saliency), and the optimal compensation of
the columns not yet visited is ``-(w_i / U_ii) U[i, i:]``: one rank-1 update for all
rows at once. Columns go in blocks of ``BLOCK``; inside a block updates are applied
immediately, to later blocks once per block (one matrix product). The mask is chosen
inside the sweep, with the weights already compensated for earlier columns:

- unstructured: at the start of each block, per row, the lowest saliencies of the
  block, so that each row ends with its share of ``count`` zeros spread evenly over
  the blocks. Per row, not across rows (as SparseGPT does): rows are output channels,
  and a BatchNorm or a scale after the layer weighs their errors differently —
  comparing raw errors across rows cost 3.7 dB of output SQNR on PP-OCR cls (the
  reason Wanda compares per output too);
- N:M: at the first column of each group of M, per row, the ``M - N`` lowest
  saliencies of those M columns (a partial last group of r columns zeroes ``r - N``);
- fixed: a given mask (Wanda, magnitude, threshold, global scope).

Zeros the weight already had are always part of the mask. Cost: one Cholesky and one
triangular inverse (``O(K^3)``, BLAS-3) plus ``O(rows * K^2)`` for the sweep, instead
of ``O(rows * kept^3)`` for a least-squares solve per row.

The sweep is greedy: a kept column is final once visited, so later zeros cannot move
it. With a fixed mask it is exact (it equals the per-row least-squares solution) when
every row's zeros come before its kept columns; otherwise :func:`polish` finishes the
job: conjugate gradients on the kept weights of all rows at once (one ``[R, K] @ Hd``
product per iteration, Jacobi preconditioned), started from the sweep's result, for at
most ``POLISH_ITERATIONS`` and ``POLISH_FLOPS`` (an 8192 x 8192 layer keeps the sweep's
values). Layers wider than ``WIDE_COLUMNS`` work in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxopt.passes.prune.selection import lowest_per_row, spread

# 10 % of the mean diagonal, not SparseGPT's 1 %: the refit is a ridge regression on 64
# calibration samples, and more damping generalises better to inputs it never saw
# (50 %, evaluation inputs: PP-OCRv4 det 4.0 -> 7.5 dB, Silero VAD 25.0 -> 28.2, PP-OCR
# cls 16.9 -> 17.9, MiniLM 7.5 -> 8.3, rec 13.6 -> 13.3 with string agreement 0.81 ->
# 0.84; digits CNN 99.07 -> 99.26 %; docs/passes/prune.md).
DAMPING = 0.1
SHRINK = 0.0
BLOCK = 128
INVERSE_BASE = 256  # triangular inverse: recursion down to this size, then numpy's inv
POLISH_TOLERANCE = 1e-6  # relative residual of every row
POLISH_ITERATIONS = 25
POLISH_FLOPS = 5e10  # per layer: fewer iterations (none) where one costs more
TRAILING_ELEMENTS = 1 << 22  # temporaries of the per-block update of the later columns
WIDE_COLUMNS = 4096  # wider layers work in float32 (as SparseGPT does): half the memory


@dataclass
class Rule:
    """Which entries a sweep zeroes: ``count`` (unstructured), ``pattern`` ``(N, M)`` or a
    ``fixed`` mask; ``forced`` marks zeros that must stay (``[G, R, K]`` booleans)."""

    count: int | None = None
    pattern: tuple[int, int] | None = None
    fixed: np.ndarray | None = None
    forced: np.ndarray | None = None


def damping(hessian: np.ndarray, rows: int | None = None) -> np.ndarray:
    """``λ`` per group (``[G]``): the mean diagonal times ``DAMPING``, or times
    ``SHRINK * K / rows`` when that is larger — few input rows for many columns (an SE
    block's pooled vector: one row per sample) give a Hessian whose small eigenvalues
    are noise; shrinking towards the mean diagonal, as a covariance estimate from
    ``rows`` samples should be, keeps the refit from fitting that noise."""
    scale = DAMPING
    if rows:
        scale = max(DAMPING, SHRINK * hessian.shape[-1] / rows)
    return scale * np.mean(np.diagonal(hessian, axis1=-2, axis2=-1), axis=-1)


def damped(hessian: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(H + λI, λ)``; a group whose inputs were all zero gets ``H = I`` (then the
    saliency is plain magnitude and nothing is compensated)."""
    lam = damping(hessian, rows)
    out = np.array(hessian, dtype=np.float64, copy=True)
    k = out.shape[-1]
    dead = lam <= 0
    out[dead] = np.eye(k)
    lam = np.where(dead, 1.0, lam)
    index = np.arange(k)
    out[:, index, index] += np.where(dead, 0.0, lam)[:, None]
    return out, lam


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of lower-triangular matrices ``[G, K, K]`` by recursive 2x2 blocks:
    ``inv([[A, 0], [B, C]]) = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]`` — matrix products only,
    about ``K^3 / 3`` flops."""
    k = lower.shape[-1]
    if k <= INVERSE_BASE:
        return np.tril(np.linalg.inv(lower))
    half = k // 2
    a_inv = lower_inverse(lower[:, :half, :half])
    c_inv = lower_inverse(lower[:, half:, half:])
    out = np.zeros_like(lower)
    out[:, :half, :half] = a_inv
    out[:, half:, half:] = c_inv
    out[:, half:, :half] = -c_inv @ (lower[:, half:, :half] @ a_inv)
    return out


def inverse_cholesky(hd: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``UᵀU = Hd⁻¹`` (what SparseGPT gets from
    ``cholesky(inverse(Hd), upper=True)``), from one Cholesky of ``Hd`` with rows and
    columns reversed: if ``P Hd P = L Lᵀ`` then ``U = P L⁻¹ P``. Raises
    ``np.linalg.LinAlgError`` when ``Hd`` is not positive definite."""
    # temporaries released as soon as they are used: the flipped copy, then the factor
    # (PP-OCRv4 rec's K=2880 layer held five K x K float64 arrays at once)
    lower = np.linalg.cholesky(np.ascontiguousarray(hd[:, ::-1, ::-1]))
    inverse = lower_inverse(lower)
    del lower
    return np.ascontiguousarray(inverse[:, ::-1, ::-1])


def dense_target(
    weights: np.ndarray, upper: np.ndarray, cross: np.ndarray, lam: np.ndarray
) -> np.ndarray:
    """``w* = Hd⁻¹ (C w + λ w)`` for every row (``[G, R, K]``): the dense weights that
    best reproduce the unpruned outputs ``X0 w`` from the inputs ``X`` (``C = XᵀX0``).
    ``(w' - w)ᵀ Hd (w' - w)`` around ``w*`` is then ``||X w' - X0 w||² + λ||w' - w||²``
    up to a constant."""
    rhs = weights @ np.swapaxes(cross, -1, -2) + lam[:, None, None] * weights
    return (rhs @ np.swapaxes(upper, -1, -2)) @ upper


def sweep(weights: np.ndarray, upper: np.ndarray, rule: Rule, block: int = BLOCK) -> np.ndarray:
    """Zero the entries ``rule`` picks in ``weights`` (``[G, R, K]`` float64, edited in
    place) and compensate the rest; returns the mask of zeroed entries."""
    k = weights.shape[-1]
    if rule.pattern is not None:
        block = max(1, block // rule.pattern[1]) * rule.pattern[1]
    mask = np.zeros(weights.shape, dtype=bool)
    diag = np.diagonal(upper, axis1=-2, axis2=-1)  # [G, K]
    if rule.count is not None:
        row_counts = spread(rule.count, weights.shape[0] * weights.shape[1])
        row_counts = row_counts.reshape(weights.shape[:2])
        row_zeroed = np.zeros(weights.shape[:2], dtype=np.int64)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1 = weights[:, :, start:end].copy()
        m1 = mask[:, :, start:end]
        d1 = diag[:, None, start:end]
        if rule.fixed is not None:
            m1[...] = rule.fixed[:, :, start:end]
        elif rule.count is not None:
            quotas = np.rint(row_counts * (end / k)).astype(np.int64) - row_zeroed
            m1[...] = _block_mask(w1, d1, quotas, _part(rule.forced, start, end))
            row_zeroed += np.count_nonzero(m1, axis=-1)
        errors = np.zeros_like(w1)
        u1 = upper[:, start:end, start:end]
        for i in range(end - start):
            if rule.pattern is not None and i % rule.pattern[1] == 0:
                _pattern_mask(w1, d1, m1, i, rule.pattern, _part(rule.forced, start, end))
            column = w1[:, :, i]
            error = np.where(m1[:, :, i], column, 0.0) / d1[:, :, i]
            w1[:, :, i:] -= error[:, :, None] * u1[:, None, i, i:]
            errors[:, :, i] = error
            w1[:, :, i] = np.where(m1[:, :, i], 0.0, w1[:, :, i])
        weights[:, :, start:end] = w1
        if end < k:  # the later columns, a block of rows at a time (bounded temporaries)
            step = max(1, TRAILING_ELEMENTS // (k - end))
            for r in range(0, weights.shape[1], step):
                weights[:, r : r + step, end:] -= (
                    errors[:, r : r + step] @ upper[:, start:end, end:]
                )
    return mask


def _part(forced: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    return None if forced is None else forced[:, :, start:end]


def _block_mask(w1, d1, quotas: np.ndarray, forced: np.ndarray | None) -> np.ndarray:
    """Per row, the ``quotas[g, r]`` lowest saliencies of the block; forced zeros first."""
    scores = (w1 / d1) ** 2
    if forced is not None:
        quotas = np.maximum(quotas, np.count_nonzero(forced, axis=-1))
        scores = np.where(forced, -1.0, scores)
    flat = scores.reshape(-1, scores.shape[-1])
    counts = np.maximum(quotas, 0).reshape(-1)
    return lowest_per_row(flat, counts).reshape(scores.shape)


def _pattern_mask(w1, d1, m1, i: int, pattern: tuple[int, int], forced) -> None:
    """Per row, the ``M - N`` lowest saliencies of columns ``i .. i+M`` (fewer in a
    partial last group, which counts its missing columns as zeros)."""
    keep, group = pattern
    end = min(i + group, w1.shape[-1])
    width = end - i
    needed = width - keep
    if needed <= 0:
        return
    scores = (w1[:, :, i:end] / d1[:, :, i:end]) ** 2
    chosen = np.zeros(scores.shape, dtype=bool)
    order = np.argsort(scores, axis=-1, kind="stable")[..., :needed]
    np.put_along_axis(chosen, order, True, axis=-1)
    if forced is not None:
        chosen |= forced[:, :, i:end]
    m1[:, :, i:end] = chosen


def polish(
    weights: np.ndarray,
    target: np.ndarray,
    hd: np.ndarray,
    mask: np.ndarray,
    *,
    tolerance: float = POLISH_TOLERANCE,
    iterations: int | None = None,
) -> int:
    """Move the kept entries of ``weights`` (in place) to ``argmin (w' - w*)ᵀ Hd (w' - w*)``
    with the ``mask`` entries held at zero, every row at once, by preconditioned
    conjugate gradients; returns the iterations used."""
    iterations = POLISH_ITERATIONS if iterations is None else iterations
    keep = ~mask
    diag = np.diagonal(hd, axis1=-2, axis2=-1)[:, None, :]  # [G, 1, K]
    residual = np.where(keep, (target - weights) @ hd, 0.0)  # -gradient / 2
    scale = np.linalg.norm(np.where(keep, target @ hd, 0.0), axis=-1) + 1e-300
    z = residual / diag
    direction = z.copy()
    rz = np.sum(residual * z, axis=-1)
    for used in range(iterations):
        if np.all(np.linalg.norm(residual, axis=-1) <= tolerance * scale):
            return used
        product = np.where(keep, direction @ hd, 0.0)
        curvature = np.sum(direction * product, axis=-1)
        alpha = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0)
        weights += alpha[..., None] * direction
        residual -= alpha[..., None] * product
        z = residual / diag
        rz_next = np.sum(residual * z, axis=-1)
        beta = np.divide(rz_next, rz, out=np.zeros_like(rz), where=rz > 0)
        direction = z + beta[..., None] * direction
        rz = rz_next
    return iterations


def working_dtype(fan_in: int) -> np.dtype:
    """float64, or float32 for layers wider than ``WIDE_COLUMNS`` (an 8192-wide layer's
    ``Hd``, ``U``, weights and refit are 4 x 512 MiB in float64)."""
    return np.dtype(np.float32 if fan_in > WIDE_COLUMNS else np.float64)


def polish_iterations(rows: int, fan_in: int) -> int:
    """``POLISH_ITERATIONS``, fewer when they would pass ``POLISH_FLOPS`` (an iteration
    is one ``[rows, K] @ [K, K]`` product): 0 for an 8192 x 8192 layer."""
    per_iteration = 2.0 * rows * fan_in * fan_in
    return int(min(POLISH_ITERATIONS, POLISH_FLOPS // max(per_iteration, 1.0)))


def output_error(weights: np.ndarray, target: np.ndarray | None, hd: np.ndarray) -> np.ndarray:
    """``(w - w*)ᵀ Hd (w - w*)`` summed over the rows of each group (``[G]``, float64),
    a block of rows at a time; ``target=None``: ``wᵀ Hd w``."""
    total = np.zeros(weights.shape[0])
    step = max(1, TRAILING_ELEMENTS // weights.shape[-1])
    for r in range(0, weights.shape[1], step):
        delta = weights[:, r : r + step]
        if target is not None:
            delta = delta - target[:, r : r + step]
        total += np.sum((delta @ hd) * delta, axis=(-2, -1), dtype=np.float64)
    return total
