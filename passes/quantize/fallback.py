"""``fallback=auto``: return the most sensitive quantized nodes to float until the
step's budget is met, fewest first.

1. The full placement is measured with ``ctx.evaluate`` (the PassManager's own
   check: same validation samples, reference and budget). Within budget: done.
2. Sensitivity of a set of quantized Conv/Gemm/MatMul: that set quantized, everything
   else float, output SQNR against the float model on calibration samples (not the
   validation samples the budget is checked on; ``SENSITIVITY_SAMPLES`` at most,
   fewer when each sample has many output values: at least ``SENSITIVITY_VALUES``
   values and ``MIN_SENSITIVITY_SAMPLES`` samples). Lower SQNR = more sensitive.
3. The ranking is found lazily, best first (:class:`Ranking`): quantization noise
   from different layers adds up, so a set is at least as noisy as any of its
   members. The noisiest set measured so far is split in two halves (graph order),
   both are measured, and a single node that comes out on top is the next most
   sensitive one. Finding the few nodes that carry the error costs about
   ``2 log2(n)`` measurements each instead of ``n`` (PP-OCRv4 det: one node of 62,
   12 measurements instead of 62); ranking everything costs at most ``2n - 2``.
4. The ``k`` most sensitive nodes stay float for k = 1, 2, 3, 4, 6, 8, 12, 16, ...
   until ``ctx.evaluate`` passes; then a bisection between the last failing and the
   first passing ``k`` finds the smallest passing count on that path.
5. When even all-float placements fail, nothing is returned (the step is a no-op
   and says so).

The report lists every node kept float with its SQNR alone and the reason, the SQNR
of every node measured alone and the number of measurements.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.pipeline import Evaluation, PassContext

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 16
MIN_SENSITIVITY_SAMPLES = 4
SENSITIVITY_VALUES = 1 << 19  # output values that make a sample count large enough


@dataclass
class FallbackOutcome:
    built: Any  # int8.Built or None when no placement meets the budget
    before: list[str]
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    evaluations: int = 1
    after: list[str] = field(default_factory=list)
    measurements: int = 0  # sensitivity measurements (single nodes and sets)

    def report(self) -> dict[str, Any]:
        return {
            "violations_before": self.before,
            "kept_float": self.kept_float,
            "sensitivity_sqnr_db": {k: _finite(v) for k, v in self.sensitivity.items()},
            "evaluations": self.evaluations,
            "sensitivity_measurements": self.measurements,
            "violations_after": self.after,
        }

    def notes(self) -> list[str]:
        if not self.before:
            return []
        if self.built is None:
            return [
                "fallback=auto: no placement meets the budget even with every node float "
                f"({'; '.join(self.before)})"
            ]
        names = ", ".join(f"{d['node']} ({d['sqnr_alone_db']} dB)" for d in self.kept_float)
        return [f"fallback=auto kept {len(self.kept_float)} node(s) float: {names}"]


def _finite(value: float) -> float | str:
    return round(value, 2) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def auto_fallback(
    build: Callable[[frozenset[str]], Any],
    built: Any,
    ctx: PassContext,
    float_graph: gs.Graph,
    first: Evaluation | None = None,
) -> FallbackOutcome:
    """See the module docstring. ``build(float_nodes)`` returns an int8 ``Built``;
    ``first``: ``ctx.evaluate(built.graph)`` when the caller has it already."""
    first = first if first is not None else ctx.evaluate(built.graph)
    outcome = FallbackOutcome(built, first.violations)
    if first.ok:
        return outcome
    units = built.plan.core()
    ranking = Ranking(units, SetSensitivity(build, units, ctx, float_graph))
    cache: dict[int, tuple[Any, Evaluation]] = {}

    def attempt(k: int) -> tuple[Any, Evaluation]:
        if k not in cache:
            candidate = build(frozenset(ranking.top(k)))
            cache[k] = (candidate, ctx.evaluate(candidate.graph))
            outcome.evaluations += 1
        return cache[k]

    passing = _search(attempt, len(units))
    outcome.sensitivity = ranking.alone
    outcome.measurements = ranking.measure.count
    if passing is None:
        outcome.built = None
        return outcome
    outcome.built, evaluation = attempt(passing)
    outcome.after = evaluation.violations
    for rank, name in enumerate(ranking.top(passing), 1):
        sqnr = outcome.sensitivity[name]
        outcome.kept_float.append(
            {
                "node": name,
                "sqnr_alone_db": _finite(sqnr),
                "reason": (
                    f"sensitivity rank {rank} of {len(units)}: quantized alone it gives output "
                    f"SQNR {sqnr:.1f} dB; kept float to meet budget {ctx.budget}"
                ),
            }
        )
    return outcome


def _search(attempt: Callable[[int], tuple[Any, Evaluation]], total: int) -> int | None:
    """Smallest k (on a galloping path, then bisection) whose build meets the budget."""
    steps = [k for k in (1, 2, 3, 4) if k <= total]
    k = 6
    while k < total:
        steps.append(k)
        k = k * 3 // 2 if k >= 8 else k + 2
    if total not in steps:
        steps.append(total)
    last_fail = 0
    for k in steps:
        if attempt(k)[1].ok:
            low, high = last_fail, k  # low fails (or is 0), high passes
            while high - low > 1:
                middle = (low + high) // 2
                if attempt(middle)[1].ok:
                    high = middle
                else:
                    low = middle
            return high
        last_fail = k
    return None


class SetSensitivity:
    """Output SQNR (dB, all outputs together) with only a set of units quantized."""

    def __init__(
        self,
        build: Callable[[frozenset[str]], Any],
        units: list[str],
        ctx: PassContext,
        float_graph: gs.Graph,
    ) -> None:
        self.build = build
        self.units = frozenset(units)
        self.ctx = ctx
        first = ctx.calibration[:1]
        session = runtime.make_session(ctx.to_model(float_graph))
        values = sum(np.asarray(v).size for v in runtime.run_samples(session, first)[0].values())
        wanted = -(-SENSITIVITY_VALUES // max(values, 1))
        count = min(max(wanted, MIN_SENSITIVITY_SAMPLES), SENSITIVITY_SAMPLES)
        self.samples = ctx.calibration[:count]
        self.reference = runtime.run_samples(session, self.samples)
        self.count = 0

    def __call__(self, group: frozenset[str]) -> float:
        candidate = self.build(self.units - group)
        session = runtime.make_session(self.ctx.to_model(candidate.graph))
        self.count += 1
        sqnr = output_sqnr(self.reference, runtime.run_samples(session, self.samples))
        return -math.inf if math.isnan(sqnr) else sqnr  # NaN outputs: most sensitive


class Ranking:
    """Units in order of decreasing sensitivity, found lazily (see the module
    docstring, step 3). ``top(k)`` measures only what the first ``k`` need."""

    def __init__(self, units: list[str], measure: Callable[[frozenset[str]], float]) -> None:
        self.measure = measure
        self.order: list[str] = []
        self.alone: dict[str, float] = {}  # SQNR of single units measured alone
        self._heap: list[tuple[float, int, tuple[str, ...]]] = []
        self._ticket = 0
        if len(units) == 1:
            self._push(tuple(units), -math.inf)
        elif units:
            self._split(tuple(units))

    def top(self, k: int) -> list[str]:
        while len(self.order) < k and self._heap:
            _, _, group = heapq.heappop(self._heap)
            if len(group) == 1:
                self.order.append(group[0])
                if group[0] not in self.alone:  # a lone unit: measure it for the report
                    self.alone[group[0]] = self.measure(frozenset(group))
            else:
                self._split(group)
        return self.order[:k]

    def _split(self, group: tuple[str, ...]) -> None:
        middle = len(group) // 2
        for part in (group[:middle], group[middle:]):
            sqnr = self.measure(frozenset(part))
            if len(part) == 1:
                self.alone[part[0]] = sqnr
            self._push(part, sqnr)

    def _push(self, group: tuple[str, ...], sqnr: float) -> None:
        # lowest SQNR first; ties in graph order
        heapq.heappush(self._heap, (sqnr, self._ticket, group))
        self._ticket += 1


def output_sqnr(reference: list[dict], outputs: list[dict]) -> float:
    signal = noise = 0.0
    for ref, got in zip(reference, outputs):
        for key, value in ref.items():
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                continue
            r = np.asarray(value, np.float64)
            g = np.asarray(got[key], np.float64)
            signal += float(np.sum(r * r))
            noise += float(np.sum((g - r) ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf
