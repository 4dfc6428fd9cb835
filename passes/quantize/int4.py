"""``quantize-int4`` — blocked 4-bit weight-only quantization (lossy).

Rewrite: the constant float32 weight of each MatMul (``B``, 2-D ``[K, N]``), Gemm
(``B``), Gather (the embedding table, 2-D), Conv and ConvTranspose is replaced by
4-bit integers and their dequantization (see the output forms below). Activations
and biases stay float; nothing is calibrated for activations (weight-only).

Which elements share a scale (``int4_grid.Layout``) — always the *reduction* axis,
so that one block holds weights that are summed together into one output:

- MatMul ``[K, N]``: blocks of ``block_size`` along K (axis 0); Gemm: along K (axis 0,
  or axis 1 when ``transB=1``); Gather ``[V, D]``: along the embedding axis 1.
- Conv ``[O, I/g, k...]``: blocks along the input-channel axis 1, i.e. for each
  output channel and each kernel position, ``block_size`` consecutive input channels
  share a scale (scale shape ``[O, ceil(I/g / block_size), k...]``); ConvTranspose
  ``[I, O/g, k...]``: along its input-channel axis 0. On a 1x1 convolution this is
  exactly the MatMul layout. When ``block_size`` does not divide the channels, the
  block is their largest divisor between ``block_size / 2`` and ``block_size``
  (``conv_block``: 88 channels -> blocks of 22), so blocks tile the channels exactly.
- *Narrow* convolutions — fewer than ``NARROW_CHANNELS`` input channels per group:
  depthwise kernels (``I/g = 1``), the RGB stem — cannot form blocks along the input
  channels (a block of 1 or 3 elements would store one float scale per 1–3 weights,
  larger than float32). They get one scale per output channel over the whole kernel
  (per-axis, axis 0; ConvTranspose axis 1) at ``narrow`` precision: ``int8``
  (default, symmetric: these layers are few weights and the most sensitive),
  ``int4``, or ``float`` (left alone).

Numerics (``grid`` ranges in ``int4_grid``): asymmetric (``symmetric=false``,
default) uint4 ``[0, 15]`` with a uint4 zero point per block, or symmetric int4
``[-8, 7]``; one float32 scale per block. ``weight_clip=mse`` chooses each block's
scale (and zero point) minimising its rounding error weighted by the mean square of
the matching inputs (from the calibration samples; unweighted without them); ``max``
covers the block's full range; ``auto`` (default): ``max`` when GPTQ rounds the weight
(GPTQ's error feedback needs the range: clipped scales cost 3 dB on the digits CNN),
``mse`` otherwise. ``rounding=gptq`` (default when calibration samples exist) rounds
MatMul/Gemm/Conv weights with GPTQ error feedback (``gptq.py``) under those scales;
Gather tables, ConvTranspose, 3-D convs and ``rounding=nearest`` round to nearest.

Fallback (``fallback=auto``, default; ``int4_fallback``): when the result misses the
step's budget (measured with ``ctx.evaluate``), the int4 weights whose rounding adds
the most noise to their layer's output (``tr(dW H dW^T) / tr(W H W^T)``; Gather
tables: rows weighted by how often calibration reads them) go to symmetric int8 with
one scale per output channel, as few as the measurements allow.

Output forms. ``format=`` chooses how MatMul and MatMul-like Gemm weights are written:

- ``dq`` (default): standard ONNX ``DequantizeLinear`` with an INT4/UINT4 input,
  ``axis`` and ``block_size`` (opset 21 — the pass declares it, and the PassManager
  runs ``upgrade-opset(target=21)`` before it as a checked step when older).
  onnxruntime fuses DQ→MatMul (and DQ→Gemm with ``transB=0``, ``alpha=beta=1``) into
  its ``MatMulNBits`` kernel.
- ``matmulnbits``: onnxruntime's ``com.microsoft.MatMulNBits`` written directly
  (MatMul, and Gemm with ``transA=0``, ``transB=0``, ``alpha=1``, ``beta=1`` and a
  bias of N values, which becomes its bias input) whose K is a multiple of
  ``block_size``; other weights use the ``dq`` form. Other runtimes cannot run it.

``unfused=`` chooses the form of the other weights (Conv, ConvTranspose, Gather,
other Gemm), which no onnxruntime kernel reads from a ``DequantizeLinear``:

- ``cast`` (default): ``Reshape((Cast(q) - Cast(zero_point)) * scale)`` on the same
  4-bit constants (levels split ``[.., blocks, block, ..]`` so the scale broadcasts).
  All inputs are constants, so onnxruntime folds it into a float32 weight when the
  session loads: fp32 speed (and its NCHWc Conv kernels), the same small file, the
  same numbers as the DQ form. A weight whose blocks do not tile its axis uses ``dq``.
- ``dq``: ``DequantizeLinear``. onnxruntime does not constant-fold DequantizeLinear
  (it keeps them for QDQ fusion), so it dequantizes every weight on every inference
  and loses its prepacked Conv kernels: 1.96x fp32 latency on PP-OCR cls.

Size: asymmetric, ``block_size=32``: 4 bits + (32 + 4) bits / 32 = 5.125 bits per
weight, 0.16x float32; narrow int8 convolutions: 8 bits + 32 / kernel size.

Does nothing (no-op, with the reason) when no target has a float32 constant weight —
in particular on an already quantized model (the reason names what is there:
QLinearConv, ConvInteger, DequantizeLinear, a Cast of integer weights...): quantized
weights are not float constants, so a second run is a no-op. ``op_types=`` and
``exclude=`` (node-name globs) restrict the targets. Weights shared by several nodes
are quantized once per node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.context import check_op_types, node_filter
from onnxopt.errors import PassCannotRun
from onnxopt.graph import to_graph
from onnxopt.passes.quantize import calibrate, gptq, int4_fallback, upgrade
from onnxopt.passes.quantize.int4_emit import Counts, Emitter, gemm_is_matmul
from onnxopt.passes.quantize.int4_grid import (
    Grid,
    Layout,
    choose_scales,
    dequantize_rows,
    round_rows,
)
from onnxopt.pipeline import (
    Pass,
    PassContext,
    PassResult,
    Requirement,
    default_opset,
    option,
    register_pass,
)
from onnxopt.weights import output_axis, reduction_axes

log = logging.getLogger(__name__)

TARGET_OPS = ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose")
CONV_OPS = ("Conv", "ConvTranspose")
NARROW_CHANNELS = 16  # fewer input channels per group: one scale per output channel
QUANTIZED_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits",
    "QGemm", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "GatherBlockQuantized", "DequantizeLinear",
}  # fmt: skip
LOW_BIT_TYPES = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8)


@dataclass
class Target:
    node: gs.Node
    index: int  # input index of the weight
    layout: Layout
    grid: Grid
    matmulnbits: bool = False  # emitted as MatMulNBits (format=matmulnbits, MatMul-like)


@dataclass
class Levels:
    """One weight's integers (weight layout), scale and zero point (DequantizeLinear
    layout), and the same parameters per group of the rows view (``int4_grid``)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    scale_rows: np.ndarray
    zero_rows: np.ndarray | None


class Usage:
    """How often each row of a Gather table is read over the calibration samples."""

    def __init__(self, rows: int) -> None:
        self.counts = np.zeros(rows, np.int64)

    def update(self, indices: np.ndarray) -> None:
        flat = np.asarray(indices).reshape(-1).astype(np.int64) % len(self.counts)
        self.counts += np.bincount(flat, minlength=len(self.counts))


@register_pass
class QuantizeInt4Pass(Pass):
    name = "quantize-int4"
    summary = "Blocked 4-bit weight-only quantization (INT4 DequantizeLinear or MatMulNBits)."
    lossless = False

    @dataclass
    class Options:
        block_size: Literal[16, 32, 64, 128] = option(32, "elements per scale along K")
        symmetric: bool = option(
            False, "int4 [-8, 7] without zero point; false: uint4 + a zero point per block"
        )
        format: Literal["dq", "matmulnbits"] = option(
            "dq", "INT4 DequantizeLinear (opset 21) or onnxruntime's MatMulNBits"
        )
        op_types: list[str] = option(
            (), "restrict to these of MatMul, Gemm, Gather, Conv, ConvTranspose"
        )
        exclude: list[str] = option((), "node-name globs kept float")
        rounding: Literal["gptq", "nearest"] = option(
            "gptq", "GPTQ error feedback on calibration data (MatMul/Gemm/Conv), or nearest"
        )
        weight_clip: Literal["auto", "mse", "max"] = option(
            "auto", "per-block scale: MSE search, full range, or auto (max under GPTQ)"
        )
        unfused: Literal["cast", "dq"] = option(
            "cast", "weights onnxruntime cannot fuse with a DequantizeLinear (Conv, Gather...)"
        )
        narrow: Literal["int8", "int4", "float"] = option(
            "int8", "convs with < 16 input channels per group (depthwise, stem): per channel"
        )
        fallback: Literal["auto", "none"] = option(
            "auto", "auto: the weights whose int4 error matters most go int8 until the budget holds"
        )
        accuracy_level: int = option(
            0, "MatMulNBits accuracy_level (0: default; 4: int8 compute)", range=(0, 4)
        )

        def validate(self) -> None:
            check_op_types(self.op_types, TARGET_OPS)

    def requires(self, model: onnx.ModelProto) -> Requirement | None:
        """Opset 21 when a weight takes the DequantizeLinear form (a checked step)."""
        if default_opset(model) >= 21:
            return None
        if all(t.matmulnbits for t in self._targets(to_graph(model))):
            return None
        return Requirement("upgrade-opset(target=21)", "blocked INT4 DequantizeLinear needs 21")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        targets = self._targets(graph)
        if not targets:
            return PassResult(False, notes=[_nothing_to_do(graph)])
        notes: list[str] = []
        if any(not t.matmulnbits for t in targets) and upgrade.default_opset(graph) < 21:
            raise PassCannotRun(
                f"quantize-int4: opset {upgrade.default_opset(graph)} < 21 (blocked INT4 "
                "DequantizeLinear needs 21); run upgrade-opset(target=21) first"
            )
        hessians, usage = self._statistics(graph, ctx, targets)
        self._names = set(graph.tensors())
        plan = [self._levels(t, hessians.get(t.node.name)) for t in targets]
        details: dict = {}
        if self.options.fallback == "auto" and _budget_active(ctx):
            outcome = self._fallback(graph, ctx, targets, plan, hessians, usage)
            targets, plan = outcome.targets, outcome.plan
            notes += outcome.notes()
            details["fallback"] = outcome.report()
        counts = self._emit_all(graph, targets, plan)
        ratio = counts.bytes_after / counts.bytes_before if counts.bytes_before else 1.0
        result_counts = {
            "weights_quantized": counts.weights,
            "matmulnbits": counts.matmulnbits,
            "cast_form": counts.cast,
            "weight_bytes_before": counts.bytes_before,
            "weight_bytes_after": counts.bytes_after,
            "weight_size_ratio": round(ratio, 4),
            "gptq_weights": len(hessians),
        }
        details.update(by_op=counts.by_op, by_bits=counts.by_bits, gptq_nodes=sorted(hessians))
        return PassResult(True, result_counts, details, notes)

    def _emit_all(self, graph: gs.Graph, targets: list[Target], plan: list[Levels]) -> Counts:
        """Write every target's levels into ``graph`` (``int4_emit``), names fresh among
        the tensors the pass started from."""
        emitter = Emitter(graph, set(self._names), self.options)
        for target, levels in zip(targets, plan):
            emitter.quantize(target, levels)
        return emitter.finish()

    # -- fallback=auto

    def _fallback(
        self, graph: gs.Graph, ctx: PassContext, targets: list[Target], plan: list[Levels],
        hessians: dict[str, gptq.Hessian], usage: dict[str, Usage],
    ) -> int4_fallback.Outcome:  # fmt: skip
        """Weights whose int4 error matters most go to int8 per channel until the step's
        budget holds (``int4_fallback``); the candidates are measured with
        ``ctx.evaluate`` on copies of the graph."""
        eligible = [i for i, t in enumerate(targets) if t.grid.bits == 4]
        alternatives: dict[int, tuple[Target, Levels]] = {}

        def wider(i: int) -> tuple[Target, Levels]:
            if i not in alternatives:
                target = _int8_target(targets[i])
                alternatives[i] = (target, self._levels(target, hessians.get(target.node.name)))
            return alternatives[i]

        def noise(i: int) -> float:
            target = targets[i]
            hessian = hessians.get(target.node.name)
            return _noise(target, plan[i], hessian, usage.get(target.node.name))

        def arrange(chosen: frozenset[int]) -> tuple[list[Target], list[Levels]]:
            picked = [wider(i) if i in chosen else (t, lv)
                      for i, (t, lv) in enumerate(zip(targets, plan))]  # fmt: skip
            return [p[0] for p in picked], [p[1] for p in picked]

        def evaluate(chosen: frozenset[int]):
            copy = graph.copy()
            position = {id(node): k for k, node in enumerate(graph.nodes)}
            moved, levels = arrange(chosen)
            moved = [replace(t, node=copy.nodes[position[id(t.node)]]) for t in moved]
            self._emit_all(copy, moved, levels)
            return ctx.evaluate(copy)

        names = [t.node.name or f"{t.node.op}#{i}" for i, t in enumerate(targets)]
        sizes = {i: int(targets[i].node.inputs[targets[i].index].values.size) for i in eligible}
        outcome = int4_fallback.choose(
            eligible, evaluate, noise, ctx.budget, names, sizes, ctx.progress
        )
        outcome.targets, outcome.plan = arrange(outcome.chosen)
        return outcome

    # -- selection

    def _targets(self, graph: gs.Graph) -> list[Target]:
        return [t for t in map(self._target, graph.nodes) if t is not None]

    def _target(self, node: gs.Node) -> Target | None:
        opts = self.options
        if node.op not in TARGET_OPS or node.domain not in ("", "ai.onnx", None):
            return None
        if node_filter(node, opts.op_types, opts.exclude):
            return None
        index = 0 if node.op == "Gather" else 1
        if index >= len(node.inputs):
            return None
        weight = node.inputs[index]
        if not isinstance(weight, gs.Constant) or weight.values.dtype != np.float32:
            return None
        if node.op in CONV_OPS:
            return self._conv_target(node, weight.values.shape)
        if weight.values.ndim != 2:
            return None
        int4 = Grid(4, opts.symmetric)
        if node.op == "Gather":
            if int(node.attrs.get("axis", 0)) != 0:
                return None
            return Target(node, 0, Layout(reduction_axes(node, 0, 2)[0], opts.block_size), int4)
        if not isinstance(node.inputs[0], gs.Variable):
            return None
        if node.op == "Gemm":
            (axis,) = reduction_axes(node, 1, 2)  # blocks run along K
            nbits = self._nbits(weight.values.shape[0]) and gemm_is_matmul(node)
            return Target(node, 1, Layout(axis, opts.block_size), int4, matmulnbits=nbits)
        nbits = self._nbits(weight.values.shape[0])
        (axis,) = reduction_axes(node, 1, 2)
        return Target(node, 1, Layout(axis, opts.block_size), int4, matmulnbits=nbits)

    def _conv_target(self, node: gs.Node, shape: tuple[int, ...]) -> Target | None:
        opts = self.options
        if len(shape) < 3 or not isinstance(node.inputs[0], gs.Variable):
            return None
        group = int(node.attrs.get("group", 1))
        transpose = node.op == "ConvTranspose"
        per_group = shape[0] // group if transpose else shape[1]
        if per_group >= NARROW_CHANNELS:
            channels = shape[0] if transpose else shape[1]
            layout = Layout(0 if transpose else 1, conv_block(channels, opts.block_size))
            return Target(node, 1, layout, Grid(4, opts.symmetric))
        if opts.narrow == "float":
            return None
        axis = (1 if group == 1 else 0) if transpose else 0
        # int8: symmetric (a zero point buys nothing at 8 bits and costs two nodes)
        grid = Grid(8, True) if opts.narrow == "int8" else Grid(4, opts.symmetric)
        return Target(node, 1, Layout(axis, None), grid)

    def _nbits(self, k: int) -> bool:
        # MatMulNBits pads K to whole blocks; when K is not a multiple of the block the
        # exact-size DequantizeLinear form is written instead (onnxruntime fuses it too)
        return self.options.format == "matmulnbits" and k % self.options.block_size == 0

    def _statistics(
        self, graph: gs.Graph, ctx: PassContext, targets: list[Target]
    ) -> tuple[dict[str, gptq.Hessian], dict[str, Usage]]:
        """GPTQ's ``H`` of each MatMul/Gemm/Conv input and how often each row of each
        Gather table is read, in one calibration pass."""
        opts = self.options
        if not ctx.calibration or (opts.rounding != "gptq" and opts.weight_clip == "max"):
            return {}, {}
        hessians: dict[str, gptq.Hessian] = {}
        usage: dict[str, Usage] = {}
        observers: dict[str, list] = {}
        for target in targets:
            node = target.node
            if node.op == "Gather" and len(node.inputs) > 1:
                usage[node.name] = Usage(node.inputs[0].values.shape[0])
                observers.setdefault(node.inputs[1].name, []).append(usage[node.name].update)
            if node.op in ("Gather", "ConvTranspose") or not gptq.Hessian.supports(node):
                continue
            hessians[node.name] = gptq.Hessian(node, ctx.rng)
            observers.setdefault(node.inputs[0].name, []).append(hessians[node.name].update)
        if hessians:
            calibrate.collect(ctx, graph, [], observers, desc="int4: input statistics")
        hessians = {name: h for name, h in hessians.items() if h.rows}
        return hessians, {name: u for name, u in usage.items() if u.counts.any()}

    # -- rewrite

    def _levels(self, target: Target, hessian: gptq.Hessian | None) -> Levels:
        """Levels (weight layout), scale and zero point (DequantizeLinear layout)."""
        w = target.node.inputs[target.index].values
        layout, grid, opts = target.layout, target.grid, self.options
        importance = _importance(target.node, w, hessian) if hessian is not None else None
        rows = layout.rows(w)
        block = layout.block_rows(rows.shape[0])
        imp_rows = None if importance is None else layout.rows(importance)
        gptq_rounding = hessian is not None and opts.rounding == "gptq"
        search = opts.weight_clip == "mse" or (opts.weight_clip == "auto" and not gptq_rounding)
        scale_rows, zero_rows = choose_scales(rows, block, grid, imp_rows, search=search)
        if gptq_rounding:
            s_full = layout.per_element(scale_rows, w.shape)
            z_full = None if zero_rows is None else layout.per_element(zero_rows, w.shape)
            q = _gptq_levels(target.node, w, hessian, s_full, z_full, grid)
        else:
            q = layout.unrows(round_rows(rows, block, scale_rows, zero_rows, grid), w.shape)
        scale = layout.params_from_rows(scale_rows, w.shape)
        zero = None if zero_rows is None else layout.params_from_rows(zero_rows, w.shape)
        return Levels(q, scale, zero, scale_rows, zero_rows)


def _importance(node: gs.Node, w: np.ndarray, hessian: gptq.Hessian) -> np.ndarray | None:
    """Mean square of the input multiplying each weight element (``diag H``), weight layout."""
    diags = []
    for g in range(hessian.groups):
        blocks = hessian.blocks(g)
        if blocks is None:
            return None
        diags.append(np.concatenate([np.diag(b) for b in blocks]) / max(hessian.rows, 1))
    if node.op == "Conv":
        per_group = w.shape[0] // hessian.groups
        kernel = [d.reshape(w.shape[1:]) for d in diags]
        return np.repeat(np.stack(kernel), per_group, axis=0).astype(np.float32)
    d = diags[0].astype(np.float32)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return np.broadcast_to(d[None, :], w.shape)
    return np.broadcast_to(d[:, None], w.shape)


def _budget_active(ctx: PassContext) -> bool:
    budget = ctx.budget
    return ctx.evaluator is not None and bool(budget.criteria or budget.tolerance is not None)


def _int8_target(target: Target) -> Target:
    """The fallback of an int4 weight: symmetric int8, one scale per output channel."""
    node = target.node
    axis = output_axis(node, target.index, node.inputs[target.index].values.ndim)
    if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) > 1:
        axis = 0  # axis 1 holds O/g channels of every group
    return Target(node, target.index, Layout(axis, None), Grid(8, True))


def _noise(
    target: Target, levels: Levels, hessian: gptq.Hessian | None, usage: Usage | None
) -> float:
    """Error energy the rounding adds to the layer's output, over the output's energy
    (a noise-to-signal ratio): ``tr(dW H dW^T) / tr(W H W^T)`` with GPTQ's ``H``; for a
    Gather table, rows weighted by how often the calibration samples read them; else
    the weight's own relative error."""
    node, layout = target.node, target.layout
    w = node.inputs[target.index].values
    rows = layout.rows(levels.q)
    block = layout.block_rows(rows.shape[0])
    deq = layout.unrows(dequantize_rows(rows, block, levels.scale_rows, levels.zero_rows), w.shape)
    delta = w.astype(np.float64) - deq
    if hessian is not None and hessian.blocks(0) is not None:
        groups = hessian.groups
        dw = np.stack(gptq.weight_matrices(node, delta, groups))
        ww = np.stack(gptq.weight_matrices(node, w, groups))
        spans = gptq.column_blocks(dw.shape[2])
        error = signal = 0.0
        for j, (a, b) in enumerate(spans):
            h = np.stack([hessian.blocks(g)[j] for g in range(groups)]).astype(np.float64)
            error += float(np.sum((dw[:, :, a:b] @ h) * dw[:, :, a:b]))
            signal += float(np.sum((ww[:, :, a:b] @ h) * ww[:, :, a:b]))
    elif usage is not None and node.op == "Gather":
        weights = usage.counts.astype(np.float64)
        error = float(weights @ np.sum(delta * delta, axis=1))
        signal = float(weights @ np.sum(w.astype(np.float64) ** 2, axis=1))
    else:
        error, signal = float(np.sum(delta * delta)), float(np.sum(w.astype(np.float64) ** 2))
    return error / signal if signal > 0 else 0.0


def _gptq_levels(
    node: gs.Node, w: np.ndarray, hessian: gptq.Hessian, scale: np.ndarray,
    zero: np.ndarray | None, grid: Grid,
) -> np.ndarray:  # fmt: skip
    """GPTQ levels under per-element ``scale`` / ``zero`` (all in the weight's layout)."""
    groups = hessian.groups
    w_m = gptq.weight_matrices(node, w, groups)
    s_m = gptq.weight_matrices(node, scale, groups)
    z_m = gptq.weight_matrices(node, zero, groups) if zero is not None else [None] * groups
    spans = gptq.column_blocks(w_m[0].shape[1])
    items = []
    for g in range(groups):
        for (a, b), h in zip(spans, hessian.blocks(g)):
            zero_g = None if z_m[g] is None else z_m[g][:, a:b]
            items.append((w_m[g][:, a:b], h, s_m[g][:, a:b], zero_g))
    pieces = gptq.round_many(items, grid.qmin, grid.qmax)
    result = [np.concatenate(pieces[g * len(spans) : (g + 1) * len(spans)], axis=1)
              for g in range(groups)]  # fmt: skip
    return gptq.from_matrices(node, result, w.shape).astype(grid.carrier)


def conv_block(channels: int, block: int) -> int:
    """Block of a convolution's input channels: ``block``, or when it does not divide
    ``channels`` the largest divisor of ``channels`` from ``block / 2`` to ``block``
    (whole blocks: no padded levels in the file); else ``block`` (last block partial)."""
    if channels <= block:
        return channels
    for size in range(block, block // 2 - 1, -1):
        if channels % size == 0:
            return size
    return block


def _nothing_to_do(graph: gs.Graph) -> str:
    present = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if any(_casts_integer_constant(n) for n in graph.nodes):
        present.append("Cast of integer weights")
    if present:
        return f"no float32 constant weight to quantize; already quantized ({', '.join(present)})"
    return "no float32 constant weight on MatMul/Gemm/Gather/Conv/ConvTranspose"


def _casts_integer_constant(node: gs.Node) -> bool:
    """A Cast of a constant integer tensor to float: this pass's (or any) weight decoding."""
    if node.op != "Cast" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return False
    values = node.inputs[0]._values
    if isinstance(values, LazyValues):
        return values.tensor.data_type in LOW_BIT_TYPES
    return np.dtype(values.dtype) in (np.int8, np.uint8)
