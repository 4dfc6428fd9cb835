"""Calibration for pruning: which weights can be refitted, one run per stage, the refit.

:func:`plan` decides, from the graph alone, whether a weight can be reconstructed: every
use must be a Conv / ConvTranspose / Gemm / MatMul input :mod:`.hessian` understands,
with one row layout and one ``[G, K]`` shape (a weight shared by several such nodes sums
their statistics).

:func:`collect` runs the **unpruned** model once over the calibration samples, with
every activation the plans need as an extra output (``ctx.activations``), and feeds each
sample's rows into each plan's :class:`~.hessian.InputStatistics`. One run serves every
layer (one-shot, like SparseGPT's "parallel" variant, not its layer-by-layer sequential
one): each layer is fitted to reproduce its own unpruned output on unpruned inputs.
Measured on the zoo, a sequential refit from the inputs of the already pruned model
either costs one run per layer (51 runs for PP-OCRv4 rec) or, in stages of several
layers, over-corrects (every layer of a stage compensates the same upstream error:
PP-OCR cls fell from 8 to -0.5 dB SQNR). :func:`stages` splits the plans only when their
statistics would pass ``STATS_BYTES`` (then one run per stage, each of the unpruned
model).

When the layers are cheap to run again (:func:`sequential`: two more runs per layer,
``2 * (layers - 1) * macs`` multiply-adds of the refitted layers, within
``SEQUENTIAL_MACS``), they are refitted layer by layer instead: layer ``l`` reads its
inputs ``X`` from the model with layers ``< l`` already pruned and, in lockstep, ``X0``
from the unpruned model, and is fitted to reproduce the unpruned outputs (``XᵀX`` and
``XᵀX0``; see :func:`~.sparsegpt.dense_target`). Measured: digits CNN output cosine
0.982 -> 0.994, digits transformer at 80 % 21 -> 81 % accuracy. The decision depends on
the model and the calibration set only (counted rows), never on a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.passes.prune.hessian import (
    InputStatistics,
    LayerInput,
    layer_input,
    positions_limit,
    statistics_bytes,
)
from onnxopt.passes.prune.sparsegpt import (
    Rule,
    damped,
    dense_target,
    inverse_cholesky,
    output_error,
    polish_iterations,
    sweep,
    working_dtype,
)
from onnxopt.passes.prune.sparsegpt import polish as sg_polish
from onnxopt.passes.prune.weights import WeightTarget
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

STATS_BYTES = 1 << 30  # float64 statistics held at once (one stage, one run)
SEQUENTIAL_MACS = 5e10  # layer-by-layer refit when its extra runs stay within this
REPLAY_CACHE_BYTES = 256 << 20  # unpruned activations kept for a layer-by-layer refit


@dataclass
class Plan:
    """A weight that can be refitted: its uses' inputs, one ``[G, K]`` shape."""

    target: WeightTarget
    inputs: list[LayerInput]
    order: int  # position of its first use in the graph

    @property
    def groups(self) -> int:
        return self.inputs[0].groups

    @property
    def fan_in(self) -> int:
        return self.inputs[0].fan_in

    def nbytes(self, *, diagonal: bool) -> int:
        return statistics_bytes(self.groups, self.fan_in, diagonal=diagonal)


def plan(target: WeightTarget, order: int) -> Plan | str:
    """A :class:`Plan` for ``target``, or why it cannot be refitted."""
    if target.layout is None:
        return "its uses disagree on the row layout"
    inputs = []
    for node, index in target.uses:
        found = layer_input(node, index, tuple(target.tensor.shape))
        if isinstance(found, str):
            return found
        inputs.append(found)
    shapes = {(i.groups, i.fan_in) for i in inputs}
    layout = target.layout
    if len(shapes) != 1:
        return "its uses read inputs of different shapes"
    groups, fan_in = shapes.pop()
    if fan_in != layout.fan_in or layout.rows % groups:
        return f"input rows [{groups}, {fan_in}] do not match the weight's layout"
    return Plan(target, inputs, order)


def stages(plans: list[Plan], *, diagonal: bool) -> list[list[Plan]]:
    """``plans`` in graph order, cut into consecutive stages whose statistics stay
    within ``STATS_BYTES`` (one stage unless memory asks for more)."""
    ordered = sorted(plans, key=lambda p: p.order)
    return runtime.split_within(ordered, lambda p: p.nbytes(diagonal=diagonal), STATS_BYTES)


def collect(
    ctx: PassContext,
    graph: gs.Graph,
    stage: list[Plan],
    *,
    diagonal: bool = False,
    unpruned: gs.Graph | None = None,
    desc: str = "prune: calibrating",
) -> dict[str, InputStatistics]:
    """Statistics of every plan of ``stage``, by weight name: one onnxruntime run of
    ``graph`` over the calibration samples (and, in lockstep, one of ``unpruned`` for
    the cross term ``XᵀX0``, when given)."""
    cross = unpruned is not None
    found = {
        p.target.name: InputStatistics(p.groups, p.fan_in, diagonal=diagonal, cross=cross)
        for p in stage
    }
    sources = sorted({use.source for p in stage for use in p.inputs})
    limits = {p.target.name: positions_limit(p.fan_in, len(ctx.calibration)) for p in stage}
    before = _stream(ctx, unpruned, sources, f"{desc} (unpruned)") if cross else None
    for acts in _stream(ctx, graph, sources, desc):
        acts0 = next(before) if before is not None else None
        for p in stage:
            stats = found[p.target.name]
            limit = limits[p.target.name]
            for use in p.inputs:
                x = use.rows_of(acts[use.source], limit)
                x0 = use.rows_of(acts0[use.source], limit) if acts0 is not None else None
                stats.add(x, x0)
        del acts, acts0
    for stats in found.values():
        stats.flush()
    return found


class Replay:
    """One onnxruntime session for a layer-by-layer refit: the unpruned model with every
    planned weight turned into an overridable input (its initializer stays its default)
    and every activation the plans read as an extra output. A layer's inputs with the
    layers before it pruned are one run with their new weights fed; the same inputs in
    the unpruned model are one run with the defaults — no session or export per layer."""

    def __init__(self, ctx: PassContext, graph: gs.Graph, plans: list[Plan]) -> None:
        self.ctx = ctx
        self.given = {t.name for t in graph.inputs}
        sources = sorted({use.source for p in plans for use in p.inputs} - self.given)
        model = runtime.with_outputs(ctx.to_model(graph), sources)
        declared = {i.name for i in model.graph.input}
        names = {p.target.name for p in plans}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer
            if t.name in names and t.name not in declared
        )
        model.ir_version = max(model.ir_version, 4)
        self.session = runtime.make_session(model)
        self.feedable = runtime.feedable(self.session)
        self.sources = sources
        self.unpruned = self._unpruned_activations()

    def _unpruned_activations(self) -> list[dict[str, np.ndarray]] | None:
        """Every source of every sample in the unpruned model, kept when they fit
        ``REPLAY_CACHE_BYTES`` (then each layer costs one run per sample, not two)."""
        kept, held = [], 0
        for sample in self.ctx.calibration:
            feed = {k: v for k, v in sample.items() if k in self.feedable}
            acts = dict(zip(self.sources, self.session.run(self.sources, feed)))
            held += sum(a.nbytes for a in acts.values())
            if held > REPLAY_CACHE_BYTES:
                return None
            kept.append(acts)
        return kept

    def collect(self, p: Plan, weights: dict[str, np.ndarray], desc: str) -> InputStatistics:
        """``XᵀX`` and ``XᵀX0`` of ``p``: inputs with ``weights`` fed, and without."""
        stats = InputStatistics(p.groups, p.fan_in, cross=True)
        limit = positions_limit(p.fan_in, len(self.ctx.calibration))
        names = sorted({use.source for use in p.inputs} - self.given)
        samples = self.ctx.progress(
            self.ctx.calibration, desc=desc, total=len(self.ctx.calibration)
        )
        for index, sample in enumerate(samples):
            feed = {k: v for k, v in sample.items() if k in self.feedable}
            now = dict(zip(names, self.session.run(names, {**feed, **weights}))) if names else {}
            if self.unpruned is not None:
                before = self.unpruned[index]
            else:
                before = dict(zip(names, self.session.run(names, feed))) if names else {}
            given = {k: sample[k] for k in self.given if k in sample}
            now, before = {**now, **given}, {**before, **given}
            for use in p.inputs:
                x, x0 = use.rows_of(now[use.source], limit), use.rows_of(before[use.source], limit)
                stats.add(x, x0)
        stats.flush()
        return stats


def macs(p: Plan, stats: InputStatistics) -> int:
    """Multiply-adds of ``p``'s layer(s) over the calibration rows ``stats`` saw."""
    return stats.rows * p.fan_in * p.target.layout.rows


def sequential(plans: list[Plan], found: dict[str, InputStatistics]) -> bool:
    """Whether a layer-by-layer refit is cheap enough (see the module docstring)."""
    if len(plans) < 2:
        return False
    run = sum(macs(p, found[p.target.name]) for p in plans)
    return 2 * (len(plans) - 1) * run <= SEQUENTIAL_MACS


def _stream(
    ctx: PassContext, graph: gs.Graph, sources: list[str], desc: str
) -> Iterator[dict[str, np.ndarray]]:
    """The ``sources`` tensors for each calibration sample: graph inputs straight from
    the sample, the others from one onnxruntime run with them as outputs."""
    given = {t.name for t in graph.inputs}
    inner = [name for name in sources if name not in given]
    runs = ctx.activations(graph, inner, desc=desc) if inner else None
    for sample in ctx.calibration:
        acts = dict(next(runs)) if runs is not None else {}
        acts.update({name: sample[name] for name in sources if name in given})
        yield acts


@dataclass
class Fit:
    """A refitted weight in its ``[rows, fan_in]`` view, and how well it reproduces the
    layer: ``error`` = output error / output energy, ``Σ (w - w*)ᵀ Hd (w - w*) / Σ
    w*ᵀ Hd w*`` (0: exact)."""

    rows: np.ndarray
    error: float
    polish_iterations: int


def refit(
    p: Plan, stats: InputStatistics, rows: np.ndarray, rule: Rule, *, polish: bool, consume: bool
) -> Fit:
    """Prune and refit the ``[rows, K]`` float64 weights of ``p`` by ``rule`` with the
    sweep of :mod:`.sparsegpt` (then :func:`~.sparsegpt.polish` when asked). With
    ``consume`` the Hessian is released as soon as it is damped. Raises
    ``np.linalg.LinAlgError`` if the damped Hessian is not positive definite."""
    groups = p.groups
    dtype = working_dtype(p.fan_in)
    target = rows.reshape(groups, rows.shape[0] // groups, rows.shape[1]).astype(dtype)
    hd, lam = damped(stats.hessian, stats.rows)
    cross = stats.cross
    if consume:
        stats.hessian = stats.cross = None
    hd = hd.astype(dtype, copy=False)
    upper = inverse_cholesky(hd)
    if cross is not None:  # inputs from the pruned model: reproduce the unpruned outputs
        target = dense_target(target, upper, cross.astype(dtype, copy=False), lam)
        del cross
    fitted = target.copy()
    mask = sweep(fitted, upper, rule)
    del upper
    iterations = polish_iterations(rows.shape[0], p.fan_in) if polish else 0
    if iterations:
        sg_polish(fitted, target, hd, mask, iterations=iterations)
    energy = float(np.sum(output_error(target, None, hd)))
    error = float(np.sum(output_error(fitted, target, hd))) / energy if energy > 0 else 0.0
    return Fit(fitted.reshape(rows.shape), error, iterations)
