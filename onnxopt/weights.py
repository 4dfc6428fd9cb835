"""Which input of an op is a weight, and how a weight is read: the one table passes use.

Every pass that rewrites weights asks the same questions about an ONNX op: which
inputs carry trainable weights (``WEIGHT_ROLES``), which axis of a weight indexes the
op's output channels (:func:`output_axis`), and which axes are summed against the
input to produce one output value (:func:`reduction_axes`). They are answered here,
once; prune's row views, share-weights' per-channel codebooks, quantize-int8's
per-channel scales, quantize-int4's blocks and remove-neurons' channel handlers read
this table.

| op            | input         | role      | output-channel axis     | reduction axes   |
|---------------|---------------|-----------|-------------------------|------------------|
| Conv          | 1 ``W[O, I/g, k...]`` | weight | 0                   | 1, 2, ...        |
| ConvTranspose | 1 ``W[I, O/g, k...]`` | weight | 1 (per group)       | 0, 2, ...        |
| Gemm          | 1 ``B``       | weight    | 0 if ``transB`` else 1  | the other axis   |
| Gemm          | 0 ``A``       | weight    | 1 if ``transA`` else 0  | the other axis   |
| MatMul        | 1 ``B[..., K, N]`` | weight | rank-1 (N)           | rank-2 (K)       |
| MatMul        | 0 ``A[..., M, K]`` | weight | rank-2 (M)           | rank-1 (K)       |
| Gather        | 0 table       | embedding | ``axis`` (default 0)    | the others       |
| Conv, ConvTranspose, Gemm | 2 | bias   | its last axis           | none             |

**Gather.** An embedding table is not multiplied with anything: a gathered row is
read whole. Its "output channel" is the *gathered* axis (``axis``, one row per
index: what share-weights' per-channel codebooks and prune's rows run along), and its
"reduction axes" are the axes of one row (the embedding axis ``D`` of ``[V, D]``:
what quantize-int4 blocks along, as it blocks along K of a matrix). Earlier copies of
this table disagreed here (one read the last axis as Gather's channel axis); this is
the reading every pass now shares.

``MatMul`` and ``Gemm`` list both operands as weights: a constant A is as much a
weight as a constant B. A pass that only rewrites B (quantization) asks for input 1.
``output_axis`` and ``reduction_axes`` return None / ``()`` for a rank the op cannot
have (a 1-D MatMul weight, a Conv weight below rank 3 is still answered: the table
describes the layout, the pass decides what it supports).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

Role = Literal["weight", "bias", "embedding"]

# Inputs that carry trainable weights, per op type: (input index, role).
WEIGHT_ROLES: dict[str, tuple[tuple[int, Role], ...]] = {
    "Conv": ((1, "weight"), (2, "bias")),
    "ConvTranspose": ((1, "weight"), (2, "bias")),
    "Gemm": ((0, "weight"), (1, "weight"), (2, "bias")),
    "MatMul": ((0, "weight"), (1, "weight")),
    "Gather": ((0, "embedding"),),
}
WEIGHT_INPUTS = WEIGHT_ROLES  # the older name, still read by tools and tests


def role_of(node: gs.Node, index: int) -> Role | None:
    """The role of input ``index`` of ``node`` in the table, or None."""
    return dict(WEIGHT_ROLES.get(node.op, ())).get(index)


def output_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The axis of input ``index`` (of rank ``rank``) that indexes ``node``'s output
    channels; None when the table has no answer (not a weight input, rank too small)."""
    role = role_of(node, index)
    if role is None or rank < 1:
        return None
    if role == "bias":
        return rank - 1
    op = node.op
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if rank >= 2 else None
    if op == "Gemm":
        if rank != 2:
            return None
        transposed = int(node.attrs.get("transB" if index == 1 else "transA", 0))
        if index == 1:
            return 0 if transposed else 1
        return 1 if transposed else 0
    if op == "MatMul":
        if rank < 2:
            return None
        return rank - 1 if index == 1 else rank - 2
    if op == "Gather":
        return int(node.attrs.get("axis", 0)) % rank
    return None


def reduction_axes(node: gs.Node, index: int, rank: int) -> tuple[int, ...]:
    """The axes of input ``index`` summed against the input to make one output value
    (a Gather table: the axes of one row); ``()`` when the table has no answer. MatMul's
    batch axes are neither output nor reduction axes."""
    out = output_axis(node, index, rank)
    if out is None or role_of(node, index) == "bias":
        return ()
    if node.op == "MatMul":
        return (rank - 1,) if index == 0 else (rank - 2,)
    return tuple(axis for axis in range(rank) if axis != out)


@dataclass(frozen=True)
class WeightRef:
    """A constant input of a weight-bearing node."""

    node: gs.Node
    index: int
    role: Role

    @property
    def tensor(self) -> gs.Constant:
        return self.node.inputs[self.index]

    def output_axis(self, rank: int | None = None) -> int | None:
        return output_axis(self.node, self.index, len(self.tensor.shape) if rank is None else rank)


def eligible_weights(
    graph: gs.Graph,
    op_types: Iterable[str] | None = None,
    roles: Iterable[Role] | None = None,
) -> Iterator[WeightRef]:
    """The constant inputs of ``graph``'s main-graph nodes that the table lists, in node
    order (a tensor read by two nodes comes twice); ``op_types`` / ``roles`` narrow it."""
    wanted = set(op_types) if op_types is not None else set(WEIGHT_ROLES)
    wanted_roles = set(roles) if roles is not None else None
    for node in graph.nodes:
        if node.op not in wanted:
            continue
        for index, role in WEIGHT_ROLES.get(node.op, ()):
            if wanted_roles is not None and role not in wanted_roles:
                continue
            if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
                yield WeightRef(node, index, role)
