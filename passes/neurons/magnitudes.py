"""Weight magnitudes per channel, for importance: sum |w| (``"l1"``) or sum w^2
(``"l2"``) over the weights that disappear with one input or output channel."""

from __future__ import annotations

import numpy as np


def _reduce(matrix: np.ndarray, norm: str, axes: tuple[int, ...]) -> np.ndarray:
    if norm == "l1":
        return np.abs(matrix).sum(axis=axes, dtype=np.float64)
    return np.square(matrix, dtype=np.float64).sum(axis=axes)


def rows(weight: np.ndarray, axis: int, norm: str) -> np.ndarray:
    """One value per index of ``axis`` (all other axes summed)."""
    moved = np.moveaxis(weight, axis, 0)
    return _reduce(moved.reshape(moved.shape[0], -1), norm, (1,))


def conv_inputs(weight: np.ndarray, group: int, norm: str) -> np.ndarray:
    """Per input channel of a (grouped) Conv with weight ``[C_out, C_in/group, k...]``."""
    out_channels, per_group = weight.shape[:2]
    grouped = weight.reshape(group, out_channels // group, per_group, -1)
    return _reduce(grouped, norm, (1, 3)).ravel()


def conv_transpose_outputs(weight: np.ndarray, group: int, norm: str) -> np.ndarray:
    """Per output channel of a ConvTranspose with weight ``[C_in, C_out/group, k...]``."""
    in_channels, per_group = weight.shape[:2]
    grouped = weight.reshape(group, in_channels // group, per_group, -1)
    return _reduce(grouped, norm, (1, 3)).ravel()


def batchnorm_scale(node, norm: str) -> np.ndarray:
    """|gamma / sqrt(var + eps)| per channel (squared for ``"l2"``)."""
    gamma, var = node.inputs[1].values.astype(np.float64), node.inputs[4].values.astype(np.float64)
    scale = np.abs(gamma / np.sqrt(np.maximum(var, 0) + float(node.attrs.get("epsilon", 1e-5))))
    return scale if norm == "l1" else scale**2
