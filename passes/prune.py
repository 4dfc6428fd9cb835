"""``prune-initializers`` and ``clip-weights`` — lossy rewrites of weight values.

**prune-initializers** zeroes the smallest-magnitude weights of Conv / ConvTranspose /
Gemm / MatMul weights and Gather embedding tables (initializers and Constant-node
weights alike: ``to_graph`` lifts the latter). Which weights go:

- ``sparsity=s`` with ``scope=layer``: in each eligible tensor the ``round(s * size)``
  smallest |w| (ties broken by position: the first in C order go, exactly what a stable
  sort would pick), so every tensor ends with exactly that many zeros; ``scope=global``:
  all eligible weights are ranked together by ``|w| / rms(tensor)`` in float64
  (normalised per tensor, so one large layer of small weights does not take
  everything; ties by tensor order, then position) and the ``round(s * total)`` lowest
  go;
- ``threshold=t``: every ``|w| < t`` (``0``, the default, turns it off);
- ``pattern=N:M``: in every group of M consecutive weights along the reduction axis
  keep the N largest (a trailing partial group counts its missing slots as zeros);
- ``sparsity=auto``: the largest overall sparsity (1-point grid, 0..0.99) whose pruned
  model still meets the step's budget, found by bisection with ``ctx.evaluate`` (the
  PassManager's own checks; at most 12 runs). ``s + 0.05`` is measured too, and the
  search goes on above ``s`` if that passes. The curve is in ``details["auto_curve"]``.

The reduction ("input") axis of each weight: Conv ``W[O, I/g, k...]`` — rows are output
channels, a row is the flattened ``I/g * k`` weights; ConvTranspose ``W[I, O/g, k...]``
— rows are the ``g * O/g`` output channels, a row holds the ``I/g * k`` weights that
feed it; Gemm B — ``transB=1``: ``B[N, K]`` rows, ``transB=0``: columns of ``B[K, N]``;
Gemm A — rows of ``A[M, K]`` (columns when ``transA=1``); MatMul B ``[..., K, N]`` —
the K axis per column, MatMul A ``[..., M, K]`` — the K axis per row; Gather table
``[V, D...]`` — rows along ``axis``, a row is the flattened rest.

With ``reconstruct=true`` (the default) the mask is chosen by magnitude as above and the
weights a row keeps are then refitted by least squares so that the layer reproduces
its unpruned outputs on the calibration samples, layer after layer in graph order
(inputs taken from the already pruned model, targets from the unpruned one; a ridge
term of 1 % of the mean diagonal pulls towards the old weights). This only moves kept
weights, never revives a zero, and needs calibration activations: it applies to 2-D
Conv (explicit pads, any stride / dilation / group), Gemm with a constant B and MatMul
with a constant 2-D B; other weights (ConvTranspose, Gather, constant A operands,
weights shared by several nodes) are pruned by magnitude only, and a note says so. So
is a tensor whose refit would cost more than ``RECONSTRUCT_MAX_FLOPS`` (per row: a dense
solve on its kept weights, ``kept^3 / 3``, plus a ``fan_in^2`` product) or whose float64
``X^T X`` and ``X^T X0`` would exceed ``RECONSTRUCT_MAX_BYTES`` (512 MiB): decided from
the mask, before any activation is computed. An 8192-wide layer at 50 % needs ~1.9e14
flops and 1 GiB of Gram matrices, so it is never refitted.

``store=sparse`` writes each eligible tensor that has zeros as an ONNX
``sparse_initializer`` (COO, linear int64 indices) when that is smaller than the dense
tensor; onnxruntime densifies it when it loads the model, so outputs are identical.

**clip-weights** clips each eligible weight tensor to ``±c``: ``percentile=p`` (default
99.9) takes ``c`` as the p-th percentile of ``|w|`` (a data value, ``method="higher"``,
so a second run clips nothing), ``sigma=k`` (``k > 0``) takes ``c = k * std(w)``
instead (not idempotent: std shrinks with every clip); per tensor or, with
``granularity=channel``, per output channel (rows as above).

Eligible weights (both passes): the constant weight / embedding input of a listed op
(``ops``), float16/32/64, at least ``min_size`` elements, name and consumer names not
matching ``exclude`` globs, not a graph output, and feeding **only** weight inputs of
listed ops (a tensor also read as a bias, by an Add, a Reshape shape... is skipped and
the reason reported). A tensor shared by several nodes is handled once. Biases,
normalization parameters and integer tensors (shapes, indices) are never touched.

Memory: no tensor-sized temporary besides the tensor being rewritten. The k smallest
|w| are found by an exact radix select on the IEEE bit patterns (a histogram per pass
over slices of ``CHUNK_ELEMENTS``), N:M masks and per-channel clipping work on blocks of
rows, and the values are read without caching them in the graph (graphsurgeon's
``Constant.values`` would keep every decoded weight): a tensor that gains no zero keeps
its lazily loaded values; a rewritten one gets a new array. ``scope=global`` decodes all
eligible tensors at once (the pass's output size). Sums over more than one slice (the
rms of ``scope=global``, ``sigma`` per tensor) are per-slice float64 sums, so their
last bits may differ from numpy's single pairwise sum on tensors over 2M elements.

Does nothing (``changed=False``) when no eligible tensor gains a zero (``sparsity=0``,
a second run at the same target, ``threshold`` below every |w|) or, for clipping, when
no value lies beyond ``c``. Subgraph bodies (If/Loop/Scan) are not visited.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt.graph import WEIGHT_INPUTS
from onnxopt.model import sparse_to_dense
from onnxopt.pipeline import Pass, PassContext, PassResult, matches_any, option, register_pass

log = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
DEFAULT_PERCENTILE = 99.9
AUTO_MAX_EVALUATIONS = 12
AUTO_STEP_CHECK = 5  # percentage points above the chosen sparsity that must fail
RECONSTRUCT_MAX_FLOPS = 5e10  # per tensor: rows * (kept^3 / 3 + fan_in^2), beyond: magnitude only
RECONSTRUCT_MAX_BYTES = 512 << 20  # float64 X^T X and X^T X0 of every group of a tensor
DAMPING = 0.01
GRAM_CHUNK_BYTES = 64 << 20
CHUNK_ELEMENTS = 1 << 21  # streaming slice: temporaries stay this small, not tensor-sized
DIGIT_BITS = 16  # radix select: 2^16 counters per pass
COLLECT_LIMIT = 1 << 22  # radix select: partition a bucket once it holds this few keys
PATTERN_COMPARE_MAX = 8  # N:M groups up to this M: ranked by M^2 comparisons, not argsort
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ---------------------------------------------------------------------------- eligibility


@dataclass(frozen=True)
class RowLayout:
    """How a weight tensor maps to ``[rows, fan_in]``: rows are output channels, a row
    holds the weights reduced together (the axis N:M groups run along)."""

    shape: tuple[int, ...]
    pre_shape: tuple[int, ...]
    perm: tuple[int, ...]

    def to_rows(self, values: np.ndarray) -> np.ndarray:
        moved = values.reshape(self.pre_shape).transpose(self.perm)
        return moved.reshape(moved.shape[0] if moved.ndim else 1, -1)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        moved_shape = tuple(self.pre_shape[p] for p in self.perm)
        back = rows.reshape(moved_shape).transpose(np.argsort(self.perm))
        return back.reshape(self.shape)


def row_layout(node: gs.Node, index: int, shape: tuple[int, ...]) -> RowLayout | None:
    """The ``[rows, fan_in]`` view of input ``index`` of ``node`` (None: unknown op/rank)."""
    rank = len(shape)
    ident = tuple(range(rank))
    if node.op == "Conv" and rank >= 3:
        return RowLayout(shape, shape, ident)
    if node.op == "ConvTranspose" and rank >= 3:
        group = int(node.attrs.get("group", 1))
        if shape[0] % group:
            return None
        pre = (group, shape[0] // group, shape[1], *shape[2:])
        perm = (0, 2, 1, *range(3, rank + 1))
        return RowLayout(shape, pre, perm)
    if node.op == "Gemm" and rank == 2:
        transposed = node.attrs.get("transA" if index == 0 else "transB", 0)
        # A[M, K]: rows are M (transA=0); B[K, N]: rows are N (transB=1 stores B[N, K]).
        rows_first = (not transposed) if index == 0 else bool(transposed)
        return RowLayout(shape, shape, (0, 1) if rows_first else (1, 0))
    if node.op == "MatMul" and rank >= 1:
        if rank == 1:
            return RowLayout(shape, (1, shape[0]), (0, 1))
        if index == 0:  # A[..., M, K]: K is already last
            return RowLayout(shape, shape, ident)
        return RowLayout(shape, shape, (*range(rank - 2), rank - 1, rank - 2))
    if node.op == "Gather" and rank >= 1:
        axis = int(node.attrs.get("axis", 0)) % rank
        return RowLayout(shape, shape, (axis, *[a for a in ident if a != axis]))
    return None


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
    skipped: list[dict[str, str]] = field(default_factory=list)


def eligible_weights(
    graph: gs.Graph, ops: tuple[str, ...], exclude: tuple[str, ...], min_size: int
) -> Selection:
    """The weight tensors a pass may rewrite, each once, plus the reasons others were not."""
    selection = Selection()
    seen: set[int] = set()
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if node.op not in ops:
            continue
        for index, role in WEIGHT_INPUTS[node.op]:
            tensor = node.inputs[index] if index < len(node.inputs) else None
            if role == "bias" or not isinstance(tensor, gs.Constant) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            reason = _ineligible_reason(tensor, ops, exclude, min_size, id(tensor) in outputs)
            if reason:
                selection.skipped.append({"tensor": tensor.name, "reason": reason})
                continue
            uses = _uses(tensor)
            layouts = {row_layout(n, i, tuple(tensor.shape)) for n, i in uses}
            layout = layouts.pop() if len(layouts) == 1 else None
            selection.targets.append(WeightTarget(tensor, uses, layout))
    return selection


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
        roles = dict(WEIGHT_INPUTS.get(node.op, ()))
        if node.op not in ops or roles.get(index) not in ("weight", "embedding"):
            return f"also feeds {node.op} {node.name!r} input {index} (not a weight input)"
        if matches_any(node.name, exclude):
            return f"consumer {node.name!r} matches exclude"
    return ""


def _parse_pattern(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError(f"pattern={pattern!r}: expected 'unstructured' or N:M such as 2:4")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise ValueError(f"pattern={pattern!r}: need 0 < N < M (keep N of every M)")
    return keep, group


def _check_ops(ops: tuple[str, ...]) -> None:
    unknown = [op for op in ops if op not in PRUNABLE_OPS]
    if unknown or not ops:
        raise ValueError(f"ops={list(ops)}: valid op types are {', '.join(PRUNABLE_OPS)}")


# ---------------------------------------------------------------------------- selection
#
# Every rewrite below edits a private copy of one tensor in place and streams over it in
# slices of CHUNK_ELEMENTS, so that no temporary is tensor-sized: ranking needs no sort
# and no index array. "The k smallest |w|" is found by an exact radix select on the IEEE
# bit patterns (non-negative floats order like their bits), then zeroed in one more pass.


def _chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[start : start + CHUNK_ELEMENTS]


_SIGN_MASK = {np.dtype(f"u{n}"): (1 << (8 * n - 1)) - 1 for n in (2, 4, 8)}


def magnitude_keys(chunk: np.ndarray) -> np.ndarray:
    """Unsigned integers that order like ``|chunk|``: the bit patterns without the sign
    bit. Every NaN gets the same key, just above +inf (a sort puts NaNs last, in order)."""
    unsigned = np.dtype(f"u{chunk.dtype.itemsize}")
    keys = np.ascontiguousarray(chunk).view(unsigned) & unsigned.type(_SIGN_MASK[unsigned])
    inf_bits = np.array(np.inf, dtype=chunk.dtype).view(unsigned)
    np.minimum(keys, inf_bits + unsigned.type(1), out=keys)
    return keys


def select_key(stream: Callable[[], Iterator[np.ndarray]], rank: int, bits: int) -> tuple[int, int]:
    """The key of 0-based ``rank`` among all keys ``stream()`` yields (unsigned, ``bits``
    wide), and how many keys are smaller. MSD radix select: one histogram of
    ``DIGIT_BITS`` per pass over the data, then the bucket's keys are gathered and
    partitioned once there are at most ``COLLECT_LIMIT`` of them. Memory: one slice and
    the counters, whatever the total size."""
    prefix, below, fixed = 0, 0, 0
    while fixed < bits:
        width = min(DIGIT_BITS, bits - fixed)
        shift = bits - fixed - width
        counts = np.zeros(1 << width, dtype=np.int64)
        for keys in _in_bucket(stream, prefix, bits - fixed, bits):
            digits = (keys >> shift) & ((1 << width) - 1)
            counts += np.bincount(digits.astype(np.intp), minlength=1 << width)
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, rank, side="right"))
        smaller = int(cumulative[digit - 1]) if digit else 0
        below, rank = below + smaller, rank - smaller
        prefix, fixed = (prefix << width) | digit, fixed + width
        if fixed < bits and counts[digit] <= COLLECT_LIMIT:
            bucket = np.concatenate(list(_in_bucket(stream, prefix, bits - fixed, bits)))
            key = np.partition(bucket, rank)[rank]
            return int(key), below + int(np.count_nonzero(bucket < key))
    return prefix, below


def _in_bucket(stream, prefix: int, low_bits: int, bits: int) -> Iterator[np.ndarray]:
    """The keys whose high ``bits - low_bits`` bits equal ``prefix``."""
    for keys in stream():
        yield keys if low_bits == bits else keys[(keys >> low_bits) == prefix]


def _zero_ranked(flat: np.ndarray, keys_of: Callable, key: int, ties: int) -> int:
    """Zero every entry of ``flat`` (in place) whose key is below ``key`` and the first
    ``ties`` entries (in position order) whose key equals it; return the ties left."""
    for chunk in _chunks(flat):
        keys = keys_of(chunk)
        if ties > 0:
            equal = np.flatnonzero(keys == key)[:ties]
            ties -= equal.size
            chunk[equal] = 0
        chunk[keys < key] = 0
    return ties


def zero_smallest(values: np.ndarray, count: int) -> None:
    """Zero, in place, the ``count`` smallest |w| of the C-contiguous ``values``; among
    equal magnitudes the first in C order go (what a stable argsort would pick)."""
    flat = values.reshape(-1)
    if count <= 0 or flat.size == 0:
        return
    if count >= flat.size:
        flat[:] = 0
        return
    key, below = select_key(
        lambda: map(magnitude_keys, _chunks(flat)), count - 1, 8 * flat.itemsize
    )
    _zero_ranked(flat, magnitude_keys, key, count - below)


def zero_global(arrays: list[np.ndarray], sparsity: float) -> None:
    """One ranking over all ``arrays`` by ``|w| / rms(tensor)`` (float64), ties by
    (tensor order, position); zero the lowest ``round(s * total)`` in place."""
    flats = [a.reshape(-1) for a in arrays]
    total = sum(f.size for f in flats)
    count = round(sparsity * total)
    if count <= 0:
        return
    scorers = [_scorer(_rms(f)) for f in flats]

    def stream() -> Iterator[np.ndarray]:
        for flat, score in zip(flats, scorers):
            yield from map(score, _chunks(flat))

    key, below = select_key(stream, min(count, total) - 1, 64)
    ties = count - below
    for flat, score in zip(flats, scorers):
        ties = _zero_ranked(flat, score, key, ties)


def _rms(flat: np.ndarray) -> float:
    """Root mean square in float64; one pairwise sum when the tensor fits one slice,
    else a sum of per-slice sums (the last bits may differ from numpy's single sum)."""
    if flat.size <= CHUNK_ELEMENTS:
        magnitude = np.abs(flat.astype(np.float64))
        return math.sqrt(float(np.mean(magnitude**2))) if flat.size else 0.0
    squares = sum(float(np.sum(np.square(c, dtype=np.float64))) for c in _chunks(flat))
    return math.sqrt(squares / flat.size)


def _scorer(rms: float) -> Callable[[np.ndarray], np.ndarray]:
    def keys(chunk: np.ndarray) -> np.ndarray:
        score = np.abs(chunk.astype(np.float64))
        if rms > 0:  # an all-zero (or NaN) tensor keeps its raw magnitudes
            score /= rms
        return magnitude_keys(score)

    return keys


def zero_below(values: np.ndarray, threshold: float) -> None:
    """Zero every ``|w| < threshold`` in place (compared in the tensor's dtype)."""
    for chunk in _chunks(values.reshape(-1)):
        chunk[np.abs(chunk) < threshold] = 0


def zero_pattern(values: np.ndarray, layout: RowLayout, keep: int, group: int) -> None:
    """In place: zero the (M - N) smallest of every M consecutive weights of each row
    (ties by position); a partial last group is padded with virtual zeros, which count
    towards its M - N. Works on blocks of about CHUNK_ELEMENTS weights."""
    if values.size == 0:
        return
    if values.ndim == 2 and layout.perm == (1, 0) and layout.pre_shape == values.shape:
        _zero_pattern_down_columns(values, keep, group)  # Gemm B[K, N], MatMul B[K, N]
        return
    moved = values.reshape(layout.pre_shape).transpose(layout.perm)
    rows = moved.shape[0] if moved.ndim else 1
    fan_in = values.size // rows
    step = max(1, CHUNK_ELEMENTS // fan_in)
    for start in range(0, rows, step):
        block = moved[start : start + step]
        flat = block.reshape(block.shape[0], fan_in)
        keys = _padded_keys(flat, group)  # [rows, groups * M]
        mask = _lowest_in_groups(keys.reshape(-1, group, 1), keep, group)
        block[mask.reshape(keys.shape)[:, :fan_in].reshape(block.shape)] = 0


def _zero_pattern_down_columns(values: np.ndarray, keep: int, group: int) -> None:
    """N:M along axis 0 of a 2-D ``[K, N]`` weight (a row is a column here), on blocks
    of whole groups of rows: contiguous, no transposed copy."""
    fan_in, columns = values.shape
    step = max(1, CHUNK_ELEMENTS // (columns * group)) * group
    for start in range(0, fan_in, step):
        block = values[start : start + step]
        keys = _padded_keys(block.T, group).T  # [groups * M, N], padding rows last
        mask = _lowest_in_groups(keys.reshape(-1, group, columns), keep, group)
        block[mask.reshape(keys.shape)[: block.shape[0]]] = 0


def _padded_keys(rows: np.ndarray, group: int) -> np.ndarray:
    """``magnitude_keys + 1`` of ``rows[r, c]``, the last axis padded with 0 (lower than
    any weight) to a multiple of ``group``."""
    keys = magnitude_keys(np.ascontiguousarray(rows))
    padded = np.zeros((rows.shape[0], -(-rows.shape[1] // group) * group), dtype=keys.dtype)
    padded[:, : rows.shape[1]] = keys
    padded[:, : rows.shape[1]] += 1
    return padded


def _lowest_in_groups(keys: np.ndarray, keep: int, group: int) -> np.ndarray:
    """``keys[a, M, b]``: True for the (M - N) lowest of each group along axis 1, ties by
    position (a stable sort's first M - N)."""
    if group > PATTERN_COMPARE_MAX:
        order = np.argsort(keys, axis=1, kind="stable")[:, : group - keep]
        mask = np.zeros(keys.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=1)
        return mask
    mask = np.empty(keys.shape, dtype=bool)
    for i in range(group):  # rank of slot i: lower keys, plus equal keys before it
        rank = np.zeros(keys[:, i].shape, dtype=np.uint8)
        for j in range(group):
            if j != i:
                rank += keys[:, j] <= keys[:, i] if j < i else keys[:, j] < keys[:, i]
        mask[:, i] = rank < group - keep
    return mask


# ---------------------------------------------------------------------------- reconstruction


def _conv_patches(x: np.ndarray, node: gs.Node, kernel: tuple[int, ...]) -> list[np.ndarray]:
    """im2col of a 2-D Conv input ``x[N, C, H, W]``: one ``[N*Ho*Wo, C/g*kh*kw]``
    matrix per group, columns ordered like ``W[o].ravel()``."""
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    strides = list(node.attrs.get("strides", [1, 1]))
    dilations = list(node.attrs.get("dilations", [1, 1]))
    group = int(node.attrs.get("group", 1))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, channels, out_h, out_w = windows.shape[:4]
    per_group = channels // group
    return [
        windows[:, g * per_group : (g + 1) * per_group]
        .transpose(0, 2, 3, 1, 4, 5)
        .reshape(n * out_h * out_w, -1)
        for g in range(group)
    ]


def _layer_inputs(node: gs.Node, index: int, shape: tuple[int, ...]) -> Callable | None:
    """A function mapping the node's activation input to per-group ``[n, fan_in]``
    matrices matching the weight's row layout, or None if not reconstructible."""
    if node.op == "Conv" and index == 1 and len(shape) == 4:
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
            return None
        return lambda x: _conv_patches(x, node, shape[2:])
    if node.op == "Gemm" and index == 1:
        trans_a = bool(node.attrs.get("transA", 0))
        return lambda x: [(x.T if trans_a else x).reshape(-1, x.shape[0 if trans_a else 1])]
    if node.op == "MatMul" and index == 1 and len(shape) == 2:
        return lambda x: [x.reshape(-1, shape[0])]
    return None


def _activation_source(node: gs.Node, index: int) -> gs.Tensor:
    return node.inputs[1 - index if node.op in ("Gemm", "MatMul") else 0]


@dataclass
class Refit:
    """What a layer-by-layer least-squares refit needs from the pass."""

    ctx: PassContext
    reference: gs.Graph  # the graph before pruning: targets come from it
    notes: list[str] = field(default_factory=list)

    def activations(self, graph: gs.Graph, name: str) -> Iterator[np.ndarray]:
        if any(t.name == name for t in graph.inputs):
            for sample in self.ctx.calibration:
                yield sample[name]
            return
        for acts in self.ctx.activations(graph, [name], desc=f"refitting {name}"):
            yield acts[name]


def refit_rows(target: WeightTarget, masked: np.ndarray, graph: gs.Graph, refit: Refit) -> bool:
    """Refit the kept weights of ``target`` (already masked to ``masked``) so the layer
    reproduces its unpruned outputs; assigns a new array. False if not applicable."""
    if len(target.uses) != 1 or target.layout is None:
        return False
    node, index = target.uses[0]
    shape = tuple(target.tensor.shape)
    columns = _layer_inputs(node, index, shape)
    if columns is None:
        return False
    layout = target.layout
    too_costly = _refit_cost_reason(masked, layout, int(node.attrs.get("group", 1)))
    if too_costly:
        refit.notes.append(f"{target.name}: too large to refit ({too_costly})")
        return False
    groups = _input_statistics(refit, graph, _activation_source(node, index).name, columns)
    if not groups:
        return False
    original = layout.to_rows(read_values(refit.reference.tensors()[target.name]))
    rows = layout.to_rows(masked)
    fitted = np.empty(rows.shape, dtype=masked.dtype)
    per_group = rows.shape[0] // len(groups)
    for r in range(rows.shape[0]):
        hessian, cross = groups[r // per_group]
        row = _solve_row(hessian, cross, original[r].astype(np.float64), rows[r] != 0)
        if not np.all(np.isfinite(row)):
            refit.notes.append(f"{target.name}: refit not finite, kept magnitude pruning")
            return False
        fitted[r] = row
    target.tensor.values = np.ascontiguousarray(layout.from_rows(fitted))
    return True


def _refit_cost_reason(masked: np.ndarray, layout: RowLayout, group: int) -> str:
    """Why refitting this tensor would cost too much ('' if it would not), decided from
    the mask alone, before any activation is computed. Per output row: a dense solve on
    its kept weights (kept^3 / 3) and one fan_in^2 product; per group of rows: float64
    ``X^T X`` and ``X^T X0`` of fan_in^2 each."""
    moved = masked.reshape(layout.pre_shape).transpose(layout.perm)
    rows = moved.shape[0] if moved.ndim else 1
    fan_in = masked.size // max(rows, 1)
    kept = np.count_nonzero(moved, axis=tuple(range(1, moved.ndim)))  # refit: ndim >= 2
    flops = float(np.sum(kept.astype(np.float64) ** 3)) / 3 + rows * float(fan_in) ** 2
    gram_bytes = 2 * group * fan_in**2 * 8
    if flops > RECONSTRUCT_MAX_FLOPS:
        return f"{flops:.2g} flops > {RECONSTRUCT_MAX_FLOPS:.2g}"
    if gram_bytes > RECONSTRUCT_MAX_BYTES:
        limit = RECONSTRUCT_MAX_BYTES >> 20
        return f"{gram_bytes >> 20} MiB of float64 Gram matrices > {limit} MiB"
    return ""


def _input_statistics(
    refit: Refit, graph: gs.Graph, source: str, columns: Callable
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group, ``(X^T X, X^T X0)`` summed over the calibration samples: X from the
    model being pruned, X0 from the unpruned reference. Rows are buffered up to
    ``GRAM_CHUNK_BYTES`` so that BLAS sees a few large products, not one per sample
    (many small multi-threaded GEMMs crawl on a busy machine)."""
    totals: list[tuple[np.ndarray, np.ndarray]] = []
    buffer: list[list[tuple[np.ndarray, np.ndarray]]] = []
    rows = 0
    for now, before in zip(
        refit.activations(graph, source), refit.activations(refit.reference, source)
    ):
        pairs = list(zip(columns(now.astype(np.float64)), columns(before.astype(np.float64))))
        buffer.append(pairs)
        rows += pairs[0][0].shape[0]
        if rows * sum(x.shape[1] for x, _ in pairs) * 16 >= GRAM_CHUNK_BYTES:
            totals = _add_gram(totals, buffer)
            buffer, rows = [], 0
    return _add_gram(totals, buffer) if buffer else totals


def _add_gram(totals, buffer):
    stats = []
    for group in range(len(buffer[0])):
        x = np.concatenate([pairs[group][0] for pairs in buffer])
        x0 = np.concatenate([pairs[group][1] for pairs in buffer])
        xt = np.ascontiguousarray(x.T)  # x.T @ x on a strided view is far slower
        stats.append((xt @ x, xt @ x0))
    if not totals:
        return stats
    return [(h + a, g + b) for (h, g), (a, b) in zip(totals, stats)]


def _solve_row(hessian, cross, weights, kept) -> np.ndarray:
    """argmin_w' ||X w' - X0 w||^2 + damp ||w' - w||^2 with w' zero outside ``kept``.
    Damping towards the old weights (not towards zero) leaves weights on inputs that
    never vary in the calibration data (H_ii = 0) as they were."""
    out = np.zeros_like(weights)
    keep = np.flatnonzero(kept)
    if keep.size == 0:
        return out
    damp = DAMPING * float(np.mean(np.diag(hessian))) + 1e-12
    system = hessian[np.ix_(keep, keep)] + damp * np.eye(keep.size)
    rhs = (cross @ weights)[keep] + damp * weights[keep]
    try:
        out[keep] = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        out[keep] = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return out


# ---------------------------------------------------------------------------- storage


def sparse_proto(name: str, values: np.ndarray) -> onnx.SparseTensorProto:
    """COO form with linear int64 indices, in typed fields (graphsurgeon's loader and
    onnxruntime read those; varint indices are also smaller than raw int64)."""
    flat = values.ravel()
    nonzero = np.flatnonzero(flat)
    data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    sparse_values = onnx.helper.make_tensor(name, data_type, [nonzero.size], flat[nonzero])
    indices = onnx.helper.make_tensor("", onnx.TensorProto.INT64, [nonzero.size], nonzero)
    return onnx.helper.make_sparse_tensor(sparse_values, indices, list(values.shape))


def dense_proto_bytes(name: str, values: np.ndarray) -> int:
    """``numpy_helper.from_array(values, name).ByteSize()`` without building it (the
    data is one ``raw_data`` field: tag, varint length, bytes)."""
    header = onnx.TensorProto(
        dims=values.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    )
    if name:
        header.name = name
    return header.ByteSize() + 1 + _varint_bytes(values.nbytes) + values.nbytes


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _try_store_sparse(tensor: gs.Constant) -> int:
    """Store ``tensor`` as a sparse initializer when smaller; return bytes saved."""
    if isinstance(tensor._values, SparseValues):
        return 0
    values = read_values(tensor)
    if np.count_nonzero(values) == values.size:
        return 0
    sparse = sparse_proto(tensor.name, values)
    saved = dense_proto_bytes(tensor.name, values) - sparse.ByteSize()
    if saved <= 0:
        return 0
    tensor.values = SparseValues(sparse)
    return saved


# ---------------------------------------------------------------------------- prune pass


@register_pass
class PruneInitializersPass(Pass):
    name = "prune-initializers"
    summary = "Zero the smallest weights (magnitude pruning, N:M, auto sparsity)."
    lossless = False

    @dataclass
    class Options:
        sparsity: float | Literal["auto"] | None = option(
            None, "fraction of weights to zero, or auto (default 0.5 without threshold/pattern)"
        )
        threshold: float = option(0.0, "zero every |w| below this instead (0: off)")
        scope: Literal["layer", "global"] = option("layer", "rank per tensor or all together")
        pattern: str = option("unstructured", "unstructured or N:M (keep N of every M)")
        ops: tuple[str, ...] = option(PRUNABLE_OPS, "op types whose weights are pruned")
        exclude: tuple[str, ...] = option((), "node or tensor name globs to leave alone")
        min_size: int = option(256, "skip tensors with fewer elements", range=(0, 2**62))
        reconstruct: bool = option(True, "refit kept weights on calibration activations")
        store: Literal["dense", "sparse"] = option("dense", "sparse: COO sparse_initializer")

        def validate(self) -> None:
            given = (
                (["sparsity"] if self.sparsity is not None else [])
                + (["threshold"] if self.threshold else [])
                + (["pattern"] if self.pattern != "unstructured" else [])
            )
            if len(given) > 1:
                raise ValueError(f"give one of sparsity=, threshold=, pattern=N:M, not {given}")
            if isinstance(self.sparsity, float) and not 0 <= self.sparsity <= 0.99:
                raise ValueError(f"sparsity={self.sparsity} must be in [0, 0.99] or auto")
            if self.threshold < 0:
                raise ValueError(f"threshold={self.threshold} must be >= 0")
            _parse_pattern(self.pattern)
            _check_ops(self.ops)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        selection = eligible_weights(
            graph, self.options.ops, self.options.exclude, self.options.min_size
        )
        details: dict = {"skipped": selection.skipped}
        notes: list[str] = []
        if self.options.sparsity == "auto":
            sparsity, curve = self._search(graph, selection, ctx)
            details["auto_curve"] = curve
            details["auto_sparsity"] = sparsity
            notes.append(f"auto sparsity {sparsity:.2f} ({len(curve)} evaluations)")
        else:
            sparsity = self.options.sparsity
            if sparsity is None and not self.options.threshold:
                sparsity = 0.5 if self.options.pattern == "unstructured" else None
        stats, prune_notes = self._prune(graph, selection, sparsity, ctx)
        notes += prune_notes
        zeroed = sum(s["zeroed"] for s in stats)
        saved = 0
        if self.options.store == "sparse":
            saved = self._store_sparse(graph, selection, stats, notes)
        details["tensors"] = stats
        counts = _prune_counts(stats, selection, zeroed, saved)
        for note in notes:
            log.info("prune-initializers: %s", note)
        return PassResult(
            changed=zeroed > 0 or saved > 0, counts=counts, details=details, notes=notes
        )

    def _prune(
        self, graph: gs.Graph, selection: Selection, sparsity: float | None, ctx: PassContext
    ) -> tuple[list[dict], list[str]]:
        """Zero (and refit) every eligible tensor, one private copy at a time (all of
        them at once for ``scope=global``); a tensor that gains no zero keeps its lazily
        loaded values. Returns per-tensor stats and notes."""
        reference = graph.copy() if self.options.reconstruct and ctx.calibration else None
        notes: list[str] = []
        stats: list[dict] = []
        pending: list[tuple[WeightTarget, np.ndarray, int]] = []
        if self.options.scope == "global" and self._rule(sparsity) == "sparsity":
            arrays = [owned_values(t.tensor) for t in selection.targets]
            before = [_zeros(values) for values in arrays]
            zero_global(arrays, sparsity)
            for target, values, zeros in zip(selection.targets, arrays, before):
                _keep_if_changed(target, values, zeros, stats, pending)
            del arrays  # unchanged copies go now; the graph holds the others
        else:
            for target in selection.targets:
                _keep_if_changed(*self._try_zero(target, sparsity, notes), stats, pending)
        if not (self.options.reconstruct and pending):
            return stats, notes
        if not ctx.calibration:
            return stats, [*notes, "no calibration samples: kept weights not refitted"]
        refit = Refit(ctx, reference=reference, notes=notes)
        by_name = {s["tensor"]: i for i, s in enumerate(stats)}
        for target, masked, zeros_before in pending:
            if refit_rows(target, masked, graph, refit):  # a refitted weight may be 0.0
                stats[by_name[target.name]] = _tensor_stats(
                    target, target.tensor.values, zeros_before
                )
            else:
                refit.notes.append(f"{target.name}: pruned by magnitude only (no refit)")
        return stats, refit.notes

    def _rule(self, sparsity: float | None) -> str:
        if self.options.pattern != "unstructured":
            return "pattern"
        if self.options.threshold:
            return "threshold"
        return "sparsity" if sparsity else "none"

    def _try_zero(
        self, target: WeightTarget, sparsity: float | None, notes: list[str]
    ) -> tuple[WeightTarget, np.ndarray, int]:
        """Zero one tensor's private copy by the pass's rule; returns it with the number
        of zeros it had before."""
        rule = self._rule(sparsity)
        if rule == "none" or (rule == "pattern" and target.layout is None):
            if rule == "pattern":
                notes.append(f"{target.name}: its uses disagree on the N:M axis; not pruned")
            values = read_values(target.tensor)
            return target, values, _zeros(values)
        values = owned_values(target.tensor)
        zeros = _zeros(values)
        if rule == "pattern":
            zero_pattern(values, target.layout, *_parse_pattern(self.options.pattern))
        elif rule == "threshold":
            zero_below(values, self.options.threshold)
        else:
            zero_smallest(values, round(sparsity * values.size))
        return target, values, zeros

    def _search(
        self, graph: gs.Graph, selection: Selection, ctx: PassContext
    ) -> tuple[float, list[dict]]:
        """Largest sparsity (percent grid) within budget; see the module docstring."""
        curve: list[dict] = []
        verdicts: dict[int, bool] = {0: True}

        def passes(percent: int) -> bool:
            if percent not in verdicts:
                candidate = graph.copy()
                picked = eligible_weights(
                    candidate, self.options.ops, self.options.exclude, self.options.min_size
                )
                self._prune(candidate, picked, percent / 100, ctx)
                evaluation = ctx.evaluate(candidate)
                # graphsurgeon graphs are reference cycles: without a collection every
                # candidate's new arrays (the model's size) would wait for the cyclic GC
                del candidate, picked
                gc.collect()
                verdicts[percent] = evaluation.ok
                curve.append(_curve_point(percent, evaluation))
            return verdicts[percent]

        if not selection.targets:
            return 0.0, curve
        budget = ctx.progress(
            range(AUTO_MAX_EVALUATIONS),
            desc="prune: searching sparsity",
            total=AUTO_MAX_EVALUATIONS,
        )
        low, high = 0, 100  # low passes; high fails (100 is never tried)
        for _ in budget:
            if high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if passes(middle) else (low, middle)
                continue
            step = low + AUTO_STEP_CHECK
            if step > 99 or (step in verdicts and not verdicts[step]):
                break
            if passes(step):  # the metric is not monotonic: search again above
                low = step
                high = min([p for p, ok in verdicts.items() if not ok and p > step] or [100])
        curve.sort(key=lambda point: point["sparsity"])
        return low / 100, curve

    def _store_sparse(
        self, graph: gs.Graph, selection: Selection, stats: list[dict], notes: list[str]
    ) -> int:
        if graph.ir_version is not None and 0 < graph.ir_version < 6:
            notes.append(f"IR version {graph.ir_version} < 6 has no sparse_initializer")
            return 0
        saved = 0
        by_name = {s["tensor"]: s for s in stats}
        for target in selection.targets:
            gained = _try_store_sparse(target.tensor)
            by_name[target.name]["stored"] = (
                "sparse" if isinstance(target.tensor._values, SparseValues) else "dense"
            )
            saved += gained
        return saved


def _curve_point(percent: int, evaluation) -> dict:
    worst = evaluation.worst()
    point = {"sparsity": percent / 100, "ok": evaluation.ok}
    for key in ("cosine", "top1", "sqnr", "max_abs"):
        value = worst.get(key)
        if value is not None:
            point[key] = value if math.isfinite(value) else str(value)
    if evaluation.violations:
        point["violations"] = evaluation.violations[:3]
    return point


def _tensor_stats(target: WeightTarget, after: np.ndarray, zeros_before: int) -> dict:
    size = int(after.size)
    zeros_after = _zeros(after)
    return {
        "tensor": target.name,
        "op": target.op,
        "shape": list(after.shape),
        "size": size,
        "sparsity_before": round(zeros_before / size, 6) if size else 0.0,
        "sparsity_after": round(zeros_after / size, 6) if size else 0.0,
        "zeroed": zeros_after - zeros_before,
        "stored": "dense",
    }


def _keep_if_changed(
    target: WeightTarget,
    values: np.ndarray,
    zeros_before: int,
    stats: list[dict],
    pending: list[tuple[WeightTarget, np.ndarray, int]],
) -> None:
    stats.append(_tensor_stats(target, values, zeros_before))
    if stats[-1]["zeroed"] > 0:  # otherwise the tensor keeps its (lazy) values
        target.tensor.values = values
        pending.append((target, values, zeros_before))


def _zeros(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(values))  # no boolean temporary


def _prune_counts(stats: list[dict], selection: Selection, zeroed: int, saved: int) -> dict:
    total = sum(s["size"] for s in stats)
    zeros = sum(round(s["sparsity_after"] * s["size"]) for s in stats)
    return {
        "eligible_tensors": len(stats),
        "tensors_pruned": sum(1 for s in stats if s["zeroed"] > 0),
        "weights_zeroed": zeroed,
        "eligible_sparsity": round(zeros / total, 4) if total else 0.0,
        "skipped_tensors": len(selection.skipped),
        "sparse_bytes_saved": saved,
    }


# ---------------------------------------------------------------------------- clip pass


@register_pass
class ClipWeightsPass(Pass):
    name = "clip-weights"
    summary = "Clip weight outliers to ±c (percentile of |w| or k·std), per tensor or channel."
    lossless = False

    @dataclass
    class Options:
        percentile: float = option(
            DEFAULT_PERCENTILE, "c = this percentile of |w|", range=(50, 100)
        )
        sigma: float = option(0.0, "c = sigma * std(w) instead (0: off)", range=(0, 100))
        granularity: Literal["tensor", "channel"] = option("tensor", "one c per tensor or row")
        ops: tuple[str, ...] = option(PRUNABLE_OPS, "op types whose weights are clipped")
        exclude: tuple[str, ...] = option((), "node or tensor name globs to leave alone")
        min_size: int = option(0, "skip tensors with fewer elements", range=(0, 2**62))

        def validate(self) -> None:
            if self.sigma and self.percentile != DEFAULT_PERCENTILE:
                raise ValueError("give percentile= or sigma=, not both")
            _check_ops(self.ops)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        options = self.options
        selection = eligible_weights(graph, options.ops, options.exclude, options.min_size)
        stats, notes = [], []
        for target in selection.targets:
            if options.granularity == "channel" and target.layout is None:
                notes.append(f"{target.name}: uses disagree on the channel axis; not clipped")
                continue
            record = self._try_clip(target)
            if record is not None:
                stats.append(record)
        clipped = sum(s["clipped"] for s in stats)
        total = sum(s["size"] for s in stats) or 1
        counts = {
            "tensors_clipped": sum(1 for s in stats if s["clipped"]),
            "values_clipped": clipped,
            "fraction_clipped": round(clipped / total, 6),
        }
        details = {"tensors": stats, "skipped": selection.skipped}
        return PassResult(changed=clipped > 0, counts=counts, details=details, notes=notes)

    def _try_clip(self, target: WeightTarget) -> dict | None:
        values = owned_values(target.tensor)
        if values.size == 0:
            return None
        range_before = [float(values.min()), float(values.max())]
        if self.options.granularity == "channel":
            clipped, c_max = self._clip_rows(values, target.layout)
        else:
            clipped, c_max = self._clip_tensor(values)
        record = {
            "tensor": target.name,
            "op": target.op,
            "size": int(values.size),
            "clipped": clipped,
            "fraction": round(clipped / values.size, 6),
            "c_max": c_max,
            "range_before": range_before,
            "range_after": range_before,
        }
        if clipped:
            target.tensor.values = values
            record["range_after"] = [float(values.min()), float(values.max())]
        return record

    def _clip_tensor(self, values: np.ndarray) -> tuple[int, float]:
        """Clip the private copy ``values`` in place to one ``±c``; (count, c)."""
        limit = np.float64(self._tensor_limit(values))
        clipped = 0
        for chunk in _chunks(values.reshape(-1)):
            clipped += _clip_block(chunk, limit)
        return clipped, float(limit)

    def _tensor_limit(self, values: np.ndarray) -> float:
        """sigma * std(w) (float64), or the percentile of |w| as numpy's
        ``method="higher"`` gives it: the value of rank ceil((n - 1) * p / 100)."""
        flat = values.reshape(-1)
        if self.options.sigma:
            return self.options.sigma * _std(flat)
        if math.isnan(float(np.max(flat))):
            return math.nan  # as np.percentile: a NaN anywhere gives NaN
        rank = math.ceil((flat.size - 1) * (self.options.percentile / 100))
        key, _ = select_key(lambda: map(magnitude_keys, _chunks(flat)), rank, 8 * flat.itemsize)
        unsigned = np.dtype(f"u{flat.itemsize}")
        return float(np.array(key, dtype=unsigned).view(flat.dtype))

    def _clip_rows(self, values: np.ndarray, layout: RowLayout) -> tuple[int, float]:
        """Clip each row (output channel) of the private copy ``values`` in place to its
        own ``±c``, a block of rows at a time; (count, largest c)."""
        moved = values.reshape(layout.pre_shape).transpose(layout.perm)
        rows = moved.shape[0] if moved.ndim else 1
        fan_in = values.size // rows
        step = max(1, CHUNK_ELEMENTS // fan_in)
        clipped, c_max = 0, -math.inf
        for start in range(0, rows, step):
            block = moved[start : start + step]
            flat = block.reshape(block.shape[0], fan_in)
            limits = self._row_limits(flat)[:, None]
            c_max = float(np.max([c_max, limits.max()]))
            over = _clip_block(flat, limits)
            if over and not np.may_share_memory(flat, values):
                block[...] = flat.reshape(block.shape)
            clipped += over
        return clipped, c_max

    def _row_limits(self, rows: np.ndarray) -> np.ndarray:
        if self.options.sigma:
            return self.options.sigma * rows.astype(np.float64).std(axis=1)
        magnitude = np.abs(rows.astype(np.float64))
        return np.percentile(magnitude, self.options.percentile, axis=1, method="higher")


def _clip_block(block: np.ndarray, limit: np.ndarray | np.float64) -> int:
    """Clip ``block`` in place to ``±limit`` (compared and clipped in float64, then
    stored in the block's dtype, as ``np.clip(...).astype`` would); returns the count."""
    over = int(np.count_nonzero(np.abs(block) > limit))
    if over:
        block[...] = np.clip(block, -limit, limit)
    return over


def _std(flat: np.ndarray) -> float:
    """Population std in float64: numpy's on one slice, two passes over slices above."""
    if flat.size <= CHUNK_ELEMENTS:
        return float(flat.reshape(1, -1).astype(np.float64).std(axis=1)[0])
    mean = sum(float(np.sum(c, dtype=np.float64)) for c in _chunks(flat)) / flat.size
    squares = sum(float(np.sum(np.square(c.astype(np.float64) - mean))) for c in _chunks(flat))
    return math.sqrt(squares / flat.size)
