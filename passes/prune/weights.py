"""Which weight tensors the prune and clip passes may rewrite, and how they read them.

Eligible: the constant weight / embedding input of a listed op (``ops``), float16/32/64,
at least ``min_size`` elements, name and consumer names not matching ``exclude`` globs,
not a graph output, and feeding **only** weight inputs of listed ops (a tensor also read
as a bias, by an Add, a Reshape shape... is skipped and the reason reported). A tensor
shared by several nodes is handled once. Each weight comes with its ``[rows, fan_in]``
view (:func:`row_layout`: the output-channel and reduction axes of ``onnxopt.weights``):
Conv ``W[O, I/g, k...]`` — rows are output channels;
ConvTranspose ``W[I, O/g, k...]`` — rows are the ``g * O/g`` output channels, a row holds
the ``I/g * k`` weights that feed it; Gemm B — ``transB=1``: ``B[N, K]`` rows,
``transB=0``: columns of ``B[K, N]``; Gemm A — rows of ``A[M, K]`` (columns when
``transA=1``); MatMul B ``[..., K, N]`` — the K axis per column, MatMul A
``[..., M, K]`` — the K axis per row; Gather table ``[V, D...]`` — rows along ``axis``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt.model import sparse_to_dense
from onnxopt.passes.prune.selection import RowLayout
from onnxopt.pipeline import matches_any
from onnxopt.results import Skipped
from onnxopt.weights import eligible_weights, output_axis, reduction_axes, role_of

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def check_ops(ops: tuple[str, ...]) -> None:
    unknown = [op for op in ops if op not in PRUNABLE_OPS]
    if unknown or not ops:
        raise ValueError(f"ops={list(ops)}: valid op types are {', '.join(PRUNABLE_OPS)}")


def row_layout(node: gs.Node, index: int, shape: tuple[int, ...]) -> RowLayout | None:
    """The ``[rows, fan_in]`` view of input ``index`` of ``node`` (None: unknown op/rank,
    or not a weight input): the output-channel axis of ``onnxopt.weights`` leads, its
    reduction axes follow (MatMul's batch axes lead both)."""
    rank = len(shape)
    if role_of(node, index) not in ("weight", "embedding"):
        return None
    if node.op == "ConvTranspose":
        if rank < 3:
            return None
        group = int(node.attrs.get("group", 1))
        if shape[0] % group:
            return None
        # rows are the g * O/g output channels: group, then axis 1 (O/g) lead
        pre = (group, shape[0] // group, shape[1], *shape[2:])
        perm = (0, 2, 1, *range(3, rank + 1))
        return RowLayout(shape, pre, perm, row_axes=2)
    if node.op == "MatMul" and rank == 1:
        return RowLayout(shape, (1, shape[0]), (0, 1))
    if node.op == "Conv" and rank < 3:
        return None
    out = output_axis(node, index, rank)
    if out is None:
        return None
    reduced = reduction_axes(node, index, rank)
    batch = tuple(axis for axis in range(rank) if axis != out and axis not in reduced)
    return RowLayout(shape, shape, (*batch, out, *reduced))


@dataclass
class WeightTarget:
    """One eligible tensor, with every node that reads it."""

    tensor: gs.Constant
    uses: list[tuple[gs.Node, int]]
    layout: RowLayout | None  # None when the uses disagree on the row layout

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def op(self) -> str:
        return "/".join(sorted({node.op for node, _ in self.uses}))


def read_values(tensor: gs.Constant) -> np.ndarray:
    """Dense values in the stored dtype, without loading them into the tensor.

    graphsurgeon's ``Constant.values`` caches a lazily loaded array in the tensor, so
    every weight the pass only looked at would stay decoded in the graph (a second
    copy of the model's weights next to the proto); it also loads a sparse initializer
    as float64 and would export it so. The result may be the tensor's own array: do not
    write into it (see ``owned_values``)."""
    stored = tensor._values
    if isinstance(stored, SparseValues):
        return sparse_to_dense(stored.tensor)
    if isinstance(stored, LazyValues):
        return stored.load()
    return stored


def owned_values(tensor: gs.Constant) -> np.ndarray:
    """A C-contiguous, writable array of the tensor's values that nothing else holds:
    the pass edits it in place and then assigns it (``Graph.copy`` shares arrays, so a
    tensor's current array is never written into). A lazily loaded tensor is decoded
    once and that array is used: ``LazyValues.load`` (graphsurgeon's, and the core's
    ``StoredValues`` reading from the weight store) returns a new array on every call."""
    stored = tensor._values
    values = read_values(tensor)
    fresh = isinstance(stored, LazyValues)  # SparseValues too: sparse_to_dense is new
    if fresh and values.flags.writeable and values.flags.c_contiguous:
        return values
    return np.array(values, order="C", copy=True)


def stored_dtype(tensor: gs.Constant) -> np.dtype | None:
    if isinstance(tensor._values, SparseValues):
        data_type = tensor._values.tensor.values.data_type
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        return None


@dataclass
class Selection:
    targets: list[WeightTarget] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def select_weights(
    graph: gs.Graph, ops: tuple[str, ...], exclude: tuple[str, ...], min_size: int
) -> Selection:
    """The weight tensors a pass may rewrite, each once, plus the reasons others were not."""
    selection = Selection()
    seen: set[int] = set()
    outputs = {id(t) for t in graph.outputs}
    for ref in eligible_weights(graph, ops, roles=("weight", "embedding")):
        tensor = ref.tensor
        if id(tensor) not in seen:
            seen.add(id(tensor))
            _select(selection, tensor, ops, exclude, min_size, id(tensor) in outputs)
    return selection


def _select(selection: Selection, tensor: gs.Constant, ops, exclude, min_size, is_out) -> None:
    reason = _ineligible_reason(tensor, ops, exclude, min_size, is_out)
    if reason:
        ops = "/".join(sorted({node.op for node in tensor.outputs}))
        selection.skipped.append(Skipped(tensor.name, "tensor", reason, ops))
        return
    uses = _uses(tensor)
    layouts = {row_layout(n, i, tuple(tensor.shape)) for n, i in uses}
    layout = layouts.pop() if len(layouts) == 1 else None
    selection.targets.append(WeightTarget(tensor, uses, layout))


def _uses(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    return [(n, i) for n in tensor.outputs for i, t in enumerate(n.inputs) if t is tensor]


def _ineligible_reason(
    tensor: gs.Constant, ops: tuple[str, ...], exclude: tuple[str, ...], min_size: int, is_out
) -> str:
    if is_out:
        return "graph output"
    dtype = stored_dtype(tensor)
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not float16/32/64"
    size = int(np.prod(tensor.shape, dtype=np.int64))
    if size < min_size:
        return f"{size} elements < min_size={min_size}"
    if matches_any(tensor.name, exclude):
        return "name matches exclude"
    for node, index in _uses(tensor):
        if node.op not in ops or role_of(node, index) not in ("weight", "embedding"):
            return f"also feeds {node.op} {node.name!r} input {index} (not a weight input)"
        if matches_any(node.name, exclude):
            return f"consumer {node.name!r} matches exclude"
    return ""
