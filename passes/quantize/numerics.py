"""Quantization arithmetic: activation parameters, per-channel weights, int32 biases,
blocked 4-bit weights. Pure numpy, no graph; every function returns new arrays.

Conventions (the ONNX QuantizeLinear / DequantizeLinear ones):
``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``.

- Activations, ``uint8`` (default): asymmetric over the calibrated ``[lo, hi]``,
  widened to contain 0 so that zero (padding, Relu) is exact; ``zero_point`` in
  ``[0, 255]``. ``int8``: symmetric, ``zero_point = 0``, ``scale = max|x| / 127``.
- Weights: symmetric int8 per output channel in ``[-levels, levels]``, ``zero_point
  = 0``. ``levels`` is 127 (a symmetric 8-bit grid) or 63 (``WEIGHT_LEVELS[7]``): on x86
  CPUs without VNNI, onnxruntime's u8 x s8 kernels add adjacent products into a
  saturating int16, and ``255 * (|w1| + |w2|)`` stays below 32767 only when
  ``|w| <= 64``.
- Biases: int32, ``scale = input_scale * weight_scale[c]``, ``zero_point = 0``; a
  channel whose bias would overflow int32 gets a larger weight scale instead.
- 4-bit weights: blocks of ``block_size`` consecutive elements along the reduction
  axis share one scale (and, asymmetric, one zero point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ActivationType = Literal["uint8", "int8"]
INT32_LIMIT = 2**31 - 1
MIN_SCALE = 1e-12  # a constant-zero tensor still needs a positive scale
WEIGHT_LEVELS = {7: 63, 8: 127}  # weight_bits -> largest |q|


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor (scalars, or 1-D per channel along ``axis``)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # uint8 / int8 / int32 / int4 carrier
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0


def activation_params(lo: float, hi: float, dtype: ActivationType = "uint8") -> QuantParams:
    """Per-tensor parameters covering ``[lo, hi]`` (always widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "int8":
        bound = max(-lo, hi)
        scale = max(bound / 127.0, MIN_SCALE)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    scale = max((hi - lo) / 255.0, MIN_SCALE)
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def fake_quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(x))`` for per-tensor parameters."""
    info = np.iinfo(params.zero_point.dtype)
    scale = params.scale.astype(np.float64)
    zero = params.zero_point.astype(np.float64)
    q = np.clip(np.rint(x / scale) + zero, info.min, info.max)
    return ((q - zero) * scale).astype(np.float32)


def weight_params(
    weight: np.ndarray, axis: int, clip_ratio: np.ndarray | None = None, levels: int = 127
) -> QuantParams:
    """Symmetric int8 per-channel parameters along ``axis`` (``scale = max|w| / levels``).

    ``clip_ratio`` (one value in (0, 1] per channel) shrinks the range below max|w|.
    """
    w = np.abs(weight.astype(np.float64))
    axis = axis % w.ndim
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    bound = np.max(w, axis=reduce_axes) if reduce_axes else w
    if clip_ratio is not None:
        bound = bound * clip_ratio
    scale = np.maximum(bound / float(levels), MIN_SCALE).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(
    weight: np.ndarray, axis: int, clip_ratio: np.ndarray | None = None
) -> tuple[np.ndarray, QuantParams]:
    """Symmetric int8 per channel along ``axis``, nearest rounding: ``(values, params)``."""
    params = weight_params(weight, axis, clip_ratio)
    return _quantize_with_scale(weight.astype(np.float64), axis % weight.ndim, params.scale)


def _quantize_with_scale(
    w: np.ndarray, axis: int, scale: np.ndarray, levels: int = 127
) -> tuple[np.ndarray, QuantParams]:
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.rint(w / scale.astype(np.float64).reshape(shape))
    q = np.clip(q, -levels, levels).astype(np.int8)
    params = QuantParams(scale, np.zeros(scale.shape, np.int8), axis)
    return q, params


def mse_weight_clip(weight: np.ndarray, axis: int, grid: int = 20, levels: int = 127) -> np.ndarray:
    """Per-channel clip ratio in [0.5, 1] minimising the weight's quantization MSE."""
    w = np.moveaxis(weight.astype(np.float64), axis % weight.ndim, 0).reshape(
        weight.shape[axis], -1
    )
    bound = np.maximum(np.max(np.abs(w), axis=1), MIN_SCALE)
    best_err = np.full(w.shape[0], np.inf)
    best = np.ones(w.shape[0])
    for ratio in np.linspace(1.0, 0.5, grid + 1):
        scale = (bound * ratio / levels)[:, None]
        err = np.sum((np.clip(np.rint(w / scale), -levels, levels) * scale - w) ** 2, axis=1)
        better = err < best_err
        best_err[better], best[better] = err[better], ratio
    return best


def dequantize_weight(q: np.ndarray, params: QuantParams) -> np.ndarray:
    shape = [1] * q.ndim
    if params.axis is not None:
        shape[params.axis] = -1
    scale = params.scale.astype(np.float64).reshape(shape)
    zero = params.zero_point.astype(np.float64).reshape(shape)
    return ((q.astype(np.float64) - zero) * scale).astype(np.float32)


def quantize_bias(
    bias: np.ndarray, input_scale: float, weight_params: QuantParams
) -> tuple[np.ndarray, QuantParams, np.ndarray]:
    """int32 bias with ``scale = input_scale * weight_scale``.

    Returns ``(int32 values, bias params, weight scale)``; the weight scale differs
    from ``weight_params.scale`` only for channels whose bias would overflow int32
    (their weight scale is raised just enough) — the caller must then requantize the
    weight with the returned scale.
    """
    weight_scale = np.broadcast_to(weight_params.scale, bias.shape).astype(np.float64)
    needed = np.abs(bias.astype(np.float64)) / (INT32_LIMIT * float(input_scale))
    weight_scale = np.maximum(weight_scale, needed)
    scale = (float(input_scale) * weight_scale).astype(np.float32)
    q = np.clip(np.rint(bias / scale.astype(np.float64)), -INT32_LIMIT, INT32_LIMIT)
    axis = 0 if weight_params.per_channel else None
    params = QuantParams(scale, np.zeros(scale.shape, np.int32), axis)
    return q.astype(np.int32), params, weight_scale.astype(np.float32)


def requantize_weight(
    weight: np.ndarray, axis: int, scale: np.ndarray, levels: int = 127
) -> tuple[np.ndarray, QuantParams]:
    """Symmetric int8 along ``axis`` with a given per-channel ``scale``, in ``±levels``."""
    return _quantize_with_scale(weight.astype(np.float64), axis % weight.ndim, scale, levels)


# ---------------------------------------------------------------------------- 4-bit


def quantize_blocked(
    weight: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocked 4-bit quantization of a 2-D ``[K, N]`` weight along K (axis 0).

    Returns ``(q [K, N], scale [ceil(K/bs), N] float32, zero_point or None)``:
    symmetric → int4 values in ``[-7, 7]`` (``scale = max|w| / 7``), no zero point;
    asymmetric → uint4 values in ``[0, 15]`` with a uint4 zero point per block.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float64)
    padded[:k] = weight
    grouped = padded.reshape(blocks, block_size, n)
    if symmetric:
        bound = np.max(np.abs(grouped), axis=1)
        scale = np.maximum(bound / 7.0, MIN_SCALE)
        q = np.clip(np.rint(grouped / scale[:, None, :]), -8, 7)
        zero = None
    else:
        lo = np.minimum(np.min(grouped, axis=1), 0.0)
        hi = np.maximum(np.max(grouped, axis=1), 0.0)
        scale = np.maximum((hi - lo) / 15.0, MIN_SCALE)
        zero = np.clip(np.rint(-lo / scale), 0, 15)
        q = np.clip(np.rint(grouped / scale[:, None, :]) + zero[:, None, :], 0, 15)
        zero = zero.astype(np.uint8)
    q = q.reshape(blocks * block_size, n)[:k]
    return (q.astype(np.int8 if symmetric else np.uint8), scale.astype(np.float32), zero)


def dequantize_blocked(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int
) -> np.ndarray:
    k = q.shape[0]
    full_scale = np.repeat(scale, block_size, axis=0)[:k].astype(np.float64)
    values = q.astype(np.float64)
    if zero is not None:
        values = values - np.repeat(zero, block_size, axis=0)[:k].astype(np.float64)
    return (values * full_scale).astype(np.float32)


def pack_int4(values: np.ndarray) -> bytes:
    """Two 4-bit values per byte, first element in the low nibble (ONNX INT4/UINT4)."""
    flat = (values.ravel().astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
