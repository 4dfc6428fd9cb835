"""Objectives and the Pareto front of a set of trial records (pure functions).

Objectives, all as "lower is better" vectors:

- ``size``    : (size_bytes, -fidelity)
- ``latency`` : (latency_ratio, -fidelity)
- ``both``    : (size_bytes, latency_ratio, -fidelity)

``fidelity`` is the space's fidelity metric (worst output vs the original: SQNR dB by
default; a model no step changed has SQNR inf, cosine 1, top-1 1). ``latency_ratio``
is the trial's latency over the original's, timed interleaved in the same worker: it
is what drives the latency objective, because machine noise cancels in the ratio.

Only trials that met the budget (status ``ok``) are candidates. A trial is on the
front when no other candidate is at least as good on every objective and better on
one. Candidates with the same pipeline text, or with exactly the same objective
vector, count once (the lowest trial number is kept), so the front does not depend
on the order in which trials finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

OBJECTIVES = ("size", "latency", "both")
UNCHANGED = {"sqnr": math.inf, "cosine": 1.0, "top1": 1.0}


def fidelity(record: Mapping[str, Any], metric: str) -> float | None:
    """The record's fidelity; None when the metric is not available (e.g. top1 on a
    model without class-score outputs, or a trial that failed before any check)."""
    metrics = record.get("metrics")
    if metrics is None:
        return None
    if not metrics:
        return UNCHANGED[metric] if record.get("status") == "ok" else None
    value = metrics.get(metric)
    if value is None:
        return None
    value = float(value)  # "inf" strings from the JSON report
    return None if math.isnan(value) else round(value, 6) if math.isfinite(value) else value


def objective_vector(record: Mapping[str, Any], objective: str, metric: str) -> tuple | None:
    """The record's "lower is better" vector, or None when a value is missing."""
    fid = fidelity(record, metric)
    size = record.get("size_bytes")
    latency = record.get("latency_ratio")
    wanted = {
        "size": (size, None if fid is None else -fid),
        "latency": (latency, None if fid is None else -fid),
        "both": (size, latency, None if fid is None else -fid),
    }[objective]
    if any(v is None for v in wanted):
        return None
    return tuple(float(v) for v in wanted)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(
    records: Sequence[Mapping[str, Any]], objective: str, metric: str
) -> list[Mapping[str, Any]]:
    """The non-dominated budget-meeting records, ordered by their first objective."""
    candidates: list[tuple[tuple, Mapping[str, Any]]] = []
    seen_pipelines: set[str] = set()
    seen_vectors: set[tuple] = set()
    for record in sorted(records, key=lambda r: r["trial"]):
        if record.get("status") != "ok" or record["pipeline"] in seen_pipelines:
            continue
        vector = objective_vector(record, objective, metric)
        if vector is None or vector in seen_vectors:
            continue
        seen_pipelines.add(record["pipeline"])
        seen_vectors.add(vector)
        candidates.append((vector, record))
    front = [
        (vector, record)
        for vector, record in candidates
        if not any(dominates(other, vector) for other, _ in candidates)
    ]
    front.sort(key=lambda item: (item[0], item[1]["trial"]))
    return [record for _, record in front]
