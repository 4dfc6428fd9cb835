"""``clip-weights`` — clip weight outliers to ``±c``.

Outlier weights stretch the int8 range of per-tensor quantization (and the centroids
of a linear codebook). Each eligible weight tensor (see :mod:`.weights`: the constant
weight input of Conv / ConvTranspose / Gemm / MatMul and Gather tables, float, feeding
only weight inputs) is clipped to ``±c``:

- ``percentile=p`` (default 99.9): ``c`` is the p-th percentile of ``|w|`` — a data
  value (numpy's ``method="higher"``: the value of rank ``ceil((n - 1) * p / 100)``),
  so a second run clips nothing;
- ``sigma=k`` (``k > 0``): ``c = k * std(w)`` instead (float64, population std; not
  idempotent: std shrinks with every clip);
- per tensor, or with ``granularity=channel`` one ``c`` per output channel (the rows of
  the weight's ``[rows, fan_in]`` view; a tensor whose uses disagree on that axis is
  left alone with a note).

Values are compared and clipped in float64 and stored in the tensor's dtype. The
percentile of a whole tensor comes from the radix select of :mod:`.selection` (no
sort, slice-sized temporaries); per-channel clipping works on blocks of rows. Sums over
more than one slice (``sigma`` per tensor) are per-slice float64 sums, so their last
bits may differ from numpy's single pairwise sum on tensors over 2M elements.

Report: per tensor ``clipped`` count and ``fraction``, ``c_max``, ``range_before``,
``range_after``; counts ``tensors_clipped``, ``values_clipped``, ``fraction_clipped``.
Does nothing (``changed=False``) when no value lies beyond ``c``. Subgraph bodies
(If/Loop/Scan) are not visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.prune import selection
from onnxopt.passes.prune.selection import RowLayout, chunks, magnitude_keys, select_key
from onnxopt.passes.prune.weights import (
    PRUNABLE_OPS,
    WeightTarget,
    check_ops,
    owned_values,
    select_weights,
)
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

DEFAULT_PERCENTILE = 99.9


@register_pass
class ClipWeightsPass(Pass):
    name = "clip-weights"
    summary = "Clip weight outliers to ±c (percentile of |w| or k·std), per tensor or channel."
    lossless = False

    @dataclass
    class Options:
        percentile: float = option(
            DEFAULT_PERCENTILE, "c = this percentile of |w|", range=(50, 100)
        )
        sigma: float = option(0.0, "c = sigma * std(w) instead (0: off)", range=(0, 100))
        granularity: Literal["tensor", "channel"] = option("tensor", "one c per tensor or row")
        ops: tuple[str, ...] = option(PRUNABLE_OPS, "op types whose weights are clipped")
        exclude: tuple[str, ...] = option((), "node or tensor name globs to leave alone")
        min_size: int = option(0, "skip tensors with fewer elements", range=(0, 2**62))

        def validate(self) -> None:
            if self.sigma and self.percentile != DEFAULT_PERCENTILE:
                raise ValueError("give percentile= or sigma=, not both")
            check_ops(self.ops)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        options = self.options
        selection = select_weights(graph, options.ops, options.exclude, options.min_size)
        stats, notes = [], []
        for target in selection.targets:
            if options.granularity == "channel" and target.layout is None:
                notes.append(f"{target.name}: uses disagree on the channel axis; not clipped")
                continue
            record = self._try_clip(target)
            if record is not None:
                stats.append(record)
        clipped = sum(s["clipped"] for s in stats)
        total = sum(s["size"] for s in stats) or 1
        counts = {
            "tensors_clipped": sum(1 for s in stats if s["clipped"]),
            "values_clipped": clipped,
            "fraction_clipped": round(clipped / total, 6),
        }
        details = {"tensors": stats}
        return PassResult(clipped > 0, counts, details, notes, skipped=selection.skipped)

    def _try_clip(self, target: WeightTarget) -> dict | None:
        values = owned_values(target.tensor)
        if values.size == 0:
            return None
        range_before = [float(values.min()), float(values.max())]
        if self.options.granularity == "channel":
            clipped, c_max = self._clip_rows(values, target.layout)
        else:
            clipped, c_max = self._clip_tensor(values)
        record = {
            "tensor": target.name,
            "op": target.op,
            "size": int(values.size),
            "clipped": clipped,
            "fraction": round(clipped / values.size, 6),
            "c_max": c_max,
            "range_before": range_before,
            "range_after": range_before,
        }
        if clipped:
            target.tensor.values = values
            record["range_after"] = [float(values.min()), float(values.max())]
        return record

    def _clip_tensor(self, values: np.ndarray) -> tuple[int, float]:
        """Clip the private copy ``values`` in place to one ``±c``; (count, c)."""
        limit = np.float64(self._tensor_limit(values))
        clipped = 0
        for chunk in chunks(values.reshape(-1)):
            clipped += _clip_block(chunk, limit)
        return clipped, float(limit)

    def _tensor_limit(self, values: np.ndarray) -> float:
        """sigma * std(w) (float64), or the percentile of |w| as numpy's
        ``method="higher"`` gives it: the value of rank ceil((n - 1) * p / 100)."""
        flat = values.reshape(-1)
        if self.options.sigma:
            return self.options.sigma * _std(flat)
        if math.isnan(float(np.max(flat))):
            return math.nan  # as np.percentile: a NaN anywhere gives NaN
        rank = math.ceil((flat.size - 1) * (self.options.percentile / 100))
        key, _ = select_key(lambda: map(magnitude_keys, chunks(flat)), rank, 8 * flat.itemsize)
        unsigned = np.dtype(f"u{flat.itemsize}")
        return float(np.array(key, dtype=unsigned).view(flat.dtype))

    def _clip_rows(self, values: np.ndarray, layout: RowLayout) -> tuple[int, float]:
        """Clip each row (output channel) of the private copy ``values`` in place to its
        own ``±c``, a block of rows at a time; (count, largest c)."""
        fan_in = layout.fan_in
        clipped, c_max = 0, -math.inf
        for block in layout.row_blocks(values, max(1, selection.CHUNK_ELEMENTS // fan_in)):
            flat = block.reshape(block.shape[0], fan_in)
            limits = self._row_limits(flat)[:, None]
            c_max = float(np.max([c_max, limits.max()]))
            over = _clip_block(flat, limits)
            if over and not np.may_share_memory(flat, values):
                block[...] = flat.reshape(block.shape)
            clipped += over
        return clipped, c_max

    def _row_limits(self, rows: np.ndarray) -> np.ndarray:
        if self.options.sigma:
            return self.options.sigma * rows.astype(np.float64).std(axis=1)
        magnitude = np.abs(rows.astype(np.float64))
        return np.percentile(magnitude, self.options.percentile, axis=1, method="higher")


def _clip_block(block: np.ndarray, limit: np.ndarray | np.float64) -> int:
    """Clip ``block`` in place to ``±limit`` (compared and clipped in float64, then
    stored in the block's dtype, as ``np.clip(...).astype`` would); returns the count."""
    over = int(np.count_nonzero(np.abs(block) > limit))
    if over:
        block[...] = np.clip(block, -limit, limit)
    return over


def _std(flat: np.ndarray) -> float:
    """Population std in float64: numpy's on one slice, two passes over slices above."""
    if flat.size <= selection.CHUNK_ELEMENTS:
        return float(flat.reshape(1, -1).astype(np.float64).std(axis=1)[0])
    mean = sum(float(np.sum(c, dtype=np.float64)) for c in chunks(flat)) / flat.size
    squares = sum(float(np.sum(np.square(c.astype(np.float64) - mean))) for c in chunks(flat))
    return math.sqrt(squares / flat.size)
