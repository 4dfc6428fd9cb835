"""Channel layouts of tensors and the shape facts the channel analysis needs.

A :class:`Layout` says which *channel atoms* sit along one axis (the tracked axis) of
a tensor: ``atoms[p]`` is the atom at position ``p``. An atom is one output channel
of one producer (Conv, Gemm, MatMul...). Pass-through ops copy layouts, Concat
concatenates them, Slice/Split cut them, Flatten repeats each atom over the block of
features one channel becomes. ``const[p]`` records that position ``p`` is provably
the same value everywhere, whatever the model input (used by ``mode=dead``).

Shapes come from onnx shape inference on a *skeleton* of the graph: large float
constants are replaced by typed graph inputs so that inference never copies the
weights of a big model. Dimensions are ``int`` or ``None`` (dynamic / unknown).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Dims = tuple[int | None, ...]
SKELETON_LIMIT = 4096  # constants with more elements become inputs of the skeleton


@dataclass
class Layout:
    """The atoms along the tracked ``axis`` of a tensor of rank ``rank``."""

    axis: int
    rank: int
    atoms: np.ndarray  # int64, one atom id per position of the tracked axis
    const: np.ndarray  # bool, position holds a value that does not depend on the input

    def __len__(self) -> int:
        return len(self.atoms)

    def moved(self, axis: int, rank: int) -> Layout:
        return Layout(axis, rank, self.atoms, self.const)

    def take(self, index: np.ndarray | slice) -> Layout:
        return Layout(self.axis, self.rank, self.atoms[index], self.const[index])

    def repeat(self, count: int) -> Layout:
        atoms, const = np.repeat(self.atoms, count), np.repeat(self.const, count)
        return Layout(self.axis, self.rank, atoms, const)

    def varying(self) -> Layout:
        return Layout(self.axis, self.rank, self.atoms, np.zeros(len(self), dtype=bool))

    def merged(self, dims: Sequence[int], position: int, axis: int, rank: int) -> Layout:
        """Positions after merging axes with sizes ``dims`` (the tracked one at
        ``position`` among them) into one axis, C order: Flatten / Reshape."""
        shape = [1] * len(dims)
        shape[position] = len(self)
        atoms = np.broadcast_to(self.atoms.reshape(shape), tuple(dims)).ravel()
        const = np.broadcast_to(self.const.reshape(shape), tuple(dims)).ravel()
        return Layout(axis, rank, atoms.copy(), const.copy())

    @staticmethod
    def concat(parts: Sequence[Layout]) -> Layout:
        first = parts[0]
        return Layout(
            first.axis,
            first.rank,
            np.concatenate([p.atoms for p in parts]),
            np.concatenate([p.const for p in parts]),
        )


# ---------------------------------------------------------------------------- shapes


def infer_shapes(graph: gs.Graph) -> dict[str, Dims | None]:
    """Dimensions of every tensor of the main graph that onnx shape inference knows."""
    model = shape_inferred_model(graph)
    dims: dict[str, Dims | None] = {}
    for info in value_infos(model.graph):
        dims[info.name] = _dims_of(info)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Constant):
            dims[name] = tuple(int(d) for d in tensor.shape)
    return dims


def value_infos(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Inputs, value_info and outputs of ``graph`` and of every subgraph in it (tensor
    names are unique across a model's scopes)."""
    infos = [*graph.input, *graph.value_info, *graph.output]
    for node in graph.node:
        for attribute in node.attribute:
            graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for sub in [attribute.g, *attribute.graphs] if attribute.type in graphs else []:
                infos += value_infos(sub)
    return infos


def shape_inferred_model(graph: gs.Graph) -> onnx.ModelProto:
    """A weightless skeleton of ``graph`` after onnx shape inference (data propagation
    on); when inference fails, the declared shapes."""
    skeleton = graph.copy()
    stand_ins: dict[str, gs.Variable] = {}
    for node in skeleton.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and _is_large(tensor):
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(
                        tensor.name, dtype=tensor.export_dtype, shape=list(tensor.shape)
                    )
                node.inputs[index] = stand_ins[tensor.name]
    skeleton.inputs = list(skeleton.inputs) + list(stand_ins.values())
    model = gs.export_onnx(skeleton, do_type_check=False)
    model.ir_version = max(model.ir_version, 4)
    with contextlib.suppress(Exception):  # an op onnx cannot infer: keep declared shapes
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


def _is_large(tensor: gs.Constant) -> bool:
    return int(np.prod(tensor.shape, dtype=np.int64)) > SKELETON_LIMIT


def _dims_of(info: onnx.ValueInfoProto) -> Dims | None:
    kind = info.type.WhichOneof("value")
    if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in info.type.tensor_type.shape.dim
    )


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------- reshape


@dataclass(frozen=True)
class ReshapeBlock:
    """Input axes ``[in_start, in_end)`` become output axes ``[out_start, out_end)``."""

    in_start: int
    in_end: int
    out_start: int
    out_end: int


def reshape_blocks(in_dims: Dims, out_dims: Dims) -> list[ReshapeBlock] | str:
    """Factor a reshape into blocks of axes with equal products (C order).

    A dynamic dimension must face a dynamic dimension (taken as the same, e.g. the
    batch); anything else that does not factor returns the reason as a string.
    """
    blocks: list[ReshapeBlock] = []
    i = j = 0
    while i < len(in_dims) and j < len(out_dims):
        if in_dims[i] is None or out_dims[j] is None:
            if in_dims[i] is None and out_dims[j] is None:
                blocks.append(ReshapeBlock(i, i + 1, j, j + 1))
                i, j = i + 1, j + 1
                continue
            return "a dynamic dimension does not line up with the reshaped axes"
        block = _grow_block(in_dims, out_dims, i, j)
        if isinstance(block, str):
            return block
        blocks.append(block)
        i, j = block.in_end, block.out_end
    rest_in, rest_out = in_dims[i:], out_dims[j:]
    if any(d != 1 for d in rest_in) or any(d != 1 for d in rest_out):
        return "the reshape does not factor into blocks of equal size"
    return blocks


def _grow_block(in_dims: Dims, out_dims: Dims, i: int, j: int) -> ReshapeBlock | str:
    left, right = in_dims[i], out_dims[j]
    ii, jj = i + 1, j + 1
    while left != right:
        if left < right:
            if ii >= len(in_dims) or in_dims[ii] is None:
                return "the reshape does not factor into blocks of equal size"
            left *= in_dims[ii]
            ii += 1
        else:
            if jj >= len(out_dims) or out_dims[jj] is None:
                return "the reshape does not factor into blocks of equal size"
            right *= out_dims[jj]
            jj += 1
    return ReshapeBlock(i, ii, j, jj)


def block_of(blocks: list[ReshapeBlock], axis: int) -> ReshapeBlock | None:
    for block in blocks:
        if block.in_start <= axis < block.in_end:
            return block
    return None
