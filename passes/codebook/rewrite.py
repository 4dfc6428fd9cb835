"""The graph forms of ``share-weights`` (specified in the pass's docstring):

    tensor:   W = Gather(codebook, Cast<int32>(indices))
    channel:  W = Gather(codebook, Add(Cast<int32>(indices), offsets))
    scaled:   W = Mul(Gather(codebook, Cast<int32>(indices)), scales)
    pooled:   W1, W2, ... = Split(head) (+ Reshape where not 1-D), the head being a
              Gather chain (codebook pool) or Cast<float>(float16 values)

Every rebuilt tensor keeps its name, so its consumers read it unchanged. Generated
tensors and nodes get short names ``sw<n>.<part>``: long names are a visible part of a
small model's file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.graph import replace_uses, unique_name
from onnxopt.passes.codebook import sparse
from onnxopt.passes.codebook.kmeans import Encoded, pack_uint4

SPLIT_INPUT_OPSET = 13  # Split's sizes: an attribute before, an input from opset 13


class Rewriter:
    """Builds the rebuild chains in ``graph``, with names unique in it."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self._names = set(graph.tensors()) | {node.name for node in graph.nodes}
        self._stems = 0
        self._streams: list[tuple[np.ndarray, gs.Variable]] = []  # sparse index stream
        self._stream_stem = self._stream_name = ""
        self.streamed_codebooks: list[tuple[gs.Constant, gs.Node]] = []  # (codebook, Gather)

    def stem(self) -> str:
        """A short prefix ``sw<n>`` for the names of one encoding's tensors and nodes."""
        while True:
            stem = f"sw{self._stems}"
            self._stems += 1
            if not any(name.startswith(stem + ".") for name in self._names):
                return stem

    def fresh(self, base: str) -> str:
        return unique_name(base, self._names)

    def rewire(
        self, tensor: gs.Constant, encoded: Encoded, index_bits: int, stream: bool = False
    ) -> dict[str, str]:
        """Replace ``tensor`` by its rebuild (tensor, channel or scaled form) for all its
        consumers; returns the names of the indices and the codebook. With ``stream``
        its indices join the step's sparse index stream (built by :meth:`finish`)."""
        stem = self.stem()
        if stream:
            position, codebook, nodes = self._streamed(stem, encoded)
            indices_name = self._stream_name
        else:
            position, indices, codebook, nodes = self.gather_chain(stem, encoded, index_bits)
            indices_name = indices.name
        if encoded.offsets is not None:
            offsets = gs.Constant(self.fresh(f"{stem}.off"), encoded.offsets)
            shifted = gs.Variable(self.fresh(f"{stem}.pos2"))
            add = gs.Node("Add", self.fresh(f"{stem}.add"), {}, [position, offsets], [shifted])
            nodes.insert(len(nodes) - 1, add)  # before the Gather
            nodes[-1].inputs[1] = shifted
        rebuilt = gs.Variable(tensor.name)
        if encoded.scales is not None:
            gathered = gs.Variable(self.fresh(f"{stem}.cbw"))
            scales = gs.Constant(self.fresh(f"{stem}.sc"), encoded.scales)
            name = self.fresh(f"{stem}.mul")
            nodes[-1].outputs = [gathered]
            nodes.append(gs.Node("Mul", name, {}, [gathered, scales], [rebuilt]))
        else:
            nodes[-1].outputs = [rebuilt]
        redirect(tensor, rebuilt)
        self.graph.nodes.extend(nodes)
        return {"indices": indices_name, "codebook": codebook.name}

    def _streamed(self, stem: str, encoded: Encoded):
        """The Gather of a tensor whose int32 indices the stream's decoder will yield."""
        if not self._streams:
            self._stream_stem = self.stem()
            self._stream_name = self.fresh(f"{self._stream_stem}.z")
        position = gs.Variable(self.fresh(f"{stem}.pos"))
        self._streams.append((encoded.indices, position))
        codebook = gs.Constant(self.fresh(f"{stem}.cb"), encoded.codebook)
        gather = gs.Node("Gather", self.fresh(f"{stem}.gather"), {"axis": 0}, [codebook, position])
        self.streamed_codebooks.append((codebook, gather))
        return position, codebook, [gather]

    def finish(self) -> None:
        """Build the decoder of the sparse index stream (``passes/codebook/sparse.py``)."""
        if not self._streams:
            return
        stem, parts = self._stream_stem, self._streams
        self._streams = []
        flat = np.concatenate([indices.reshape(-1) for indices, _ in parts])
        const = lambda suffix, value: gs.Constant(self.fresh(f"{stem}.{suffix}"), value)  # noqa: E731
        var = lambda suffix: gs.Variable(self.fresh(f"{stem}.{suffix}"))  # noqa: E731
        stream = gs.Constant(self._stream_name, sparse.encode(flat))
        sixteen, one = const("16", np.array(16, np.int32)), const("1", np.array(1, np.int32))
        x, gap, index, step, ends, position, zeros, out = (
            var(s) for s in ("x", "gap", "v", "step", "end", "at", "zero", "flat")
        )
        node = lambda op, ins, outs, **attrs: gs.Node(  # noqa: E731
            op, self.fresh(f"{stem}.{op.lower()}"), attrs, ins, outs
        )
        nodes = [
            node("Cast", [stream], [x], to=onnx.TensorProto.INT32),
            node("Div", [x, sixteen], [gap]),
            node("Mod", [x, sixteen], [index]),
            node("Add", [gap, one], [step]),
            node("CumSum", [step, const("axis", np.array(0, np.int32))], [ends]),
            node("Sub", [ends, one], [position]),
            node(
                "Expand",
                [const("0", np.array(0, np.int32)), const("n", np.array([flat.size], np.int64))],
                [zeros],
            ),
            node("ScatterElements", [zeros, position, index], [out], axis=0),
        ]
        if len(parts) == 1:
            pieces = [out]
        else:
            pieces = [var(f"p{j}") for j in range(len(parts))]
            sizes = np.array([indices.size for indices, _ in parts], np.int64)
            nodes.append(node("Split", [out, const("sizes", sizes)], pieces, axis=0))
        for (indices, position), piece in zip(parts, pieces):
            shape = const("s", np.array(indices.shape, np.int64))
            nodes.append(node("Reshape", [piece, shape], [position]))
        self.graph.nodes.extend(nodes)

    def gather_chain(
        self, stem: str, encoded: Encoded, index_bits: int
    ) -> tuple[gs.Variable, gs.Constant, gs.Constant, list[gs.Node]]:
        """``Cast(indices) -> Gather(codebook, .)``; returns the Cast output, the two
        constants and the nodes (the Gather last, its output still to be set)."""
        name = self.fresh(f"{stem}.idx")
        if index_bits == 4:
            indices = gs.Constant(name, LazyValues(pack_uint4(encoded.indices, name)))
        else:
            indices = gs.Constant(name, encoded.indices)
        codebook = gs.Constant(self.fresh(f"{stem}.cb"), encoded.codebook)
        # New variables carry no dtype/shape: value_info would cost bytes in a pass whose
        # point is a small file, and shape inference recomputes them anyway.
        position = gs.Variable(self.fresh(f"{stem}.pos"))
        cast = gs.Node(
            "Cast",
            self.fresh(f"{stem}.cast"),
            {"to": onnx.TensorProto.INT32},
            [indices],
            [position],
        )
        gather = gs.Node("Gather", self.fresh(f"{stem}.gather"), {"axis": 0}, [codebook, position])
        return position, indices, codebook, [cast, gather]

    def rewire_pool(self, stem: str, members: list, head: list[gs.Node]) -> None:
        """``head`` (its last node yields the members concatenated) ``-> Split`` (one
        output per member) ``-> Reshape`` where not rank 1."""
        flat = gs.Variable(self.fresh(f"{stem}.all"))
        parts, rebuilt, nodes = [], [], list(head)
        for j, member in enumerate(members):
            target = gs.Variable(member.tensor.name)
            rebuilt.append(target)
            if len(member.tensor.shape) == 1:
                parts.append(target)
                continue
            part = gs.Variable(self.fresh(f"{stem}.p{j}"))
            shape = np.array(member.tensor.shape, np.int64)
            shape_const = gs.Constant(self.fresh(f"{stem}.s{j}"), shape)
            name = self.fresh(f"{stem}.r{j}")
            nodes.append(gs.Node("Reshape", name, {}, [part, shape_const], [target]))
            parts.append(part)
        if len(members) == 1:  # no Split: the head's output is the member (or its Reshape input)
            head[-1].outputs = parts
        else:
            head[-1].outputs = [flat]
            nodes.insert(len(head), self._split(stem, flat, members, parts))
        for member, target in zip(members, rebuilt):
            redirect(member.tensor, target)
        self.graph.nodes.extend(nodes)

    def _split(self, stem: str, flat: gs.Variable, members: list, parts: list) -> gs.Node:
        sizes = np.array([m.size for m in members], np.int64)
        name = self.fresh(f"{stem}.split")
        if int(self.graph.opset) >= SPLIT_INPUT_OPSET:
            split = gs.Constant(self.fresh(f"{stem}.sizes"), sizes)
            return gs.Node("Split", name, {"axis": 0}, [flat, split], parts)
        return gs.Node("Split", name, {"axis": 0, "split": sizes.tolist()}, [flat], parts)


def split_bytes(members: list) -> int:
    """int64 Split sizes (when there are several members) and Reshape shapes."""
    sizes = 8 * len(members) if len(members) > 1 else 0
    return sizes + sum(8 * len(m.tensor.shape) for m in members if len(m.tensor.shape) != 1)


def redirect(tensor: gs.Constant, rebuilt: gs.Variable) -> None:
    """Every consumer of ``tensor`` reads ``rebuilt`` instead."""
    replace_uses(tensor, rebuilt)
