"""Per-op channel handlers for the analysis: ``HANDLERS[op_type](node, cg)``.

Each handler reads the layouts of the node's inputs (``cg.layout``) and either
propagates them to its outputs (``cg.set_layout``), couples them (``cg.couple``),
records where they end (``cg.sink``), creates new atoms (``cg.new_producer``), or
pins them with a reason (``cg.block`` / ``cg.pin``). A handler must never raise on a
well-formed model; whatever it cannot prove rewritable it blocks.

The table is plain data, read top to bottom: producers/consumers, elementwise ops,
normalizations, pooling and ops that always block here; the ops that move, cut or
reduce axes (Concat/Split/Slice/Transpose/Flatten/Reshape/Squeeze/Unsqueeze/Expand/
Tile/Gather/Resize/Pad/reductions) in ``reshaping.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons import magnitudes as mag
from onnxopt.passes.neurons.groups import ChannelGraph
from onnxopt.passes.neurons.layout import Layout, normalize_axis
from onnxopt.registry import table_decorator
from onnxopt.weights import output_axis, reduction_axes

Handler = Callable[[gs.Node, ChannelGraph], None]
HANDLERS: dict[str, Handler] = {}


channel_handler = table_decorator(HANDLERS, "channel handler")


# ---------------------------------------------------------------------------- helpers


def input_at(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and not node.inputs[index].is_empty():
        return node.inputs[index]
    return None


def constant_values(tensor: gs.Tensor | None) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def int_list(node: gs.Node, attr: str, index: int) -> list[int] | str | None:
    """An int list given as attribute ``attr`` (old opsets) or as constant input
    ``index``; None when absent, the string "variable" when computed at run time."""
    if attr in node.attrs:
        return [int(v) for v in np.atleast_1d(node.attrs[attr])]
    tensor = input_at(node, index)
    if tensor is None:
        return None
    if not isinstance(tensor, gs.Constant):
        return "variable"
    return [int(v) for v in np.atleast_1d(tensor.values)]


def _consts_of_weight(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """Output channels whose weights are all zero (their output is the bias)."""
    moved = np.moveaxis(weight, out_axis, 0)
    return np.all(moved.reshape(moved.shape[0], -1) == 0, axis=1)


def _constants(*tensors: gs.Tensor | None) -> bool:
    return all(t is None or isinstance(t, gs.Constant) for t in tensors)


def no_padding(node: gs.Node) -> bool:
    pads = node.attrs.get("pads", [])
    return node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads)


# ---------------------------------------------------------------------------- conv family


def _conv_operands(node: gs.Node, cg: ChannelGraph):
    """``(weight, shape, group, input layout)`` of a Conv/ConvTranspose, or None when
    its weight or bias is not a constant (the node is blocked)."""
    x, weight, bias = input_at(node, 0), input_at(node, 1), input_at(node, 2)
    if not _constants(weight, bias):
        cg.block(node, "weight or bias is not a constant")
        return None
    shape = tuple(weight.shape)
    group = int(node.attrs.get("group", 1))
    # Conv W[O, I/g, k...]; ConvTranspose W[I, O/g, k...]
    in_channels = shape[0] if node.op == "ConvTranspose" else shape[1] * group
    return weight, shape, group, _channel_input(node, cg, x, in_channels)


@channel_handler("Conv", "ConvTranspose")
def _conv_family(node: gs.Node, cg: ChannelGraph) -> None:
    operands = _conv_operands(node, cg)
    if operands is not None:
        (_conv if node.op == "Conv" else _conv_transpose)(node, cg, *operands)


def _conv(node: gs.Node, cg: ChannelGraph, weight, shape, group, layout) -> None:
    out_channels = shape[0]
    if group > 1 and shape[1] == 1:
        _depthwise(node, cg, layout, weight, out_channels // group)
        return
    if layout is not None:
        cg.sink(node, 0, layout)
        cg.contribute(layout.atoms, lambda norm: mag.conv_inputs(weight.values, group, norm))
        if group > 1:
            cg.constrain(np.split(layout.atoms, group), f"grouped {_name(node)} (group={group})")
    axis = output_axis(node, 1, len(shape))
    const = _consts_of_weight(weight.values, axis) if cg.track_constants else None
    out = cg.new_producer(node, out_channels, 1, len(shape), const)
    cg.contribute(out.atoms, lambda norm: mag.rows(weight.values, axis, norm))
    if group > 1:
        cg.constrain(np.split(out.atoms, group), f"grouped {_name(node)} (group={group})")
    cg.mac_term(node, layout, out)


def _channel_input(node: gs.Node, cg: ChannelGraph, x: gs.Tensor, in_channels: int):
    """Layout of a Conv/ConvTranspose input, or None; an input tracked on another axis
    (or with another width) blocks the node."""
    layout = cg.layout(x)
    if layout is not None and (layout.axis != 1 or len(layout) != in_channels):
        cg.block(node, "input channels are not its tracked axis")
        return None
    return layout


def _depthwise(node, cg, layout, weight, multiplier) -> None:
    """Depthwise Conv: output channel c*m+j reads input channel c only (coupled)."""
    if layout is None:
        return
    out = layout.repeat(multiplier)
    if cg.track_constants:
        zero = _consts_of_weight(weight.values, 0)
        carried = out.const & no_padding(node)
        out = Layout(out.axis, out.rank, out.atoms, zero | carried)
    cg.set_layout(node.outputs[0], out)
    cg.contribute(out.atoms, lambda norm: mag.rows(weight.values, 0, norm))
    cg.mac_term(node, None, out)


def _conv_transpose(node: gs.Node, cg: ChannelGraph, weight, shape, group, layout) -> None:
    in_channels, out_channels = shape[0], shape[1] * group
    if group > 1 and group == in_channels:
        if layout is not None:
            out = layout.repeat(shape[1]).varying()
            cg.set_layout(node.outputs[0], out)
            cg.contribute(layout.atoms, lambda norm: mag.rows(weight.values, 0, norm))
            cg.mac_term(node, None, out)
        return
    if layout is not None:
        cg.sink(node, 0, layout)
        cg.contribute(layout.atoms, lambda norm: mag.rows(weight.values, 0, norm))
        if group > 1:
            cg.constrain(np.split(layout.atoms, group), f"grouped {_name(node)} (group={group})")
    const = None
    if cg.track_constants:
        grouped = weight.values.reshape(group, shape[0] // group, shape[1], -1)
        const = np.all(grouped == 0, axis=(1, 3)).ravel()
    out = cg.new_producer(node, out_channels, 1, len(shape), const)
    cg.contribute(out.atoms, lambda norm: mag.conv_transpose_outputs(weight.values, group, norm))
    if group > 1:
        cg.constrain(np.split(out.atoms, group), f"grouped {_name(node)} (group={group})")
    cg.mac_term(node, layout, out)


@channel_handler("Gemm")
def _gemm(node: gs.Node, cg: ChannelGraph) -> None:
    a, b, c = input_at(node, 0), input_at(node, 1), input_at(node, 2)
    if not isinstance(b, gs.Constant) or len(b.shape) != 2 or isinstance(a, gs.Constant):
        cg.block(node, "B is not a constant matrix (or A is a constant)")
        return
    if c is not None and not isinstance(c, gs.Constant):
        cg.block(node, "C is not a constant")
        return
    trans_a = int(node.attrs.get("transA", 0))
    n_axis, (k_axis,) = output_axis(node, 1, 2), reduction_axes(node, 1, 2)
    k, n = b.shape[k_axis], b.shape[n_axis]
    layout = cg.layout(a)
    if layout is not None and (trans_a or layout.axis != 1 or len(layout) != k):
        cg.block(node, "A's tracked axis is not its K axis")
        layout = None
    if layout is not None:
        cg.sink(node, 0, layout)
        cg.contribute(layout.atoms, lambda norm: mag.rows(b.values, k_axis, norm))
    const = None
    if cg.track_constants:
        bias_rows = 1 if c is None else (c.values.shape[0] if c.values.ndim == 2 else 1)
        const = _consts_of_weight(b.values, n_axis) & (bias_rows == 1)
    out = cg.new_producer(node, n, 1, 2, const)
    cg.contribute(out.atoms, lambda norm: mag.rows(b.values, n_axis, norm))
    cg.mac_term(node, layout, out)


@channel_handler("MatMul")
def _matmul(node: gs.Node, cg: ChannelGraph) -> None:
    a, b = input_at(node, 0), input_at(node, 1)
    rank_a, rank_b = cg.rank(a), cg.rank(b)
    if rank_a is None or rank_b is None:
        cg.block(node, "an operand has an unknown rank")
    elif isinstance(a, gs.Constant) or (isinstance(b, gs.Constant) and rank_b < 2):
        cg.block(node, "MatMul with a constant first input (or a 1-D weight)")
    elif isinstance(b, gs.Constant):
        _matmul_weight(node, cg, a, b, rank_a)
    elif rank_a >= 2 and rank_b >= 2:
        _matmul_activations(node, cg, a, b, rank_a, rank_b)
    else:
        cg.block(node, "MatMul of 1-D activations")


def _matmul_weight(node, cg: ChannelGraph, a, b, rank_a: int) -> None:
    layout = cg.layout(a)
    if layout is not None and (layout.axis != rank_a - 1 or len(layout) != b.shape[-2]):
        cg.block(node, "the tracked axis is not the contracted one")
        layout = None
    n_axis, (k_axis,) = output_axis(node, 1, len(b.shape)), reduction_axes(node, 1, len(b.shape))
    if layout is not None:
        cg.sink(node, 0, layout)
        cg.contribute(layout.atoms, lambda norm: mag.rows(b.values, k_axis, norm))
    rank = len(b.shape) - 1 if rank_a == 1 else max(rank_a, len(b.shape))
    const = _consts_of_weight(b.values, n_axis) if cg.track_constants else None
    out = cg.new_producer(node, b.shape[n_axis], rank - 1, rank, const)
    cg.contribute(out.atoms, lambda norm: mag.rows(b.values, n_axis, norm))
    cg.mac_term(node, layout, out)


def _matmul_activations(node, cg: ChannelGraph, a, b, rank_a: int, rank_b: int) -> None:
    """``A @ B`` of two activations (attention): a channel contracted on both sides
    is removed from both (the product loses that term); B's last axis passes
    through to the output's last axis."""
    la, lb = cg.layout(a), cg.layout(b)
    rank = max(rank_a, rank_b)
    if (la is not None and la.axis < rank_a - 2) or (lb is not None and lb.axis < rank_b - 2):
        _matmul_batch(node, cg, (a, la, rank_a), (b, lb, rank_b), rank)
        return
    contracted_a = la is not None and la.axis == rank_a - 1
    contracted_b = lb is not None and lb.axis == rank_b - 2
    passing_b = lb is not None and lb.axis == rank_b - 1
    carried_b = lb is None or contracted_b or passing_b
    if (la is not None and not contracted_a) or not carried_b:
        cg.block(node, "a tracked axis of an operand is not one MatMul can carry")
    elif contracted_a != contracted_b or (contracted_a and len(la) != len(lb)):
        cg.block(node, "a channel is contracted on one side only")
    elif contracted_a:
        cg.couple(la, lb)
        cg.sink(node, 0, la)
        cg.sink(node, 1, lb)
        cg.mac_term(node, la, None)
    elif passing_b:
        out = lb.moved(rank - 1, rank).varying()
        cg.set_layout(node.outputs[0], out)
        cg.mac_term(node, None, out)


def _matmul_batch(node, cg: ChannelGraph, left, right, rank: int) -> None:
    """A tracked *batch* axis (attention heads after ``[B, heads, S, d]``): both sides
    lose the same heads, or the other side broadcasts along it; the output keeps it."""
    axes, tracked = set(), []
    for _, layout, operand_rank in (left, right):
        if layout is None:
            continue
        if layout.axis >= operand_rank - 2:
            cg.block(node, "one operand is tracked on a batch axis, the other on a matrix axis")
            return
        axes.add(layout.axis + rank - operand_rank)
        tracked.append(layout)
    if len(axes) != 1 or len({len(layout) for layout in tracked}) != 1:
        cg.block(node, "operands are tracked on different batch axes")
        return
    axis = axes.pop()
    for tensor, layout, operand_rank in (left, right):
        if layout is None:
            dims = cg.dims(tensor)
            k = axis - (rank - operand_rank)
            if dims is None or (k >= 0 and dims[k] != 1):
                cg.block(node, f"operand {tensor.name!r} does not broadcast along the heads")
                return
    if len(tracked) == 2:
        cg.couple(tracked[0], tracked[1])
    out = Layout(axis, rank, tracked[0].atoms, np.zeros(len(tracked[0]), dtype=bool))
    cg.set_layout(node.outputs[0], out)
    cg.mac_term(node, None, out)


def _name(node: gs.Node) -> str:
    return f"{node.op} {node.name or node.outputs[0].name!r}"


# ---------------------------------------------------------------------------- elementwise

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Shrink", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan",
    "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike", "Clip", "Dropout",
)  # fmt: skip


@channel_handler(*UNARY)
def _unary(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    for other in node.inputs[1:]:
        if cg.layout(other) is not None and node.op != "CastLike":
            cg.block(node, "a tracked tensor is used as a parameter")
            return
    if layout is None:
        return
    for output in node.outputs:
        cg.set_layout(output, layout)


ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
    "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
)  # fmt: skip


@channel_handler(*ELEMENTWISE)
def elementwise(node: gs.Node, cg: ChannelGraph) -> None:
    inputs = [t for t in node.inputs if not t.is_empty()]
    tracked = [(t, cg.layout(t)) for t in inputs if cg.layout(t) is not None]
    if not tracked:
        return
    ranks = [cg.rank(t) for t in inputs]
    if any(r is None for r in ranks):
        cg.block(node, "an operand has an unknown rank")
        return
    rank = max(ranks)
    axes = {layout.axis + rank - layout.rank for _, layout in tracked}
    lengths = {len(layout) for _, layout in tracked}
    if len(axes) != 1 or len(lengths) != 1:
        cg.block(node, "operands are tracked on different axes")
        return
    axis, length = axes.pop(), lengths.pop()
    base = tracked[0][1]
    const = base.const.copy()
    for _, layout in tracked[1:]:
        cg.couple(base, layout)
        const &= layout.const
    for tensor in inputs:
        if cg.layout(tensor) is not None:
            continue
        problem = _broadcast_problem(cg, tensor, axis, rank, length)
        if problem:
            cg.block(node, problem)
            return
        if not isinstance(tensor, gs.Constant):
            const[:] = False
    cg.set_layout(node.outputs[0], Layout(axis, rank, base.atoms, const))


def _broadcast_problem(cg, tensor, axis, rank, length) -> str | None:
    """None when an untracked operand broadcasts along the tracked axis or is a
    constant with one value per channel (sliced by the rewrite)."""
    dims = cg.dims(tensor)
    if dims is None:
        return f"shape of operand {tensor.name!r} is unknown"
    k = axis - (rank - len(dims))
    if k < 0 or dims[k] == 1:
        return None
    if dims[k] == length and isinstance(tensor, gs.Constant):
        return None
    source = f" (from {_name(tensor.inputs[0])})" if tensor.inputs else " (a graph input)"
    return (
        f"operand {tensor.name!r}{source} has channels the analysis does not track "
        "(neither a per-channel constant nor broadcast)"
    )


# ---------------------------------------------------------------------------- normalization


@channel_handler("BatchNormalization", "InstanceNormalization")
def _batchnorm(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    if _extra_outputs_used(node, cg):
        cg.block(node, "its statistics outputs are used")
        return
    if layout.axis != 1:
        cg.block(node, "it normalizes axis 1, not the tracked axis")
        return
    for param in node.inputs[1:]:
        if not isinstance(param, gs.Constant) or tuple(param.shape) != (len(layout),):
            cg.block(node, "its parameters are not per-channel constants")
            return
    cg.set_layout(node.outputs[0], layout)
    if node.op == "BatchNormalization":
        cg.contribute(layout.atoms, lambda norm: mag.batchnorm_scale(node, norm))


def _extra_outputs_used(node: gs.Node, cg: ChannelGraph) -> bool:
    extra = [out for out in node.outputs[1:] if not out.is_empty()]
    return any(out.outputs or out in cg.graph.outputs for out in extra)


@channel_handler("LayerNormalization")
def _layernorm(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    axis = normalize_axis(int(node.attrs.get("axis", -1)), layout.rank)
    if layout.axis >= axis or any(cg.layout(t) is not None for t in node.inputs[1:]):
        cg.block(node, "it normalizes over the channel axis")
        return
    if _extra_outputs_used(node, cg):
        cg.block(node, "its statistics outputs are used")
        return
    cg.set_layout(node.outputs[0], layout.varying())


@channel_handler("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    default = -1 if cg.opset >= 13 else 1
    axis = normalize_axis(int(node.attrs.get("axis", default)), layout.rank)
    covered = layout.axis == axis if cg.opset >= 13 else layout.axis >= axis
    if covered:
        cg.block(node, "it normalizes over the channel axis")
        return
    cg.set_layout(node.outputs[0], layout)


# ---------------------------------------------------------------------------- pooling


POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")


@channel_handler(*POOLS)
def _pool(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    if layout.axis != 1:
        cg.block(node, "it pools a tensor whose tracked axis is not 1")
        return
    if len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1] in cg.graph.outputs):
        cg.block(node, "its Indices output encodes channel offsets")
        return
    excludes_pads = no_padding(node) or not node.attrs.get("count_include_pad", 0)
    keeps_constants = node.op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool") or (
        node.op == "AveragePool" and excludes_pads
    )
    cg.set_layout(node.outputs[0], layout if keeps_constants else layout.varying())


# ---------------------------------------------------------------------------- blockers

MIXING = {
    "LRN": "LRN mixes neighbouring channels",
    "GroupNormalization": "GroupNormalization normalizes over groups of channels",
    "DepthToSpace": "DepthToSpace moves channels into space",
    "SpaceToDepth": "SpaceToDepth moves space into channels",
    "Size": "the element count is read at run time",
}


def _mixing(node: gs.Node, cg: ChannelGraph) -> None:
    cg.block(node, MIXING[node.op])


for _op in MIXING:
    HANDLERS[_op] = _mixing


# the axis-moving ops register themselves into HANDLERS (kept in their own module)
from onnxopt.passes.neurons import reshaping  # noqa: E402, F401
