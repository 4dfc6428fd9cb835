"""``share-weights`` — codebook weight sharing with 1-D k-means (lossy, Deep Compression style).

Rewrite: the values of each eligible weight tensor ``W`` are clustered into
``K = 2**bits`` shared values. ``W`` is then stored as integer *indices* plus a small
float *codebook*, and rebuilt in front of its consumers::

    tensor granularity:   W = Gather(codebook[K], Cast<int32>(indices))
    channel granularity:  W = Gather(codebook[C*K], Add(Cast<int32>(indices), offsets))

``indices`` has ``W``'s shape and layout (UINT8, or packed UINT4 — two per byte — when
``bits <= 4`` and the opset is >= 21); ``offsets`` (int32, ``c*K`` along the channel axis,
shaped to broadcast) selects channel ``c``'s row of the flat codebook. The Gather output
keeps ``W``'s name, and every consumer of ``W`` reads it (a weight shared by several
nodes is encoded once). The reconstruction depends only on constants: onnxruntime folds
it back into a float initializer when the session is created (level BASIC and above),
so the *file* shrinks while inference speed and memory are those of the float model.
``materialize=true`` instead snaps ``W`` to its centroids in place (float storage, same
graph): same outputs as the Gather form, for runtimes that dislike it; the file only
shrinks once compressed.

k-means: one dimension, per tensor (or per output channel), Lloyd iterations until the
assignment stops changing (or ``max_iter``). ``init=linear`` (default) spaces the K
starting centroids evenly over ``[min, max]`` — the initialisation Deep Compression found
best, because it keeps the few large weights, when the codebook is *retrained* afterwards;
``init=density`` starts at the quantiles, which without retraining often loses less
accuracy (see docs/passes/codebook.md). Each row is sorted once (O(n log n)); with prefix
sums an iteration costs O(K log n) (binary search of the boundaries between neighbouring
centroids), and rows that stopped moving leave the loop: 10 M weights take one to a few
seconds (tools/bench_codebook.py). Nothing is random: the result does not depend on the
seed, and the output is byte-identical.

- Exact zeros stay exactly zero: a row containing zeros reserves a centroid fixed at 0.0
  (the linear grid point nearest zero is snapped to 0 and never moves), so pruned
  weights keep their sparsity; nonzero weights may also land on it.
- A row with at most K distinct values gets those values as its codebook (no loss), so
  re-encoding a materialized tensor is lossless and ``materialize=true`` is idempotent.
- Centroids are computed in float64 and stored in the weight's dtype; indices are
  assigned to the nearest *stored* centroid, so the reported MSE is the real one.
- Channel axis (``granularity=channel``): output channels — Conv axis 0, ConvTranspose
  axis 1, Gemm/MatMul the output-feature axis of the weight operand, Gather tables the
  feature (last) axis. A weight shared by several consumers uses its first consumer's
  axis. Rank-1 weights use one codebook.
- Index type (``index_dtype=auto``): UINT4 when ``bits <= 4`` and the model's opset is
  >= 21 (Cast from uint4 exists from opset 21; the IR version is raised to 10 if lower),
  otherwise UINT8 with a note. ``upgrade_opset=true`` converts an older model to opset 21
  with ``onnx.version_converter`` (e.g. ReduceMean's ``axes`` attribute becomes an input)
  when UINT4 is wanted; if the converter fails, ``auto`` falls back to UINT8 with a note
  and ``index_dtype=uint4`` raises.

Eligible tensors: constant ``weight``/``embedding`` inputs of Conv, ConvTranspose, Gemm,
MatMul and Gather (``onnxopt.graph.weight_refs``) — not biases — in float16/32/64 with at
least ``min_size`` elements, whose consumer op type matches ``ops`` and whose name (or
consumer's name) matches no ``exclude`` glob. Does nothing to (reported in
``details["skipped"]`` with the reason): smaller or non-float tensors, tensors with
NaN/Inf, graph inputs and outputs, tensors in subgraph bodies, the codebook of an
existing Gather reconstruction (so running the pass twice changes nothing the second
time), and tensors whose indices + codebook would not be smaller than the float weights
(per-channel codebooks of small layers at high ``bits``). With ``materialize=true``, a
tensor that already has at most K distinct values per row is left as it is.

Reported per tensor in ``details["tensors"]``: bits, granularity, codebooks and codebook
entries, MSE and SQNR of the shared weights, zeros kept, k-means iterations and seconds,
bytes before/after. The model's file size and deflate-compressed size before/after are in
the step's ``before``/``after`` stats (the PassManager measures them for every step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.errors import UsageError
from onnxopt.graph import WeightRef, convert_opset, weight_refs
from onnxopt.pipeline import Pass, PassContext, PassResult, matches_any, option, register_pass

log = logging.getLogger(__name__)

UINT4_OPSET = 21  # first opset whose Cast accepts tensor(uint4)
UINT4_IR = 10  # first IR version with the UINT4 data type
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SHARED_ROLES = ("weight", "embedding")


class Skip(Exception):
    """A tensor is not encoded; the message is the reason shown in the report."""


# ---------------------------------------------------------------------------- k-means


@dataclass
class Codebook:
    """Result of clustering the rows of a ``[C, N]`` matrix into ``K`` values per row."""

    centroids: np.ndarray  # [C, K], ascending per row, in the weight's dtype
    indices: np.ndarray  # [C, N] uint8
    iterations: int
    exact_rows: int  # rows whose distinct values fit the codebook (encoded without loss)


def kmeans_1d(rows: np.ndarray, k: int, *, init: str = "linear", max_iter: int = 100) -> Codebook:
    """Cluster each row of ``rows`` ([C, N], float) into ``k`` shared values.

    ``init="linear"``: centroids evenly spaced over each row's nonzero [min, max];
    ``"density"``: at the quantiles (j + 1/2) / k of its nonzero values. A row with exact
    zeros keeps a centroid fixed at 0.0 and its zeros map to it; a row with <= ``k``
    distinct values gets exactly those values. Deterministic.
    """
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"kmeans_1d expects a non-empty [C, N] matrix, got {rows.shape}")
    if not 2 <= k <= 256:
        raise ValueError(f"kmeans_1d: k must be in [2, 256], got {k}")
    ordered = np.sort(rows, axis=1).astype(np.float64)
    prefix = np.zeros((ordered.shape[0], ordered.shape[1] + 1))
    np.cumsum(ordered, axis=1, out=prefix[:, 1:])
    centroids, fixed, exact = _initial_centroids(ordered, k, init)
    iterations = _lloyd(ordered, prefix, centroids, fixed, max_iter)
    stored = centroids.astype(rows.dtype)
    indices = assign(rows, stored)
    return Codebook(stored, indices, iterations, int(exact.sum()))


def _initial_centroids(
    ordered: np.ndarray, k: int, init: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroids [C, K], fixed [C, K] bool, exact [C] bool)`` for sorted rows."""
    n = ordered.shape[1]
    negative = np.count_nonzero(ordered < 0, axis=1)[:, None]
    zeros = np.count_nonzero(ordered == 0, axis=1)
    has_zero = zeros > 0
    nonzero = np.maximum(n - zeros, 1)[:, None]
    if init == "linear":
        # Sorted rows hold [negatives, zeros, positives]: the nonzero ends are easy to find.
        first = np.where(negative[:, 0] > 0, 0, np.minimum(zeros, n - 1))
        last = np.where(zeros + negative[:, 0] < n, n - 1, np.maximum(negative[:, 0] - 1, 0))
        low = np.take_along_axis(ordered, first[:, None], axis=1)
        high = np.take_along_axis(ordered, last[:, None], axis=1)
        centroids = low + (high - low) * (np.arange(k) / (k - 1))[None, :]
    else:  # density: quantiles of the nonzero values
        rank = np.floor((np.arange(k)[None, :] + 0.5) / k * nonzero).astype(np.int64)
        position = np.minimum(rank + np.where(rank >= negative, zeros[:, None], 0), n - 1)
        centroids = np.take_along_axis(ordered, position, axis=1)
    fixed = np.zeros(centroids.shape, dtype=bool)
    rows_with_zero = np.flatnonzero(has_zero)
    nearest = np.argmin(np.abs(centroids[rows_with_zero]), axis=1)
    # Snapping the grid point nearest zero keeps the row sorted and reserves one centroid.
    centroids[rows_with_zero, nearest] = 0.0
    fixed[rows_with_zero, nearest] = True
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
    exact = distinct <= k
    for row in np.flatnonzero(exact):
        values = np.unique(ordered[row])
        centroids[row] = np.concatenate([values, np.full(k - values.size, values[-1])])
        fixed[row] = True  # already optimal: every value is its own centroid
    return centroids, fixed, exact


def _lloyd(
    ordered: np.ndarray, prefix: np.ndarray, centroids: np.ndarray, fixed: np.ndarray, max_iter: int
) -> int:
    """Lloyd iterations in place on ``centroids``; returns the most updates any row made.

    A row whose assignment did not change is at a fixed point and leaves the active set.
    """
    n = ordered.shape[1]
    active = np.arange(len(ordered))
    previous = np.full((len(ordered), centroids.shape[1] - 1), -1, np.int64)
    for iteration in range(max_iter):
        bounds = (centroids[active, :-1] + centroids[active, 1:]) / 2
        counts_le = _count_le(ordered, active, bounds)
        moved = np.any(counts_le != previous[active], axis=1)
        active, counts_le = active[moved], counts_le[moved]
        if not active.size:
            return iteration
        previous[active] = counts_le
        _update(active, counts_le, n, prefix, centroids, fixed)
    return max_iter


def _update(active, counts_le, n, prefix, centroids, fixed) -> None:
    """Move the free centroids of the ``active`` rows to the means of their clusters."""
    edges = np.concatenate(
        [np.zeros((len(active), 1), np.int64), counts_le, np.full((len(active), 1), n)], axis=1
    )
    counts = np.diff(edges, axis=1)
    sums = np.diff(prefix[active[:, None], edges], axis=1)  # gathers only the edges
    rows = centroids[active]
    update = (counts > 0) & ~fixed[active]
    rows[update] = sums[update] / counts[update]
    flags = fixed[active]
    if np.any(np.diff(rows, axis=1) < 0):  # round-off only; keep rows sorted
        order = np.argsort(rows, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        flags = np.take_along_axis(flags, order, axis=1)
    centroids[active], fixed[active] = rows, flags


def _count_le(ordered: np.ndarray, active: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For each active row ``r``, how many of ``ordered[r]`` are <= each bound."""
    counts = np.empty(bounds.shape, np.int64)
    for i, row in enumerate(active):  # one C-level binary search per row
        counts[i] = ordered[row].searchsorted(bounds[i], side="right")
    return counts


def assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ties to the lower one); exact zeros to a 0 centroid."""
    exact = centroids.astype(np.float64)
    bounds = (exact[:, :-1] + exact[:, 1:]) / 2
    indices = np.empty(rows.shape, dtype=np.uint8)
    for row in range(rows.shape[0]):
        indices[row] = np.searchsorted(bounds[row], rows[row], side="left")
        zero_slots = np.flatnonzero(exact[row] == 0)
        if zero_slots.size:  # a free centroid may sit next to the reserved one: be explicit
            indices[row][rows[row] == 0] = zero_slots[0]
    return indices


# ---------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """A weight tensor as indices (its own shape) plus a flat codebook [C*K]."""

    indices: np.ndarray  # uint8, shape of the weight
    codebook: np.ndarray  # [C*K], weight dtype
    offsets: np.ndarray | None  # int32 c*K broadcastable along the channel axis, or None
    channels: int
    iterations: int
    exact_rows: int
    seconds: float

    def stored_bytes(self, index_bits: int) -> int:
        """Bytes of indices (packed at ``index_bits``), codebook and offsets."""
        offsets = self.offsets.nbytes if self.offsets is not None else 0
        return (self.indices.size * index_bits + 7) // 8 + self.codebook.nbytes + offsets

    def reconstruct(self) -> np.ndarray:
        flat = self.indices.astype(np.int64)
        if self.offsets is not None:
            flat = flat + self.offsets
        return self.codebook[flat]


def encode(
    values: np.ndarray, k: int, axis: int | None, *, init: str = "linear", max_iter: int = 100
) -> Encoded:
    """Cluster ``values`` per tensor (``axis=None``) or per slice along ``axis``."""
    started = time.perf_counter()
    if axis is None:
        rows = values.reshape(1, -1)
    else:
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    book = kmeans_1d(rows, k, init=init, max_iter=max_iter)
    channels = rows.shape[0]
    if axis is None:
        indices, offsets = book.indices.reshape(values.shape), None
    else:
        moved = np.moveaxis(values, axis, 0).shape
        indices = np.ascontiguousarray(np.moveaxis(book.indices.reshape(moved), 0, axis))
        shape = [1] * values.ndim
        shape[axis] = channels
        offsets = (np.arange(channels, dtype=np.int32) * k).reshape(shape)
    return Encoded(
        indices,
        np.ascontiguousarray(book.centroids.reshape(-1)),
        offsets,
        channels,
        book.iterations,
        book.exact_rows,
        time.perf_counter() - started,
    )


def pack_uint4(indices: np.ndarray, name: str) -> onnx.TensorProto:
    """A UINT4 TensorProto, two values per byte, first value in the low nibble (ONNX)."""
    flat = indices.reshape(-1).astype(np.uint8)
    if flat.size and int(flat.max()) > 15:
        raise ValueError(f"{name}: index {int(flat.max())} does not fit in uint4")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(
        name, onnx.TensorProto.UINT4, list(indices.shape), packed.tobytes(), raw=True
    )


# ---------------------------------------------------------------------------- the pass


@register_pass
class ShareWeightsPass(Pass):
    name = "share-weights"
    summary = "Cluster each weight tensor into 2^bits shared values (k-means codebook)."
    lossless = False

    @dataclass
    class Options:
        bits: int = option(4, "codebook size 2^bits per tensor/channel", range=(2, 8))
        granularity: Literal["tensor", "channel"] = option(
            "tensor", "one codebook per tensor, or per output channel"
        )
        init: Literal["linear", "density"] = option(
            "linear", "k-means start: evenly over [min, max], or at the quantiles"
        )
        index_dtype: Literal["auto", "uint8", "uint4"] = option(
            "auto", "index storage; auto = uint4 when bits<=4 and opset>=21, else uint8"
        )
        upgrade_opset: bool = option(
            False, "convert the model to opset 21 when that is what uint4 indices need"
        )
        materialize: bool = option(
            False, "snap weights to their centroids in place (float storage, no Gather)"
        )
        min_size: int = option(
            256, "only tensors with at least this many elements", range=(1, 2**62)
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
        candidates, skipped = self._candidates(graph)
        notes: list[str] = []
        index_bits = 0
        upgraded = False
        if candidates and not opts.materialize:
            index_bits, upgraded, notes = self._choose_index_bits(graph, ctx.template)
            if upgraded:  # the graph was re-imported: find the tensors again
                candidates, skipped = self._candidates(graph)
        self._names = set(graph.tensors())
        records = []
        for tensor, refs in candidates:
            try:
                records.append(self._try_share(graph, tensor, refs, index_bits))
            except Skip as reason:
                skipped.append({"tensor": tensor.name, "reason": str(reason)})
        if records and not opts.materialize:
            graph.toposort()  # the Gather chains were appended after their consumers
        return self._result(records, skipped, notes, index_bits, upgraded)

    # ------------------------------------------------------------------ selection

    def _candidates(
        self, graph: gs.Graph
    ) -> tuple[list[tuple[gs.Constant, list[WeightRef]]], list[dict[str, str]]]:
        """Eligible tensors (each once, in node order) with their weight uses."""
        uses: dict[int, tuple[gs.Constant, list[WeightRef]]] = {}
        for ref in weight_refs(graph):
            if ref.role in SHARED_ROLES:
                uses.setdefault(id(ref.tensor), (ref.tensor, []))[1].append(ref)
        chosen, skipped = [], []
        for tensor, refs in uses.values():
            reason = self._ineligible(graph, tensor, refs)
            if reason is None:
                chosen.append((tensor, refs))
            elif reason:
                skipped.append({"tensor": tensor.name, "reason": reason})
        return chosen, skipped

    def _ineligible(
        self, graph: gs.Graph, tensor: gs.Constant, refs: list[WeightRef]
    ) -> str | None:
        """Why ``tensor`` is left alone, or None when it is encoded ('' = not worth a line)."""
        opts = self.options
        if not any(matches_any(ref.node.op, opts.ops) for ref in refs):
            return ""
        names = [tensor.name] + [ref.node.name for ref in refs]
        if any(matches_any(name, opts.exclude) for name in names if name):
            return "excluded by exclude="
        if all(ref.node.op == "Gather" and _is_reconstruction(ref.node) for ref in refs):
            return "table of a Gather with constant indices (e.g. an existing codebook)"
        if any(t is tensor for t in (*graph.inputs, *graph.outputs)):
            return "graph input or output"
        if not _is_float(tensor):
            return f"dtype {tensor.export_dtype} is not float16/32/64"
        size = int(np.prod(tensor.shape, dtype=np.int64))
        if size < opts.min_size:
            return f"{size} elements < min_size={opts.min_size}"
        return None

    # ------------------------------------------------------------------ index type

    def _choose_index_bits(
        self, graph: gs.Graph, template: onnx.ModelProto
    ) -> tuple[int, bool, list[str]]:
        """``(index bits, opset upgraded?, notes)``; may convert ``graph`` to opset 21."""
        opts = self.options
        wants_uint4 = opts.index_dtype == "uint4" or (opts.index_dtype == "auto" and opts.bits <= 4)
        if not wants_uint4:
            return 8, False, []
        opset = int(graph.opset)
        if opset >= UINT4_OPSET:
            _raise_ir_version(graph)
            return 4, False, []
        if not opts.upgrade_opset:
            message = (
                f"opset {opset} < {UINT4_OPSET}: Cast from uint4 needs opset {UINT4_OPSET}, "
                "so indices are stored as uint8; pass upgrade_opset=true for packed uint4"
            )
            if opts.index_dtype == "uint4":
                raise UsageError(f"share-weights: index_dtype=uint4 with {message}")
            return 8, False, [message]
        failure = upgrade_opset(graph, UINT4_OPSET, template)
        if failure is None:
            _raise_ir_version(graph)
            return 4, True, [f"converted the model from opset {opset} to {UINT4_OPSET}"]
        message = f"cannot convert opset {opset} to {UINT4_OPSET}: {failure}"
        if opts.index_dtype == "uint4":
            raise UsageError(f"share-weights: index_dtype=uint4: {message}")
        return 8, False, [message + "; indices are stored as uint8"]

    # ------------------------------------------------------------------ rewrite

    def _try_share(
        self, graph: gs.Graph, tensor: gs.Constant, refs: list[WeightRef], index_bits: int
    ) -> dict[str, Any]:
        opts = self.options
        values = tensor.values
        if not np.all(np.isfinite(values)):
            raise Skip("has NaN or Inf values")
        k = 2**opts.bits
        axis = _channel_axis(refs[0], values.ndim) if opts.granularity == "channel" else None
        encoded = encode(values, k, axis, init=opts.init, max_iter=opts.max_iter)
        shared = encoded.reconstruct()
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
                    f"the weights ({values.nbytes} bytes); use fewer bits or granularity=tensor"
                )
            self._rewire(graph, tensor, encoded, index_bits)
        record = _stats(values, shared, encoded)
        record.update(
            tensor=tensor.name,
            shape=list(values.shape),
            consumers=sorted({ref.node.name or ref.node.op for ref in refs}),
            bits=opts.bits,
            granularity=opts.granularity,
            axis=axis,
            index_bits=index_bits or None,
            bytes_before=int(values.nbytes),
            bytes_after=int(bytes_after),
        )
        return record

    def _rewire(
        self, graph: gs.Graph, tensor: gs.Constant, encoded: Encoded, index_bits: int
    ) -> None:
        """Replace ``tensor`` by ``Gather(codebook, indices)`` for all its consumers."""
        base = tensor.name
        name = self._fresh(f"{base}.indices")
        if index_bits == 4:
            indices = gs.Constant(name, LazyValues(pack_uint4(encoded.indices, name)))
        else:
            indices = gs.Constant(name, encoded.indices)
        codebook = gs.Constant(self._fresh(f"{base}.codebook"), encoded.codebook)
        # New variables carry no dtype/shape: value_info would cost bytes in a pass whose
        # point is a small file, and shape inference recomputes them anyway.
        position = gs.Variable(self._fresh(f"{base}.positions"))
        nodes = [
            gs.Node(
                "Cast",
                self._fresh(f"{base}/cast"),
                {"to": onnx.TensorProto.INT32},
                [indices],
                [position],
            )
        ]
        if encoded.offsets is not None:
            offsets = gs.Constant(self._fresh(f"{base}.offsets"), encoded.offsets)
            shifted = gs.Variable(self._fresh(f"{base}.codebook_positions"))
            nodes.append(
                gs.Node("Add", self._fresh(f"{base}/offset"), {}, [position, offsets], [shifted])
            )
            position = shifted
        rebuilt = gs.Variable(base)
        nodes.append(
            gs.Node(
                "Gather",
                self._fresh(f"{base}/gather"),
                {"axis": 0},
                [codebook, position],
                [rebuilt],
            )
        )
        for consumer in list(tensor.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is tensor:
                    consumer.inputs[i] = rebuilt
        graph.nodes.extend(nodes)

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
        counts = {
            "tensors_shared": len(records),
            "weights_shared": sum(int(np.prod(r["shape"])) for r in records),
            "skipped": len(skipped),
            "bytes_before": before,
            "bytes_after": after,
            "opset_upgraded": int(upgraded and bool(records)),
        }
        if records:
            form = "materialized" if self.options.materialize else f"uint{index_bits} indices"
            log.info(
                "share-weights: %d tensors, %d -> %d bytes (%s), k-means %.2f s",
                len(records),
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
    exact = values.astype(np.float64)
    error = float(np.mean((shared.astype(np.float64) - exact) ** 2))
    power = float(np.mean(exact**2))
    zeros = int(np.count_nonzero(values == 0))
    return {
        "codebooks": encoded.channels,
        "codebook_size": int(encoded.codebook.size),
        "mse": error,
        "sqnr_db": float("inf") if error == 0 else (10 * np.log10(power / error) if power else 0.0),
        "zeros": zeros,
        "zeros_kept": bool(np.all(shared[values == 0] == 0)),
        "iterations": encoded.iterations,
        "exact_codebooks": encoded.exact_rows,
        "kmeans_seconds": round(encoded.seconds, 4),
    }


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
