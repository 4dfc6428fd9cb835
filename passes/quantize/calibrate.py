"""Streaming calibration: per-tensor statistics and the clipping range of each method.

Memory is bounded by design: :func:`collect` runs the float model on one calibration
sample at a time (``ctx.activations``) and folds each tensor into a
:class:`TensorStats` — exact min/max plus a histogram of at most ``BINS`` bins — then
drops the sample. Nothing grows with the number of samples.

The histogram has bins of a power-of-two width ``w`` at absolute positions
``[i*w, (i+1)*w)``. When a new sample widens the range beyond ``BINS`` bins, the width
doubles and pairs of bins merge (``i -> floor(i/2)``): re-binning is exact, never an
interpolation, and the result does not depend on the order of the samples except
through the starting width. The range always spans more than ``BINS/2`` bins.

Range methods (``choose_range``), all computed from the statistics:

- ``minmax``: the observed ``[min, max]``.
- ``percentile``: the ``(100-p)``-th and ``p``-th percentiles (``p`` = ``percentile``
  option, default 99.999).
- ``entropy``: the magnitude threshold ``t`` minimising the KL divergence between the
  clipped histogram and its quantized version (the TensorRT method, on ``|x|``); the
  range is ``[max(min, -t), min(max, t)]``.
- ``mse``: the range minimising the expected squared quantization error
  (clipping + rounding) of the histogram under the activation type's grid: a search
  over ``hi`` (and ``lo`` for signed tensors) on a fraction grid of the observed range.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.passes.quantize.numerics import MIN_SCALE, ActivationType
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy", "mse"]
BINS = 2048
ADD_SLICE = 1 << 18  # elements binned at once


@dataclass
class TensorStats:
    """Exact min/max and a mergeable histogram of one tensor over all samples seen."""

    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    width: float = 0.0  # bin width, a power of two (0 before the first update)
    start: int = 0  # absolute index of counts[0]: it covers [start*w, (start+1)*w)
    counts: np.ndarray | None = None  # int64, at most BINS entries

    def update(self, values: np.ndarray) -> None:
        # min/max and the finiteness test on the tensor as it comes (no filtered copy
        # unless something is not finite)
        x = np.asarray(values)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        x = x.ravel()
        if x.size == 0:
            return
        low, high = x.min(), x.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            low, high = x.min(), x.max()
        self.min = min(self.min, float(low))
        self.max = max(self.max, float(high))
        self.count += x.size
        if self.counts is None:
            self.width = _initial_width(self.min, self.max)
            self.start = math.floor(self.min / self.width)
            self.counts = np.zeros(0, np.int64)
        while math.floor(self.max / self.width) - math.floor(self.min / self.width) + 1 > BINS:
            self._double_width()
        self._add(x)

    def _double_width(self) -> None:
        absolute = np.arange(self.start, self.start + len(self.counts)) // 2
        new_start = self.start // 2
        merged = np.zeros(int(absolute[-1] - new_start + 1) if len(absolute) else 0, np.int64)
        np.add.at(merged, absolute - new_start, self.counts)
        self.width *= 2.0
        self.start, self.counts = new_start, merged

    def _add(self, x: np.ndarray) -> None:
        # floor is monotone: the extreme indices are those of min(x) and max(x)
        low = min(self.start, math.floor(float(x.min()) / self.width))
        high = max(self.start + len(self.counts) - 1, math.floor(float(x.max()) / self.width))
        if low != self.start or high != self.start + len(self.counts) - 1:
            grown = np.zeros(high - low + 1, np.int64)
            grown[self.start - low : self.start - low + len(self.counts)] = self.counts
            self.start, self.counts = low, grown
        # in slices: the float64 values and int64 indices of a whole 640x640 feature
        # map are 40 MB of temporaries; counts are integers, so the sum is exact
        for begin in range(0, x.size, ADD_SLICE):
            part = x[begin : begin + ADD_SLICE].astype(np.float64, copy=False)
            index = np.floor(part / self.width).astype(np.int64)
            self.counts += np.bincount(index - self.start, minlength=len(self.counts))

    # -- views used by the range methods

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres and counts of the non-empty bins, centres clamped to [min, max]."""
        nonzero = np.nonzero(self.counts)[0]
        centers = (self.start + nonzero + 0.5) * self.width
        return np.clip(centers, self.min, self.max), self.counts[nonzero].astype(np.float64)

    def quantile(self, fraction: float) -> float:
        """Value below which ``fraction`` of the elements lie (linear within a bin)."""
        if self.counts is None:
            return 0.0
        cumulative = np.cumsum(self.counts)
        target = fraction * cumulative[-1]
        i = int(np.searchsorted(cumulative, target))
        i = min(i, len(cumulative) - 1)
        before = cumulative[i - 1] if i else 0
        inside = (target - before) / max(self.counts[i], 1)
        value = (self.start + i + inside) * self.width
        return float(np.clip(value, self.min, self.max))

    def magnitude_histogram(self) -> np.ndarray:
        """Counts of |x| in bins [j*w, (j+1)*w), j >= 0 (negative bins fold exactly)."""
        absolute = np.arange(self.start, self.start + len(self.counts))
        folded = np.where(absolute < 0, -absolute - 1, absolute)
        hist = np.zeros(int(folded.max()) + 1, np.int64)
        np.add.at(hist, folded, self.counts)
        return hist


def _initial_width(lo: float, hi: float) -> float:
    span = hi - lo
    if span <= 0:
        span = abs(hi) or 1.0
    return 2.0 ** math.ceil(math.log2(span / BINS))


# ---------------------------------------------------------------------------- collect


FETCH_BYTES = 64 << 20  # intermediate tensors fetched from one run of the model


def collect(
    ctx: PassContext,
    graph: gs.Graph,
    names: Sequence[str],
    observers: Mapping[str, Sequence[Callable[[np.ndarray], None]]] | None = None,
    desc: str = "calibrating",
) -> dict[str, TensorStats]:
    """Statistics of tensors ``names`` over the calibration samples, one sample at a time.

    ``observers`` maps tensor names to callbacks that also see each sample's value
    (e.g. GPTQ's Hessians); their tensors are fetched even when not in ``names``.
    One run of the model fetches at most ``FETCH_BYTES`` of tensors (see
    :func:`fetch_chunks`): a large input (PP-OCRv4 det at 640x640) is calibrated in a
    few passes over the samples instead of holding every activation of a sample at once.
    """
    observers = observers or {}
    stats = {name: TensorStats() for name in names}
    wanted = list(dict.fromkeys([*names, *observers]))
    inputs = {t.name for t in graph.inputs}
    direct = [n for n in wanted if n in inputs]
    computed = [n for n in wanted if n not in inputs]

    def feed_sample(values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name in stats:
                stats[name].update(value)
            for observe in observers.get(name, ()):
                observe(value)

    chunks = fetch_chunks(ctx, graph, computed) if computed else [[]]
    for index, chunk in enumerate(chunks):
        head = direct if index == 0 else []  # graph inputs: with the first run
        if chunk:
            stream = ctx.activations(graph, chunk, desc=desc)
            for feed, sample in zip(ctx.calibration, stream):
                feed_sample({**{n: feed[n] for n in head}, **sample})
        elif head:
            for feed in ctx.progress(ctx.calibration, desc=desc, total=len(ctx.calibration)):
                feed_sample({n: feed[n] for n in head})
    return stats


def fetch_chunks(ctx: PassContext, graph: gs.Graph, names: Sequence[str]) -> list[list[str]]:
    """``names`` split into runs that each fetch at most ``FETCH_BYTES``.

    Sizes come from onnx shape inference at the first calibration sample's input
    shapes; a tensor of unknown size counts as the largest known one. Without any
    known size, one run fetches everything.
    """
    names = list(names)
    if len(names) <= 1 or not ctx.calibration:
        return [names]
    sizes = tensor_bytes(ctx.to_model(graph), ctx.calibration[0], names)
    if not sizes:
        return [names]
    largest = max(sizes.values())
    return runtime.split_within(names, lambda name: sizes.get(name, largest), FETCH_BYTES)


def tensor_bytes(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, int]:
    """Bytes of the tensors ``names`` whose shapes onnx infers statically for ``feed``."""
    view = runtime.typed_view(model)
    if view is model:
        view = onnx.ModelProto()
        view.CopyFrom(model)
    for graph_input in view.graph.input:
        if graph_input.name not in feed:
            continue
        shape = np.shape(feed[graph_input.name])
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for dim, value in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(value)
    try:
        inferred = onnx.shape_inference.infer_shapes(view)
    except Exception as exc:  # sizes are an optimisation: one run fetches everything
        log.debug("calibration: no static shapes (%s)", exc)
        return {}
    wanted = set(names)
    sizes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if info.name not in wanted or not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if all(d > 0 for d in dims):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            sizes[info.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return sizes


# ---------------------------------------------------------------------------- methods


def choose_range(
    stats: TensorStats,
    method: Method,
    dtype: ActivationType = "uint8",
    percentile: float = 99.999,
) -> tuple[float, float]:
    """The clipping range ``[lo, hi]`` of one tensor under ``method`` (contains 0)."""
    if stats.counts is None:
        return 0.0, 0.0
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if method == "minmax" or hi - lo == 0:
        return lo, hi
    if method == "percentile":
        fraction = percentile / 100.0
        return min(stats.quantile(1.0 - fraction), 0.0), max(stats.quantile(fraction), 0.0)
    if method == "entropy":
        t = entropy_threshold(stats, 128 if lo < 0 or dtype == "int8" else 256)
        return max(lo, -t), min(hi, t)
    if method == "mse":
        return mse_range(stats, dtype)
    raise ValueError(f"unknown calibration method {method!r}")


def entropy_threshold(stats: TensorStats, levels: int = 128) -> float:
    """KL-optimal magnitude threshold over ``|x|``: TensorRT's entropy calibration.

    Candidates are the bin edges from ``levels`` bins up to the whole histogram. The
    reference P is the histogram up to the candidate with the clipped mass added to
    its last bin; the candidate Q merges the same bins *without* that mass into
    ``levels`` levels and spreads each level evenly over its non-empty bins.
    """
    hist = stats.magnitude_histogram().astype(np.float64)
    n = len(hist)
    if n <= levels:
        return n * stats.width
    best, best_kl = n, math.inf
    step = max(1, (n - levels) // 256)  # at most ~256 candidate thresholds
    for i in [*range(levels, n, step), n]:
        reference = hist[:i].copy()
        reference[-1] += hist[i:].sum()
        kl = _kl_after_quantization(reference, hist[:i], levels)
        if kl < best_kl:
            best, best_kl = i, kl
    return best * stats.width


def _kl_after_quantization(reference: np.ndarray, clipped: np.ndarray, levels: int) -> float:
    nonzero = clipped != 0
    edges = np.linspace(0, len(clipped), levels + 1).astype(np.int64)
    expanded = np.zeros_like(clipped)
    for a, b in itertools.pairwise(edges):
        used = nonzero[a:b]
        count = used.sum()
        if b > a and count:
            expanded[a:b][used] = clipped[a:b].sum() / count
    if expanded.sum() == 0 or reference.sum() == 0:
        return math.inf
    p, q = reference / reference.sum(), expanded / expanded.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


FRACTIONS = np.concatenate([np.linspace(0.02, 0.3, 15), np.linspace(0.32, 1.0, 35)])


def mse_range(stats: TensorStats, dtype: ActivationType = "uint8") -> tuple[float, float]:
    """Range minimising sum(count * (x - fake_quant(x))^2) over the histogram."""
    centers, counts = stats.centers()
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if dtype == "int8":
        bound = max(-lo, hi)
        candidates = [(-bound * f, bound * f) for f in FRACTIONS]
    elif lo == 0:
        candidates = [(0.0, hi * f) for f in FRACTIONS]
    else:
        candidates = [(lo * a, hi * b) for a in FRACTIONS[::2] for b in FRACTIONS[::2]]
        candidates.append((lo, hi))
    errors = _range_errors(centers, counts, candidates, dtype)
    return candidates[int(np.argmin(errors))]


def _range_errors(
    centers: np.ndarray,
    counts: np.ndarray,
    candidates: Sequence[tuple[float, float]],
    dtype: ActivationType,
) -> np.ndarray:
    """``sum(count * (x - fake_quant(x))^2)`` for every candidate range at once: the
    parameters of ``activation_params`` (same float64 steps, float32 scale), one row
    per candidate (rows of at most ``ROWS`` elements per chunk)."""
    bounds = np.array(candidates, np.float64).reshape(-1, 2)
    lo, hi = np.minimum(bounds[:, 0], 0.0), np.maximum(bounds[:, 1], 0.0)
    if dtype == "int8":
        scale64 = np.maximum(np.maximum(-lo, hi) / 127.0, MIN_SCALE)
        zero = np.zeros_like(scale64)
        qmin, qmax = -128, 127
    else:
        scale64 = np.maximum((hi - lo) / 255.0, MIN_SCALE)
        zero = np.clip(np.round(-lo / scale64), 0, 255)
        qmin, qmax = 0, 255
    scale = scale64.astype(np.float32).astype(np.float64)
    errors = np.empty(len(bounds))
    step = max(1, ROWS // max(len(centers), 1))
    for a in range(0, len(bounds), step):
        s, z = scale[a : a + step, None], zero[a : a + step, None]
        q = np.clip(np.rint(centers[None, :] / s) + z, qmin, qmax)
        error = (q - z) * s - centers[None, :]
        errors[a : a + step] = np.sum(counts * error * error, axis=1)
    return errors


ROWS = 1 << 20


def ranges(
    stats: Mapping[str, TensorStats],
    method: Method,
    dtype: ActivationType = "uint8",
    percentile: float = 99.999,
) -> dict[str, tuple[float, float]]:
    return {name: choose_range(s, method, dtype, percentile) for name, s in stats.items()}
