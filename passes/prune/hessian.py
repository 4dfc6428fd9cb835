"""What a layer's weight sees: its input rows, and their Hessian ``H = XᵀX``.

A weight in its ``[rows, fan_in]`` view (:mod:`.weights`) computes every output value as
one row times one input vector ``x`` of length ``fan_in`` (K). :func:`layer_input` says,
for one use of a weight, which activation tensor holds those vectors and how to cut
them out of it, per group of rows (``[G, n, K]``):

- Gemm B: the rows of A (columns when ``transA=1``); Gemm A: the columns of B (rows
  when ``transB=1``);
- MatMul B ``[K, N]`` (or ``[K]``): A reshaped to ``[-1, K]``; MatMul A ``[M, K]``: the
  columns of B, every batch;
- Conv (1-D, 2-D, 3-D; any stride, dilation, group; explicit pads or ``auto_pad``):
  im2col patches, one matrix per group, columns ordered like ``W[o].ravel()``;
  depthwise convolutions get one small ``K = kh*kw`` system per channel. The
  collectors keep at most :func:`positions_limit` output positions per sample (every
  s-th of the flattened positions; about ``64 * K`` rows over all samples, 256 to
  4,096 per sample): a 160x160 map gives 25,600 nearly redundant rows per sample, and
  a depthwise 5x5 needs far fewer than a 3x3 over 96 channels;
- ConvTranspose (explicit pads or VALID, ``output_padding``; not ``output_shape``): the
  patches of the equivalent convolution over the stride-dilated input with the kernel
  flipped, so that column ``(c, t)`` multiplies ``W[c, o, t]``.

Anything else (Gather tables, batched MatMul weights, ``output_shape``) gets a reason
instead.

:class:`InputStatistics` sums ``XᵀX`` (float64, per group) over the calibration
samples. Rows arrive one sample at a time and are buffered only up to
``FLUSH_ELEMENTS`` floats before being folded in with one float32 matrix product
(BLAS-sized, accumulated in float64): memory is the ``G * K^2`` sums plus that buffer,
whatever the number of samples. ``diagonal=True`` keeps only the squared column norms
(Wanda needs nothing else).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

FLUSH_ELEMENTS = 1 << 20  # floats buffered per layer before they are folded into H
POSITIONS_PER_SAMPLE = 4096  # Conv rows per sample and group, at most...
ROWS_PER_COLUMN = 64  # ...about this many rows per column of K over all samples...
MIN_POSITIONS = 256  # ...but at least this many per sample
_NOTSET = ("NOTSET", b"NOTSET")


@dataclass(frozen=True)
class LayerInput:
    """One use of a weight: the activation feeding it, and how to cut that activation
    into per-group input rows ``[G, n, K]`` (float32)."""

    source: str
    groups: int
    fan_in: int
    rows_of: Callable[..., np.ndarray]  # (activation, positions=None) -> [G, n, K]


def positions_limit(fan_in: int, samples: int) -> int:
    """Conv output positions kept per sample: enough for ``ROWS_PER_COLUMN * K`` rows
    over all samples, within ``[MIN_POSITIONS, POSITIONS_PER_SAMPLE]``."""
    wanted = -(-ROWS_PER_COLUMN * fan_in // max(samples, 1))
    return min(POSITIONS_PER_SAMPLE, max(MIN_POSITIONS, wanted))


def layer_input(node: gs.Node, index: int, shape: tuple[int, ...]) -> LayerInput | str:
    """How input ``index`` (a weight of ``shape``) of ``node`` sees its activation, or
    the reason it cannot be refitted."""
    builder = _BUILDERS.get(node.op)
    if builder is None:
        return f"{node.op} has no input activations to refit on"
    return builder(node, index, shape)


def _gemm(node: gs.Node, index: int, shape: tuple[int, ...]) -> LayerInput | str:
    if len(shape) != 2:
        return "Gemm weight is not 2-D"
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    if index == 1:
        k = shape[1] if trans_b else shape[0]
        return LayerInput(_name(node, 0), 1, k, lambda x, _=None: _rows(x.T if trans_a else x, k))
    k = shape[0] if trans_a else shape[1]
    return LayerInput(_name(node, 1), 1, k, lambda x, _=None: _rows(x if trans_b else x.T, k))


def _matmul(node: gs.Node, index: int, shape: tuple[int, ...]) -> LayerInput | str:
    if len(shape) > 2:
        return f"batched MatMul weight {list(shape)}"
    if index == 1:
        k = shape[0]
        return LayerInput(_name(node, 0), 1, k, lambda x, _=None: _rows(x, k))
    k = shape[-1]
    return LayerInput(
        _name(node, 1),
        1,
        k,
        lambda x, _=None: _rows(x if x.ndim == 1 else np.swapaxes(x, -1, -2), k),
    )


def _rows(x: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(1, -1, k)


def _name(node: gs.Node, index: int) -> str:
    return node.inputs[index].name


# ---------------------------------------------------------------------------- convolutions


@dataclass(frozen=True)
class _Window:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    groups: int

    @property
    def spans(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilations, self.kernel))


def _window(node: gs.Node, shape: tuple[int, ...]) -> _Window:
    kernel = tuple(int(k) for k in shape[2:])
    dims = len(kernel)
    attrs = node.attrs
    pads = [int(p) for p in attrs.get("pads", [0] * 2 * dims)]
    return _Window(
        kernel,
        tuple(int(s) for s in attrs.get("strides", [1] * dims)),
        tuple(int(d) for d in attrs.get("dilations", [1] * dims)),
        tuple(pads[:dims]),
        tuple(pads[dims:]),
        int(attrs.get("group", 1)),
    )


def _conv(node: gs.Node, index: int, shape: tuple[int, ...]) -> LayerInput | str:
    if index != 1 or not 3 <= len(shape) <= 5:
        return f"Conv weight of rank {len(shape)}"
    window = _window(node, shape)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    fan_in = math.prod(shape[1:])
    return LayerInput(
        _name(node, 0),
        window.groups,
        fan_in,
        lambda x, positions=None: conv_patches(x, window, auto_pad, positions),
    )


def _same_pads(window: _Window, spatial: tuple[int, ...], lower: bool) -> _Window:
    begin, end = [], []
    for size, span, stride in zip(spatial, window.spans, window.strides):
        total = max((-(-size // stride) - 1) * stride + span - size, 0)
        small = total // 2
        begin.append(total - small if lower else small)
        end.append(total - begin[-1])
    return _Window(
        window.kernel, window.strides, window.dilations, tuple(begin), tuple(end), window.groups
    )


def conv_patches(
    x: np.ndarray, window: _Window, auto_pad: str = "NOTSET", positions: int | None = None
) -> np.ndarray:
    """im2col of a Conv input ``x[N, C, *spatial]``: ``[G, N * positions, C/G * prod(k)]``."""
    spatial = tuple(x.shape[2:])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        window = _same_pads(window, spatial, auto_pad == "SAME_LOWER")
    elif auto_pad == "VALID":
        zero = (0,) * len(spatial)
        window = _Window(window.kernel, window.strides, window.dilations, zero, zero, window.groups)
    padding = [(0, 0), (0, 0), *zip(window.begin, window.end)]
    padded = np.pad(np.asarray(x, dtype=np.float32), padding)
    return _patches(
        padded, window.spans, window.strides, window.dilations, window.groups, positions
    )


def _patches(
    padded, spans, strides, dilations, groups, limit: int | None, flip: bool = False
) -> np.ndarray:
    """``[G, N * positions, C/G * prod(k)]`` from the padded input, one copy; at most
    ``limit`` output positions per sample (every s-th of the flattened positions)."""
    dims = len(spans)
    axes = tuple(range(2, 2 + dims))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    picks = [slice(None)] * 2 + [slice(None, None, s) for s in strides]
    picks += [slice(None, None, -d if flip else d) for d in dilations]
    windows = windows[tuple(picks)]  # [N, C, *out, *k]
    n, channels = windows.shape[:2]
    out, kernel = windows.shape[2 : 2 + dims], windows.shape[2 + dims :]
    grouped = windows.reshape(n, groups, channels // groups, math.prod(out), *kernel)
    positions = math.prod(out)
    if limit is not None and positions > limit:
        step = -(-positions // limit)
        grouped = grouped[:, :, :, ::step]
        positions = grouped.shape[3]
    # [G, N, positions, C/G, *k] -> [G, N * positions, K]: the only copy
    moved = np.moveaxis(grouped, (1, 3), (0, 2))
    return moved.reshape(groups, n * positions, -1)


def _conv_transpose(node: gs.Node, index: int, shape: tuple[int, ...]) -> LayerInput | str:
    if index != 1 or not 3 <= len(shape) <= 5:
        return f"ConvTranspose weight of rank {len(shape)}"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in (*_NOTSET, "VALID", b"VALID"):
        return f"ConvTranspose auto_pad={auto_pad!r}"
    if node.attrs.get("output_shape"):
        return "ConvTranspose with output_shape"
    window = _window(node, shape)
    if auto_pad in ("VALID", b"VALID"):
        zero = (0,) * len(window.kernel)
        window = _Window(window.kernel, window.strides, window.dilations, zero, zero, window.groups)
    extra = tuple(int(p) for p in node.attrs.get("output_padding", [0] * len(window.kernel)))
    fan_in = shape[0] // window.groups * math.prod(shape[2:])
    return LayerInput(
        _name(node, 0),
        window.groups,
        fan_in,
        lambda x, positions=None: transposed_patches(x, window, extra, positions),
    )


def transposed_patches(
    x: np.ndarray, window: _Window, extra: tuple[int, ...], positions: int | None = None
) -> np.ndarray:
    """Input rows of a ConvTranspose: output position ``p`` and tap ``t`` read input
    position ``q`` with ``q * stride + t * dilation - pad_begin = p`` (zero if there is
    none): a stride-1 convolution of the zero-inserted input with the kernel flipped."""
    x = np.asarray(x, dtype=np.float32)
    spatial = x.shape[2:]
    inserted = [(size - 1) * s + 1 for size, s in zip(spatial, window.strides)]
    up = np.zeros((*x.shape[:2], *inserted), dtype=np.float32)
    up[(slice(None), slice(None), *[slice(None, None, s) for s in window.strides])] = x
    lefts, rights = [], []
    for size, stride, span, begin, end, more in zip(
        spatial, window.strides, window.spans, window.begin, window.end, extra
    ):
        out = stride * (size - 1) + more + span - begin - end
        lefts.append(span - 1 - begin)
        rights.append(out + span - 1 - lefts[-1] - ((size - 1) * stride + 1))
    padded = np.pad(up, [(0, 0), (0, 0), *[(max(a, 0), max(b, 0)) for a, b in zip(lefts, rights)]])
    crop = [slice(max(-a, 0), n - max(-b, 0)) for a, b, n in zip(lefts, rights, padded.shape[2:])]
    padded = padded[(slice(None), slice(None), *crop)]
    ones = (1,) * len(spatial)
    spans, dilations, groups = window.spans, window.dilations, window.groups
    return _patches(padded, spans, ones, dilations, groups, positions, flip=True)


_BUILDERS: dict[str, Callable[[gs.Node, int, tuple[int, ...]], LayerInput | str]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


# ---------------------------------------------------------------------------- accumulation


class InputStatistics:
    """``Σ XᵀX`` of one weight's input rows, per group, in float64; with ``cross``
    also ``Σ XᵀX0``, ``X0`` being the same rows in the unpruned model.

    ``add`` takes the rows of one sample (``[G, n, K]``), buffers them and folds the
    buffer in once it holds ``FLUSH_ELEMENTS`` floats: memory does not grow with the
    number of samples."""

    def __init__(
        self, groups: int, fan_in: int, *, diagonal: bool = False, cross: bool = False
    ) -> None:
        self.groups, self.fan_in = groups, fan_in
        self.diagonal = diagonal
        shape = (groups, fan_in) if diagonal else (groups, fan_in, fan_in)
        self.hessian: np.ndarray | None = np.zeros(shape, dtype=np.float64)
        self.cross = np.zeros(shape, dtype=np.float64) if cross and not diagonal else None
        self.rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_elements = 0

    def add(self, rows: np.ndarray, unpruned: np.ndarray | None = None) -> None:
        """The input rows ``[G, n, K]`` of one sample (and, for ``cross``, the same
        rows in the unpruned model)."""
        self.rows += rows.shape[1]
        if self.diagonal:
            self.hessian += np.einsum("gnk,gnk->gk", rows, rows, dtype=np.float64)
            return
        self._pending.append((rows, unpruned if self.cross is not None else None))
        self._pending_elements += rows.size
        if self._pending_elements >= FLUSH_ELEMENTS or rows.shape[1] >= rows.shape[2]:
            self.flush()  # a sample with at least K rows is a BLAS-sized product alone

    def flush(self) -> None:
        if not self._pending:
            return
        x = _joined([rows for rows, _ in self._pending])
        if self.cross is not None:
            x0 = _joined([rows for _, rows in self._pending])
        self._pending, self._pending_elements = [], 0
        xt = x.transpose(0, 2, 1)
        if x.shape[0] == 1:
            self.hessian[0] += xt[0] @ x[0]  # numpy runs syrk on a.T @ a
        else:
            xt = np.ascontiguousarray(xt)
            self.hessian += np.matmul(xt, x)
        if self.cross is not None:
            self.cross += np.matmul(xt, x0)

    @property
    def nbytes(self) -> int:
        held = [self.hessian, self.cross]
        return sum(m.nbytes for m in held if m is not None)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def statistics_bytes(groups: int, fan_in: int, *, diagonal: bool, cross: bool = False) -> int:
    """Memory an :class:`InputStatistics` holds (without its bounded buffer)."""
    one = groups * fan_in * (1 if diagonal else fan_in) * 8
    return one * (2 if cross and not diagonal else 1)
