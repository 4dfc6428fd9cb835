"""Error statistics of an encoding, as reported per tensor by ``share-weights``."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxopt.passes.codebook.kmeans import Encoded, iter_chunks


def stats(values: np.ndarray, shared: np.ndarray, encoded: Encoded) -> dict[str, Any]:
    error, power = error_and_power(values, shared)
    zeros = int(np.count_nonzero(values == 0))
    return {
        "codebooks": encoded.channels,
        "codebook_size": int(encoded.codebook.size),
        "mse": error,
        "sqnr_db": sqnr(values, shared, (error, power)),
        "zeros": zeros,
        "zeros_kept": bool(np.all(shared[values == 0] == 0)),
        "iterations": encoded.iterations,
        "exact_codebooks": encoded.exact_rows,
        "kmeans_seconds": round(encoded.seconds, 4),
    }


def error_and_power(values: np.ndarray, shared: np.ndarray) -> tuple[float, float]:
    """Mean squared error and mean power in float64, a chunk at a time."""
    exact, approx = values.reshape(1, -1), shared.reshape(1, -1)
    error = power = 0.0
    for _, start, part in iter_chunks(exact):
        wide = part.astype(np.float64)
        diff = approx[0, start : start + part.size].astype(np.float64) - wide
        error += float(np.dot(diff, diff))
        power += float(np.dot(wide, wide))
    count = max(values.size, 1)
    return error / count, power / count


def sqnr(
    values: np.ndarray, shared: np.ndarray, measured: tuple[float, float] | None = None
) -> float:
    error, power = measured if measured is not None else error_and_power(values, shared)
    if error == 0:
        return float("inf")
    return float(10 * np.log10(power / error)) if power else 0.0


def row_error(
    values: np.ndarray, encoded: Encoded, axis: int, importance: np.ndarray | None = None
) -> float:
    """Mean over the rows along ``axis`` of each row's relative squared error (weighted
    by the elements' importances when given): what a codebook does to the rows that
    matter less to it (BatchNorm-folded channels of small scale, rare table rows) shows
    here, not in the tensor's SQNR."""

    def rows(array: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(np.broadcast_to(array, values.shape), axis, 0)
        return moved.reshape(values.shape[axis], -1).astype(np.float64)

    exact, rebuilt = rows(values), rows(encoded.reconstruct())
    weights = rows(importance) if importance is not None else 1.0
    error = np.sum(weights * (rebuilt - exact) ** 2, axis=1)
    power = np.maximum(np.sum(weights * exact**2, axis=1), 1e-30)
    return float(np.mean(error / power))
