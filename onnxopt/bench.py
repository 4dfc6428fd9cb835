"""Latency of several models in onnxruntime, measured fairly on a small, noisy machine.

Models are timed *interleaved* (round r runs model A, then B, then C...) so slow
drift of the machine hits all of them alike; each round times a block of runs and
the figure reported is the median over rounds, plus the ratio to the first model.
Sessions use onnxruntime's full graph optimizations (what deployment gets).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.data import Feed
from onnxopt.runtime import make_session


@dataclass
class Timing:
    label: str
    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: float  # median / median of the first model at the same thread count


def measure_latency(
    models: Sequence[tuple[str, onnx.ModelProto]],
    feed: Feed,
    *,
    threads: Sequence[int] = (1,),
    rounds: int = 30,
    runs_per_round: int = 5,
    warmup: int = 5,
    tick: Callable[[], None] | None = None,
) -> list[Timing]:
    """Median ms per inference for each model and thread count, interleaved."""
    timings: list[Timing] = []
    for count in threads:
        sessions = [(label, make_session(m, optimize=True, threads=count)) for label, m in models]
        runners = []
        for label, session in sessions:
            names = {i.name for i in session.get_inputs()}
            runners.append((label, session, {k: v for k, v in feed.items() if k in names}))
        for _, session, inputs in runners:
            for _ in range(warmup):
                session.run(None, inputs)
        samples: dict[str, list[float]] = {label: [] for label, _, _ in runners}
        for _ in range(rounds):
            for label, session, inputs in runners:
                start = time.perf_counter()
                for _ in range(runs_per_round):
                    session.run(None, inputs)
                samples[label].append((time.perf_counter() - start) * 1000 / runs_per_round)
            if tick:
                tick()
        base = statistics.median(samples[runners[0][0]])
        for label, _, _ in runners:
            values = samples[label]
            median = statistics.median(values)
            timings.append(
                Timing(
                    label,
                    count,
                    median,
                    float(np.percentile(values, 10)),
                    float(np.percentile(values, 90)),
                    median / base if base else float("nan"),
                )
            )
    return timings
