"""``share-weights`` — codebook weight sharing with 1-D k-means (lossy, Deep Compression style).

Rewrite: the values of each eligible float tensor ``W`` are clustered into ``K = 2**bits``
shared values. ``W`` is then stored as integer *indices* plus a small float *codebook*,
and rebuilt in front of its consumers::

    tensor granularity:   W = Gather(codebook[K], Cast<int32>(indices))
    channel granularity:  W = Gather(codebook[C*K], Add(Cast<int32>(indices), offsets))
    pooled constants:     W1, W2, ... = Split(Gather(codebook[<=K], Cast<int32>(indices)))

``indices`` has ``W``'s shape and layout (UINT8, or packed UINT4 — two per byte — when
``bits <= 4`` and the opset is >= 21); ``offsets`` (int32, ``c*K`` along the channel axis,
shaped to broadcast) selects channel ``c``'s row of the flat codebook. The rebuilt tensor
keeps ``W``'s name, and every consumer of ``W`` reads it (a tensor shared by several
nodes is encoded once). The reconstruction depends only on constants: onnxruntime folds
it back into a float initializer when the session is created (level BASIC and above),
so the *file* shrinks while inference speed and memory are those of the float model.
``materialize=true`` instead snaps ``W`` to its centroids in place (float storage, same
graph): same outputs as the Gather form, for runtimes that dislike it; the file only
shrinks once compressed. Generated tensors and nodes get short names (``sw3.idx``,
``sw3.cb``, ``sw3.cast`` ...): on a small model, long names are a visible part of the file.

What is shared (``scope``):

- ``scope=weights``: constant ``weight``/``embedding`` inputs of Conv, ConvTranspose,
  Gemm, MatMul and Gather (``onnxopt.graph.WEIGHT_INPUTS``) with at least ``min_size``
  elements, one codebook each (per tensor or per output channel).
- ``scope=all`` (default) adds every other float constant whose consumers all read it
  at a position listed in ``CONSTANT_INPUTS`` — biases, BatchNormalization scale, shift
  and mean (not the variance: its error is amplified by ``1/sqrt(var)``), Layer/Instance/
  GroupNormalization scale and shift, PRelu slopes, Add/Sub/Mul/Div/Concat operands
  (positional embeddings). Those with at least ``min_size`` elements get their own
  codebook at ``bits`` (per tensor). Those with fewer (``POOL_MIN_SIZE`` to
  ``min_size - 1`` elements, small weights included) are *pooled*: concatenated per
  dtype into one tensor clustered with a single codebook of at most ``2**pool_bits``
  values and split back. A per-tensor codebook of 16 floats costs as much as a
  32-element bias; the pool shares one. These tensors are few, small and sensitive, so
  the pool is finer than the weights (8 bits by default) and only built when
  ``pool_bits > bits`` (at ``bits=8`` they stay float). Below ``POOL_MIN_SIZE``
  elements (scalars such as GELU's 0.5) pooling saves nothing.
  Constants read at any other position (Resize scales, Clip bounds, Pow exponents,
  shapes...) are never touched: they set shapes or exact semantics.

Defaults, measured on the sample models (tools/bench_codebook.py, docs/passes/codebook.md):

- ``init=best``: Lloyd runs from both starts — ``linear`` (evenly over [min, max], the
  initialisation Deep Compression found best *when the codebook is retrained*
  afterwards: it keeps the few large weights) and ``density`` (at the quantiles) — and
  each codebook keeps the result with the smaller squared error, as k-means libraries
  keep the best of several starts. This pass does not retrain: with ``linear`` alone
  the sample CNN lost 1.48 points at 4 bits (99.07 -> 97.59 %; 97.22 % with
  ``scope=weights``), with ``density`` alone the 8-bit CNN fell to cosine 0.99979 (the
  issue asks 0.9999); ``best`` keeps both within bounds (98.33 %, 0.99992) for twice
  the Lloyd time (the sort is shared).
  ``linear`` stays available (before training the codebook with ``distill``; and on
  pruned weights its lower index entropy gives a better deflate ratio).
- ``upgrade_opset=auto``: when UINT4 indices are wanted (``bits <= 4``) and the model's
  opset is below 21, convert it with ``onnx.version_converter`` and keep the result if
  the conversion succeeds and the converted model passes onnx's checker; otherwise
  store UINT8 indices and say why in a note. ``true`` raises instead of falling back,
  ``false`` never converts.

k-means: one dimension, per tensor (or per output channel), Lloyd iterations until the
assignment stops changing (or ``max_iter``). Each row is sorted once (O(n log n)); with
prefix sums an iteration costs O(K log n) (binary search of the boundaries between
neighbouring centroids), and rows that stopped moving leave the loop: 10 M weights take
one to a few seconds (tools/bench_codebook.py). Nothing is random: the result does not
depend on the seed, and the output is byte-identical.

- Exact zeros stay exactly zero: a row containing zeros reserves a centroid fixed at 0.0
  (the starting centroid nearest zero is snapped to 0 and never moves), so pruned
  weights keep their sparsity; nonzero weights may also land on it.
- A row with at most K distinct values gets those values as its codebook (no loss), so
  re-encoding a materialized tensor is lossless and ``materialize=true`` is idempotent.
- Per-tensor and pooled codebooks keep only the centroids some index uses, and every
  codebook numbers its entries by use (most used first: zero, on pruned weights).
  Same values; deflate codes the index bytes better (80 %-pruned MLP: 11.5x -> 12.0x).
- Centroids are computed in float64 and stored in the tensor's dtype; indices are
  assigned to the nearest *stored* centroid, so the reported MSE is the real one.
- Channel axis (``granularity=channel``, weights only): output channels — Conv axis 0,
  ConvTranspose axis 1, Gemm/MatMul the output-feature axis of the weight operand,
  Gather tables the feature (last) axis. A weight shared by several consumers uses its
  first consumer's axis. Rank-1 weights use one codebook.
- Index type (``index_dtype=auto``): UINT4 when ``bits <= 4`` and the model's opset is
  >= 21 (Cast from uint4 exists from opset 21; the IR version is raised to 10 if lower),
  otherwise UINT8. The pool's indices are UINT4 only when ``pool_bits <= 4``.

Does nothing to (reported in ``details["skipped"]`` with the reason): non-float or
too-small tensors, tensors with NaN/Inf, graph inputs and outputs, constants also read
inside a subgraph body (bodies are not visited), the codebook of an existing Gather
reconstruction (so running the pass twice changes nothing the second time), constants
whose consumer op matches no ``ops`` glob or whose name (or consumer's) matches an
``exclude`` glob, and encodings whose indices + codebook would not be smaller than the
float tensor (per-channel codebooks of small layers at high ``bits``; a pool of a few
biases at 8 bits). With ``materialize=true``, a tensor that already has at most K
distinct values per row is left as it is.

Reported per tensor in ``details["tensors"]``: bits, granularity, the generated index
and codebook names, codebooks and codebook entries, MSE and SQNR, zeros kept, k-means
iterations and seconds, bytes before/after (a pool is one record listing its members
and their SQNR). The model's file size and deflate-compressed size before/after are in
the step's ``before``/``after`` stats (the PassManager measures them for every step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.errors import UsageError
from onnxopt.graph import WEIGHT_INPUTS, WeightRef, convert_opset, iter_nodes
from onnxopt.passes.codebook.kmeans import Encoded, encode, iter_chunks, pack_uint4
from onnxopt.pipeline import Pass, PassContext, PassResult, matches_any, option, register_pass

log = logging.getLogger(__name__)

UINT4_OPSET = 21  # first opset whose Cast accepts tensor(uint4)
UINT4_IR = 10  # first IR version with the UINT4 data type
SPLIT_INPUT_OPSET = 13  # Split's sizes: an attribute before, an input from opset 13
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SHARED_ROLES = ("weight", "embedding")
POOL_MIN_SIZE = 8  # below this, a pooled tensor's split entry costs what it saves

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
    "BatchNormalization": (1, 2, 3),  # scale, shift, mean; not 4: var's error ~ 1/sqrt(var)
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
}


class Skip(Exception):
    """A tensor is not encoded; the message is the reason shown in the report."""


# ---------------------------------------------------------------------------- the pass


@dataclass
class Candidate:
    """A float constant of the main graph and how it is read."""

    tensor: gs.Constant
    uses: list[tuple[gs.Node, int]]  # (consumer, input index)

    @property
    def weight_refs(self) -> list[WeightRef]:
        """The uses as a Conv/ConvTranspose/Gemm/MatMul weight or a Gather table."""
        return [
            WeightRef(node, index, role)
            for node, index in self.uses
            for position, role in WEIGHT_INPUTS.get(node.op, ())
            if position == index and role in SHARED_ROLES
        ]

    @property
    def size(self) -> int:
        return int(np.prod(self.tensor.shape, dtype=np.int64))


@register_pass
class ShareWeightsPass(Pass):
    name = "share-weights"
    summary = "Cluster each weight tensor into 2^bits shared values (k-means codebook)."
    lossless = False

    @dataclass
    class Options:
        bits: int = option(4, "codebook size 2^bits per tensor/channel", range=(2, 8))
        granularity: Literal["tensor", "channel"] = option(
            "tensor", "one codebook per tensor, or per output channel (weights)"
        )
        scope: Literal["weights", "all"] = option(
            "all",
            "weights: Conv/Gemm/MatMul/Gather weights; all: also biases, normalization "
            "parameters and elementwise operands (small ones pooled at pool_bits)",
        )
        pool_bits: int = option(
            8, "codebook bits of the pool of constants under min_size (scope=all)", range=(2, 8)
        )
        init: Literal["best", "linear", "density"] = option(
            "best",
            "k-means start: evenly over [min, max], at the quantiles, or best = both, "
            "keeping the smaller error per codebook",
        )
        index_dtype: Literal["auto", "uint8", "uint4"] = option(
            "auto", "index storage; auto = uint4 when bits<=4 and opset>=21, else uint8"
        )
        upgrade_opset: bool | Literal["auto"] = option(
            "auto",
            "convert to opset 21 for uint4 indices: auto = when it succeeds (else uint8, "
            "with a note), true = or fail, false = never",
        )
        materialize: bool = option(
            False, "snap weights to their centroids in place (float storage, no Gather)"
        )
        min_size: int = option(
            256, "own codebook for tensors with at least this many elements", range=(1, 2**62)
        )
        max_iter: int = option(100, "maximum Lloyd iterations", range=(1, 10000))
        ops: tuple[str, ...] = option(("*",), "consumer op types to consider (globs)")
        exclude: tuple[str, ...] = option((), "tensor or node names to leave alone (globs)")

        def validate(self) -> None:
            if self.index_dtype == "uint4" and self.bits > 4:
                raise ValueError(
                    f"index_dtype=uint4 holds 16 values, bits={self.bits} needs "
                    f"{2**self.bits}; use bits<=4 or index_dtype=uint8|auto"
                )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        own, pooled, skipped = self._candidates(graph)
        notes: list[str] = []
        index_bits = 0
        upgraded = False
        if (own or pooled) and not opts.materialize:
            index_bits, upgraded, notes = self._choose_index_bits(graph, ctx.template, own, pooled)
            if upgraded:  # the graph was re-imported: find the tensors again
                own, pooled, skipped = self._candidates(graph)
        self._names = set(graph.tensors()) | {node.name for node in graph.nodes}
        self._stems = 0
        records = []
        for candidate in own:
            try:
                records.append(self._try_share(graph, candidate, index_bits))
            except Skip as reason:
                skipped.append({"tensor": candidate.tensor.name, "reason": str(reason)})
        for members in _by_dtype(pooled):
            try:
                records.append(self._try_pool(graph, members, index_bits, skipped))
            except Skip as reason:
                skipped.extend({"tensor": m.tensor.name, "reason": str(reason)} for m in members)
        if records and not opts.materialize:
            graph.toposort()  # the Gather chains were appended after their consumers
        return self._result(records, skipped, notes, index_bits, upgraded)

    # ------------------------------------------------------------------ selection

    def _candidates(
        self, graph: gs.Graph
    ) -> tuple[list[Candidate], list[Candidate], list[dict[str, str]]]:
        """``(own codebook, pooled, skipped)``: eligible constants, each once, in node order."""
        found: dict[int, Candidate] = {}
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant):
                    found.setdefault(id(tensor), Candidate(tensor, [])).uses.append((node, index))
        in_bodies = _names_in_subgraphs(graph)
        own, pooled, skipped = [], [], []
        for candidate in found.values():
            reason = self._ineligible(graph, candidate, in_bodies)
            if reason is None:
                reason = self._size_class(candidate, own, pooled)
            if reason:
                skipped.append({"tensor": candidate.tensor.name, "reason": reason})
        return own, pooled, skipped

    def _ineligible(self, graph: gs.Graph, candidate: Candidate, in_bodies: set[str]) -> str | None:
        """Why a constant is left alone, or None when it is shared ('' = not worth a line)."""
        opts = self.options
        tensor, uses = candidate.tensor, candidate.uses
        is_weight = bool(candidate.weight_refs)
        if not is_weight and (opts.scope == "weights" or not _is_float(tensor)):
            return ""
        if not any(matches_any(node.op, opts.ops) for node, _ in uses):
            return ""
        names = [tensor.name] + [node.name for node, _ in uses]
        if any(matches_any(name, opts.exclude) for name in names if name):
            return "excluded by exclude="
        if all(node.op == "Gather" and _is_reconstruction(node) for node, _ in uses):
            return "table of a Gather with constant indices (e.g. an existing codebook)"
        if not is_weight:
            for node, index in uses:
                allowed = CONSTANT_INPUTS.get(node.op, ())
                if allowed is not None and index not in allowed:
                    return f"read as input {index} of {node.op} {node.name!r}"
        if any(t is tensor for t in (*graph.inputs, *graph.outputs)):
            return "graph input or output"
        if tensor.name in in_bodies:
            return "also read inside a subgraph body"
        if not _is_float(tensor):
            return f"dtype {tensor.export_dtype} is not float16/32/64"
        return None

    def _size_class(self, candidate: Candidate, own: list, pooled: list) -> str | None:
        """Append to ``own`` or ``pooled`` by size, or return why the tensor is too small."""
        opts = self.options
        small = f"{candidate.size} elements < min_size={opts.min_size}"
        if candidate.size >= opts.min_size:
            own.append(candidate)
        elif opts.scope == "weights":
            return small
        elif opts.pool_bits <= opts.bits:
            return f"{small}, and pool_bits={opts.pool_bits} is not finer than bits={opts.bits}"
        elif candidate.size < POOL_MIN_SIZE:
            return f"{small}, and < {POOL_MIN_SIZE}: too small to pool"
        else:
            pooled.append(candidate)
        return None

    # ------------------------------------------------------------------ index type

    def _choose_index_bits(
        self,
        graph: gs.Graph,
        template: onnx.ModelProto,
        own: list[Candidate],
        pooled: list[Candidate],
    ) -> tuple[int, bool, list[str]]:
        """``(index bits, opset upgraded?, notes)``; may convert ``graph`` to opset 21."""
        opts = self.options
        small = bool(own and opts.bits <= 4) or bool(pooled and opts.pool_bits <= 4)
        wants_uint4 = opts.index_dtype == "uint4" or (opts.index_dtype == "auto" and small)
        if not wants_uint4:
            return 8, False, []
        opset = int(graph.opset)
        if opset >= UINT4_OPSET:
            _raise_ir_version(graph)
            return 4, False, []
        if opts.upgrade_opset is False:
            message = (
                f"opset {opset} < {UINT4_OPSET}: Cast from uint4 needs opset {UINT4_OPSET}, "
                "so indices are stored as uint8 (upgrade_opset=false)"
            )
            if opts.index_dtype == "uint4":
                raise UsageError(f"share-weights: index_dtype=uint4 with {message}")
            return 8, False, [message]
        failure = upgrade_opset(graph, UINT4_OPSET, template)
        if failure is None:
            _raise_ir_version(graph)
            return 4, True, [f"converted the model from opset {opset} to {UINT4_OPSET}"]
        message = f"cannot convert opset {opset} to {UINT4_OPSET}: {failure}"
        if opts.index_dtype == "uint4" or opts.upgrade_opset is True:
            raise UsageError(
                f"share-weights: upgrade_opset={_text(opts.upgrade_opset)}: {message}; "
                "use upgrade_opset=auto to fall back to uint8 indices"
            )
        return 8, False, [message + "; indices are stored as uint8"]

    # ------------------------------------------------------------------ one codebook

    def _try_share(self, graph: gs.Graph, candidate: Candidate, index_bits: int) -> dict[str, Any]:
        opts = self.options
        tensor, refs = candidate.tensor, candidate.weight_refs
        values = tensor.values
        if not np.all(np.isfinite(values)):
            raise Skip("has NaN or Inf values")
        k = 2**opts.bits
        per_channel = opts.granularity == "channel" and refs
        axis = _channel_axis(refs[0], values.ndim) if per_channel else None
        encoded = encode(values, k, axis, init=opts.init, max_iter=opts.max_iter)
        shared = encoded.reconstruct()
        names: dict[str, str] = {}
        if opts.materialize:
            if encoded.exact_rows == encoded.channels:
                raise Skip(f"already has at most {k} distinct values per codebook")
            tensor.values = shared  # a new array: Graph.copy() shares the old one
            bytes_after = shared.nbytes
        else:
            bytes_after = encoded.stored_bytes(index_bits)
            if bytes_after >= values.nbytes:
                raise Skip(
                    f"indices + codebook ({bytes_after} bytes) would not be smaller than "
                    f"the tensor ({values.nbytes} bytes); use fewer bits or granularity=tensor"
                )
            names = self._rewire(graph, tensor, encoded, index_bits)
        record = _stats(values, shared, encoded)
        record.update(
            tensor=tensor.name,
            shape=list(values.shape),
            consumers=sorted({node.name or node.op for node, _ in candidate.uses}),
            bits=opts.bits,
            granularity="channel" if axis is not None else "tensor",
            axis=axis,
            index_bits=index_bits or None,
            bytes_before=int(values.nbytes),
            bytes_after=int(bytes_after),
            **names,
        )
        return record

    def _rewire(
        self, graph: gs.Graph, tensor: gs.Constant, encoded: Encoded, index_bits: int
    ) -> dict[str, str]:
        """Replace ``tensor`` by ``Gather(codebook, indices)`` for all its consumers."""
        stem = self._stem()
        position, indices, codebook, nodes = self._gather_chain(stem, encoded, index_bits)
        if encoded.offsets is not None:
            offsets = gs.Constant(self._fresh(f"{stem}.off"), encoded.offsets)
            shifted = gs.Variable(self._fresh(f"{stem}.pos2"))
            nodes.insert(
                1, gs.Node("Add", self._fresh(f"{stem}.add"), {}, [position, offsets], [shifted])
            )
            nodes[-1].inputs[1] = shifted
        rebuilt = gs.Variable(tensor.name)
        nodes[-1].outputs = [rebuilt]
        _redirect(tensor, rebuilt)
        graph.nodes.extend(nodes)
        return {"indices": indices.name, "codebook": codebook.name}

    def _gather_chain(
        self, stem: str, encoded: Encoded, index_bits: int
    ) -> tuple[gs.Variable, gs.Constant, gs.Constant, list[gs.Node]]:
        """``Cast(indices) -> Gather(codebook, .)``; returns the Cast output, the two
        constants and the nodes (the Gather last, its output still to be set)."""
        name = self._fresh(f"{stem}.idx")
        if index_bits == 4:
            indices = gs.Constant(name, LazyValues(pack_uint4(encoded.indices, name)))
        else:
            indices = gs.Constant(name, encoded.indices)
        codebook = gs.Constant(self._fresh(f"{stem}.cb"), encoded.codebook)
        # New variables carry no dtype/shape: value_info would cost bytes in a pass whose
        # point is a small file, and shape inference recomputes them anyway.
        position = gs.Variable(self._fresh(f"{stem}.pos"))
        cast = gs.Node(
            "Cast",
            self._fresh(f"{stem}.cast"),
            {"to": onnx.TensorProto.INT32},
            [indices],
            [position],
        )
        gather = gs.Node("Gather", self._fresh(f"{stem}.gather"), {"axis": 0}, [codebook, position])
        return position, indices, codebook, [cast, gather]

    # ------------------------------------------------------------------ pooled constants

    def _try_pool(
        self, graph: gs.Graph, members: list[Candidate], index_bits: int, skipped: list
    ) -> dict[str, Any]:
        """One codebook for the small constants ``members`` (same dtype)."""
        opts = self.options
        finite = []
        for member in members:
            if np.all(np.isfinite(member.tensor.values)):
                finite.append(member)
            else:
                skipped.append({"tensor": member.tensor.name, "reason": "has NaN or Inf values"})
        if not finite:
            raise Skip("no finite values")
        parts = [m.tensor.values for m in finite]
        flat = np.concatenate([p.reshape(-1) for p in parts])
        k = 2**opts.pool_bits
        # One tensor like any other: weighting the members by their norms (so each one's
        # relative error counts the same) was measured and lost accuracy on the CNN.
        encoded = encode(flat, k, None, init=opts.init, max_iter=opts.max_iter)
        shared = encoded.reconstruct()
        pieces = np.split(shared, np.cumsum([p.size for p in parts])[:-1])
        bits = 4 if index_bits == 4 and opts.pool_bits <= 4 else 8
        names: dict[str, str] = {}
        if opts.materialize:
            if encoded.exact_rows:
                raise Skip(f"the pooled constants already have at most {k} distinct values")
            for member, piece in zip(finite, pieces):
                member.tensor.values = piece.reshape(member.tensor.shape)
            bytes_after = flat.nbytes
        else:
            bytes_after = encoded.stored_bytes(bits) + _split_bytes(finite)
            if bytes_after >= flat.nbytes:
                raise Skip(
                    f"pooled indices + codebook ({bytes_after} bytes) would not be smaller "
                    f"than the {len(finite)} small constants ({flat.nbytes} bytes); a lower "
                    "pool_bits shrinks the codebook"
                )
            names = self._rewire_pool(graph, finite, encoded, bits)
        record = _stats(flat, shared, encoded)
        record.update(
            tensor=f"pool of {len(finite)} constants",
            pool=[m.tensor.name for m in finite],
            member_sqnr_db={
                m.tensor.name: round(_sqnr(p.reshape(-1), piece), 2)
                for m, p, piece in zip(finite, parts, pieces)
            },
            shape=[int(flat.size)],
            consumers=sorted({node.name or node.op for m in finite for node, _ in m.uses}),
            bits=opts.pool_bits,
            granularity="pool",
            axis=None,
            index_bits=bits if not opts.materialize else None,
            bytes_before=int(flat.nbytes),
            bytes_after=int(bytes_after),
            **names,
        )
        return record

    def _rewire_pool(
        self, graph: gs.Graph, members: list[Candidate], encoded: Encoded, index_bits: int
    ) -> dict[str, str]:
        """``Gather -> Split`` (one output per member) ``-> Reshape`` where not rank 1."""
        stem = self._stem()
        _, indices, codebook, nodes = self._gather_chain(stem, encoded, index_bits)
        flat = gs.Variable(self._fresh(f"{stem}.all"))
        nodes[-1].outputs = [flat]
        parts, rebuilt = [], []
        for j, member in enumerate(members):
            target = gs.Variable(member.tensor.name)
            rebuilt.append(target)
            if len(member.tensor.shape) == 1:
                parts.append(target)
                continue
            part = gs.Variable(self._fresh(f"{stem}.part{j}"))
            shape = np.array(member.tensor.shape, np.int64)
            shape_const = gs.Constant(self._fresh(f"{stem}.shape{j}"), shape)
            name = self._fresh(f"{stem}.reshape{j}")
            nodes.append(gs.Node("Reshape", name, {}, [part, shape_const], [target]))
            parts.append(part)
        if len(members) == 1:  # no Split: the Gather output is the member (or its Reshape input)
            nodes[1].outputs = parts
        else:
            nodes.insert(2, self._split(graph, stem, flat, members, parts))
        for member, target in zip(members, rebuilt):
            _redirect(member.tensor, target)
        graph.nodes.extend(nodes)
        return {"indices": indices.name, "codebook": codebook.name}

    def _split(
        self,
        graph: gs.Graph,
        stem: str,
        flat: gs.Variable,
        members: list[Candidate],
        parts: list[gs.Variable],
    ) -> gs.Node:
        sizes = np.array([m.size for m in members], np.int64)
        name = self._fresh(f"{stem}.split")
        if int(graph.opset) >= SPLIT_INPUT_OPSET:
            split = gs.Constant(self._fresh(f"{stem}.sizes"), sizes)
            return gs.Node("Split", name, {"axis": 0}, [flat, split], parts)
        return gs.Node("Split", name, {"axis": 0, "split": sizes.tolist()}, [flat], parts)

    # ------------------------------------------------------------------ names

    def _stem(self) -> str:
        """A short prefix ``sw<n>`` for the names of one encoding's tensors and nodes."""
        while True:
            stem = f"sw{self._stems}"
            self._stems += 1
            if not any(name.startswith(stem + ".") for name in self._names):
                return stem

    def _fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self._names:
            name, index = f"{base}_{index}", index + 1
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ report

    def _result(self, records, skipped, notes, index_bits, upgraded) -> PassResult:
        before = sum(r["bytes_before"] for r in records)
        after = sum(r["bytes_after"] for r in records)
        seconds = sum(r["kmeans_seconds"] for r in records)
        pooled = sum(len(r.get("pool", ())) for r in records)
        counts = {
            "tensors_shared": sum(1 for r in records if "pool" not in r) + pooled,
            "pooled": pooled,
            "weights_shared": sum(int(np.prod(r["shape"])) for r in records),
            "skipped": len(skipped),
            "bytes_before": before,
            "bytes_after": after,
            "opset_upgraded": int(upgraded and bool(records)),
        }
        if records:
            form = "materialized" if self.options.materialize else f"uint{index_bits} indices"
            log.info(
                "share-weights: %d tensors (%d pooled), %d -> %d bytes (%s), k-means %.2f s",
                counts["tensors_shared"],
                pooled,
                before,
                after,
                form,
                seconds,
            )
        for note in notes:
            log.info("share-weights: %s", note)
        details = {
            "tensors": records,
            "skipped": skipped,
            "index_bits": index_bits or None,
            "kmeans_seconds": round(seconds, 4),
        }
        return PassResult(changed=bool(records), counts=counts, details=details, notes=notes)


# ---------------------------------------------------------------------------- helpers


def _stats(values: np.ndarray, shared: np.ndarray, encoded: Encoded) -> dict[str, Any]:
    error, power = _error_and_power(values, shared)
    zeros = int(np.count_nonzero(values == 0))
    return {
        "codebooks": encoded.channels,
        "codebook_size": int(encoded.codebook.size),
        "mse": error,
        "sqnr_db": _sqnr(values, shared, (error, power)),
        "zeros": zeros,
        "zeros_kept": bool(np.all(shared[values == 0] == 0)),
        "iterations": encoded.iterations,
        "exact_codebooks": encoded.exact_rows,
        "kmeans_seconds": round(encoded.seconds, 4),
    }


def _error_and_power(values: np.ndarray, shared: np.ndarray) -> tuple[float, float]:
    """Mean squared error and mean power in float64, a chunk at a time."""
    exact, approx = values.reshape(1, -1), shared.reshape(1, -1)
    error = power = 0.0
    for _, start, part in iter_chunks(exact):
        wide = part.astype(np.float64)
        diff = approx[0, start : start + part.size].astype(np.float64) - wide
        error += float(np.dot(diff, diff))
        power += float(np.dot(wide, wide))
    count = max(values.size, 1)
    return error / count, power / count


def _sqnr(
    values: np.ndarray, shared: np.ndarray, measured: tuple[float, float] | None = None
) -> float:
    error, power = measured if measured is not None else _error_and_power(values, shared)
    if error == 0:
        return float("inf")
    return float(10 * np.log10(power / error)) if power else 0.0


def _by_dtype(members: list[Candidate]) -> list[list[Candidate]]:
    groups: dict[np.dtype, list[Candidate]] = {}
    for member in members:
        groups.setdefault(np.dtype(member.tensor.dtype), []).append(member)
    return list(groups.values())


def _split_bytes(members: list[Candidate]) -> int:
    """int64 Split sizes (when there are several members) and Reshape shapes."""
    sizes = 8 * len(members) if len(members) > 1 else 0
    return sizes + sum(8 * len(m.tensor.shape) for m in members if len(m.tensor.shape) != 1)


def _redirect(tensor: gs.Constant, rebuilt: gs.Variable) -> None:
    for consumer in list(tensor.outputs):
        for i, inp in enumerate(consumer.inputs):
            if inp is tensor:
                consumer.inputs[i] = rebuilt


def _names_in_subgraphs(graph: gs.Graph) -> set[str]:
    main = set(map(id, graph.nodes))
    return {t.name for node in iter_nodes(graph) if id(node) not in main for t in node.inputs}


def _text(value: bool | str) -> str:
    return value if isinstance(value, str) else str(value).lower()


def _is_float(tensor: gs.Constant) -> bool:
    try:
        return np.dtype(tensor.export_dtype) in FLOAT_DTYPES
    except TypeError:  # bfloat16, float8, 4-bit types have no numpy dtype here
        return False


def _channel_axis(ref: WeightRef, rank: int) -> int | None:
    """The output-channel axis of a weight, or None (one codebook) for rank < 2."""
    if rank < 2:
        return None
    node = ref.node
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        transposed = int(node.attrs.get("transB" if ref.index == 1 else "transA", 0))
        if ref.index == 1:
            return 0 if transposed else 1
        return 1 if transposed else 0
    if node.op == "MatMul":
        return rank - 1 if ref.index == 1 else rank - 2
    gather_axis = int(node.attrs.get("axis", 0)) % rank
    return rank - 1 if gather_axis != rank - 1 else 0


def _is_reconstruction(node: gs.Node, depth: int = 3) -> bool:
    """A Gather whose indices depend on constants only (e.g. our own Cast/Add chain)."""
    return len(node.inputs) > 1 and _constant_only(node.inputs[1], depth)


def _constant_only(tensor: gs.Tensor, depth: int) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    return all(_constant_only(t, depth - 1) for t in tensor.inputs[0].inputs)


def _raise_ir_version(graph: gs.Graph) -> None:
    if (graph.ir_version or 0) < UINT4_IR:
        graph.ir_version = UINT4_IR


def upgrade_opset(graph: gs.Graph, target: int, template: onnx.ModelProto) -> str | None:
    """Convert ``graph`` in place to ``target``; None on success, else the reason
    (graph unchanged)."""
    if graph.functions:
        return "the model has local functions, which onnx's version converter does not convert"
    try:
        convert_opset(graph, target, template, validate=True)
    except ValueError as exc:
        return str(exc)
    return None
