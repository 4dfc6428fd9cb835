"""``remove-neurons`` / ``remove-dead-neurons`` — structured pruning on the ONNX graph.

Rewrite: delete whole output channels (Conv / ConvTranspose filters, Gemm / MatMul
output features) and propagate the change through the graph so the model stays
valid and gets smaller: the coupled producers lose the same channels, consumers lose
the matching input slices, per-channel parameters (BatchNormalization, elementwise
constants, per-axis quantization scales) are sliced, and shape constants (Reshape
shape, Split sizes, Slice bounds, Resize sizes, Expand shape) are recomputed; stale
shapes are dropped so ONNX shape inference recomputes them.

Which channels go together comes from the dependency analysis (``groups.py``,
handler tables in ``handlers.py`` and ``reshaping.py``): residual Adds couple groups,
Concat / Split / Slice map channel offsets, a depthwise Conv couples its input and
output, Flatten / Reshape into Gemm / MatMul map one channel to a block of features,
Transpose moves the tracked axis, a Reshape splitting the channel axis couples the same
channel of every shuffle group (channel shuffle) or, for ``[heads, head_dim]`` of
attention, the channels of one head (``attention=heads``, default: Q/K/V lose whole
heads through the batched MatMuls; ``attention=dims``: the same dims of every head,
``q @ kᵀ`` coupling q and k), grouped Convs remove the same count from every channel
group (a shuffled class straddling two Conv groups is kept), LSTM / GRU / RNN lose
hidden units in every gate and direction (``recurrent.py``). Reshape / Slice / Split
parameters computed from ``Shape`` are first resolved into constants on the symbolic
shapes (``shapes.py``, exact), and the branches of ``If`` nodes are pruned as graphs
of their own with ``ratio=`` (``branches.py``).
Groups that touch something the pass cannot rewrite exactly (LayerNorm / Softmax /
reductions over the channel axis, reshapes regrouping it with other axes, shapes
computed at run time, graph outputs, unknown ops) are *blocked* and reported with
the reason; nothing is guessed.

Two passes share the machinery:

- ``remove-dead-neurons`` (lossless, strict budget): removes channels that are
  *provably* constant whatever the input (all-zero filter: the output is the bias,
  kept constant by the ops on the way), folding a non-zero constant into the
  consumers' bias exactly (only where that is exact: see ``dead.py``).
- ``remove-neurons`` (lossy, checked against the original with the pipeline's
  budget): ``mode=l1|l2`` removes the least important channels of every prunable
  group, ``ratio=`` per group or ``target_macs=`` (fraction of the MACs to keep,
  chosen with one global threshold on normalized importance); ``mode=dead`` also
  removes channels that are constant (e.g. zero after a ReLU) on every calibration
  sample. ``round_to=`` keeps channel counts multiples of N, ``min_channels=`` keeps
  at least N per group, ``exclude=`` names producers never pruned, ``compensate=true``
  folds each removed channel's calibration mean into its consumers' bias.

Does nothing (``changed=False``) when no group is prunable or nothing is selected.
Loop/Scan bodies are not pruned; a tensor any subgraph reads is pinned. The
report lists every group: producers, channels before/after, status and reasons, plus
parameter and MAC counts before and after (MACs at batch 1, dynamic dims as 1).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.errors import UsageError
from onnxopt.graph import param_count
from onnxopt.passes.neurons import branches, dead, recurrent  # noqa: F401  (registers)
from onnxopt.passes.neurons.constants import fold_constant_shape_ops
from onnxopt.passes.neurons.groups import ChannelGraph, analyze
from onnxopt.passes.neurons.importance import (
    Limits,
    Selection,
    class_scores,
    keep_mask,
    select_candidates,
    select_ratio,
    select_target_macs,
)
from onnxopt.passes.neurons.layout import infer_shapes
from onnxopt.passes.neurons.macs import MacEstimator, count_macs
from onnxopt.passes.neurons.rewrite import Rewriter, apply
from onnxopt.passes.neurons.shapes import resolve_shape_parameters, symbolic_dims
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass
from onnxopt.results import Skipped

log = logging.getLogger(__name__)


@dataclass
class NeuronOptions:
    mode: Literal["l1", "l2", "dead"] = option(
        "l1", "l1 / l2: least important channels; dead: constant channels"
    )
    ratio: Optional[float] = option(  # noqa: UP045  (options.coerce reads both forms)
        None, "fraction of the channels removed from every prunable group", range=(0.0, 1.0)
    )
    target_macs: Optional[float] = option(  # noqa: UP045
        None, "fraction of the model's MACs to keep (global choice)", range=(0.0, 1.0)
    )
    round_to: int = option(1, "kept channel counts are multiples of this", range=(1, 4096))
    min_channels: int = option(1, "channels every group keeps at least", range=(1, 2**31))
    exclude: tuple[str, ...] = option((), "glob patterns of producer node names never pruned")
    compensate: bool = option(
        False, "l1/l2: fold removed channels' calibration mean into the consumers' bias"
    )
    attention: Literal["heads", "dims"] = option(
        "heads", "attention: remove whole heads, or the same dims of every head"
    )

    def validate(self) -> None:
        if self.mode == "dead":
            if self.ratio is not None or self.target_macs is not None:
                raise ValueError("mode=dead takes neither ratio= nor target_macs=")
            return
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError(f"mode={self.mode} needs exactly one of ratio= or target_macs=")
        if self.ratio is not None and self.ratio >= 1.0:
            raise ValueError("ratio must be below 1 (min_channels keeps what is left)")
        if self.target_macs is not None and self.target_macs <= 0.0:
            raise ValueError("target_macs must be above 0")


@dataclass
class DeadOptions:
    min_channels: int = option(1, "channels every group keeps at least", range=(1, 2**31))
    exclude: tuple[str, ...] = option((), "glob patterns of producer node names never pruned")


@register_pass
class RemoveNeuronsPass(Pass):
    name = "remove-neurons"
    summary = "Remove whole channels/features (structured pruning) and fix the graph around them."
    lossless = False
    Options = NeuronOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return _run(graph, ctx, self.options, provable_only=False)


@register_pass
class RemoveDeadNeuronsPass(Pass):
    name = "remove-dead-neurons"
    summary = "Remove channels that are provably constant; fold their value into consumers."
    lossless = True
    Options = DeadOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        options = NeuronOptions(
            mode="dead", min_channels=self.options.min_channels, exclude=self.options.exclude
        )
        return _run(graph, ctx, options, provable_only=True)


# ---------------------------------------------------------------------------- the run


def _run(
    graph: gs.Graph, ctx: PassContext, options: NeuronOptions, provable_only: bool
) -> PassResult:
    prefolded = fold_constant_shape_ops(graph)
    branch_params = branches.prepare(graph)
    resolved = resolve_shape_parameters(graph)
    shapes = infer_shapes(graph)
    before = {"params": param_count(graph) + branch_params, "macs": count_macs(graph, shapes)}
    dead_mode = options.mode == "dead"
    cg = analyze(
        graph, track_constants=dead_mode, exclude=options.exclude, shapes=shapes,
        heads=options.attention == "heads",
    )  # fmt: skip
    scores = class_scores(cg, "l1" if dead_mode else options.mode)
    limits = Limits(options.min_channels, options.round_to)
    notes: list[str] = []
    values: dict[str, dead.SinkValues] = {}
    if dead_mode or options.compensate:
        values = _sink_values(graph, cg, ctx, provable_only)
    if dead_mode:
        candidates = dead.dead_classes(cg, values, use_data=not provable_only)
        selection = select_candidates(cg, scores, candidates, limits)
    elif options.ratio is not None:
        selection = select_ratio(cg, scores, options.ratio, limits)
    else:
        estimate = MacEstimator(cg, before["macs"])
        selection, reached = select_target_macs(
            cg, scores, options.target_macs * before["macs"], estimate, limits
        )
        if reached > options.target_macs * before["macs"]:
            notes.append(
                f"target_macs={options.target_macs:g} not reachable: at most "
                f"{reached / max(before['macs'], 1):.3f} of the MACs within the limits"
            )
    keep = keep_mask(cg, selection)
    groups = _group_records(cg, selection, keep)
    removed = sum(r["channels_before"] - r["channels_after"] for r in groups)
    branch_params_after = branch_params
    if branch_params and options.ratio is not None and not dead_mode:
        outcome = branches.prune_branches(
            graph, shapes, symbolic_dims(graph), norm=options.mode, ratio=options.ratio,
            limits=limits, exclude=options.exclude, records=_group_records,
            heads=options.attention == "heads",
        )  # fmt: skip
        groups += outcome.groups
        removed += outcome.removed
        resolved += outcome.resolved
        branch_params_after = outcome.params_after
    elif branch_params:
        notes.append("If branches are pruned with ratio= only; left as they are")
    result = _result(cg, groups, before, before, removed, prefolded, notes)
    result.counts["shape_parameters_resolved"] = resolved
    if not removed:
        return result
    rw = Rewriter(graph, cg, keep)
    folded = dead.fold(rw, values)
    touched = apply(rw)
    graph.cleanup(remove_unused_graph_inputs=False)
    after = {"params": param_count(graph) + branch_params_after, "macs": count_macs(graph)}
    result = _result(cg, groups, before, after, removed, prefolded, notes)
    result.changed = True
    result.counts["shape_parameters_resolved"] = resolved
    result.counts["folded_into_bias"] = folded
    result.details["rewritten_nodes"] = len(touched)
    log.info(
        "remove-neurons: %d channels removed, params %d -> %d, MACs %d -> %d",
        removed, before["params"], after["params"], before["macs"], after["macs"],
    )  # fmt: skip
    return result


def _sink_values(graph, cg: ChannelGraph, ctx: PassContext, provable_only: bool):
    """Per-position stats of the consumer inputs that matter for dead channels."""
    open_group = np.array([not g.blocked for g in cg.groups], dtype=bool)
    wanted = set()
    for sink in cg.sinks:
        relevant = open_group[cg.atom_group[sink.layout.atoms]]
        if provable_only:
            relevant &= sink.layout.const
        if relevant.any():
            wanted.add(sink.node.inputs[sink.index].name)
    if not wanted:
        return {}
    if not ctx.calibration and not provable_only:
        return {}  # no data: nothing data-dependent is removed or compensated
    if not ctx.calibration:
        raise UsageError(
            "remove-dead-neurons needs calibration samples; pass --data or raise --calib-samples"
        )
    samples = ctx.calibration[:1] if provable_only else ctx.calibration
    model = ctx.to_model(graph)
    progress = ctx.progress(samples, desc="measuring channels", total=len(samples))
    return dead.measure(cg, runtime.iter_activations(model, sorted(wanted), progress))


def _group_records(
    cg: ChannelGraph, selection: Selection, keep: np.ndarray
) -> list[dict[str, Any]]:
    """One record per group: its channels (classes) before/after, status, reasons,
    and each producer's output width before/after."""
    records = []
    for group in cg.groups:
        producers = [p for p in group.producers if p.op != "untracked"]
        if not producers:
            continue
        removed = len(selection.get(group.index, ()))
        status = "blocked" if group.blocked else ("pruned" if removed else "unchanged")
        widths = {p.name: [p.size, int(keep[p.base : p.base + p.size].sum())] for p in producers}
        records.append(
            {
                "group": group.index,
                "producers": group.describe(),
                "channels_before": group.size,
                "channels_after": group.size - removed,
                "status": status,
                "reason": "; ".join(group.reasons),  # for people; "reasons" for counting
                "reasons": list(group.reasons),
                "widths": widths,
            }
        )
    return records


def _result(cg, groups, before, after, removed, prefolded, notes) -> PassResult:
    blocked = [g for g in groups if g["status"] == "blocked"]
    reasons = Counter(reason for g in blocked for reason in g["reasons"])
    counts = {
        "groups": len(groups),
        "groups_pruned": sum(g["status"] == "pruned" for g in groups),
        "groups_blocked": len(blocked),
        "channels_removed": removed,
        "params_before": before["params"],
        "params_after": after["params"],
        "macs_before": before["macs"],
        "macs_after": after["macs"],
        "constant_ops_folded": prefolded,
    }
    details = {
        "groups": groups,
        "blocked_reasons": dict(reasons.most_common()),
        "params": {"before": before["params"], "after": after["params"]},
        "macs": {"before": before["macs"], "after": after["macs"]},
    }
    skipped = [
        Skipped(f"group {g['group']} ({g['producers']})", "group", g["reason"]) for g in blocked
    ]
    return PassResult(False, counts, details, list(notes), skipped=skipped)
