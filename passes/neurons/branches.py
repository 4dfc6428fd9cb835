"""Neuron removal inside the branches of ``If`` nodes (``remove-neurons(ratio=)``).

Exporters wrap a whole network in an ``If`` (Silero VAD picks its 8 kHz or 16 kHz
network on the sample rate input). Each branch body is pruned as a graph of its own:
its ``Constant`` nodes are lifted into branch initializers, shape parameters computed
from ``Shape`` are resolved (dims come from the whole model's shape inference, which
covers subgraphs), and the channel analysis runs with the branch outputs pinned (they
are the ``If``'s outputs) and every tensor from the enclosing scope untracked. The
main graph already pins what a branch reads from it, so the two never disagree.

Only ``ratio=`` selection applies here: ``target_macs`` counts the main graph's MACs
and ``mode=dead`` measures main-graph tensors, so with those options branches are left
as they are (a note says so). Loop / Scan bodies are never pruned (their state is
carried between iterations).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from onnxopt.graph import lift_constant_nodes, param_count
from onnxopt.passes.neurons.constants import fold_constant_shape_ops
from onnxopt.passes.neurons.groups import analyze
from onnxopt.passes.neurons.importance import Limits, class_scores, keep_mask, select_ratio
from onnxopt.passes.neurons.layout import Dims
from onnxopt.passes.neurons.rewrite import Rewriter, apply
from onnxopt.passes.neurons.shapes import Entry, resolve_shape_parameters


@dataclass
class BranchOutcome:
    groups: list[dict[str, Any]] = field(default_factory=list)
    removed: int = 0
    params_before: int = 0
    params_after: int = 0
    resolved: int = 0


def if_branches(graph: gs.Graph) -> Iterator[tuple[gs.Node, str, gs.Graph]]:
    """``(If node, attribute, body)`` for every If branch, nested ones included."""
    for node in graph.nodes:
        if node.op != "If":
            continue
        for key in ("then_branch", "else_branch"):
            body = node.attrs.get(key)
            if isinstance(body, gs.Graph):
                yield node, key, body
                yield from if_branches(body)


def prepare(graph: gs.Graph) -> int:
    """Lift the Constant nodes of every branch; return the branches' parameter count."""
    total = 0
    for _, _, body in if_branches(graph):
        lift_constant_nodes(body)
        fold_constant_shape_ops(body)
        total += param_count(body)
    return total


def prune_branches(
    graph: gs.Graph,
    shapes: dict[str, Dims | None],
    symbols: dict[str, list[Entry]],
    *,
    norm: str,
    ratio: float,
    limits: Limits,
    exclude: tuple[str, ...],
    records,
    heads: bool = True,
) -> BranchOutcome:
    """Prune every If branch of ``graph`` with ``ratio``; ``records(cg, selection,
    keep)`` turns a branch's analysis into report records."""
    outcome = BranchOutcome()
    for node, key, body in list(if_branches(graph)):
        outcome.params_before += param_count(body)
        outcome.resolved += resolve_shape_parameters(body, symbols)
        cg = analyze(body, exclude=exclude, shapes=shapes, heads=heads)
        selection = select_ratio(cg, class_scores(cg, norm), ratio, limits)
        keep = keep_mask(cg, selection)
        groups = records(cg, selection, keep)
        for group in groups:
            group["branch"] = f"{node.name or node.outputs[0].name}.{key}"
        removed = sum(g["channels_before"] - g["channels_after"] for g in groups)
        if removed:
            apply(Rewriter(body, cg, keep))
            body.cleanup(remove_unused_graph_inputs=False)
        outcome.groups += groups
        outcome.removed += removed
        outcome.params_after += param_count(body)
    return outcome
