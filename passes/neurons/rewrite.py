"""Apply a channel selection: slice weights and parameters, fix shape constants.

``apply(Rewriter(graph, cg, keep))`` visits every node that reads or writes a tensor losing
positions (``keep[atom]`` is False) and calls ``REWRITERS[op](node, rw)``:

- producers lose output rows (Conv/ConvTranspose/Gemm/MatMul weight and bias);
- consumers lose input columns (Conv/ConvTranspose/Gemm/MatMul, grouped Conv per
  channel group); depthwise Conv loses filters and its ``group`` shrinks;
- per-channel parameters are sliced (BatchNormalization / InstanceNormalization,
  elementwise constants, per-axis Quantize/DequantizeLinear scales);
- shape constants are recomputed (Reshape shape, Split sizes, Slice bounds, Resize
  sizes, Expand shape);
- everything else in the handler table carries channels without parameters.

New values always go into new constants (never written in place: graphsurgeon's
``Graph.copy`` shares arrays, and a constant may be shared between nodes). Stale
shapes of changed tensors are dropped so shape inference recomputes them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import forget_shapes, unique_name
from onnxopt.passes.neurons.groups import ChannelGraph
from onnxopt.passes.neurons.handlers import ELEMENTWISE, MIXING, UNARY
from onnxopt.passes.neurons.layout import normalize_axis
from onnxopt.passes.neurons.reshaping import REDUCE
from onnxopt.registry import table_decorator

Rewrite = Callable[[gs.Node, "Rewriter"], None]
REWRITERS: dict[str, Rewrite] = {}


channel_rewriter = table_decorator(REWRITERS, "channel rewriter")


class Rewriter:
    """Masks of tracked tensors and safe ways to replace constants."""

    def __init__(self, graph: gs.Graph, cg: ChannelGraph, keep: np.ndarray) -> None:
        self.graph = graph
        self.cg = cg
        self.keep = keep
        self.names = set(graph.tensors())
        self.inserted = False  # new nodes were appended (dead-channel folding)

    def mask(self, tensor: gs.Tensor | None, size: int | None = None) -> np.ndarray | None:
        layout = self.cg.layout(tensor) if tensor is not None else None
        if layout is None:
            return None if size is None else np.ones(size, dtype=bool)
        return self.keep[layout.atoms]

    def changed(self, tensor: gs.Tensor) -> bool:
        mask = self.mask(tensor)
        return mask is not None and not bool(mask.all())

    def replace(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        old = node.inputs[index]
        base = f"{old.name}_pruned" if old.name else f"{node.name}_param"
        name = unique_name(base, self.names)
        export = getattr(old, "export_dtype", None)
        node.inputs[index] = gs.Constant(name, np.ascontiguousarray(values), export_dtype=export)

    def values(self, node: gs.Node, index: int) -> np.ndarray | None:
        if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
            return node.inputs[index].values
        return None


def apply(rw: Rewriter) -> list[str]:
    """Rewrite ``rw.graph`` in place for ``rw.keep``; return the rewritten nodes' names."""
    graph = rw.graph
    touched: list[str] = []
    stale: list[gs.Tensor] = []
    for node in list(graph.nodes):
        tensors = [t for t in (*node.inputs, *node.outputs) if not t.is_empty()]
        if not any(rw.changed(t) for t in tensors):
            continue
        rewrite = REWRITERS.get(node.op)
        if rewrite is None:
            raise RuntimeError(f"remove-neurons: no rewriter for {node.op} {node.name!r}")
        rewrite(node, rw)
        touched.append(node.name or node.outputs[0].name)
        stale += [t for t in node.outputs if rw.changed(t)]
    io = {id(t) for t in (*graph.inputs, *graph.outputs)}
    forget_shapes(t for t in stale if id(t) not in io)
    if rw.inserted:
        graph.toposort()
    return touched


# ---------------------------------------------------------------------------- producers / consumers


def _grouped_take(weight: np.ndarray, group: int, row_mask, col_mask) -> np.ndarray:
    """Rows split into ``group`` chunks; chunk g keeps its rows in ``row_mask`` and the
    columns of ``col_mask``'s chunk g (every chunk keeps as many columns)."""
    rows = np.split(np.arange(weight.shape[0]), group)
    cols = np.split(col_mask, group)
    parts = [weight[r[row_mask[r]]][:, c] for r, c in zip(rows, cols)]
    return np.concatenate(parts, axis=0)


def _slice_bias(node: gs.Node, rw: Rewriter, index: int, mask: np.ndarray) -> None:
    bias = rw.values(node, index)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == len(mask) > 1:
        rw.replace(node, index, bias[..., mask])


@channel_rewriter("Conv")
def _conv(node: gs.Node, rw: Rewriter) -> None:
    weight = node.inputs[1].values
    group = int(node.attrs.get("group", 1))
    keep_in = rw.mask(node.inputs[0], weight.shape[1] * group)
    keep_out = rw.mask(node.outputs[0], weight.shape[0])
    if group > 1 and weight.shape[1] == 1:
        new = weight[keep_out]
        node.attrs["group"] = int(keep_in.sum())
    elif group == 1:
        new = weight[keep_out][:, keep_in]
    else:
        new = _grouped_take(weight, group, keep_out, keep_in)
    rw.replace(node, 1, new)
    _slice_bias(node, rw, 2, keep_out)


@channel_rewriter("ConvTranspose")
def _conv_transpose(node: gs.Node, rw: Rewriter) -> None:
    weight = node.inputs[1].values
    group = int(node.attrs.get("group", 1))
    keep_in = rw.mask(node.inputs[0], weight.shape[0])
    keep_out = rw.mask(node.outputs[0], weight.shape[1] * group)
    if group > 1 and group == weight.shape[0]:
        new = weight[keep_in]
        node.attrs["group"] = int(keep_in.sum())
    elif group == 1:
        new = weight[keep_in][:, keep_out]
    else:
        new = _grouped_take(weight, group, keep_in, keep_out)
    rw.replace(node, 1, new)
    _slice_bias(node, rw, 2, keep_out)


@channel_rewriter("Gemm")
def _gemm(node: gs.Node, rw: Rewriter) -> None:
    b = node.inputs[1].values
    trans_b = int(node.attrs.get("transB", 0))
    k, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    keep_in, keep_out = rw.mask(node.inputs[0], k), rw.mask(node.outputs[0], n)
    rw.replace(node, 1, b[keep_out][:, keep_in] if trans_b else b[keep_in][:, keep_out])
    _slice_bias(node, rw, 2, keep_out)


@channel_rewriter("MatMul")
def _matmul(node: gs.Node, rw: Rewriter) -> None:
    if not isinstance(node.inputs[1], gs.Constant):
        return  # two activations: both lose the channels, nothing to slice here
    w = node.inputs[1].values
    keep_in, keep_out = rw.mask(node.inputs[0], w.shape[-2]), rw.mask(node.outputs[0], w.shape[-1])
    rw.replace(node, 1, w[..., keep_in, :][..., keep_out])


# ---------------------------------------------------------------------------- parameters


@channel_rewriter(*ELEMENTWISE)
def _elementwise(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.outputs[0])
    keep = rw.keep[layout.atoms]
    for index, tensor in enumerate(node.inputs):
        if not isinstance(tensor, gs.Constant):
            continue
        k = layout.axis - (layout.rank - tensor.values.ndim)
        if k >= 0 and tensor.values.shape[k] == len(keep) > 1:
            rw.replace(node, index, np.compress(keep, tensor.values, axis=k))


@channel_rewriter("Concat")
def _concat(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.outputs[0])
    axis = normalize_axis(int(node.attrs.get("axis", 1)), layout.rank)
    if axis != layout.axis:
        _elementwise(node, rw)


@channel_rewriter("BatchNormalization", "InstanceNormalization")
def _batchnorm(node: gs.Node, rw: Rewriter) -> None:
    keep = rw.mask(node.inputs[0])
    for index in range(1, len(node.inputs)):
        rw.replace(node, index, node.inputs[index].values[keep])


@channel_rewriter("QuantizeLinear", "DequantizeLinear")
def _quantize(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.inputs[0])
    keep = rw.keep[layout.atoms]
    axis = normalize_axis(int(node.attrs.get("axis", 1)), layout.rank)
    for index in (1, 2):
        values = rw.values(node, index)
        if values is not None and values.size > 1 and axis == layout.axis:
            rw.replace(node, index, values[keep])


# ---------------------------------------------------------------------------- shape constants


@channel_rewriter("Reshape")
def _reshape(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.outputs[0])
    shape = node.inputs[1].values.copy()
    if shape[layout.axis] > 0:
        shape[layout.axis] = int(rw.keep[layout.atoms].sum())
        rw.replace(node, 1, shape)


@channel_rewriter("Split")
def _split(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.inputs[0])
    if normalize_axis(int(node.attrs.get("axis", 0)), layout.rank) != layout.axis:
        return
    sizes = np.array([int(rw.mask(out).sum()) for out in node.outputs], dtype=np.int64)
    if rw.cg.opset < 13:
        node.attrs["split"] = [int(s) for s in sizes]
        return
    node.attrs.pop("num_outputs", None)
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        rw.replace(node, 1, sizes)
    else:
        del node.inputs[1:]
        node.inputs.append(gs.Constant(_fresh(rw, f"{node.name}_split"), sizes))


def _fresh(rw: Rewriter, base: str) -> str:
    return unique_name(base, rw.names)


@channel_rewriter("Slice")
def _slice(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.inputs[0])
    keep_in, keep_out = rw.keep[layout.atoms], rw.mask(node.outputs[0])
    old = rw.cg.opset < 10
    starts = list(node.attrs["starts"]) if old else rw.values(node, 1).copy()
    ends = list(node.attrs["ends"]) if old else rw.values(node, 2).copy()
    axes = node.attrs.get("axes") if old else rw.values(node, 3)
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    axes = [normalize_axis(a, layout.rank) for a in axes]
    if layout.axis not in axes:
        return
    k = axes.index(layout.axis)
    positions = np.arange(len(keep_in))[slice(int(starts[k]), int(ends[k]))]
    if not len(positions):
        return
    starts[k] = int(keep_in[: positions[0]].sum())
    ends[k] = starts[k] + int(keep_out.sum())
    if old:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
    else:
        rw.replace(node, 1, starts)
        rw.replace(node, 2, ends)


@channel_rewriter("Resize", "Upsample")
def _resize(node: gs.Node, rw: Rewriter) -> None:
    sizes = rw.values(node, 3) if node.op == "Resize" and rw.cg.opset >= 11 else None
    if sizes is None:
        return
    layout = rw.cg.layout(node.inputs[0])
    axes = node.attrs.get("axes")
    position = layout.axis
    if axes is not None:
        normalized = [normalize_axis(int(a), layout.rank) for a in axes]
        if layout.axis not in normalized:
            return
        position = normalized.index(layout.axis)
    new = sizes.copy()
    new[position] = int(rw.keep[layout.atoms].sum())
    rw.replace(node, 3, new)


@channel_rewriter("Expand")
def _expand(node: gs.Node, rw: Rewriter) -> None:
    layout = rw.cg.layout(node.outputs[0])
    shape = node.inputs[1].values.copy()
    k = layout.axis - (layout.rank - len(shape))
    full = len(layout)
    if k >= 0 and shape[k] == full > 1:
        shape[k] = int(rw.keep[layout.atoms].sum())
        rw.replace(node, 1, shape)


# ---------------------------------------------------------------------------- carriers


def _nothing(node: gs.Node, rw: Rewriter) -> None:
    """Carries channels without channel-sized parameters."""


CARRIERS = (
    *UNARY, *REDUCE,
    "LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Pad", "Transpose",
    "Flatten", "Squeeze", "Unsqueeze", "Tile", "Gather", "Shape",
)  # fmt: skip
for _op in CARRIERS:
    REWRITERS[_op] = _nothing
assert not set(MIXING) & set(REWRITERS)
