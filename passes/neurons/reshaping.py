"""Channel handlers for ops that move, cut or reduce axes: ``HANDLERS`` entries for
Resize / Upsample, Pad, Concat, Split, Slice, Transpose, Flatten, Reshape, Squeeze /
Unsqueeze, Expand, Tile, Gather, Quantize / DequantizeLinear, Shape and reductions.

Registered into ``handlers.HANDLERS`` when ``handlers`` is imported (same rules: never
raise on a well-formed model, block what cannot be rewritten exactly).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.groups import ChannelGraph
from onnxopt.passes.neurons.handlers import (
    channel_handler,
    constant_values,
    elementwise,
    input_at,
    int_list,
)
from onnxopt.passes.neurons.layout import Layout, block_of, normalize_axis, reshape_blocks


@channel_handler("Resize", "Upsample")
def _resize(node: gs.Node, cg: ChannelGraph) -> None:
    layout = _data_layout(node, cg, "a parameter")
    if layout is None:
        return
    scales_index = 1 if node.op == "Upsample" or cg.opset < 11 else 2
    axes = node.attrs.get("axes")
    position = layout.axis if axes is None else _position(axes, layout)
    scales = node.attrs.get("scales") if node.op == "Upsample" else None
    scales = scales if scales is not None else constant_values(input_at(node, scales_index))
    sizes = input_at(node, 3) if node.op == "Resize" and cg.opset >= 11 else None
    if sizes is not None and not isinstance(sizes, gs.Constant):
        cg.block(node, "its sizes are computed at run time")
        return
    if position is None:
        cg.set_layout(node.outputs[0], layout)
        return
    if scales is not None and len(scales) and float(np.asarray(scales)[position]) != 1.0:
        cg.block(node, "it scales the channel axis")
        return
    if sizes is not None and int(sizes.values[position]) != len(layout):
        cg.block(node, "it resizes the channel axis")
        return
    if scales is None and sizes is None and node.op == "Resize":
        cg.block(node, "it has neither scales nor sizes")
        return
    cg.set_layout(node.outputs[0], layout)


def _data_layout(node: gs.Node, cg: ChannelGraph, parameters: str) -> Layout | None:
    """Layout of the data input (0); None when it is not tracked, or when a tracked
    tensor feeds one of the other inputs (``parameters``), which blocks the node."""
    layout = cg.layout(input_at(node, 0))
    if layout is not None and any(cg.layout(t) is not None for t in node.inputs[1:]):
        cg.block(node, f"a tracked tensor is used as {parameters}")
        return None
    return layout


def _position(axes, layout: Layout) -> int | None:
    normalized = [normalize_axis(int(a), layout.rank) for a in axes]
    return normalized.index(layout.axis) if layout.axis in normalized else None


@channel_handler("Pad")
def _pad(node: gs.Node, cg: ChannelGraph) -> None:
    layout = _data_layout(node, cg, "a parameter")
    if layout is None:
        return
    pads = int_list(node, "pads", 1)
    axes = int_list(node, "axes", 3)
    if pads == "variable" or axes == "variable" or pads is None:
        cg.block(node, "its pads are computed at run time")
        return
    axes = range(layout.rank) if axes is None else axes
    axes = [normalize_axis(a, layout.rank) for a in axes]
    if layout.axis in axes:
        k = axes.index(layout.axis)
        if pads[k] or pads[k + len(axes)]:
            cg.block(node, "it pads the channel axis")
            return
    constant_mode = node.attrs.get("mode", "constant") == "constant"
    padded = any(pads)
    cg.set_layout(node.outputs[0], layout.varying() if constant_mode and padded else layout)


# ---------------------------------------------------------------------------- layout ops


@channel_handler("Concat")
def _concat(node: gs.Node, cg: ChannelGraph) -> None:
    inputs = [t for t in node.inputs if not t.is_empty()]
    layouts = [cg.layout(t) for t in inputs]
    tracked = [layout for layout in layouts if layout is not None]
    if not tracked:
        return
    rank = tracked[0].rank
    axis = normalize_axis(int(node.attrs.get("axis", 1)), rank)
    if {layout.axis for layout in tracked} != {tracked[0].axis} or any(
        layout.rank != rank for layout in tracked
    ):
        cg.block(node, "inputs are tracked on different axes")
        return
    if tracked[0].axis != axis:
        elementwise(node, cg)  # same channels in every input: coupled like an Add
        return
    parts = []
    for tensor, layout in zip(inputs, layouts):
        if layout is None:
            dims = cg.dims(tensor)
            if dims is None or len(dims) != rank or dims[axis] is None:
                cg.block(node, f"the channel count of {tensor.name!r} is unknown")
                return
            layout = cg.untracked(dims[axis], axis, rank, f"concatenated with {tensor.name!r}")
        parts.append(layout)
    cg.set_layout(node.outputs[0], Layout.concat(parts))


@channel_handler("Split")
def _split(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    axis = normalize_axis(int(node.attrs.get("axis", 0)), layout.rank)
    if axis != layout.axis:
        for output in node.outputs:
            cg.set_layout(output, layout)
        return
    sizes = int_list(node, "split", 1)
    if sizes == "variable":
        cg.block(node, "its split sizes are computed at run time")
        return
    count = len(node.outputs)
    if sizes is None:
        if len(layout) % count:
            cg.block(node, "it splits the channel axis unevenly without sizes")
            return
        sizes = [len(layout) // count] * count
    offsets = np.cumsum([0, *sizes])
    for output, start, end in zip(node.outputs, offsets[:-1], offsets[1:]):
        cg.set_layout(output, layout.take(slice(int(start), int(end))))


@channel_handler("Slice")
def _slice(node: gs.Node, cg: ChannelGraph) -> None:
    layout = _data_layout(node, cg, "slice bounds")
    if layout is None:
        return
    starts, ends = int_list(node, "starts", 1), int_list(node, "ends", 2)
    axes, steps = int_list(node, "axes", 3), int_list(node, "steps", 4)
    if "variable" in (starts, ends, axes, steps):
        cg.block(node, "its bounds are computed at run time")
        return
    axes = list(range(len(starts))) if axes is None else axes
    axes = [normalize_axis(a, layout.rank) for a in axes]
    if layout.axis not in axes:
        cg.set_layout(node.outputs[0], layout)
        return
    k = axes.index(layout.axis)
    if steps is not None and steps[k] != 1:
        cg.block(node, "it slices the channel axis with a step")
        return
    positions = np.arange(len(layout))[slice(starts[k], ends[k])]
    cg.set_layout(node.outputs[0], layout.take(positions))


@channel_handler("Transpose")
def _transpose(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    perm = list(node.attrs.get("perm", range(layout.rank - 1, -1, -1)))
    cg.set_layout(node.outputs[0], layout.moved(perm.index(layout.axis), layout.rank))


@channel_handler("Flatten")
def _flatten(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    split = normalize_axis(int(node.attrs.get("axis", 1)), layout.rank)
    dims = cg.dims(node.inputs[0])
    start, end, out_axis = (split, layout.rank, 1) if layout.axis >= split else (0, split, 0)
    merged = dims[start:end] if dims is not None else None
    if merged is None or any(d is None for d in merged):
        cg.block(node, "it flattens dynamic dimensions together with the channels")
        return
    cg.set_layout(node.outputs[0], layout.merged(merged, layout.axis - start, out_axis, 2))


@channel_handler("Reshape")
def _reshape(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    shape = input_at(node, 1)
    if cg.layout(shape) is not None or not isinstance(shape, gs.Constant):
        cg.block(node, "its shape is computed at run time")
        return
    mapped = _map_reshape(node, cg, layout, [int(v) for v in shape.values])
    if isinstance(mapped, str):
        cg.block(node, mapped)
        return
    cg.set_layout(node.outputs[0], mapped)


def _map_reshape(node, cg, layout: Layout, target: list[int]) -> Layout | str:
    in_dims = cg.dims(node.inputs[0])
    out_dims = cg.dims(node.outputs[0])
    if in_dims is None or out_dims is None or len(out_dims) != len(target):
        return "its input or output shape is unknown"
    blocks = reshape_blocks(in_dims, out_dims)
    if isinstance(blocks, str):
        return blocks
    block = block_of(blocks, layout.axis)
    if block is None:
        return "the channel axis does not survive the reshape"
    wide = [i for i in range(block.out_start, block.out_end) if out_dims[i] != 1]
    out_axis = wide[-1] if wide else block.out_start
    one_to_one = block.in_end - block.in_start == 1 and block.in_start == out_axis
    if not int(node.attrs.get("allowzero", 0)):
        if target[out_axis] == 0 and not one_to_one:
            return "its shape copies (0) a dimension the channels move into"
        if layout.axis < len(target) and target[layout.axis] == 0 and not one_to_one:
            return "its shape copies (0) the channel dimension to another axis"
    in_sizes = in_dims[block.in_start : block.in_end]
    if len(wide) > 1:
        if block.in_end - block.in_start != 1:
            return "it regroups the channel axis with other axes"
        if cg.heads and _splits_heads(layout, wide, len(out_dims)):
            return _split_heads(cg, layout, out_dims[out_axis], wide[0], len(out_dims))
        return _split_channels(cg, layout, out_dims[out_axis], out_axis, len(out_dims))
    return layout.merged(in_sizes, layout.axis - block.in_start, out_axis, len(out_dims))


def _splits_heads(layout: Layout, wide: list[int], rank: int) -> bool:
    """The last axis becomes ``[..., heads, head_dim]`` (multi-head attention); a split
    of axis 1 of an image tensor (channel shuffle) keeps pruning by position."""
    return len(wide) == 2 and wide[-1] == rank - 1 and layout.axis == layout.rank - 1


def _split_heads(cg, layout: Layout, inner: int, axis: int, rank: int) -> Layout:
    """``[..., heads * head_dim]`` -> ``[..., heads, head_dim]``: the ``head_dim``
    channels of a head are removed together, so whole heads go; the layout continues
    on the ``heads`` axis (one atom per head)."""
    atoms = layout.atoms.reshape(-1, inner)
    const = layout.const.reshape(-1, inner)
    first = Layout(axis, rank, atoms[:, 0], np.all(const, axis=1))
    for column in range(1, inner):
        cg.couple(first, Layout(axis, rank, atoms[:, column], first.const))
    return first


def _split_channels(cg, layout: Layout, inner: int, axis: int, rank: int) -> Layout:
    """The channel axis becomes ``[..., outer, inner]`` (attention heads, channel
    shuffle groups): position ``i * inner + j`` is coupled with ``j`` in every outer
    slice, so every head / shuffle group loses the same channels and the reshape
    stays valid; the layout continues on the ``inner`` axis."""
    atoms = layout.atoms.reshape(-1, inner)
    const = layout.const.reshape(-1, inner)
    first = Layout(axis, rank, atoms[0], np.all(const, axis=0))
    for row in atoms[1:]:
        cg.couple(first, Layout(axis, rank, row, first.const))
    return first


@channel_handler("Squeeze", "Unsqueeze")
def _squeeze(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    axes = int_list(node, "axes", 1)
    if axes == "variable":
        cg.block(node, "its axes are computed at run time")
        return
    if node.op == "Squeeze":
        if axes is None:
            dims = cg.dims(node.inputs[0])
            if dims is None:
                cg.block(node, "its input shape is unknown")
                return
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = [normalize_axis(a, layout.rank) for a in axes]
        if layout.axis in axes:
            cg.block(node, "it squeezes the channel axis")
            return
        axis = layout.axis - sum(a < layout.axis for a in axes)
        rank = layout.rank - len(axes)
    else:
        rank = layout.rank + len(axes or [])
        inserted = {normalize_axis(a, rank) for a in axes or []}
        kept = [i for i in range(rank) if i not in inserted]
        axis = kept[layout.axis]
    cg.set_layout(node.outputs[0], layout.moved(axis, rank))


@channel_handler("Expand")
def _expand(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    shape = constant_values(input_at(node, 1))
    if layout is None:
        if cg.layout(input_at(node, 1)) is not None:
            cg.block(node, "a tracked tensor is used as a shape")
        return
    if shape is None:
        cg.block(node, "its shape is computed at run time")
        return
    rank = max(layout.rank, len(shape))
    axis = layout.axis + rank - layout.rank
    entry = int(shape[axis - (rank - len(shape))]) if axis >= rank - len(shape) else 1
    if entry not in (1, len(layout)):
        cg.block(node, "it expands the channel axis")
        return
    cg.set_layout(node.outputs[0], layout.moved(axis, rank))


@channel_handler("Tile")
def _tile(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    repeats = constant_values(input_at(node, 1))
    if repeats is None or int(repeats[layout.axis]) != 1:
        cg.block(node, "it tiles the channel axis (or its repeats are computed at run time)")
        return
    cg.set_layout(node.outputs[0], layout)


@channel_handler("Gather")
def _gather(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    indices = input_at(node, 1)
    if cg.layout(indices) is not None:
        cg.block(node, "a tracked tensor is used as indices")
        return
    if layout is None:
        return
    axis = normalize_axis(int(node.attrs.get("axis", 0)), layout.rank)
    index_rank = cg.rank(indices)
    if axis == layout.axis or index_rank is None:
        cg.block(node, "it gathers along the channel axis")
        return
    new_axis = layout.axis if layout.axis < axis else layout.axis - 1 + index_rank
    cg.set_layout(node.outputs[0], layout.moved(new_axis, layout.rank - 1 + index_rank))


@channel_handler("QuantizeLinear", "DequantizeLinear")
def _quantize(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    scale = input_at(node, 1)
    if not isinstance(scale, gs.Constant) or node.attrs.get("block_size", 0):
        cg.block(node, "its scale is not a per-tensor or per-axis constant")
        return
    if scale.values.size > 1:
        axis = normalize_axis(int(node.attrs.get("axis", 1)), layout.rank)
        if axis == layout.axis and scale.values.shape != (len(layout),):
            cg.block(node, "its scale does not have one value per channel")
            return
    cg.set_layout(node.outputs[0], layout)


@channel_handler("Shape")
def _shape(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    start = normalize_axis(int(node.attrs.get("start", 0)), layout.rank)
    end = node.attrs.get("end")
    end = layout.rank if end is None else normalize_axis(int(end), layout.rank)
    if not start <= layout.axis < end:
        return
    channel_entry = layout.axis - start
    for reader in node.outputs[0].outputs:
        indices = constant_values(input_at(reader, 1)) if reader.op == "Gather" else None
        if indices is None or channel_entry in np.atleast_1d(indices) % (end - start):
            cg.block(node, "the channel count is read at run time")
            return
    if node.outputs[0] in cg.graph.outputs:
        cg.block(node, "the channel count is a graph output")


# ---------------------------------------------------------------------------- reductions

REDUCE = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
)  # fmt: skip


@channel_handler(*REDUCE)
def _reduce(node: gs.Node, cg: ChannelGraph) -> None:
    layout = cg.layout(input_at(node, 0))
    if layout is None:
        return
    if node.op in ("ArgMax", "ArgMin"):
        axes: list[int] | str | None = [int(node.attrs.get("axis", 0))]
    else:
        axes = int_list(node, "axes", 1)
    if axes == "variable":
        cg.block(node, "its axes are computed at run time")
        return
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            cg.set_layout(node.outputs[0], layout)
            return
        axes = list(range(layout.rank))
    axes = [normalize_axis(a, layout.rank) for a in axes]
    if layout.axis in axes:
        cg.block(node, "it reduces over the channel axis")
        return
    if int(node.attrs.get("keepdims", 1)):
        cg.set_layout(node.outputs[0], layout)
        return
    axis = layout.axis - sum(a < layout.axis for a in axes)
    cg.set_layout(node.outputs[0], layout.moved(axis, layout.rank - len(axes)))
