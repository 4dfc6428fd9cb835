"""Which constants ``share-weights`` encodes, and how (the pass's selection rules are
specified in its docstring, ``onnxopt.passes.codebook``).

``select`` returns the weights that get their own codebook, the small constants that
go to float16 (or a pooled codebook), and the skipped ones with their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_nodes
from onnxopt.pipeline import matches_any
from onnxopt.results import Skipped
from onnxopt.weights import WEIGHT_ROLES, WeightRef

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SHARED_ROLES = ("weight", "embedding")
POOL_MIN_SIZE = 8  # below this, a pooled tensor's split entry costs what it saves
# a weight holding less than this share of the model's weights is not worth a codebook:
# float16 (scope=all) keeps it. Such tensors are often read everywhere (MiniLM's token
# type embeddings, 768 values: the largest single error of the 4-bit model).
SMALL_SHARE = 1e-3

# scope=all: positions at which a float constant other than a weight may be shared
# (None = every input). Anything else (Resize scales, Clip bounds, Pow exponents, ...)
# sets shapes or exact semantics and is left alone.
CONSTANT_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Add": None,
    "Sub": None,
    "Mul": None,
    "Div": None,
    "Concat": None,
    "Conv": (2,),  # bias
    "ConvTranspose": (2,),
    "Gemm": (2,),  # C
    "BatchNormalization": (1, 2, 3, 4),  # scale, shift, mean, var (not pooled: see below)
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
}
# Ops that only move values around. A constant read through them (as their data) is
# judged by where the values end up: torch exports LSTM weights as Slice -> Concat ->
# Unsqueeze of the parameter, Paddle reshapes biases before an Add.
LAYOUT_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Slice": (0,),
    "Concat": None,
    "Unsqueeze": (0,),
    "Squeeze": (0,),
    "Reshape": (0,),
    "Transpose": (0,),
    "Identity": (0,),
    "Flatten": (0,),
    "Split": (0,),
}
LAYOUT_DEPTH = 6
# Recurrent weights (W, R: [directions, gates x hidden, features]); B is a constant.
RECURRENT_WEIGHTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
CONSTANT_INPUTS.update({"LSTM": (3,), "GRU": (3,), "RNN": (3,)})
# never pooled into a shared codebook: the variance's error is amplified by 1/sqrt(var)
NOT_POOLED = {("BatchNormalization", 4)}


@dataclass
class Candidate:
    """A float constant of the main graph and how it is read."""

    tensor: gs.Constant
    uses: list[tuple[gs.Node, int]]  # (consumer, input index)
    graph_outputs: frozenset[int] = frozenset()  # ids of the graph's output tensors

    @property
    def weight_refs(self) -> list[WeightRef]:
        """The uses as a Conv/ConvTranspose/Gemm/MatMul weight or a Gather table."""
        return [
            WeightRef(node, index, role)
            for node, index in self.uses
            for position, role in WEIGHT_ROLES.get(node.op, ())
            if position == index and role in SHARED_ROLES
        ]

    def skip(self, reason: str) -> Skipped:
        """This tensor is left alone, and why (op: its readers' op types)."""
        ops = "/".join(sorted({node.op for node, _ in self.uses}))
        return Skipped(self.tensor.name, "tensor", reason, ops)

    @property
    def size(self) -> int:
        return int(np.prod(self.tensor.shape, dtype=np.int64))

    @property
    def reads(self) -> list[tuple[gs.Node, int]] | None:
        """Where the values end up: the uses, with layout ops (``LAYOUT_INPUTS``) followed
        to their readers; None when they reach a graph output or go deeper than
        ``LAYOUT_DEPTH``."""
        return _reads(self.uses, LAYOUT_DEPTH, self.graph_outputs)

    @property
    def is_weight(self) -> bool:
        """Read as a weight: directly (the weight table), or through layout ops only by
        weight inputs or recurrent W/R."""
        if self.weight_refs:
            return True
        reads = self.reads
        return bool(reads) and all(_weight_read(node, index) for node, index in reads)

    def row_axis(self, rank: int) -> int | None:
        """The output-channel axis (direct weights), axis 0 for weights read through
        layout ops (torch's recurrent weights: gates x hidden rows), None for rank < 2."""
        refs = self.weight_refs
        if refs:
            return refs[0].output_axis(rank) if rank >= 2 else None
        return 0 if rank >= 2 else None


@dataclass
class Selection:
    """``own``: weights with a codebook of their own; ``pooled``: small constants
    (float16, or one pooled codebook); ``skipped``: the others, with their reasons."""

    own: list[Candidate] = field(default_factory=list)
    pooled: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    floor: int = 0  # elements a weight needs for a codebook of its own


def select(graph: gs.Graph, opts: Any, floor: int | None = None) -> Selection:
    """Eligible constants of ``graph``'s main body, each once, in node order. ``floor``
    (default: from the weights found now) keeps the size classes of a first call when
    the pass looks again after rewriting the weights."""
    found: dict[int, Candidate] = {}
    outputs = frozenset(id(t) for t in graph.outputs)
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                candidate = found.setdefault(id(tensor), Candidate(tensor, [], outputs))
                candidate.uses.append((node, index))
    in_bodies = _names_in_subgraphs(graph)
    selection, eligible = Selection(), []
    for candidate in found.values():
        reason = _ineligible(graph, opts, candidate, in_bodies)
        if reason is None:
            eligible.append(candidate)
        elif reason:
            selection.skipped.append(candidate.skip(reason))
    if floor is None:
        weights = sum(c.size for c in eligible if c.is_weight)
        floor = max(opts.min_size, int(SMALL_SHARE * weights))
    selection.floor = floor
    for candidate in eligible:
        reason = _size_class(opts, floor, candidate, selection)
        if reason:
            selection.skipped.append(candidate.skip(reason))
    return selection


def _ineligible(
    graph: gs.Graph, opts: Any, candidate: Candidate, in_bodies: set[str]
) -> str | None:
    """Why a constant is left alone, or None when it is shared ('' = not worth a line)."""
    tensor, uses = candidate.tensor, candidate.uses
    is_weight = candidate.is_weight
    if not is_weight and (opts.scope == "weights" or not _is_float(tensor)):
        return ""
    if not any(matches_any(node.op, opts.ops) for node, _ in uses):
        return ""
    names = [tensor.name] + [node.name for node, _ in uses]
    if any(matches_any(name, opts.exclude) for name in names if name):
        return "excluded by exclude="
    if all(node.op == "Gather" and _is_reconstruction(node) for node, _ in uses):
        return "table of a Gather with constant indices (e.g. an existing codebook)"
    if opts.pool_bits and any(_scales_a_reconstruction(node, tensor) for node, _ in uses):
        return "scales of an existing codebook"
    if not is_weight:
        for node, index in candidate.reads or [(tensor, -1)]:
            if isinstance(node, gs.Tensor):
                return "reaches a graph output through layout ops"
            if node.op in RECURRENT_WEIGHTS and index in RECURRENT_WEIGHTS[node.op]:
                continue  # part of a recurrent weight, next to other readers
            allowed = CONSTANT_INPUTS.get(node.op, ())
            if allowed is not None and index not in allowed:
                return f"read as input {index} of {node.op} {node.name!r}"
            if opts.pool_bits and (node.op, index) in NOT_POOLED:
                return f"read as input {index} of {node.op} {node.name!r} (not pooled)"
    if any(t is tensor for t in (*graph.inputs, *graph.outputs)):
        return "graph input or output"
    if tensor.name in in_bodies:
        return "also read inside a subgraph body"
    if not _is_float(tensor):
        return f"dtype {tensor.export_dtype} is not float16/32/64"
    return None


def _size_class(opts: Any, floor: int, candidate: Candidate, selection: Selection) -> str | None:
    """Add ``candidate`` to ``own`` or ``pooled`` by size, or return why it is too small."""
    small = f"{candidate.size} elements < {floor} (min_size; {SMALL_SHARE:.1%} of weights)"
    if candidate.size >= floor and (candidate.is_weight or opts.pool_bits):
        selection.own.append(candidate)  # a weight, or (pool_bits) any large constant
    elif opts.scope == "weights":
        return small
    elif opts.pool_bits and opts.pool_bits <= (opts.bits if opts.bits != "auto" else 4):
        return f"{small}, and pool_bits={opts.pool_bits} is not finer than bits={opts.bits}"
    elif candidate.size < POOL_MIN_SIZE:
        return f"{candidate.size} elements < {POOL_MIN_SIZE}: too small to gain anything"
    else:
        selection.pooled.append(candidate)
    return None


def _reads(uses, depth: int, outputs: frozenset[int]) -> list[tuple[gs.Node, int]] | None:
    found = []
    for node, index in uses:
        allowed = LAYOUT_INPUTS.get(node.op, ())
        if allowed is not None and index not in allowed:
            found.append((node, index))
            continue
        if depth == 0 or any(not o.outputs or id(o) in outputs for o in node.outputs):
            return None  # too deep, or a layout op's output is a graph output / unused
        for out in node.outputs:
            later = [(n, i) for n in out.outputs for i, t in enumerate(n.inputs) if t is out]
            deeper = _reads(later, depth - 1, outputs)
            if deeper is None:
                return None
            found.extend(deeper)
    return found


def _weight_read(node: gs.Node, index: int) -> bool:
    if index in RECURRENT_WEIGHTS.get(node.op, ()):
        return True
    return any(
        position == index and role in SHARED_ROLES
        for position, role in WEIGHT_ROLES.get(node.op, ())
    )


def _names_in_subgraphs(graph: gs.Graph) -> set[str]:
    main = set(map(id, graph.nodes))
    return {t.name for node in iter_nodes(graph) if id(node) not in main for t in node.inputs}


def _is_float(tensor: gs.Constant) -> bool:
    try:
        return np.dtype(tensor.export_dtype) in FLOAT_DTYPES
    except TypeError:  # bfloat16, float8, 4-bit types have no numpy dtype here
        return False


def _is_reconstruction(node: gs.Node, depth: int = 10) -> bool:
    """A Gather whose indices depend on constants only (e.g. our own Cast/Add chain, or
    the sparse index stream's decoder: nine nodes deep)."""
    return len(node.inputs) > 1 and _constant_only(node.inputs[1], depth)


def _constant_only(tensor: gs.Tensor, depth: int) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    return all(_constant_only(t, depth - 1) for t in tensor.inputs[0].inputs)


def _scales_a_reconstruction(node: gs.Node, tensor: gs.Constant) -> bool:
    """``node`` multiplies an existing Gather rebuild by ``tensor`` (scaled codebook)."""
    if node.op != "Mul":
        return False
    for other in node.inputs:
        if other is tensor or len(other.inputs) != 1:
            continue
        producer = other.inputs[0]
        if producer.op == "Gather" and _is_reconstruction(producer):
            return True
    return False
