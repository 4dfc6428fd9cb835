"""``sparsity=auto``: the largest overall sparsity within the step's budget, spread over
the layers by their measured sensitivity.

1. **Statistics once.** The calibration statistics of every refittable weight are
   collected once, from the unpruned model (one onnxruntime run, as for a fixed
   sparsity), and reused by every candidate: a candidate costs its sweeps and its
   evaluation, no calibration run. Two exceptions, where each candidate collects its
   own: models cheap enough for the layer-by-layer refit (:mod:`.refit`), which then
   every candidate gets too, and statistics that would not fit ``STATS_BYTES`` at once.
2. **Sensitivity.** Each layer is pruned alone at ``PROBE_SPARSITY`` with the pass's
   method; its relative output error on the calibration inputs is its sensitivity
   (weights without statistics: magnitude pruning's relative error ``||w_pruned -
   w||² / ||w||²``).
3. **Allocation (OWL-style).** For a global target ``s``, layer ``l`` gets
   ``s_l = s + ALLOCATION_SPREAD * (1 - 2 * q_l)`` shifted so that the size-weighted
   mean is exactly ``s`` (then clipped to ``[0, 0.99]``), where ``q_l`` in ``[0, 1]`` is
   the rank of its sensitivity among the layers: the least sensitive layer gets up to
   ``ALLOCATION_SPREAD`` more than the target, the most sensitive that much less (Yin
   et al., OWL, 2024, spread layer sparsity the same way by outlier ratio).
4. **Search.** Bisection over ``s`` on a 1-point grid (0..0.99) with the PassManager's
   own checks (``ctx.evaluate``), at most ``AUTO_MAX_EVALUATIONS`` candidates. ``s +
   0.05`` is measured too, and the search goes on above ``s`` if it passes (the metric
   is not always monotonic). Each candidate is pruned on a copy of the graph and freed
   before the next.

``details["auto_curve"]``: per candidate, sparsity, pass/fail and the worst metrics;
``details["auto_sparsity"]``: the choice; ``details["auto_layers"]``: per tensor its
sensitivity and its sparsity at the choice.
"""

from __future__ import annotations

import gc
import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.prune import refit as refitting
from onnxopt.passes.prune.pruner import Outcome, Request
from onnxopt.passes.prune.selection import zero_smallest
from onnxopt.passes.prune.weights import Selection, read_values, select_weights
from onnxopt.pipeline import PassContext

if TYPE_CHECKING:
    from onnxopt.passes.prune.initializers import PruneInitializersPass

AUTO_MAX_EVALUATIONS = 12
AUTO_STEP_CHECK = 5  # percentage points above the chosen sparsity that must fail
PROBE_SPARSITY = 0.5
ALLOCATION_SPREAD = 0.1


def search(
    graph: gs.Graph, selection: Selection, ctx: PassContext, prune_pass: PruneInitializersPass
) -> tuple[Outcome, dict]:
    """Prune ``graph`` at the chosen sparsity; returns the outcome and the details."""
    statistics = _statistics(graph, selection, ctx, prune_pass)
    sensitivity = _sensitivity(graph, selection, ctx, prune_pass, statistics)
    if statistics is not None and refitting.sequential(_plans(selection), statistics):
        statistics = None  # cheap to run: every candidate gets the layer-by-layer refit
    curve: list[dict] = []

    def passes(percent: int) -> bool:
        candidate = graph.copy()
        picked = select_weights(candidate, *_eligibility(prune_pass))
        request = _request(picked, percent / 100, sensitivity)
        prune_pass.prune(candidate, picked, ctx, request, statistics=statistics)
        evaluation = ctx.evaluate(candidate)
        # graphsurgeon graphs are reference cycles: without a collection every
        # candidate's new arrays (the model's size) would wait for the cyclic GC
        del candidate, picked
        gc.collect()
        curve.append(_curve_point(percent, evaluation))
        return evaluation.ok

    chosen = _bisect(passes, ctx) if selection.targets else 0
    curve.sort(key=lambda point: point["sparsity"])
    request = _request(selection, chosen / 100, sensitivity)
    outcome = prune_pass.prune(graph, selection, ctx, request, statistics=statistics)
    sparsity = chosen / 100
    outcome.notes.append(f"auto sparsity {sparsity:.2f} ({len(curve)} evaluations)")
    layers = [
        {
            "tensor": t.name,
            "sensitivity": round(sensitivity[t.name], 6),
            "sparsity": round(request.counts.get(t.name, 0) / max(_size(t), 1), 4),
        }
        for t in selection.targets
    ]
    found = {"auto_curve": curve, "auto_sparsity": sparsity, "auto_layers": layers}
    return outcome, found


def _eligibility(prune_pass: PruneInitializersPass) -> tuple:
    options = prune_pass.options
    return options.ops, options.exclude, options.min_size


def _bisect(passes, ctx: PassContext) -> int:
    budget = ctx.progress(
        range(AUTO_MAX_EVALUATIONS), desc="prune: searching sparsity", total=AUTO_MAX_EVALUATIONS
    )
    verdicts: dict[int, bool] = {0: True}

    def check(percent: int) -> bool:
        if percent not in verdicts:
            verdicts[percent] = passes(percent)
        return verdicts[percent]

    low, high = 0, 100  # low passes; high fails (100 is never tried)
    for _ in budget:
        if high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if check(middle) else (low, middle)
            continue
        step = low + AUTO_STEP_CHECK
        if step > 99 or (step in verdicts and not verdicts[step]):
            break
        if check(step):  # the metric is not monotonic: search again above
            low = step
            high = min([p for p, ok in verdicts.items() if not ok and p > step] or [100])
    return low


def _statistics(graph, selection, ctx, prune_pass) -> dict | None:
    """Statistics of every refittable weight from one run of the unpruned model, when the
    method uses calibration data and they fit ``STATS_BYTES`` (else None: each
    candidate collects its own, one run per memory stage)."""
    if not prune_pass.uses_calibration or not ctx.calibration:
        return None
    plans = _plans(selection)
    diagonal = not prune_pass.refits
    cut = refitting.stages(plans, diagonal=diagonal)
    if len(cut) > 1:
        return None
    return refitting.collect(ctx, graph, cut[0] if cut else [], diagonal=diagonal)


def _plans(selection: Selection) -> list[refitting.Plan]:
    plans = [refitting.plan(t, i) for i, t in enumerate(selection.targets)]
    return [p for p in plans if not isinstance(p, str)]


def _sensitivity(graph, selection, ctx, prune_pass, statistics) -> dict[str, float]:
    """Relative output error of each layer pruned alone at ``PROBE_SPARSITY``."""
    probe = _request(selection, PROBE_SPARSITY, {})
    errors: dict[str, float] = {}
    for target in selection.targets:
        stats = (statistics or {}).get(target.name)
        if stats is not None:
            error = prune_pass.probe(graph, target, ctx, probe, stats)
            if error is not None:
                errors[target.name] = error
                continue
        errors[target.name] = _magnitude_error(target, probe.counts.get(target.name, 0))
    return errors


def _magnitude_error(target, count: int) -> float:
    values = np.array(read_values(target.tensor), dtype=np.float64, copy=True)
    energy = float(np.sum(values * values))
    pruned = values.copy()
    zero_smallest(pruned, count)
    return float(np.sum((values - pruned) ** 2)) / energy if energy > 0 else 0.0


def allocate(sizes: np.ndarray, sensitivity: np.ndarray, target: float) -> np.ndarray:
    """Per-layer sparsities with size-weighted mean ``target`` (see the module docs)."""
    if len(sizes) == 0:
        return np.zeros(0)
    order = np.argsort(np.argsort(sensitivity, kind="stable"), kind="stable")
    quantile = order / max(len(sizes) - 1, 1)
    offsets = ALLOCATION_SPREAD * (1 - 2 * quantile)
    weights = sizes / sizes.sum()

    def mean(shift: float) -> float:
        return float(np.sum(weights * np.clip(target + offsets + shift, 0.0, 0.99)))

    low, high = -1.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean(middle) < target else (low, middle)
    return np.clip(target + offsets + (low + high) / 2, 0.0, 0.99)


def _request(selection: Selection, sparsity: float, sensitivity: dict[str, float]) -> Request:
    targets = selection.targets
    sizes = np.array([_size(t) for t in targets], dtype=np.float64)
    if sensitivity:
        scores = np.array([sensitivity[t.name] for t in targets])
        per_layer = allocate(sizes, scores, sparsity)
    else:
        per_layer = np.full(len(targets), sparsity)
    counts = {t.name: round(s * n) for t, s, n in zip(targets, per_layer, sizes)}
    return Request("sparsity" if sparsity else "none", counts, sparsity=sparsity)


def _size(target) -> int:
    return int(np.prod(target.tensor.shape, dtype=np.int64))


def _curve_point(percent: int, evaluation) -> dict:
    worst = evaluation.worst()
    point = {"sparsity": percent / 100, "ok": evaluation.ok}
    for key in ("cosine", "top1", "sqnr", "max_abs"):
        value = worst.get(key)
        if value is not None:
            point[key] = value if math.isfinite(value) else str(value)
    if evaluation.violations:
        point["violations"] = evaluation.violations[:3]
    return point
