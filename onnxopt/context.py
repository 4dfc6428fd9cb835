"""What a pass may use while it runs: ``PassContext`` (calibration samples, a seeded
RNG, progress, the model template, ``evaluate`` to measure a candidate exactly as the
manager will, ``activations`` for intermediate tensors), ``matches_any`` for the
glob options (``exclude=``, ``ops=``) and ``node_filter`` / ``check_op_types`` for the
``op_types=`` / ``exclude=`` pair the quantizers share."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as graph_utils
from onnxopt import runtime
from onnxopt.check import (
    Budget,
    OutputMetrics,
    worst,
)
from onnxopt.data import Feed
from onnxopt.errors import UsageError
from onnxopt.progress import SILENT, Progress
from onnxopt.store import WeightStore


@dataclass
class Evaluation:
    """One measurement of a candidate graph against the step's budget."""

    metrics: dict[str, OutputMetrics]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def worst(self) -> dict[str, float | None]:
        return worst(self.metrics)


@dataclass
class PassContext:
    """What a pass may use: calibration data, a seeded RNG, progress, measurement."""

    calibration: Sequence[Feed]  # a list, or samples read from the data file on use
    rng: np.random.Generator
    seed: int
    template: onnx.ModelProto
    original: onnx.ModelProto
    budget: Budget
    progress: Progress = SILENT
    evaluator: Callable[[gs.Graph], Evaluation] | None = None
    store: WeightStore | None = None  # a large model's run: where new weights are written

    def evaluate(self, graph: gs.Graph) -> Evaluation:
        """Measure ``graph`` exactly as the PassManager will (budget, reference). A graph
        onnxruntime cannot load or run comes back failed, with the reason as violation."""
        if self.evaluator is None:
            raise RuntimeError("no evaluator in this context")
        return self.evaluator(graph)

    def to_model(self, graph: gs.Graph) -> onnx.ModelProto:
        return graph_utils.to_model(graph, self.template, self.store)

    def activations(
        self, graph: gs.Graph, names: Sequence[str], desc: str = "calibrating"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Intermediate tensors ``names`` for each calibration sample, one at a time."""
        if not self.calibration:
            raise UsageError(
                "this pass needs calibration samples; pass --data or raise --calib-samples"
            )
        model = self.to_model(graph)
        samples = self.progress(self.calibration, desc=desc, total=len(self.calibration))
        return runtime.iter_activations(model, names, samples)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Glob match used by ``exclude=`` / ``ops=`` style options."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def node_filter(node: gs.Node, op_types: Iterable[str], exclude: Iterable[str]) -> str | None:
    """Why a pass's ``op_types=`` / ``exclude=`` options leave ``node`` alone (its op is
    not one of ``op_types`` when any are given; its name matches an ``exclude`` glob),
    or None when they allow it."""
    op_types = tuple(op_types)
    if op_types and node.op not in op_types:
        return f"op type not in op_types={list(op_types)}"
    if matches_any(node.name, exclude):
        return "matches exclude="
    return None


def check_op_types(op_types: Iterable[str], valid: Sequence[str]) -> None:
    """``ValueError`` naming the entries of an ``op_types=`` option that are not in
    ``valid`` (for an ``Options.validate``)."""
    unknown = [op for op in op_types if op not in valid]
    if unknown:
        raise ValueError(
            f"op_types: unknown op type(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
