"""``fallback=auto``: return the most sensitive quantized nodes to float until the
step's budget is met, fewest first.

1. The full placement is measured with ``ctx.evaluate`` (the PassManager's own
   check: same validation samples, reference and budget). Within budget: done.
2. Sensitivity: each quantized Conv/Gemm/MatMul is quantized *alone* (everything
   else float) and the output SQNR against the float model is measured on up to
   ``SENSITIVITY_SAMPLES`` calibration samples (not the validation samples the
   budget is checked on). Lower SQNR = more sensitive.
3. The ``k`` most sensitive nodes stay float for k = 1, 2, 3, 4, 6, 8, 12, 16, ...
   until ``ctx.evaluate`` passes; then a bisection between the last failing and the
   first passing ``k`` finds the smallest passing count on that path.
4. When even all-float placements fail, nothing is returned (the step is a no-op
   and says so).

The report lists every node kept float with its SQNR alone and the reason.
"""

from __future__ import annotations

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


@dataclass
class FallbackOutcome:
    built: Any  # int8.Built or None when no placement meets the budget
    before: list[str]
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    evaluations: int = 1
    after: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "violations_before": self.before,
            "kept_float": self.kept_float,
            "sensitivity_sqnr_db": {k: _finite(v) for k, v in self.sensitivity.items()},
            "evaluations": self.evaluations,
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
    build: Callable[[frozenset[str]], Any], built: Any, ctx: PassContext, float_graph: gs.Graph
) -> FallbackOutcome:
    """See the module docstring. ``build(float_nodes)`` returns an int8 ``Built``."""
    first = ctx.evaluate(built.graph)
    outcome = FallbackOutcome(built, first.violations)
    if first.ok:
        return outcome
    units = built.plan.core()
    outcome.sensitivity = sensitivity(build, units, ctx, float_graph)
    order = sorted(units, key=lambda name: outcome.sensitivity[name])
    cache: dict[int, tuple[Any, Evaluation]] = {}

    def attempt(k: int) -> tuple[Any, Evaluation]:
        if k not in cache:
            candidate = build(frozenset(order[:k]))
            cache[k] = (candidate, ctx.evaluate(candidate.graph))
            outcome.evaluations += 1
        return cache[k]

    passing = _search(attempt, len(order))
    if passing is None:
        outcome.built = None
        return outcome
    outcome.built, evaluation = attempt(passing)
    outcome.after = evaluation.violations
    for rank, name in enumerate(order[:passing], 1):
        sqnr = outcome.sensitivity[name]
        outcome.kept_float.append(
            {
                "node": name,
                "sqnr_alone_db": _finite(sqnr),
                "reason": (
                    f"sensitivity rank {rank} of {len(order)}: quantized alone it gives output "
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


def sensitivity(
    build: Callable[[frozenset[str]], Any],
    units: list[str],
    ctx: PassContext,
    float_graph: gs.Graph,
) -> dict[str, float]:
    """Output SQNR (dB, all outputs together) with only one unit quantized."""
    samples = ctx.calibration[:SENSITIVITY_SAMPLES]
    reference = runtime.run_samples(runtime.make_session(ctx.to_model(float_graph)), samples)
    result = {}
    everything = frozenset(units)
    for name in ctx.progress(units, desc="fallback: sensitivity", total=len(units)):
        candidate = build(everything - {name})
        outputs = runtime.run_samples(runtime.make_session(ctx.to_model(candidate.graph)), samples)
        result[name] = output_sqnr(reference, outputs)
    return result


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
