"""``quantize-int4(fallback=auto)``: the weights whose 4-bit error matters most go to
int8 until the step's budget holds, as few as the measurements allow.

1. The all-int4 result is measured with ``ctx.evaluate`` (the PassManager's own
   check: same validation samples, reference and budget). Within budget: done, at the
   cost of that one measurement.
2. Ranking, without running the model: each int4 weight's *noise*, the error energy its
   rounding adds to the layer's output over the output's energy,
   ``tr(dW H dW^T) / tr(W H W^T)`` with the ``H`` GPTQ already collected (a Gather
   table: rows weighted by how often the calibration samples read them). Noisier first.
3. The output's noise is taken as the sum of the layers' (each share counted once,
   whatever it passes through), so moving the noisiest weights to int8 removes the
   output noise in proportion to their share. From the measured output (worst SQNR,
   or cosine) and the budget's threshold the pass works out the share to remove (with
   a margin: ``MARGIN``), moves the fewest noisiest weights that cover it, and measures. Missed:
   the share to remove goes halfway to 1 (every int4 weight int8) and it measures
   again. Once a count passes after a failing one, bisection between the two looks for
   a smaller passing count while the weights in between are at least ``BISECT_SHARE``
   of the int4 weights (a measurement costs more than a few kilobytes are worth),
   within ``MAX_EVALUATIONS`` measurements in all.
4. When even every weight in int8 misses the budget, the all-int4 result is returned
   and the manager rolls the step back with its reason (the report says so).

The ranking is an estimate (a layer's noise reaches the output amplified or damped by
what follows it); the count is measured. The report lists the weights moved to int8,
their noise and every measurement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onnxopt.check import Budget
from onnxopt.pipeline import Evaluation

log = logging.getLogger(__name__)

MAX_EVALUATIONS = 7
MARGIN = 0.8  # aim at 80 % of the noise the budget allows
BISECT_SHARE = 0.02  # bisect only when the int8 weights in question are >= 2 % of all


@dataclass
class Outcome:
    chosen: frozenset[int]
    before: list[str]
    after: list[str] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    targets: list = field(default_factory=list)  # filled by the pass
    plan: list = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "violations_before": self.before,
            "int8": self.moved,
            "noise_db": {k: _db(v) for k, v in self.noise.items()},
            "trials": self.trials,
            "violations_after": self.after,
        }

    def notes(self) -> list[str]:
        if not self.before:
            return []
        if not self.chosen:
            return [
                "fallback=auto: the budget is missed even with every int4 weight in int8 "
                f"({'; '.join(self.before)})"
            ]
        return [
            f"fallback=auto: {len(self.moved)} weight(s) int8 per channel to meet the budget "
            f"({len(self.trials)} measurements): {', '.join(self.moved)}"
        ]


def _db(nsr: float) -> float | str:
    return round(-10 * math.log10(nsr), 2) if nsr > 0 else "inf"


def choose(
    eligible: list[int],
    evaluate: Callable[[frozenset[int]], Evaluation],
    noise: Callable[[int], float],
    budget: Budget,
    names: list[str],
    sizes: dict[int, int],
    progress: Callable = lambda items, **_: items,
) -> Outcome:
    """See the module docstring. ``evaluate(chosen)`` measures the result with the
    targets ``chosen`` in int8; ``noise(i)`` is target ``i``'s noise-to-signal ratio;
    ``sizes[i]`` its number of weights."""
    first = evaluate(frozenset())
    outcome = Outcome(frozenset(), first.violations)
    outcome.trials.append({"int8": 0, "violations": first.violations})
    if first.ok or not eligible:
        return outcome
    levels = {i: noise(i) for i in progress(eligible, desc="int4 fallback: noise")}
    order = sorted(eligible, key=lambda i: -levels[i])
    outcome.noise = {names[i]: levels[i] for i in order}
    total = sum(levels.values())
    cumulative, running = [], 0.0
    for i in order:
        running += levels[i]
        cumulative.append(running)

    def count_for(share: float) -> int:
        need = share * total
        return next((k + 1 for k, c in enumerate(cumulative) if c >= need), len(order))

    cache: dict[int, Evaluation] = {}

    def attempt(k: int) -> bool:
        if k not in cache:
            cache[k] = evaluate(frozenset(order[:k]))
            outcome.trials.append({"int8": k, "violations": cache[k].violations})
            log.info("int4 fallback: %d int8 -> %s", k, cache[k].violations or "ok")
        return cache[k].ok

    share = _share_to_remove(first, budget)
    failing, passing = 0, None
    while len(cache) < MAX_EVALUATIONS:
        k = max(count_for(share), failing + 1)
        if attempt(k):
            passing = k
            break
        failing = k
        if k >= len(order):
            break
        share = 1 - (1 - share) / 2
    if passing is None:
        outcome.chosen = frozenset()
        return outcome

    def worth(low: int, high: int) -> bool:  # do int8 weights low..high cost bytes?
        return sum(sizes[i] for i in order[low:high]) > BISECT_SHARE * sum(sizes.values())

    while passing - failing > 1 and len(cache) < MAX_EVALUATIONS and worth(failing, passing):
        middle = (passing + failing) // 2
        if attempt(middle):
            passing = middle
        else:
            failing = middle
    outcome.chosen = frozenset(order[:passing])
    outcome.moved = [names[i] for i in order[:passing]]
    outcome.after = cache[passing].violations
    return outcome


def _share_to_remove(first: Evaluation, budget: Budget) -> float:
    """The share of the output noise to remove so that the budget's SQNR or cosine
    threshold holds with ``MARGIN`` (0.5 when the budget names neither)."""
    measured = [m for m in first.metrics.values() if m.is_float]
    now = max((10 ** (-m.sqnr / 10) for m in measured if math.isfinite(m.sqnr)), default=0.0)
    allowed = []
    for criterion in budget.criteria:
        if criterion.metric == "sqnr":
            allowed.append(10 ** (-criterion.value / 10))
        elif criterion.metric == "cosine" and criterion.value < 1:
            allowed.append(2 * (1 - criterion.value))  # 1 - cos ~ NSR / 2
    if now <= 0 or not allowed:
        return 0.5
    return min(max(1 - MARGIN * min(allowed) / now, 0.05), 1.0)
