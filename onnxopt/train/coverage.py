"""Which ops of a student onnxruntime-training can differentiate, found before training.

onnxruntime-training builds the backward graph op by op from a registry of gradient
builders; an op without one stops artifact generation with "The gradient builder has
not been registered: HardSigmoid", an op whose gradient kernel exists only for CUDA
stops the first training step. :func:`analyze` finds, before anything is sent to the
adjunct, every node on the student's *trainable path* — a node with an input that
depends on a trained tensor and an output that a distilled output depends on — and
classifies its op:

- ``gradient``: onnxruntime-training 1.19.2 trains through it on CPU;
- ``rewrite``: it does not, but :mod:`onnxopt.train.rewrites` has a differentiable
  form of it for the training copy (the trained weights go back into the student's
  original graph, so the exported model keeps its ops);
- ``none``: neither; distillation stops with :class:`NoGradientError`, which names the
  op, the node and its position and offers ``freeze=[globs]`` for the tensors before it;
- ``unknown``: not in the table below; left to onnxruntime-training and reported.

Nodes before the first trained tensor never need a gradient (an STFT's reflect Pad in
front of the first Conv is fine), nor do integer edges (Shape, Equal, Cast to int64).

``GRADIENT_OPS`` / ``NO_GRADIENT_OPS`` were measured, not guessed:
``tools/probe_gradients.py`` (run with the adjunct's python) builds ``Conv(W) -> op``
for each op, generates the training artifacts with ``W`` trainable and runs one AdamW
step; ``tests/test_distill.py`` re-probes a sample of both lists.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PassCannotRun, UsageError

# Probed in onnxruntime-training 1.19.2 (CPU): a gradient builder and CPU kernels exist.
GRADIENT_OPS = frozenset(
    {
        "Abs", "Add", "AveragePool", "Cast", "Clip", "Concat",
        "Conv", "Cos", "Div", "Dropout", "Erf", "Exp", "Expand", "Flatten", "Gather",
        "GatherElements", "Gelu", "Gemm", "GlobalAveragePool", "Identity",
        "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "MatMul", "Max",
        "MaxPool", "Min", "Mul", "Neg", "Pad", "Pow", "Reciprocal", "ReduceL2",
        "ReduceLogSumExp", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Sin",
        "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
        "Unsqueeze", "Where",
    }
)  # fmt: skip
# Probed: "The gradient builder has not been registered", or a gradient op without a
# CPU kernel (ResizeGrad, ConvTransposeGrad), or a builder that fails (LSTM, GRU).
NO_GRADIENT_OPS = frozenset(
    {
        "Ceil", "Celu", "ConvTranspose", "CumSum", "DepthToSpace", "Einsum", "Elu",
        "Floor", "GRU", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Hardmax",
        "InstanceNormalization", "LSTM", "Mean", "Mod", "PRelu", "ReduceMax", "ReduceMin",
        "ReduceProd", "ReduceSumSquare", "Resize", "Round", "Selu", "Shrink", "Sign",
        "Softplus", "Softsign", "SpaceToDepth", "Sum", "ThresholdedRelu",
    }
)  # fmt: skip
FLOAT_TYPES = (np.float32, np.float16, np.float64)


def _conditional_reason(node: gs.Node) -> str | None:
    """Why a node of a GRADIENT_OPS op still has no gradient, if it has none."""
    if node.op == "Pad" and node.attrs.get("mode", "constant") not in ("constant", b"constant"):
        return f"its gradient supports mode=constant only, not {node.attrs['mode']!r}"
    if node.op == "AveragePool":
        shape = node.inputs[0].shape
        if not shape or not isinstance(shape[0], int):
            return "its CPU gradient divides by zero (SIGFPE) when the batch is symbolic"
    steps = node.inputs[4] if node.op == "Slice" and len(node.inputs) > 4 else None
    if isinstance(steps, gs.Constant) and np.any(np.asarray(steps.values) < 0):
        return "its gradient fails for negative steps"
    return None


class NoGradientError(PassCannotRun):
    """An op on the trainable path has neither a gradient nor a training rewrite."""


@dataclass
class PathNode:
    """One node on the trainable path and what training does with it."""

    op: str
    name: str
    position: int  # index in topological order
    status: str  # gradient | rewrite | none | unknown
    reason: str = ""  # why none (or why the rewrite did not apply)
    upstream: list[str] = field(default_factory=list)  # trained tensors it depends on


@dataclass
class Coverage:
    """The trainable path of a training copy, classified op by op."""

    nodes: list[PathNode]
    total_nodes: int
    rewritten: dict[str, int] = field(default_factory=dict)  # op -> nodes rewritten
    frozen: list[str] = field(default_factory=list)  # tensors kept frozen by freeze=

    def by_status(self, status: str) -> Counter:
        return Counter(n.op for n in self.nodes if n.status == status)

    def summary(self) -> dict:
        """JSON-serializable: ops per status, rewrites made, frozen tensors."""
        return {
            "path_nodes": len(self.nodes),
            "gradient_ops": dict(sorted(self.by_status("gradient").items())),
            "rewritten_ops": dict(sorted(self.rewritten.items())),
            "unknown_ops": dict(sorted(self.by_status("unknown").items())),
            "frozen_tensors": len(self.frozen),
        }


def classify(node: gs.Node, rewritable: Callable[[gs.Node], str | None]) -> tuple[str, str]:
    """(status, reason) of one node; ``rewritable`` returns None when a rewrite applies,
    else why it does not (or "" when no rewrite exists for the op)."""
    if node.op in GRADIENT_OPS and node.domain in ("", "ai.onnx", None):
        reason = _conditional_reason(node)
        if reason is None:
            return "gradient", ""
    elif node.op in NO_GRADIENT_OPS:
        reason = "onnxruntime-training 1.19.2 has no CPU gradient for it"
    else:
        return "unknown", ""
    why_not = rewritable(node)
    if why_not is None:
        return "rewrite", ""
    return "none", reason + (f"; the training rewrite does not apply: {why_not}" if why_not else "")


def trainable_path(graph: gs.Graph, trainable: Iterable[str], targets: Iterable[str]):
    """Nodes (in topological order) with an input depending on a trained tensor and a
    float output a target depends on; and, per node, the trained tensors upstream."""
    trainable, targets = set(trainable), set(targets)
    upstream: dict[str, frozenset[str]] = {name: frozenset([name]) for name in trainable}
    for node in graph.nodes:
        found = frozenset().union(*(upstream.get(t.name, frozenset()) for t in node.inputs))
        if not found:
            continue
        for out in node.outputs:
            if _is_float(out):
                upstream[out.name] = found
    needed = set(targets)
    for node in reversed(graph.nodes):
        if any(o.name in needed for o in node.outputs):
            needed.update(t.name for t in node.inputs)
    path = []
    for position, node in enumerate(graph.nodes):
        feeds = [t for t in node.inputs if t.name in upstream]
        if feeds and any(o.name in needed and o.name in upstream for o in node.outputs):
            names = sorted(frozenset().union(*(upstream[t.name] for t in feeds)))
            path.append((position, node, names))
    return path


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:  # unknown type: assume it carries a gradient
        return True
    try:
        return np.dtype(dtype) in [np.dtype(t) for t in FLOAT_TYPES]
    except TypeError:
        return False


def select_frozen(trainable: Sequence[str], globs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, frozen) trainable names; a glob that matches nothing is a UsageError."""
    frozen = set()
    for pattern in globs:
        matched = {name for name in trainable if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            shown = ", ".join(list(trainable)[:5]) + (", ..." if len(trainable) > 5 else "")
            raise UsageError(
                f"distill: freeze pattern {pattern!r} matches no trainable tensor "
                f"(the student's trainable tensors: {shown})"
            )
        frozen |= matched
    return [n for n in trainable if n not in frozen], sorted(frozen)


def no_gradient_error(node: PathNode, total: int, trainable: Sequence[str]) -> NoGradientError:
    """The error for a node that cannot be trained through, with the way out."""
    count = len(node.upstream)
    suggestion = _freeze_suggestion(node.upstream, trainable)
    return NoGradientError(
        f"cannot train through {node.op} node {node.name!r} (node {node.position + 1} of "
        f"{total} in topological order, {count} trained tensor(s) before it): "
        f"{node.reason}. Keep the part before it frozen and train the rest: "
        f"freeze=[{', '.join(repr(s) for s in suggestion)}] (glob patterns of tensor names; "
        "--freeze on the command line)"
    )


def _freeze_suggestion(upstream: Sequence[str], trainable: Sequence[str]) -> list[str]:
    """Short globs covering ``upstream`` and no other trainable tensor, when possible."""
    upstream = sorted(upstream)
    others = [n for n in trainable if n not in set(upstream)]
    prefix = _common_prefix(upstream)
    if len(upstream) > 1 and prefix and not any(n.startswith(prefix) for n in others):
        return [prefix + "*"]
    if len(upstream) <= 4:
        return upstream
    return [*upstream[:3], f"... {len(upstream) - 3} more"]


def _common_prefix(names: Sequence[str]) -> str:
    if not names:
        return ""
    first, last = min(names), max(names)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]
