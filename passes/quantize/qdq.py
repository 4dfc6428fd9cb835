"""Where QuantizeLinear/DequantizeLinear go: the per-op rule table, the placement plan
and the graph rewrite.

The table (``QDQ_RULES``, filled by ``@qdq_rule``) says, per op type, how
onnxruntime's CPU provider runs it once its float inputs come from DequantizeLinear
and its output goes to QuantizeLinear — learned from onnxruntime's QDQ selectors
(``qdq_selector_action_transformer.cc``) and checked on the optimized graph
onnxruntime actually runs (``tests/test_quantize.py``):

- ``core``: Conv, Gemm, MatMul — int8 weights (symmetric, per output channel) and
  int32 bias; fused into QLinearConv / QGemm / QLinearMatMul or
  MatMulIntegerToFloat. Conv needs its output quantized; Gemm and MatMul keep a
  float output when nothing downstream wants int8 (fewer Q/DQ, less noise).
- ``int8``: ops with an integer kernel (QLinearAdd, QLinearConcat,
  QLinearGlobalAveragePool...). They run in int8 only when *all* their inputs and
  their output are quantized anyway — then quantizing them adds no rounding at all.
- ``passthrough``: data movement (Reshape, Transpose, Flatten, MaxPool...).
  onnxruntime drops DQ→op→Q when both sides share one scale and zero point, so the
  output shares its input's parameters and the Q moves in front of the op.
- ``absorbed``: Relu, and Clip(min=0): removed when their output is quantized with
  ``lo = 0`` (uint8, or any ``[0, hi]`` range), because QuantizeLinear's saturation
  then performs them.

Placement (:func:`plan`): the activation inputs of the core nodes must be int8; Relu
is absorbed into its producer's output; the need for int8 flows backwards through
passthrough ops; an int8 op joins when its output is int8 anyway and its inputs are
int8 already or come out of quantized nodes (through Relu) — never by adding a
rounding step to a float producer's output. One
QuantizeLinear per tensor, one DequantizeLinear per tensor shared by its readers
(onnxruntime duplicates DQs per node unit itself), so no Q→DQ→Q chain exists. A
tensor produced by a quantized node is read through its DequantizeLinear by every
consumer (onnxruntime fuses a node only when all its output edges are Q); a tensor
produced by a float node keeps feeding float consumers unquantized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import replace_uses, unique_name
from onnxopt.passes.quantize import bias_correct, numerics
from onnxopt.passes.quantize.numerics import ActivationType, QuantParams
from onnxopt.pipeline import node_filter
from onnxopt.results import Skipped
from onnxopt.weights import output_axis

log = logging.getLogger(__name__)

Kind = Literal["core", "int8", "passthrough", "absorbed"]
FLOAT_TYPES = (np.dtype(np.float32),)
HUGE_RANGE = 1e30  # a calibrated |x| this large is a mask / -inf fill, not a signal


@dataclass(frozen=True)
class QdqRule:
    """How one op type is quantized and what onnxruntime turns it into."""

    op: str
    kind: Kind
    kernel: str  # what onnxruntime's CPU provider runs (for the report and docs)
    check: Callable[[gs.Node], str | None]  # why a node cannot be quantized, or None
    activations: tuple[int, ...] = (0,)  # float inputs quantized per tensor; () = all
    weight: int | None = None
    bias: int | None = None
    output: Literal["required", "optional", "own", "shared"] = "own"


QDQ_RULES: dict[str, QdqRule] = {}


def qdq_rule(op: str, kind: Kind, kernel: str, **fields) -> Callable:
    """Register ``check(node) -> reason | None`` as the rule of ``op`` (no duplicates)."""

    def register(check: Callable[[gs.Node], str | None]) -> Callable:
        if op in QDQ_RULES:
            raise ValueError(f"duplicate qdq_rule for {op!r}")
        QDQ_RULES[op] = QdqRule(op, kind, kernel, check, **fields)
        return check

    return register


def _const_float(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and tensor.values.dtype in FLOAT_TYPES


def _variable_float(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and (
        tensor.dtype is None or np.dtype(tensor.dtype) in FLOAT_TYPES
    )


def _bias_reason(node: gs.Node, index: int, channels: int) -> str | None:
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        return None
    bias = node.inputs[index]
    if not _const_float(bias):
        return "bias is not a float32 constant"
    if bias.values.size != channels or bias.values.squeeze().ndim > 1:
        return f"bias of shape {bias.values.shape} is not one value per output channel"
    return None


# ---------------------------------------------------------------------------- core ops


@qdq_rule("Conv", "core", "QLinearConv", weight=1, bias=2, output="required")
def _conv(node: gs.Node) -> str | None:
    if not _variable_float(node.inputs[0]):
        return "input is not a float32 activation"
    if not _const_float(node.inputs[1]):
        return "weight is not a float32 constant"
    return _bias_reason(node, 2, node.inputs[1].values.shape[0])


@qdq_rule("Gemm", "core", "QGemm", weight=1, bias=2, output="optional")
def _gemm(node: gs.Node) -> str | None:
    if not _variable_float(node.inputs[0]):
        return "input A is not a float32 activation"
    weight = node.inputs[1]
    if not _const_float(weight) or weight.values.ndim != 2:
        return "B is not a 2-D float32 constant"
    return _bias_reason(node, 2, weight.values.shape[output_axis(node, 1, 2)])


@qdq_rule("MatMul", "core", "QLinearMatMul / MatMulIntegerToFloat", weight=1, output="optional")
def _matmul(node: gs.Node) -> str | None:
    if not _variable_float(node.inputs[0]):
        return "input A is not a float32 activation"
    weight = node.inputs[1]
    if isinstance(weight, gs.Constant):
        if not _const_float(weight) or weight.values.ndim != 2:
            return "B is a constant but not a 2-D float32 matrix"
        return None
    return ACTIVATION_MATMUL  # decided by the caller's option


ACTIVATION_MATMUL = "activation x activation MatMul (option matmul_activations=false)"


# ---------------------------------------------------------------------------- int8 kernels


def _all_inputs_activations(node: gs.Node) -> str | None:
    for tensor in node.inputs:
        if not _variable_float(tensor):
            return f"input {tensor.name!r} is a constant or not float32"
    return None


for _op, _kernel in (("Add", "QLinearAdd"), ("Mul", "QLinearMul")):
    qdq_rule(_op, "int8", _kernel, activations=(0, 1))(_all_inputs_activations)
qdq_rule("Concat", "int8", "QLinearConcat", activations=())(_all_inputs_activations)
for _op in ("AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid"):
    qdq_rule(_op, "int8", f"QLinear{_op}")(_all_inputs_activations)


@qdq_rule("Softmax", "int8", "QLinearSoftmax")
def _softmax(node: gs.Node) -> str | None:
    return _all_inputs_activations(node)


@qdq_rule("Where", "int8", "QLinearWhere", activations=(1, 2))
def _where(node: gs.Node) -> str | None:
    for tensor in node.inputs[1:]:
        if not _variable_float(tensor):
            return f"input {tensor.name!r} is a constant or not float32"
    return None


# ---------------------------------------------------------------------------- passthrough


def _data_input_activation(node: gs.Node) -> str | None:
    if not _variable_float(node.inputs[0]):
        return "data input is a constant or not float32"
    return None


for _op in (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Slice", "Tile",
    "Gather", "GatherElements", "Resize", "Split", "ReduceMax", "ReduceMin",
):  # fmt: skip
    qdq_rule(_op, "passthrough", f"{_op} on int8", output="shared")(_data_input_activation)


@qdq_rule("MaxPool", "passthrough", "MaxPool on int8", output="shared")
def _maxpool(node: gs.Node) -> str | None:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or not node.outputs[1].is_empty()):
        return "its Indices output is used"
    return _data_input_activation(node)


# ---------------------------------------------------------------------------- absorbed


@qdq_rule("Relu", "absorbed", "QuantizeLinear saturation")
def _relu(node: gs.Node) -> str | None:
    return _data_input_activation(node)


@qdq_rule("Clip", "absorbed", "QuantizeLinear saturation")
def _clip(node: gs.Node) -> str | None:
    low, _ = clip_bounds(node)
    if low is None or low != 0.0:
        return "Clip min is not a constant 0"
    return _data_input_activation(node)


def clip_bounds(node: gs.Node) -> tuple[float | None, float]:
    """``(min, max)`` of a Relu/Clip (min None when it is not a known constant)."""
    if node.op == "Relu":
        return 0.0, np.inf
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index >= len(node.inputs) or node.inputs[index].is_empty():
            bounds.append(default)
        elif isinstance(node.inputs[index], gs.Constant):
            bounds.append(float(node.inputs[index].values))
        else:
            bounds.append(None)
    low, high = bounds
    return low, (np.inf if high is None else high)


# ---------------------------------------------------------------------------- plan


@dataclass
class TensorPlan:
    """One activation tensor that gets a QuantizeLinear/DequantizeLinear pair."""

    name: str
    stats: str  # tensor whose calibrated range sets the parameters
    share: str | None = None  # take the parameters of this tensor instead (passthrough)
    high: float = np.inf  # cap on the range (Clip max absorbed)
    all_readers: bool = False  # every consumer reads the DQ (an absorbed Relu lives in it)


@dataclass
class Plan:
    """Which nodes run quantized and which tensors carry Q/DQ."""

    nodes: dict[str, Kind] = field(default_factory=dict)  # node name -> kind
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    absorbed: dict[str, str] = field(default_factory=dict)  # Relu/Clip name -> tensor
    alias: dict[str, str] = field(default_factory=dict)  # absorbed output -> its input
    skipped: list[Skipped] = field(default_factory=list)

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def quantized(self, tensor: gs.Tensor) -> bool:
        return self.resolve(tensor.name) in self.tensors

    def core(self) -> list[str]:
        return [n for n, kind in self.nodes.items() if kind == "core"]

    def stats_names(self) -> set[str]:
        return {t.stats for t in self.tensors.values() if t.share is None}


@dataclass(frozen=True)
class Selection:
    """What the user allows: op types, excluded globs, nodes forced float."""

    op_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    float_nodes: frozenset[str] = frozenset()
    activations: ActivationType = "uint8"
    matmul_activations: bool = False
    huge: Mapping[str, str] = field(default_factory=dict)  # node -> huge-range tensor it touches

    def allows(self, node: gs.Node) -> str | None:
        reason = node_filter(node, self.op_types, self.exclude)
        if reason:
            return reason
        if node.name in self.huge:
            return (
                f"tensor {self.huge[node.name]!r} reaches |x| >= {HUGE_RANGE:.0e} (a mask or "
                "-inf fill): never put in a calibrated range"
            )
        if node.name in self.float_nodes:
            return "kept float by fallback=auto / speed=auto"
        return None


def ensure_node_names(graph: gs.Graph) -> int:
    """Give unnamed nodes unique names (plans refer to nodes by name); return how many."""
    taken = {n.name for n in graph.nodes if n.name}
    named = 0
    for index, node in enumerate(graph.nodes):
        if node.name:
            continue
        node.name = unique_name(f"{node.op}_{index}", taken)
        named += 1
    return named


def plan(graph: gs.Graph, selection: Selection) -> Plan:
    """Decide the placement for ``graph`` (read-only; see the module docstring)."""
    result = Plan()
    candidates = _candidates(graph, selection, result)
    outputs = {t.name for t in graph.outputs}
    quantized = result.tensors
    for node in candidates:
        rule = QDQ_RULES[node.op]
        if rule.kind != "core":
            continue
        result.nodes[node.name] = "core"
        for tensor in _activation_inputs(node, rule, selection):
            quantized.setdefault(tensor.name, TensorPlan(tensor.name, tensor.name))
        if rule.output == "required":
            out = node.outputs[0].name
            quantized.setdefault(out, TensorPlan(out, out))
    allowed = {node.name for node in candidates}
    changed = True
    while changed:
        changed = False
        for node in candidates:
            if node.name in result.nodes or node.name in result.absorbed:
                continue
            kind = QDQ_RULES[node.op].kind
            if kind == "absorbed":
                changed |= _try_absorb(node, result, selection, outputs)
            elif kind == "passthrough":
                changed |= _try_passthrough(node, result)
            elif kind == "int8":
                changed |= _try_int8(node, result, selection, allowed)
    return result


def _candidates(graph: gs.Graph, selection: Selection, result: Plan) -> list[gs.Node]:
    candidates = []
    for node in graph.nodes:
        rule = QDQ_RULES.get(node.op)
        if rule is None or node.domain not in ("", "ai.onnx", None):
            continue
        reason = selection.allows(node) if rule.kind != "absorbed" else None
        if reason is None:
            reason = rule.check(node)
            if reason == ACTIVATION_MATMUL and selection.matmul_activations:
                reason = None if _variable_float(node.inputs[1]) else "B is not float32"
        if reason is not None:
            if rule.kind == "core":
                result.skipped.append(Skipped(node.name, "node", reason, node.op))
            continue
        candidates.append(node)
    return candidates


def _activation_inputs(node: gs.Node, rule: QdqRule, selection: Selection) -> list[gs.Tensor]:
    if rule.kind == "core":
        indices = [0]
        if node.op == "MatMul" and not isinstance(node.inputs[1], gs.Constant):
            indices.append(1)
    else:
        indices = list(rule.activations) or list(range(len(node.inputs)))
    return [node.inputs[i] for i in indices if i < len(node.inputs)]


def _try_absorb(node: gs.Node, result: Plan, selection: Selection, outputs: set[str]) -> bool:
    """Relu/Clip(0, hi) whose output is int8: quantize its input with [0, hi] instead."""
    source, out = node.inputs[0], node.outputs[0]
    if not result.quantized(out) and not result.quantized(source):
        return False
    if len(source.outputs) != 1 or source.name in outputs or out.name in outputs:
        return False
    if not isinstance(source, gs.Variable):
        return False
    _, high = clip_bounds(node)
    result.tensors.pop(out.name, None)
    # the Relu lives in this Q from now on: every reader must read its DQ
    result.tensors[source.name] = TensorPlan(source.name, out.name, high=high, all_readers=True)
    for tensor in result.tensors.values():
        if tensor.share == out.name:
            tensor.share = source.name
    if selection.activations == "int8":
        # symmetric int8 cannot clamp at 0: keep the node, shared scale (exact on a
        # symmetric grid), input range taken from the output's statistics
        result.nodes[node.name] = "passthrough"
        result.tensors[out.name] = TensorPlan(out.name, out.name, share=source.name)
        return True
    result.absorbed[node.name] = source.name
    result.alias[out.name] = source.name
    return True


def _try_passthrough(node: gs.Node, result: Plan) -> bool:
    """Data movement whose output is int8: move the Q in front, share its parameters."""
    wanted = [t for t in node.outputs if not t.is_empty()]
    if not wanted or not all(result.quantized(t) for t in wanted):
        return False
    source = node.inputs[0]
    if not isinstance(source, gs.Variable):
        return False
    result.nodes[node.name] = "passthrough"
    name = result.resolve(source.name)
    result.tensors.setdefault(name, TensorPlan(name, name))
    for tensor in wanted:
        result.tensors[tensor.name] = TensorPlan(tensor.name, tensor.name, share=name)
    return True


def _try_int8(node: gs.Node, result: Plan, selection: Selection, allowed: set[str]) -> bool:
    """An op with an integer kernel joins when its output is int8 anyway and each input
    is int8 already or comes out of a node that can produce int8 without adding a
    rounding step (see ``_producible``); such inputs then get their own Q."""
    rule = QDQ_RULES[node.op]
    inputs = _activation_inputs(node, rule, selection)
    if not inputs or not result.quantized(node.outputs[0]):
        return False
    missing = [t for t in inputs if not result.quantized(t)]
    if not all(_producible(t, result, selection, allowed, MAX_PRODUCIBLE_DEPTH) for t in missing):
        return False
    for tensor in missing:
        result.tensors[tensor.name] = TensorPlan(tensor.name, tensor.name)
    result.nodes[node.name] = "int8"
    return True


MAX_PRODUCIBLE_DEPTH = 4


def _producible(
    tensor: gs.Tensor, result: Plan, selection: Selection, allowed: set[str], depth: int
) -> bool:
    """True when ``tensor`` can become int8 for free: its producer is quantized (or an
    int8-capable op whose own inputs are), possibly through an absorbable Relu/Clip —
    e.g. ResNet's last ``Add -> Relu -> GlobalAveragePool``."""
    if result.quantized(tensor):
        return True
    producer = tensor.inputs[0] if tensor.inputs else None
    if depth <= 0 or producer is None or producer.name not in allowed:
        return False
    if producer.name in result.nodes:
        return True
    rule = QDQ_RULES[producer.op]
    if rule.kind == "absorbed":
        source = producer.inputs[0]
        return len(source.outputs) == 1 and _producible(
            source, result, selection, allowed, depth - 1
        )
    if rule.kind == "int8":
        return all(
            _producible(t, result, selection, allowed, depth - 1)
            for t in _activation_inputs(producer, rule, selection)
        )
    return False


# ---------------------------------------------------------------------------- rewrite


Rounder = Callable[[gs.Node, np.ndarray, int, np.ndarray, int], np.ndarray]


def nearest_rounding(
    node: gs.Node, weight: np.ndarray, axis: int, scale: np.ndarray, levels: int = 127
) -> np.ndarray:
    """Round to the nearest level in ``±levels`` (``Rounder``: node, weight, axis, scale,
    levels)."""
    return numerics.requantize_weight(weight, axis, scale, levels)[0]


@dataclass
class RewriteStats:
    qdq_pairs: int = 0
    weights: int = 0
    biases: int = 0
    absorbed: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


class Rewriter:
    """Applies a :class:`Plan` to a graph with the calibrated ranges."""

    def __init__(
        self,
        graph: gs.Graph,
        ranges: Mapping[str, tuple[float, float]],
        activations: ActivationType = "uint8",
        weight_clip: Literal["max", "mse"] = "max",
        rounder: Rounder | None = None,
        weight_levels: int = 127,
        corrections: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.graph = graph
        self.corrections = corrections or {}  # node -> bias correction (bias_correct.py)
        self.weight_levels = weight_levels
        self.ranges = ranges
        self.activations = activations
        self.weight_clip = weight_clip
        self.rounder = rounder or nearest_rounding
        self.names = set(graph.tensors())
        self.params: dict[str, QuantParams] = {}
        self.stats = RewriteStats()
        # id(params) -> (params kept alive so the id stays unique, scale, zero point)
        self._shared: dict[int, tuple[QuantParams, gs.Constant, gs.Constant]] = {}

    def apply(self, plan_: Plan) -> RewriteStats:
        nodes = {n.name: n for n in self.graph.nodes}
        for name in plan_.absorbed:
            self._remove_absorbed(nodes[name])
        self._resolve_params(plan_)
        for name in plan_.core():  # before the rewiring: reads the input's name
            self._quantize_weights(nodes[name])
        producers = {out.name: node for node in self.graph.nodes for out in node.outputs}
        quantized_nodes = set(plan_.nodes)
        tensors = self.graph.tensors()
        for name in plan_.tensors:
            tensor = tensors[name]
            producer = producers.get(name)
            all_readers = plan_.tensors[name].all_readers or (
                producer is not None and producer.name in quantized_nodes
            )
            self._insert_qdq(tensor, self.params[name], quantized_nodes, all_readers)
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return self.stats

    # -- parameters

    def _resolve_params(self, plan_: Plan) -> None:
        for name, tensor in plan_.tensors.items():
            if tensor.share is None:
                lo, hi = self.ranges[tensor.stats]
                if tensor.high < np.inf:
                    hi = min(hi, tensor.high)
                self.params[name] = numerics.activation_params(lo, hi, self.activations)
        for name, tensor in plan_.tensors.items():
            source, seen = tensor, set()
            while source.share is not None and source.share not in seen:
                seen.add(source.share)
                source = plan_.tensors[source.share]
            self.params[name] = self.params[source.name]

    # -- graph edits

    def _fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def _remove_absorbed(self, node: gs.Node) -> None:
        replace_uses(node.outputs[0], node.inputs[0])
        node.inputs.clear()
        node.outputs.clear()
        self.stats.absorbed += 1

    def _constants(self, base: str, params: QuantParams) -> tuple[gs.Constant, gs.Constant]:
        key = id(params)  # tensors sharing parameters share the constants too
        if key not in self._shared:
            scale = gs.Constant(self._fresh(f"{base}_scale"), np.asarray(params.scale, np.float32))
            zero = gs.Constant(self._fresh(f"{base}_zero_point"), np.asarray(params.zero_point))
            self._shared[key] = (params, scale, zero)
        return self._shared[key][1:]

    def _insert_qdq(
        self, tensor: gs.Variable, params: QuantParams, quantized: set[str], all_readers: bool
    ) -> None:
        readers = [c for c in tensor.outputs if all_readers or c.name in quantized]
        is_output = tensor in self.graph.outputs
        if not readers and not (all_readers and is_output):
            return
        scale, zero = self._constants(tensor.name, params)
        qtype = params.zero_point.dtype
        quantized_t = gs.Variable(self._fresh(f"{tensor.name}_quantized"), qtype, tensor.shape)
        if all_readers and is_output:
            # the producer's output edges must all be Q: DQ takes over the output name
            source = gs.Variable(self._fresh(f"{tensor.name}_float"), np.float32, tensor.shape)
            producer = tensor.inputs[0]
            producer.outputs[producer.outputs.index(tensor)] = source
            dequantized = tensor
        else:
            source = tensor
            dequantized = gs.Variable(
                self._fresh(f"{tensor.name}_dequantized"), np.float32, tensor.shape
            )
        replace_uses(tensor, dequantized, readers)
        base = tensor.name
        self.graph.nodes.append(
            gs.Node("QuantizeLinear", self._fresh(f"{base}_QuantizeLinear"),
                    inputs=[source, scale, zero], outputs=[quantized_t])
        )  # fmt: skip
        self.graph.nodes.append(
            gs.Node("DequantizeLinear", self._fresh(f"{base}_DequantizeLinear"),
                    inputs=[quantized_t, scale, zero], outputs=[dequantized])
        )  # fmt: skip
        self.stats.qdq_pairs += 1

    def _quantize_weights(self, node: gs.Node) -> None:
        rule = QDQ_RULES[node.op]
        if rule.weight is None or not isinstance(node.inputs[rule.weight], gs.Constant):
            return
        if node.name in self.corrections:
            bias_correct.apply(node, self.corrections[node.name], rule.bias, self._fresh)
        weight = node.inputs[rule.weight]
        axis = output_axis(node, rule.weight, weight.values.ndim)  # per output channel
        bias = None
        if rule.bias is not None and rule.bias < len(node.inputs):
            candidate = node.inputs[rule.bias]
            bias = candidate if isinstance(candidate, gs.Constant) else None
        values = weight.values
        levels = self.weight_levels
        ratio = (
            numerics.mse_weight_clip(values, axis, levels=levels)
            if self.weight_clip == "mse"
            else None
        )
        params = numerics.weight_params(values, axis, ratio, levels)
        if bias is not None:
            input_scale = float(self.params[node.inputs[0].name].scale)
            if node.op == "Gemm":
                bias_values = bias.values.reshape(-1) * float(node.attrs.get("beta", 1.0))
                node.attrs["beta"] = 1.0
            else:
                bias_values = bias.values.reshape(-1)
            q_bias, bias_params, weight_scale = numerics.quantize_bias(
                bias_values, input_scale, params
            )
            params = numerics.QuantParams(weight_scale, params.zero_point, axis)
            node.inputs[rule.bias] = self.dequantized(bias.name, q_bias, bias_params)
            self.stats.biases += 1
        q = self.rounder(node, values, axis, params.scale, levels)
        self.stats.weight_bytes_before += values.nbytes
        self.stats.weight_bytes_after += q.nbytes + params.scale.nbytes + params.zero_point.nbytes
        node.inputs[rule.weight] = self.dequantized(weight.name, q, params)
        self.stats.weights += 1

    def dequantized(self, base: str, q: np.ndarray, params: QuantParams) -> gs.Variable:
        """A DequantizeLinear of the constant ``q`` (added to the graph); its output."""
        values = gs.Constant(self._fresh(f"{base}_quantized"), q)
        scale, zero = self._constants(base, params)
        out = gs.Variable(self._fresh(f"{base}_dequantized"), np.float32, list(q.shape))
        attrs = {"axis": int(params.axis)} if params.per_channel else {}
        self.graph.nodes.append(
            gs.Node("DequantizeLinear", self._fresh(f"{base}_DequantizeLinear"), attrs,
                    inputs=[values, scale, zero], outputs=[out])
        )  # fmt: skip
        return out


def huge_range_nodes(
    graph: gs.Graph, plan_: Plan, ranges: Mapping[str, tuple[float, float]]
) -> dict[str, str]:
    """Planned nodes that read or write a tensor whose range reaches ``HUGE_RANGE``
    (attention masks filled with -3.4e38): node name -> tensor name. One such value
    stretches a per-tensor scale until every real value rounds to the zero point."""
    huge = {
        name
        for name, tensor in plan_.tensors.items()
        if tensor.share is None
        and max(abs(v) for v in ranges.get(tensor.stats, (0.0, 0.0))) >= HUGE_RANGE
    }
    nodes = {}
    for node in graph.nodes:
        if node.name not in plan_.nodes:
            continue
        for tensor in [*node.inputs, *node.outputs]:
            if plan_.resolve(tensor.name) in huge:
                nodes[node.name] = tensor.name
    return nodes


def activation_tensors(plan_: Plan) -> list[str]:
    """Names whose calibration statistics the plan needs."""
    return sorted(plan_.stats_names())


def describe(plan_: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in plan_.nodes.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def kernels(nodes: Iterable[gs.Node], plan_: Plan) -> dict[str, str]:
    """Node name -> the onnxruntime kernel its rule expects (for the report)."""
    by_name = {n.name: n for n in nodes}
    return {name: QDQ_RULES[by_name[name].op].kernel for name in plan_.nodes if name in by_name}
