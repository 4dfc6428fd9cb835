"""Apply one pruning rule to every eligible weight: magnitude, Wanda or SparseGPT.

The pass (:mod:`.initializers`) decides *how many* zeros each tensor gets (its rule:
``sparsity`` per layer or global, ``threshold``, ``pattern``); a :class:`Pruner`
decides *which* and refits, by ``method``:

- ``magnitude``: streamed radix select on ``|w|`` (:mod:`.selection`), no data;
- ``wanda``: per output row, the lowest ``|w_j| * ||x_j||`` (column norms from one
  calibration run, ``diag(XᵀX)``); a pattern picks per group of M the same way;
- ``sparsegpt``: the OBS sweep of :mod:`.sparsegpt` picks the mask block by block
  and compensates the kept weights, then :func:`~.sparsegpt.polish` makes them the
  exact least-squares solution for that mask.

``reconstruct=true`` refits the kept weights of a magnitude or Wanda mask the same way
(sweep with a fixed mask, then polish). ``threshold`` fixes the mask (``|w| < t``) for
every method. Weights that cannot be refitted (Gather tables, batched MatMul weights,
no calibration samples...) are pruned by magnitude, with a note saying why; an
embedding table by magnitude per gathered row (every token keeps the same share).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.prune import refit as refitting
from onnxopt.passes.prune.hessian import InputStatistics
from onnxopt.passes.prune.selection import (
    count_zeros,
    global_counts,
    lowest_per_row,
    pattern_lowest,
    spread,
    zero_below,
    zero_global,
    zero_pattern,
    zero_smallest,
)
from onnxopt.passes.prune.sparsegpt import Rule, working_dtype
from onnxopt.passes.prune.weights import Selection, WeightTarget, owned_values, read_values
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What the pass asks of every tensor: ``kind`` is ``none``, ``sparsity`` (with
    per-tensor ``counts``), ``threshold`` or ``pattern``."""

    kind: str
    counts: dict[str, int] = field(default_factory=dict)
    threshold: float = 0.0
    pattern: tuple[int, int] | None = None
    scope: str = "layer"
    sparsity: float = 0.0


@dataclass
class Outcome:
    stats: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    refitted: int = 0
    macs: int = 0  # multiply-adds of the refitted layers in one calibration run


class Pruner:
    """Prunes the targets of one selection by one request and method."""

    def __init__(
        self,
        graph: gs.Graph,
        selection: Selection,
        ctx: PassContext,
        *,
        method: str,
        reconstruct: bool,
        statistics: dict[str, InputStatistics] | None = None,
    ) -> None:
        self.graph, self.selection, self.ctx = graph, selection, ctx
        self.method, self.reconstruct = method, reconstruct
        self.statistics = statistics  # reused (not consumed) when given
        self.outcome = Outcome()

    # -------------------------------------------------------------- entry point

    def run(self, request: Request) -> Outcome:
        if request.kind == "none":
            for target in self.selection.targets:
                values = read_values(target.tensor)
                self._record(target, values, count_zeros(values))
            return self.outcome
        calibrated = self.method != "magnitude" or self.reconstruct
        if calibrated and not self.ctx.calibration:
            self.outcome.notes.append("no calibration samples: pruned by magnitude only")
            calibrated = False
        if not calibrated:
            self._magnitude_all(request)
            return self.outcome
        self._calibrated(request)
        return self.outcome

    # -------------------------------------------------------------- magnitude

    def _magnitude_all(self, request: Request) -> None:
        if request.kind == "sparsity" and request.scope == "global":
            arrays = [owned_values(t.tensor) for t in self.selection.targets]
            before = [count_zeros(values) for values in arrays]
            zero_global(arrays, request.sparsity)
            for target, values, zeros in zip(self.selection.targets, arrays, before):
                self._keep_if_changed(target, values, zeros)
            return
        for target in self.selection.targets:
            self._magnitude(target, request)

    def _magnitude(self, target: WeightTarget, request: Request) -> None:
        if request.kind == "pattern" and target.layout is None:
            self.outcome.notes.append(f"{target.name}: its uses disagree on the N:M axis")
            values = read_values(target.tensor)
            self._record(target, values, count_zeros(values))
            return
        values = owned_values(target.tensor)
        zeros = count_zeros(values)
        _zero_by_magnitude(values, target, request)
        self._keep_if_changed(target, values, zeros)

    def _table_rows(self, target: WeightTarget, request: Request) -> None:
        """An embedding table under a calibrated method: every gathered row (one token,
        one position) loses its own share of its smallest ``|w|``. Per tensor, rows of
        small norm (rare tokens) would lose nearly everything and others nothing; each
        row is a whole input vector of the next layer. MiniLM at 50 %: output SQNR 6.7 ->
        7.7 dB (docs/passes/prune.md)."""
        values = owned_values(target.tensor)
        zeros = count_zeros(values)
        rows = target.layout.to_rows(values)
        scores = np.abs(rows)
        scores[rows == 0] = -1.0  # zeros the table already has go first
        mask = lowest_per_row(scores, spread(request.counts.get(target.name, 0), rows.shape[0]))
        rows[mask] = 0
        self._keep_if_changed(target, np.ascontiguousarray(target.layout.from_rows(rows)), zeros)

    # -------------------------------------------------------------- calibrated

    def _calibrated(self, request: Request) -> None:
        """Plan every tensor that changes, collect its statistics from the unpruned
        model (one run per memory stage), prune and refit; the rest by magnitude."""
        order = {t.name: i for i, t in enumerate(self.selection.targets)}
        plans, fallback = [], []
        for target in self.selection.targets:
            if not self._needs_change(target, request):
                values = read_values(target.tensor)
                self._record(target, values, count_zeros(values))
                continue
            found = refitting.plan(target, _first_use(self.graph, target))
            if self.statistics is not None and target.name not in self.statistics:
                found = "no statistics"
            if isinstance(found, str):
                self.outcome.notes.append(f"{target.name}: pruned by magnitude only ({found})")
                fallback.append(target)
            else:
                plans.append(found)
        if self.statistics is not None:
            for p in plans:
                self._apply(p, self.statistics[p.target.name], request)
        else:
            self._collect_and_apply(plans, request)
        for target in fallback:  # after collecting: statistics come from the unpruned model
            if target.op == "Gather" and request.kind == "sparsity" and target.layout:
                self._table_rows(target, request)
            else:
                self._magnitude(target, request)
        self.outcome.stats.sort(key=lambda s: order[s["tensor"]])

    def _collect_and_apply(self, plans: list[refitting.Plan], request: Request) -> None:
        """Statistics of every plan from one run of the unpruned model (one per memory
        stage), then the refit: layer by layer when that is cheap, else one-shot."""
        diagonal = not (self.method == "sparsegpt" or self.reconstruct)
        cut = refitting.stages(plans, diagonal=diagonal)
        unpruned = self.graph.copy() if len(cut) > 1 else self.graph  # shares the arrays
        ordered = [p for stage in cut for p in stage]
        for index, stage in enumerate(cut):
            desc = f"prune: calibrating ({index + 1}/{len(cut)})"
            found = refitting.collect(self.ctx, unpruned, stage, diagonal=diagonal, desc=desc)
            self.outcome.runs += 1
            self.outcome.macs += sum(refitting.macs(p, found[p.target.name]) for p in stage)
            if len(cut) == 1 and not diagonal and refitting.sequential(ordered, found):
                self._layer_by_layer(ordered, found, request)
                return
            for p in stage:
                self._apply(p, found.pop(p.target.name), request)

    def _layer_by_layer(self, plans: list[refitting.Plan], found: dict, request: Request) -> None:
        """Each layer is refitted on the inputs of the model with the layers before it
        already pruned, to reproduce the unpruned outputs (two runs per sample and
        layer, in one session: :class:`~.refit.Replay`)."""
        replay = refitting.Replay(self.ctx, self.graph, plans)
        self.outcome.runs += 1 if replay.unpruned is not None else 0
        pruned: dict[str, np.ndarray] = {}
        for index, p in enumerate(plans):
            stats = found.pop(p.target.name)  # the first layer's inputs are unpruned
            if index:
                del stats
                desc = f"prune: calibrating {p.target.name}"
                stats = replay.collect(p, pruned, desc)
                self.outcome.runs += 1 if replay.unpruned is not None else 2
            self._apply(p, stats, request)
            if isinstance(p.target.tensor._values, np.ndarray):
                pruned[p.target.name] = p.target.tensor._values

    def _needs_change(self, target: WeightTarget, request: Request) -> bool:
        if request.kind == "sparsity":
            zeros = count_zeros(read_values(target.tensor))
            return request.counts.get(target.name, 0) > zeros
        return True  # pattern / threshold: decided on the values

    def _apply(self, p: refitting.Plan, stats: InputStatistics, request: Request) -> None:
        target = p.target
        values = read_values(target.tensor)
        zeros = count_zeros(values)
        try:
            rows, error = self.fit(p, values, stats, request)
        except np.linalg.LinAlgError:
            self.outcome.notes.append(f"{target.name}: Hessian not positive definite")
            self._magnitude(target, request)
            return
        if error is not None:
            self.outcome.refitted += 1
        new = np.ascontiguousarray(target.layout.from_rows(rows).astype(values.dtype))
        if not np.all(np.isfinite(new)) and np.all(np.isfinite(values)):
            self.outcome.notes.append(f"{target.name}: refit not finite, pruned by magnitude")
            self._magnitude(target, request)
            return
        self._keep_if_changed(target, new, zeros)
        if error is not None:
            self.outcome.stats[-1]["output_error"] = round(error, 6)

    def fit(
        self, p: refitting.Plan, values: np.ndarray, stats: InputStatistics, request: Request
    ) -> tuple[np.ndarray, float | None]:
        """The pruned ``[rows, K]`` float64 weights of ``p`` and, when refitted, the
        layer's relative output error."""
        target = p.target
        rows = target.layout.to_rows(values).astype(working_dtype(p.fan_in))
        shape3 = (p.groups, rows.shape[0] // p.groups, rows.shape[1])
        forced = (rows == 0).reshape(shape3)
        if self.method == "sparsegpt" and request.kind != "threshold":
            rule = Rule(
                count=request.counts.get(target.name) if request.kind == "sparsity" else None,
                pattern=request.pattern if request.kind == "pattern" else None,
                forced=forced,
            )
        else:
            mask = self._fixed_mask(target, values, rows, stats, request)
            rule = Rule(fixed=mask.reshape(shape3) | forced)
        if not (self.method == "sparsegpt" or self.reconstruct):
            return np.where(rule.fixed.reshape(rows.shape), 0.0, rows), None
        consume = self.statistics is None
        fit = refitting.refit(p, stats, rows, rule, polish=True, consume=consume)
        return fit.rows, fit.error

    def probe(self, target: WeightTarget, stats: InputStatistics, request: Request) -> float:
        """Relative output error of ``target`` pruned alone by ``request`` (the graph is
        not changed); the diagonal approximation when only column norms are known."""
        p = refitting.plan(target, 0)
        values = read_values(target.tensor)
        if stats.diagonal:
            rows = target.layout.to_rows(values).astype(np.float64)
            pruned, _ = self.fit(p, values, stats, request)
            energy = _column_norms(stats, rows.shape[0]) ** 2 * rows**2
            lost = float(np.sum(np.where(pruned == 0, energy, 0.0)))
            return lost / max(float(np.sum(energy)), 1e-300)
        _, error = self.fit(p, values, stats, request)
        return error

    def _fixed_mask(self, target, values, rows, stats, request: Request) -> np.ndarray:
        """The mask of a magnitude, Wanda or threshold rule, ``[rows, K]``."""
        if request.kind == "threshold":
            return np.abs(rows) < request.threshold
        if self.method == "magnitude":
            copy = np.array(values, order="C", copy=True)
            _zero_by_magnitude(copy, target, request)
            return target.layout.to_rows(copy) == 0
        scores = np.abs(rows) * _column_norms(stats, rows.shape[0])
        scores[rows == 0] = -1.0  # zeros the weight already has go first
        if request.kind == "pattern":
            return pattern_lowest(scores, *request.pattern)
        count = request.counts.get(target.name, 0)
        return lowest_per_row(scores, spread(count, rows.shape[0]))

    # -------------------------------------------------------------- report

    def _keep_if_changed(self, target: WeightTarget, values: np.ndarray, zeros: int) -> None:
        self._record(target, values, zeros)
        if self.outcome.stats[-1]["zeroed"] > 0:  # otherwise: keeps its (lazy) values
            target.tensor.values = values

    def _record(self, target: WeightTarget, values: np.ndarray, zeros_before: int) -> None:
        self.outcome.stats.append(tensor_stats(target, values, zeros_before))


def _zero_by_magnitude(values: np.ndarray, target: WeightTarget, request: Request) -> None:
    if request.kind == "pattern":
        zero_pattern(values, target.layout, *request.pattern)
    elif request.kind == "threshold":
        zero_below(values, request.threshold)
    else:
        zero_smallest(values, request.counts.get(target.name, 0))


def _column_norms(stats: InputStatistics, rows: int) -> np.ndarray:
    """``||x_j||`` for every row's group: ``[rows, K]`` broadcastable."""
    diagonal = stats.hessian if stats.diagonal else np.diagonal(stats.hessian, axis1=-2, axis2=-1)
    norms = np.sqrt(np.maximum(diagonal, 0.0))  # [G, K]
    return np.repeat(norms, rows // norms.shape[0], axis=0)


def _first_use(graph: gs.Graph, target: WeightTarget) -> int:
    positions = {id(node): i for i, node in enumerate(graph.nodes)}
    return min(positions.get(id(node), 0) for node, _ in target.uses)


def request_counts(selection: Selection, sparsity: float, scope: str) -> dict[str, int]:
    """Zeros each tensor should end with: ``round(s * size)`` per tensor, or the
    tensor's share of one ranking by ``|w| / rms(tensor)`` (``scope=global``)."""
    if scope == "global":
        arrays = [read_values(t.tensor) for t in selection.targets]
        counts = global_counts(arrays, sparsity)
        return {t.name: c for t, c in zip(selection.targets, counts)}
    return {
        t.name: round(sparsity * int(np.prod(t.tensor.shape, dtype=np.int64)))
        for t in selection.targets
    }


def tensor_stats(target: WeightTarget, after: np.ndarray, zeros_before: int) -> dict:
    size = int(after.size)
    zeros_after = count_zeros(after)
    return {
        "tensor": target.name,
        "op": target.op,
        "shape": list(after.shape),
        "size": size,
        "sparsity_before": round(zeros_before / size, 6) if size else 0.0,
        "sparsity_after": round(zeros_after / size, 6) if size else 0.0,
        "zeroed": zeros_after - zeros_before,
        "stored": "dense",
    }
