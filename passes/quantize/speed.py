"""Speed: the int8/fp32 latency in the report, ``speed=rule`` and ``speed=auto``.

``speed=rule`` (the default) keeps float, before anything is measured, the Convs whose
onnxruntime int8 kernel is slower than the float one on x86 (:func:`slow_by_rule`):
grouped and depthwise Convs, Convs that reduce fewer than ``RULE_MIN_REDUCTION`` inputs
per output, and Convs reading a 1x1 pooled map (squeeze-excitation gates). Read from
per-node profiles of the zoo (PP-OCR cls/det/rec, Silero VAD: 169 Convs, 1 thread):
every grouped Conv was 1.4-9x slower in int8 (the integer kernels run NHWC, with a
layout Transpose pair and no depthwise fast path), and so were most reductions under
64 inputs; wider reductions were 0.25-0.9x. Whole models (int8 / fp32): PP-OCR cls
1.94 -> 1.00, det 0.83 -> 0.76, rec 0.74 -> 0.71, VAD unchanged. It depends on the
graph only, so the output bytes do not depend on the machine or its load.

``latency_ratio`` times the float and the int8 model interleaved
(``onnxopt.bench.measure_latency``, onnxruntime with all graph optimizations, one
thread) on the first calibration sample.

``speed=auto`` starts from that whole-model timing: when int8 is at
most ``SLOWER_MARGIN`` slower than fp32 (timing noise on a shared machine), nothing
else happens and the report reuses the figure. Otherwise onnxruntime's profiler runs
both models (all optimizations, one thread); each node's kernel time is the median
over runs. A quantized Conv/Gemm/MatMul costs what its fused integer kernel costs
plus its share of every QuantizeLinear that quantizes one of its activation inputs
(what onnxruntime did not fuse away); it saves what its float kernel cost
(onnxruntime names fused float kernels after a node or after the fused chain's output
tensor — both are mapped, through a following Relu/Clip). Nodes whose integer version
is not cheaper stay float and the placement is rebuilt; two such rounds at most. Then
the whole int8 model is timed again; if it is still more than ``SLOWER_MARGIN``
slower, nothing stays quantized and the report says so, with what onnxruntime runs
in the int8 graph that the fp32 graph does not (:func:`slow_reasons`) — on tiny
models per-op overhead makes integer kernels a loss; on PP-OCR cls, layout
Transposes around float HardSwish/SE ops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt.bench import measure_latency
from onnxopt.model import materialized
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

PROFILE_RUNS = 30
ROUNDS = 2
SLOWER_MARGIN = 0.10  # whole-model int8/fp32 above 1 + this: slower, not timing noise
RULE_MIN_REDUCTION = 64  # speed=rule: Convs reducing fewer inputs per output stay float
POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


@dataclass
class RuleOutcome:
    """``speed=rule``: the Convs kept float, each with its reason."""

    kept_float: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"min_reduction": RULE_MIN_REDUCTION, "kept_float": self.kept_float}

    def notes(self) -> list[str]:
        if not self.kept_float:
            return []
        kinds: dict[str, int] = defaultdict(int)
        for d in self.kept_float:
            kinds[d["kind"]] += 1
        parts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        return [
            f"speed=rule kept {len(self.kept_float)} Conv(s) float where onnxruntime's int8 "
            f"kernels are slower than fp32 ({parts}); speed=none quantizes them"
        ]


def slow_by_rule(graph: gs.Graph) -> RuleOutcome:
    """The Convs of ``graph`` that ``speed=rule`` keeps float (see the module docstring)."""
    outcome = RuleOutcome()
    for node in graph.nodes:
        if node.op != "Conv" or len(node.inputs) < 2:
            continue
        group = int(node.attrs.get("group", 1))
        weight = node.inputs[1]
        shape = weight.shape if isinstance(weight, gs.Constant) else None
        reduction = math.prod(shape[1:]) if shape is not None and len(shape) > 1 else None
        source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if group > 1:
            kind, why = "grouped", f"grouped Conv (group={group})"
        elif reduction is not None and reduction < RULE_MIN_REDUCTION:
            kind, why = "narrow", f"reduces {reduction} inputs per output (< {RULE_MIN_REDUCTION})"
        elif source is not None and source.op in POOLS:
            kind, why = "pooled", f"reads a 1x1 map pooled by {source.op} (a gate)"
        else:
            continue
        outcome.kept_float.append({"node": node.name, "kind": kind, "reason": f"speed=rule: {why}"})
    return outcome


def latency_ratio(ctx: PassContext, float_graph: gs.Graph, int8_graph: gs.Graph) -> dict:
    """Median latency (ms) of both models, 1 thread, interleaved; and the ratio."""
    feed = ctx.calibration[0] if ctx.calibration else None
    if feed is None:
        return {"ratio_1_thread": float("nan")}
    timings = measure_latency(
        [("fp32", ctx.to_model(float_graph)), ("int8", ctx.to_model(int8_graph))],
        feed,
        threads=(1,),
        rounds=15,
        runs_per_round=3,
        warmup=3,
    )
    fp32, int8 = timings
    return {
        "fp32_ms": round(fp32.median_ms, 4),
        "int8_ms": round(int8.median_ms, 4),
        "ratio_1_thread": int8.ratio,
    }


def runtime_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (all optimizations, CPU).

    Read back from ``SessionOptions.optimized_model_filepath``: fused integer kernels
    (QLinearConv, QGemm, MatMulIntegerToFloat...) and any QuantizeLinear/
    DequantizeLinear that onnxruntime could not fuse away.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        with materialized(model) as source:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def profile_nodes(model: onnx.ModelProto, feed: dict, runs: int = PROFILE_RUNS) -> dict:
    """Median kernel time (microseconds) per onnxruntime node: name -> (op, us)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "profile")
        with materialized(model) as source:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        inputs = {k: v for k, v in feed.items() if k in names}
        for _ in range(runs):
            session.run(None, inputs)
        path = session.end_profiling()
        with open(path) as handle:
            events = json.load(handle)
    times: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        times[name].append(float(event.get("dur", 0)))
        ops[name] = event.get("args", {}).get("op_name", "")
    return {name: (ops[name], statistics.median(values)) for name, values in times.items()}


@dataclass
class SpeedOutcome:
    built: Any
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    float_nodes: frozenset[str] = frozenset()
    ratio: float = float("nan")  # int8 / fp32 latency of ``built`` (last timing)
    timing: dict = field(default_factory=dict)  # latency_ratio() of ``built``
    profiled: bool = False
    first_ratio: float = float("nan")
    why: str = ""  # what makes the int8 graph slower (slow_reasons), when left float

    def report(self) -> dict[str, Any]:
        return {
            "kept_float": self.kept_float,
            "int8_fp32_before": self.first_ratio,
            "profiled": self.profiled,
            "int8_fp32_after_profiling": self.ratio,
        }

    def notes(self) -> list[str]:
        if not self.kept_float or not self.built.plan.core():
            return []
        names = ", ".join(d["node"] for d in self.kept_float)
        return [f"speed=auto kept {len(self.kept_float)} node(s) float (slower in int8): {names}"]


SUFFIXES = re.compile(r"(_token_\d+|_nchwc|/MatMulScaleFusion/|_kernel_time)+$")


def speed_auto(
    build: Callable[[frozenset[str]], Any],
    built: Any,
    ctx: PassContext,
    float_graph: gs.Graph,
    already_float: frozenset[str] = frozenset(),
) -> SpeedOutcome:
    """Time the whole int8 model; when it is slower than fp32 (beyond
    ``SLOWER_MARGIN``), keep float the core nodes whose integer kernel (plus its Q) is
    not faster, up to ``ROUNDS`` rounds of profile-and-revert, and time again; if it is
    still slower, nothing stays quantized (``outcome.built`` has an empty plan)."""
    outcome = SpeedOutcome(built, float_nodes=already_float)
    _time(outcome, ctx, float_graph)
    outcome.first_ratio = outcome.ratio
    if not outcome.ratio > 1.0 + SLOWER_MARGIN:
        return outcome
    outcome.profiled = True
    fp32_times = profile_nodes(ctx.to_model(float_graph), ctx.calibration[0])
    for _ in range(ROUNDS):
        slower = _slower_units(outcome.built, ctx, float_graph, fp32_times)
        if not slower:
            break
        outcome.kept_float += slower
        outcome.float_nodes = outcome.float_nodes | {d["node"] for d in slower}
        outcome.built = build(outcome.float_nodes)
        if not outcome.built.plan.core():
            return outcome
    _time(outcome, ctx, float_graph)
    if outcome.ratio > 1.0 + SLOWER_MARGIN:
        try:
            fp32_ops = runtime_ops(ctx.to_model(float_graph))
            outcome.why = slow_reasons(fp32_ops, runtime_ops(ctx.to_model(outcome.built.graph)))
        except Exception as exc:  # reporting only
            log.debug("could not read onnxruntime's optimized graphs: %s", exc)
        rest = outcome.built.plan.core()
        outcome.kept_float += [
            {"node": unit, "reason": f"whole int8 model measured {outcome.ratio:.2f}x fp32"}
            for unit in rest
        ]
        outcome.float_nodes = outcome.float_nodes | frozenset(rest)
        outcome.built = build(outcome.float_nodes)
    return outcome


def _time(outcome: SpeedOutcome, ctx: PassContext, float_graph: gs.Graph) -> None:
    outcome.timing = latency_ratio(ctx, float_graph, outcome.built.graph)
    outcome.ratio = outcome.timing.get("ratio_1_thread", float("nan"))


def speed_auto_reason(outcome: SpeedOutcome) -> str:
    """Why speed=auto left the whole model float: every node profiled slower in int8,
    or the whole int8 model still timed slower (and what onnxruntime added to it)."""
    if not outcome.why:
        return (
            f"speed=auto: int8 is not faster than fp32 here (whole model "
            f"{outcome.first_ratio:.2f}x fp32, and each of the {len(outcome.kept_float)} "
            "quantized node(s) profiled slower in int8 than in fp32); model left float"
        )
    return (
        "speed=auto: int8 is not faster than fp32 here (profiled per node, whole model "
        f"{outcome.ratio:.2f}x fp32): {outcome.why}; model left float"
    )


def slow_reasons(fp32_ops: dict[str, int], int8_ops: dict[str, int]) -> str:
    """What onnxruntime runs in the int8 graph beside its integer kernels, against the
    fp32 graph: layout Transposes, float ops between Q/DQ, unfused Q/DQ."""
    integer = sum(n for op, n in int8_ops.items() if op.startswith("QLinear") or op in (
        "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"))  # fmt: skip
    transposes = int8_ops.get("Transpose", 0) - fp32_ops.get("Transpose", 0)
    qdq = int8_ops.get("QuantizeLinear", 0) + int8_ops.get("DequantizeLinear", 0)
    ignored = {"QuantizeLinear", "DequantizeLinear", "Transpose"}
    floats = sum(
        n for op, n in int8_ops.items()
        if op not in ignored and not op.startswith("QLinear")
        and op not in ("QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
    )  # fmt: skip
    parts = [f"onnxruntime runs {integer} integer kernel(s)"]
    if transposes > 0:
        parts.append(f"{transposes} more layout Transpose(s) than fp32 (NHWC int8 kernels)")
    if qdq:
        parts.append(f"{qdq} Quantize/DequantizeLinear between them and {floats} float op(s)")
    fused = fp32_ops.get("FusedConv", 0) + sum(
        n for op, n in fp32_ops.items() if op in ("ReorderInput", "ReorderOutput")
    )
    if fused:
        parts.append("where fp32 runs NCHWc-blocked convolutions with their activations fused")
    return "; ".join(parts)


def _slower_units(built: Any, ctx: PassContext, float_graph: gs.Graph, fp32_times: dict) -> list:
    units = built.plan.core()
    int8_times = profile_nodes(ctx.to_model(built.graph), ctx.calibration[0])
    owner = _owners(float_graph, units)
    float_cost = dict.fromkeys(units, 0.0)
    for name, (_, micros) in fp32_times.items():
        unit = owner.get(SUFFIXES.sub("", name))
        if unit is not None:
            float_cost[unit] += micros
    int8_cost = _int8_costs(built, units, int8_times)
    return [
        {
            "node": unit,
            "int8_us": round(int8_cost[unit], 2),
            "fp32_us": round(float_cost[unit], 2),
            "reason": (
                f"profiled {int8_cost[unit]:.1f} us in int8 (kernel + its QuantizeLinear) "
                f"vs {float_cost[unit]:.1f} us in fp32"
            ),
        }
        for unit in units
        if int8_cost[unit] >= float_cost[unit] > 0
    ]


def _owners(graph: gs.Graph, units: list[str]) -> dict[str, str]:
    """onnxruntime node/tensor names -> the core node they belong to in the fp32 run.

    onnxruntime names a fused float kernel after a node or after the output tensor of
    the fused chain (Conv+Relu -> "<relu output>_nchwc"), so both are mapped, through
    a Relu/Clip that follows a core node.
    """
    wanted = set(units)
    owner: dict[str, str] = {}
    for node in graph.nodes:
        if node.name not in wanted:
            continue
        owner[node.name] = node.name
        for out in node.outputs:
            owner[out.name] = node.name
            for consumer in out.outputs:
                if consumer.op in ("Relu", "Clip") and len(out.outputs) == 1:
                    owner[consumer.name] = node.name
                    for tensor in consumer.outputs:
                        owner[tensor.name] = node.name
    return owner


def _int8_costs(built: Any, units: list[str], times: dict) -> dict[str, float]:
    cost = dict.fromkeys(units, 0.0)
    readers = defaultdict(list)  # quantized tensor -> units reading it
    nodes = {n.name: n for n in built.graph.nodes}
    for unit in units:
        node = nodes.get(unit)
        if node is None:
            continue
        for tensor in node.inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and producer.op == "DequantizeLinear":
                source = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
                if source is not None and source.op == "QuantizeLinear":
                    readers[source.name].append(unit)
    by_prefix = sorted(units, key=len, reverse=True)
    for name, (op, micros) in times.items():
        if op == "QuantizeLinear" and readers.get(name):
            for unit in readers[name]:
                cost[unit] += micros / len(readers[name])
            continue
        base = SUFFIXES.sub("", name)
        unit = next((u for u in by_prefix if base == u), None)
        if unit is not None:
            cost[unit] += micros
    return cost
