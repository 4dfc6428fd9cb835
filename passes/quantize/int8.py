"""``quantize-int8`` — static int8 quantization in QDQ form (lossy).

Rewrite: calibrated QuantizeLinear/DequantizeLinear pairs on activations and int8
DequantizeLinear weights, placed so that onnxruntime's CPU provider fuses them into
integer kernels (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat,
QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, int8 Reshape/Transpose/
MaxPool...). The placement rules are the table in ``qdq.py``.

- Calibration (``calibrate.py``): ``method=mse`` (default) | ``minmax`` |
  ``percentile`` | ``entropy``, streamed one calibration sample at a time.
- Weights: symmetric int8 per output channel (Conv axis 0, Gemm the N axis of B,
  MatMul axis 1) in ``[-63, 63]`` (``weight_bits=7``, default) or ``[-127, 127]``
  (``weight_bits=8``). onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2,
  AVX-512F) sum pairs of products in a saturating int16; only ``|w| <= 64`` keeps
  ``255 * (|w1| + |w2|)`` below 32767 (on such a CPU the digits MLP loses 14 dB to
  saturation with 8-bit weights). ``weight_clip=mse`` searches a per-channel clip.
  Biases: int32, ``scale = input scale x weight scale``.
- Activations: ``activations=uint8`` (default) asymmetric per tensor;
  ``activations=int8`` symmetric (Relu/Clip are then kept, with a shared scale): for
  runtimes that want it; onnxruntime on x86 runs it 1.0-1.6x the fp32 latency, and a
  per-tensor choice between the two gains nothing there (docs/passes/quantize.md).
- ``op_types=[...]`` restricts the quantized op types, ``exclude=[globs]`` keeps
  matching node names float.
- ``fallback=auto`` (default): when the result misses the step's budget (measured
  with ``ctx.evaluate`` exactly as the PassManager will), each quantized Conv/Gemm/
  MatMul is measured alone (output SQNR on calibration samples) and the most
  sensitive ones return to float, fewest first, until the budget is met; the report
  lists them with their SQNR. ``fallback=none`` leaves the verdict to the manager.
- ``speed=rule`` (default): grouped/depthwise Convs, Convs reducing fewer than 64
  inputs per output and Convs on 1x1 pooled gates stay float, decided from the graph
  (``speed.slow_by_rule``: onnxruntime's int8 kernels are slower there on x86; PP-OCR
  cls 1.94x -> 1.00x fp32, det 0.83x -> 0.76x). ``speed=none`` quantizes them too.
- ``speed=auto`` (the rule, then timing; not the default: the placement would depend
  on timing, and a pass must write the same bytes in every process): the int8 model
  is timed against fp32
  (the report's latency figure); only when it is clearly slower does onnxruntime's
  profiler time
  each fused integer node against its float original (plus the Q/DQ it adds): nodes
  slower in int8 stay float, and if the whole model is still slower it is left float
  with the reason. ``latency=false`` skips every timing (and with it ``speed=auto``).
- ``weights_only=true``: weight-only int8 (per-channel DequantizeLinear on
  Conv/ConvTranspose/Gemm/MatMul weights, activations and biases stay float); no
  calibration. onnxruntime turns DQ→MatMul into MatMulNBits(bits=8).
- Opset < 13 (per-channel DequantizeLinear needs 13): with ``upgrade=true`` (default)
  the pass declares it needs opset 13, and the PassManager runs
  ``upgrade-opset(target=13)`` before it as a checked lossless step of its own (when
  that fails, this step is skipped with the reason); refused with ``upgrade=false``.

Does nothing (no-op, the nodes left float reported as skipped) when no Conv/Gemm/MatMul
qualifies: weights that are not float32 constants, graphs already quantized, op types
outside the table. Subgraphs (If/Loop/Scan bodies) are not visited.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import PassCannotRun, UsageError
from onnxopt.graph import replace_contents
from onnxopt.passes.quantize import (
    bias_correct,
    calibrate,
    equalize,
    fallback,
    gptq,
    numerics,
    prepare,
    qdq,
    smooth,
    speed,
    upgrade,
)
from onnxopt.pipeline import (
    Evaluation,
    Pass,
    PassContext,
    PassResult,
    Requirement,
    check_op_types,
    default_opset,
    node_filter,
    option,
    register_pass,
)
from onnxopt.results import Skipped
from onnxopt.weights import output_axis

log = logging.getLogger(__name__)

# an op of these means the model is quantized already: the pass is a no-op that says so
QUANTIZED_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearAveragePool", "QLinearWhere", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "MatMulNBits",
    "GatherBlockQuantized",
)  # fmt: skip
WEIGHT_ONLY_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Calibration:
    """Everything measured on the float graph, once: tensor statistics, GPTQ Hessians,
    and the rounded weights (cached across the builds fallback/speed make)."""

    def __init__(self, ctx: PassContext, graph: gs.Graph, options) -> None:
        self.ctx = ctx
        self.graph = graph
        self.options = options
        self.stats: dict[str, calibrate.TensorStats] = {}
        self.hessians: dict[str, gptq.Hessian] = {}
        self.runs = 0
        self._rounded: dict[tuple[str, bytes, int], np.ndarray] = {}
        self._ranges: dict[str, tuple[float, float]] = {}

    def prepare(self, placement: qdq.Plan) -> None:
        """One streaming pass: statistics of the plan's tensors and the core nodes' H."""
        observers: dict[str, list] = {}
        if self.options.rounding == "gptq":
            nodes = {n.name: n for n in self.graph.nodes}
            for name in placement.core():
                node = nodes[name]
                if gptq.Hessian.supports(node) and name not in self.hessians:
                    hessian = gptq.Hessian(node, self.ctx.rng)
                    self.hessians[name] = hessian
                    observers.setdefault(node.inputs[0].name, []).append(hessian.update)
        names = [n for n in qdq.activation_tensors(placement) if n not in self.stats]
        if names or observers:
            self.stats.update(calibrate.collect(self.ctx, self.graph, names, observers))
            self.runs += 1

    def ranges(self, names: list[str]) -> dict[str, tuple[float, float]]:
        missing = [n for n in names if n not in self.stats]
        if missing:
            self.stats.update(calibrate.collect(self.ctx, self.graph, missing))
            self.runs += 1
        opts = self.options
        for name in names:  # fallback and speed rebuild often: each range is chosen once
            if name not in self._ranges:
                self._ranges[name] = calibrate.choose_range(
                    self.stats[name], opts.method, opts.activations, opts.percentile
                )
        return {name: self._ranges[name] for name in names}

    def release(self) -> None:
        """Drop the Hessians, rounded weights and statistics once the last graph is
        built (45 MB on PP-OCRv4 det at 640x640, held through the latency runs)."""
        for hessian in self.hessians.values():
            hessian.release()
        self._rounded.clear()
        self.stats.clear()
        self._ranges.clear()

    def extents(self) -> dict[str, tuple[float, float]]:
        """Observed ``(min, max)`` of every tensor measured so far."""
        return {name: (s.min, s.max) for name, s in self.stats.items() if s.count}

    def round_weight(
        self, node: gs.Node, weight: np.ndarray, axis: int, scale: np.ndarray, levels: int
    ) -> np.ndarray:
        hessian = self.hessians.get(node.name)
        if hessian is None or hessian.rows == 0:
            return qdq.nearest_rounding(node, weight, axis, scale, levels)
        key = (node.name, scale.tobytes(), levels)
        if key not in self._rounded:
            self._rounded[key] = gptq.gptq_quantize(node, weight, hessian, scale, levels)
        return self._rounded[key]


@dataclass
class Built:
    graph: gs.Graph
    plan: qdq.Plan
    rewrite: qdq.RewriteStats


class Job:
    """One run of the pass: builds placements from the float graph and the report."""

    def __init__(self, ctx: PassContext, options, float_graph: gs.Graph, notes):
        self.ctx = ctx
        self.options = options
        self.float_graph = float_graph
        self.calibration = Calibration(ctx, float_graph, options)
        self.notes: list[str] = notes
        self.details: dict = {}
        self.skipped: list[Skipped] = []  # nodes the first placement left float, and why
        self.kept: dict[str, str] = {}  # node kept float by fallback / speed -> why
        self.timing: dict = {}  # latency_ratio() of the final graph, when already measured
        self.corrections: dict[str, np.ndarray] = {}  # node -> bias correction
        self.slow: frozenset[str] = frozenset()  # speed=rule: always kept float

    def build(self, float_nodes: frozenset[str]) -> Built:
        """The int8 graph with ``float_nodes`` (and the user's exclusions) kept float."""
        opts = self.options
        candidate = self.float_graph.copy()
        selection = qdq.Selection(
            tuple(opts.op_types), tuple(opts.exclude), float_nodes | self.slow,
            opts.activations, opts.matmul_activations,
        )  # fmt: skip
        placement = qdq.plan(candidate, selection)
        if not float_nodes:
            self.calibration.prepare(placement)
        ranges = self.calibration.ranges(qdq.activation_tensors(placement))
        for _ in range(3):  # masks: keep their readers float, plan again
            huge = qdq.huge_range_nodes(candidate, placement, self.calibration.extents())
            if not huge:
                break
            selection = replace(selection, huge={**selection.huge, **huge})
            placement = qdq.plan(candidate, selection)
            ranges = self.calibration.ranges(qdq.activation_tensors(placement))
        rewriter = qdq.Rewriter(
            candidate, ranges, opts.activations, opts.weight_clip, self.calibration.round_weight,
            numerics.WEIGHT_LEVELS[opts.weight_bits], self.corrections,
        )  # fmt: skip
        return Built(candidate, placement, rewriter.apply(placement))

    def correct_biases(self, built: Built) -> tuple[Built, Evaluation | None]:
        """Measure every quantized node's output shift on ``built`` (bias_correct.py)
        and rebuild the full placement with the corrections. ``auto``: keep them only
        when the corrected placement measures better (``ctx.evaluate``: the budget met,
        then the worst output SQNR) than ``built``; returns the evaluation of the
        placement kept (None when nothing was evaluated)."""
        core = built.plan.core()
        corrections = bias_correct.measure(self.ctx, self.float_graph, built.graph, core)
        report: dict = {
            "nodes": len(corrections),
            "max_abs_shift": round(
                max((float(np.abs(c).max()) for c in corrections.values()), default=0.0), 6
            ),
            "used": bool(corrections),
        }
        self.details["bias_correction"] = report
        if not corrections:
            return built, None
        self.corrections = corrections
        corrected = self.build(frozenset())
        if self.options.bias_correction != "auto" or self.ctx.evaluator is None:
            return corrected, None
        plain_eval = self.ctx.evaluate(built.graph)
        corrected_eval = self.ctx.evaluate(corrected.graph)
        scores = [(e.ok, _worst_sqnr(e)) for e in (plain_eval, corrected_eval)]
        report["sqnr_db"] = {"without": _rounded(scores[0][1]), "with": _rounded(scores[1][1])}
        if scores[1] > scores[0]:
            self.notes.append(
                f"bias correction of {len(corrections)} node(s): worst output SQNR "
                f"{scores[0][1]:.1f} -> {scores[1][1]:.1f} dB"
            )
            return corrected, corrected_eval
        self.corrections = {}
        report["used"] = False
        return built, plain_eval

    def _why_slower(self, graph: gs.Graph) -> str:
        try:
            fp32_ops = speed.runtime_ops(self.ctx.to_model(self.float_graph))
        except Exception as exc:  # reporting only
            log.debug("could not read onnxruntime's fp32 graph: %s", exc)
            return ""
        int8_ops = self.details.get("onnxruntime_ops", {})
        self.details["onnxruntime_ops_fp32"] = fp32_ops
        return ": " + speed.slow_reasons(fp32_ops, int8_ops)

    def record(self, key: str, outcome) -> None:
        self.details[key] = outcome.report()
        self.notes += outcome.notes()
        self.kept.update((d["node"], d["reason"]) for d in outcome.kept_float)

    def all_skipped(self) -> list[Skipped]:
        """What the first placement left float, then the nodes speed=rule, fallback=auto
        and speed=auto kept float, once each with their own reason (their measurements
        stay in ``details``)."""
        ops = {node.name: node.op for node in self.float_graph.nodes}
        kept = [Skipped(name, "node", f"kept float: {why}", ops.get(name, ""))
                for name, why in self.kept.items()]  # fmt: skip
        placed = [skip for skip in self.skipped if skip.subject not in self.kept]
        return [*placed, *kept]

    def unchanged(self, note: str | None = None) -> PassResult:
        if note:
            self.notes.append(note)
        return PassResult(False, {}, self.details, self.notes, skipped=self.all_skipped())

    def finish(self, graph: gs.Graph, built: Built) -> PassResult:
        counts = _counts(built)
        self.details.update(_details(built, self.calibration))
        self.calibration.release()  # no more builds
        try:
            self.details["onnxruntime_ops"] = speed.runtime_ops(self.ctx.to_model(graph))
        except Exception as exc:  # reporting only: the manager's checks decide
            log.debug("could not read onnxruntime's optimized graph: %s", exc)
        if self.options.latency:
            # speed=auto timed exactly this graph already
            timing = self.timing or speed.latency_ratio(self.ctx, self.float_graph, graph)
            self.details["latency"] = timing
            ratio = timing["ratio_1_thread"]
            counts["int8_fp32_latency"] = round(ratio, 3)
            if ratio > 1.0:
                why = self._why_slower(graph)
                hint = "" if self.options.speed == "auto" else "; speed=auto keeps slow nodes float"
                self.notes.append(
                    f"int8 model is {ratio:.2f}x the fp32 latency (1 thread){why}{hint}"
                )
        return PassResult(True, counts, self.details, self.notes, skipped=self.all_skipped())


@register_pass
class QuantizeInt8Pass(Pass):
    name = "quantize-int8"
    summary = "Static int8 QDQ quantization, calibrated, fused by onnxruntime into int8 kernels."
    lossless = False

    @dataclass
    class Options:
        method: Literal["mse", "minmax", "percentile", "entropy"] = option(
            "mse", "activation range calibration"
        )
        percentile: float = option(99.999, "percentile for method=percentile", range=(50, 100))
        activations: Literal["uint8", "int8"] = option(
            "uint8", "activation type: uint8 asymmetric or int8 symmetric"
        )
        op_types: list[str] = option((), "quantize only these op types (default: all in the table)")
        exclude: list[str] = option((), "node-name globs kept float")
        fallback: Literal["auto", "none"] = option(
            "auto", "return the most sensitive nodes to float until the budget is met"
        )
        speed: Literal["none", "rule", "auto"] = option(
            "rule",
            "rule: keep float the Convs onnxruntime runs slower in int8 on x86 (grouped/"
            "depthwise, reductions under 64 inputs, 1x1 pooled gates), decided from the "
            "graph; auto: the rule, then, when the int8 model times slower than fp32, keep "
            "float what the profiler finds slower, or the whole model (needs latency=true); "
            "none: every node the table allows",
        )
        weights_only: bool = option(False, "int8 weights only (no activation quantization)")
        matmul_activations: bool = option(False, "also quantize activation x activation MatMul")
        weight_clip: Literal["max", "mse"] = option("max", "per-channel weight range")
        weight_bits: int = option(
            7,
            "weight grid: 7 = [-63, 63], exact in onnxruntime's u8s8 kernels on every x86 CPU "
            "(without VNNI their int16 pair sums saturate); 8 = [-127, 127]",
            range=(7, 8),
        )
        rounding: Literal["gptq", "nearest"] = option(
            "gptq", "weight rounding: GPTQ error feedback on calibration data, or nearest"
        )
        upgrade: bool = option(True, "upgrade opset < 13 to 13 first (a checked step)")
        prepare: bool = option(
            True, "fold constants, BatchNormalization and per-channel Mul/Add into Conv first"
        )
        equalize: bool = option(
            True, "activation-aware cross-layer equalisation of Conv -> (Relu) -> Conv pairs"
        )
        latency: bool = option(True, "measure int8/fp32 latency for the report")
        smooth: bool = option(
            True,
            "SmoothQuant: move the outlier channels of LayerNorm outputs into the weights "
            "of the MatMul/Gemm reading them",
        )
        bias_correction: Literal["auto", "on", "off"] = option(
            "off",
            "subtract each quantized node's mean output shift (calibration) from its bias; "
            "auto: only when the corrected model measures better on the validation samples",
        )

        def validate(self) -> None:
            check_op_types(self.op_types, sorted(qdq.QDQ_RULES))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        found = _already_quantized(graph)
        if found:
            return PassResult(False, notes=[f"model is already quantized ({found}): nothing done"])
        qdq.ensure_node_names(graph)
        notes: list[str] = []
        self._check_opset(graph)
        if opts.weights_only:
            return self._weights_only(graph, notes)
        folds = prepare.prepare(graph, ctx) if opts.prepare else {}
        if folds.get("affine_folded"):
            notes.append(f"folded {folds['affine_folded']} per-channel Mul/Add into their Conv")
        equalized = equalize.equalize(graph, ctx) if opts.equalize else {}
        if equalized.get("pairs"):
            notes.append(f"equalized the channels of {equalized['pairs']} Conv pair(s)")
        smoothed = smooth.smooth(graph, ctx) if opts.smooth else {}
        if smoothed.get("tensors"):
            notes.append(
                f"smoothed {smoothed['tensors']} activation(s) into {smoothed['readers']} "
                "MatMul/Gemm weight(s)"
            )
        job = Job(ctx, opts, graph.copy(), notes)
        job.details["prepare"] = {**folds, "equalized": equalized, "smoothed": smoothed}
        if opts.speed != "none":
            rule = speed.slow_by_rule(job.float_graph)
            job.slow = frozenset(d["node"] for d in rule.kept_float)
            job.record("speed_rule", rule)
        built = job.build(frozenset())
        job.skipped = built.plan.skipped
        if not built.plan.core():
            return job.unchanged("no Conv/Gemm/MatMul can be quantized")
        evaluation = None
        if opts.bias_correction != "off" and ctx.calibration:
            built, evaluation = job.correct_biases(built)
        float_nodes: frozenset[str] = frozenset()
        if opts.fallback == "auto":
            outcome = fallback.auto_fallback(job.build, built, ctx, job.float_graph, evaluation)
            job.record("fallback", outcome)
            if outcome.built is None:
                return job.unchanged()
            built = outcome.built
            float_nodes = frozenset(d["node"] for d in outcome.kept_float)
        if opts.speed == "auto" and opts.latency and ctx.calibration:
            outcome = speed.speed_auto(job.build, built, ctx, job.float_graph, float_nodes)
            job.record("speed", outcome)
            built = outcome.built
            if not built.plan.core():
                return job.unchanged(speed.speed_auto_reason(outcome))
            job.timing = outcome.timing
        replace_contents(graph, built.graph)
        return job.finish(graph, built)

    def requires(self, model: onnx.ModelProto) -> Requirement | None:
        """Opset 13, from a checked ``upgrade-opset`` step (``upgrade=true``)."""
        if not self.options.upgrade or default_opset(model) >= 13:
            return None
        if any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
            return None  # a no-op: nothing to upgrade for
        return Requirement("upgrade-opset(target=13)", "per-channel DequantizeLinear needs 13")

    def _check_opset(self, graph: gs.Graph) -> None:
        opset = upgrade.default_opset(graph)
        if opset >= 13:
            return
        if not self.options.upgrade:
            raise UsageError(
                f"quantize-int8: opset {opset} < 13 (per-channel DequantizeLinear needs 13); "
                "put upgrade-opset(target=13) in front or set upgrade=true"
            )
        raise PassCannotRun(
            f"quantize-int8: opset {opset} < 13 (per-channel DequantizeLinear needs 13); "
            "run upgrade-opset(target=13) first (the PassManager does)"
        )

    def _weights_only(self, graph: gs.Graph, notes: list[str]) -> PassResult:
        rewriter = qdq.Rewriter(graph, {})
        count = 0
        for node in list(graph.nodes):
            axis = _weight_only_axis(node)
            if axis is None or not self._allowed(node):
                continue
            weight = node.inputs[1]
            q, params = numerics.quantize_weight(weight.values, axis)
            node.inputs[1] = rewriter.dequantized(weight.name, q, params)
            rewriter.stats.weight_bytes_before += weight.values.nbytes
            rewriter.stats.weight_bytes_after += (
                q.nbytes + params.scale.nbytes + params.zero_point.nbytes
            )
            count += 1
        if not count:
            return PassResult(False, notes=[*notes, "no float32 weight to quantize"])
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        counts = {
            "weights_quantized": count,
            "weight_bytes_before": rewriter.stats.weight_bytes_before,
            "weight_bytes_after": rewriter.stats.weight_bytes_after,
        }
        return PassResult(True, counts, notes=notes)

    def _allowed(self, node: gs.Node) -> bool:
        return node_filter(node, self.options.op_types, self.options.exclude) is None


def _weight_only_axis(node: gs.Node) -> int | None:
    """Input 1's output-channel axis (``onnxopt.weights``); None: not a float weight,
    or a MatMul weight that is not a matrix."""
    if node.op not in WEIGHT_ONLY_OPS or len(node.inputs) < 2:
        return None
    if not qdq._const_float(node.inputs[1]):
        return None
    weight = node.inputs[1].values
    if node.op == "MatMul" and weight.ndim != 2:
        return None
    return output_axis(node, 1, weight.ndim)


def _worst_sqnr(evaluation: Evaluation) -> float:
    value = evaluation.worst().get("sqnr")
    return -math.inf if value is None or math.isnan(value) else float(value)


def _rounded(value: float) -> float | str:
    return round(value, 2) if math.isfinite(value) else str(value)


def _already_quantized(graph: gs.Graph) -> str:
    """The quantized op types present (``"ConvInteger x2, ..."``), or ``""``."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in QUANTIZED_OPS:
            counts[node.op] = counts.get(node.op, 0) + 1
    return ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(counts.items()))


def _counts(built: Built) -> dict[str, float]:
    kinds = qdq.describe(built.plan)
    stats = built.rewrite
    return {
        "core_quantized": kinds.get("core", 0),
        "int8_ops": kinds.get("int8", 0),
        "passthrough_int8": kinds.get("passthrough", 0),
        "relu_absorbed": stats.absorbed,
        "qdq_pairs": stats.qdq_pairs,
        "weights_quantized": stats.weights,
        "biases_int32": stats.biases,
        "kept_float": len(built.plan.skipped),
    }


def _details(built: Built, calibration: Calibration) -> dict:
    return {
        "quantized_nodes": qdq.kernels(built.graph.nodes, built.plan)
        or {name: kind for name, kind in built.plan.nodes.items()},
        "calibration_runs": calibration.runs,
        "gptq_nodes": sorted(calibration.hessians),
        "weight_bytes": {
            "before": built.rewrite.weight_bytes_before,
            "after": built.rewrite.weight_bytes_after,
        },
    }
