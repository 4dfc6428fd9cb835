"""``fold-constants`` — compute what only depends on constants, once (lossless).

Rewrite: every node whose inputs are all constant is evaluated with onnxruntime and
its result stored as an initializer; the nodes that become dead are removed. With
``shapes=true`` (default), ``Shape`` / ``Size`` of a tensor whose shape onnx shape
inference finds static become constants first, and so do ``Gather`` / ``Slice`` that
pick only static dimensions out of a partly dynamic shape (``x.shape[1]`` with a
dynamic batch), so whole shape computations (Shape→Gather→Concat→Reshape) fold.

How: onnx-graphsurgeon's ``Graph.fold_constants`` does the evaluation, called with
``error_ok=False`` (its default swallows every onnxruntime error and folds nothing,
silently). When that batch evaluation fails, the pass does not give up or raise: it
folds node by node in topological order, each node in its own onnxruntime session,
so one op that cannot be evaluated (a custom-domain op, a kernel onnxruntime lacks)
only blocks its own descendants, and the report names it with the error. Failures
are data (``PassResult.skip`` records, ``counts["skipped"]``, one note each), not
exceptions: the graph is only ever changed by replacing a tensor with the value
onnxruntime computed for it, so a failure cannot leave it half-rewritten. Any other
exception propagates and the PassManager rolls the step back. Rounds repeat until
nothing changes (a folded Reshape can make another shape static), so a second run
is a no-op.

Shapes are folded by this pass, not by graphsurgeon's ``fold_shapes``: in
onnx-graphsurgeon 0.6.1 that option also ignores ``Shape``'s ``start``/``end``
attributes (opset 15) and runs a TensorRT-oriented "cast elision" that rewrites
``Cast(int→float) → Mul(0.5) → Cast(int)`` into integer arithmetic (``0.5`` becomes
``0``) — neither is lossless.

Does nothing to (reported as skipped, with the reason, when the inputs
are constant):
- ops with random outputs (RandomNormal/Uniform[Like], Multinomial, Bernoulli,
  Dropout with ``training_mode`` true): folding would freeze one draw (graphsurgeon
  0.6.1 folds them unless told not to);
- ops producing sequences or optionals;
- results larger than ``size_threshold`` bytes (they stay computed at run time), and
  the constant-only nodes that feed them;
- QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear (kept so quantized
  patterns stay recognisable; graphsurgeon's rule, not reported);
- nodes reading an (u)int4 / (u)int8 constant: such constants are compressed weights
  (``share-weights`` codebook indices, quantized weights); folding their ``Cast`` /
  ``Gather`` would store them back as floats and undo the compression;
- nodes with subgraphs when folding falls back to node by node, and the bodies of
  If/Loop/Scan (graphsurgeon does not apply the exclusions above inside them) and
  of model-local functions. An ``If`` with a constant condition is inlined.
A graph output that depends only on constants becomes an initializer listed as an
output (valid since IR 4). Graph inputs are never removed. String constants are kept
as TensorProtos, which graphsurgeon can export (it cannot export numpy strings).

Counts: ``nodes_folded`` (nodes removed: folded, or already dead), ``constants_created``,
``shape_values_folded``, ``skipped``; ``details["folded_ops"]`` by op type.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnxopt import runtime
from onnxopt.errors import first_line
from onnxopt.graph import forget_shapes, is_topologically_sorted
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass
from onnxopt.results import SKIPPED, Skipped, skip_label

log = logging.getLogger(__name__)

RANDOM_OPS = frozenset(
    {
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
        "Multinomial", "Bernoulli",
    }
)  # fmt: skip
NON_TENSOR_OPS = frozenset(
    {
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
        "SplitToSequence", "Optional",
    }
)  # fmt: skip
NEVER_FOLDED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
MAX_ROUNDS = 8
MAX_NOTES = 10
# Constants above this size are given to shape inference as typed inputs, not values:
# their values never decide a shape, and this keeps the inference model small.
SHAPE_INFERENCE_VALUE_LIMIT = 1 << 20


@dataclass
class FoldReport:
    nodes_folded: int = 0
    constants_created: int = 0
    shape_values: int = 0
    folded_ops: Counter = field(default_factory=Counter)
    not_folded: dict[str, Skipped] = field(default_factory=dict)
    batch_errors: list[str] = field(default_factory=list)

    def skip(self, node: gs.Node, reason: str) -> None:
        label = _label(node)
        self.not_folded[label] = Skipped(label, "node", reason, node.op)


@register_pass
class FoldConstantsPass(Pass):
    name = "fold-constants"
    summary = "Evaluate constant-only subgraphs (and static shapes) into initializers."
    lossless = True

    @dataclass
    class Options:
        size_threshold: int = option(
            16 << 20, "do not store folded tensors larger than this many bytes", range=(0, 2**62)
        )
        shapes: bool = option(True, "also fold Shape/Size of tensors with a static shape")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        report = FoldReport()
        if graph.ir_version is not None and graph.ir_version < 4:
            graph.ir_version = 4  # as to_model() exports it; IR 3 needs initializers as inputs
        for _ in range(MAX_ROUNDS):
            if not self._fold_round(graph, report):
                break
        for node in graph.nodes:
            reason = _leftover_reason(node, self.options.size_threshold)
            if reason and _label(node) not in report.not_folded:
                report.skip(node, reason)
        _keep_strings_exportable(graph)
        return _result(report)

    def _fold_round(self, graph: gs.Graph, report: FoldReport) -> bool:
        if not is_topologically_sorted(graph):
            graph.toposort()
        _keep_strings_exportable(graph)
        nodes_before = _count_nodes(graph)
        main_nodes = list(graph.nodes)
        pending = {id(t) for n in graph.nodes for t in n.outputs if isinstance(t, gs.Variable)}
        if self.options.shapes:
            report.shape_values += self._fold_shapes(graph, report)
        try:
            with G_LOGGER.suppress():  # failures are reported below, not printed by gs
                graph.fold_constants(
                    fold_shapes=False,
                    partitioning=None,
                    error_ok=False,
                    # gs does not pass should_exclude_node down to subgraphs, so a
                    # random op in a Loop body would be frozen: leave bodies alone.
                    recurse_subgraphs=False,
                    size_threshold=self.options.size_threshold,
                    should_exclude_node=lambda node: _excluded(node, report),
                    recurse_functions=False,
                )
        except Exception as exc:
            log.debug("fold-constants: batch evaluation failed", exc_info=True)
            error = f"batch evaluation failed, folded node by node: {first_line(exc)}"
            if error not in report.batch_errors:
                report.batch_errors.append(error)
            self._fold_node_by_node(graph, report)
        created = [
            t for t in graph.tensors().values() if isinstance(t, gs.Constant) and id(t) in pending
        ]
        graph.cleanup(remove_unused_graph_inputs=False)
        kept = {id(n) for n in graph.nodes}
        report.folded_ops.update(n.op for n in main_nodes if id(n) not in kept)
        removed = nodes_before - _count_nodes(graph)
        report.nodes_folded += removed
        report.constants_created += len(created)
        return bool(created or removed)

    # ------------------------------------------------------------------ node by node

    def _fold_node_by_node(self, graph: gs.Graph, report: FoldReport) -> None:
        for node in list(graph.nodes):
            if not _foldable_now(node):
                continue
            if _excluded(node, report):
                continue
            if any(True for _ in node.subgraphs()):
                report.skip(node, "has a subgraph; not evaluated on its own")
                continue
            try:
                values = _evaluate_alone(node, graph)
            except Exception as exc:
                report.skip(node, f"onnxruntime could not evaluate it: {first_line(exc)}")
                continue
            nbytes = sum(int(v.nbytes) for v in values.values())
            if nbytes > self.options.size_threshold:
                report.skip(node, f"result is {nbytes} bytes, over size_threshold")
                continue
            for out in node.outputs:
                if not out.is_empty():
                    out.to_constant(values[out.name])
            node.outputs.clear()

    # ------------------------------------------------------------------ shapes

    def _fold_shapes(self, graph: gs.Graph, report: FoldReport) -> int:
        """Turn Shape/Size outputs (and Gather/Slice of static dims) into constants."""
        nodes = [
            n for n in graph.nodes
            if n.op in ("Shape", "Size") and n.outputs and isinstance(n.inputs[0], gs.Variable)
        ]  # fmt: skip
        if not nodes:
            return 0
        dims_of = _inferred_dims(graph, {n.inputs[0].name for n in nodes}, report)
        folded = 0
        for node in nodes:
            dims = dims_of.get(node.inputs[0].name)
            if dims is not None:
                folded += _try_fold_shape(node, dims)
        return folded


# ---------------------------------------------------------------------------- shape helpers


def _try_fold_shape(node: gs.Node, dims: list[int | None]) -> int:
    out = node.outputs[0]
    if node.op == "Size":
        if None in dims:
            return 0
        _make_constant(out, np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64))
        return 1
    rank = len(dims)
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    picked = dims[start:end]  # python slicing clamps like the spec
    if None not in picked:
        _make_constant(out, np.array(picked, dtype=np.int64))
        return 1
    folded = 0
    for consumer in list(out.outputs):
        positions = _static_positions(consumer, out, len(picked))
        if positions is None:
            continue
        values = [picked[p] for p in positions.ravel()]
        if None not in values and consumer.outputs:
            array = np.array(values, dtype=np.int64).reshape(positions.shape)
            _make_constant(consumer.outputs[0], array)
            folded += 1
    return folded


def _static_positions(consumer: gs.Node, shape: gs.Tensor, length: int) -> np.ndarray | None:
    """Which elements of a 1-D shape tensor a Gather/Slice consumer picks, if constant."""
    index = np.arange(length)
    try:
        if consumer.op == "Gather" and consumer.inputs[0] is shape:
            indices = consumer.inputs[1]
            if isinstance(indices, gs.Constant) and int(consumer.attrs.get("axis", 0)) in (0, -1):
                return index[indices.values.astype(np.int64)]
        if consumer.op == "Slice" and consumer.inputs[0] is shape:
            bounds = _slice_bounds(consumer)
            if bounds is not None:
                return index[slice(*bounds)]
    except (IndexError, ValueError):
        return None  # out of range: leave it to onnxruntime's error at run time
    return None


def _slice_bounds(node: gs.Node) -> tuple[int, int, int] | None:
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", [0]), [1]
    else:
        parts = []
        for tensor in node.inputs[1:5]:
            if tensor.is_empty():
                parts.append(None)
            elif isinstance(tensor, gs.Constant):
                parts.append([int(v) for v in tensor.values.ravel()])
            else:
                return None
        parts += [None] * (4 - len(parts))
        starts, ends, axes, steps = parts
        axes, steps = axes or [0], steps or [1]
    if len(starts) != 1 or list(axes) not in ([0], [-1]) or steps[0] == 0:
        return None
    return int(starts[0]), int(ends[0]), int(steps[0])


def _inferred_dims(
    graph: gs.Graph, names: set[str], report: FoldReport
) -> dict[str, list[int | None]]:
    """Dims (None where dynamic) of the tensors ``names``, by onnx shape inference."""
    probe = graph.copy()  # shares weight arrays; only tensor objects are changed below
    for tensor in probe.tensors().values():
        if isinstance(tensor, gs.Constant):
            nbytes = int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
            if nbytes > SHAPE_INFERENCE_VALUE_LIMIT:
                tensor.to_variable(shape=list(tensor.shape))
                tensor.type = "tensor_type"  # graphsurgeon 0.6's to_variable leaves it unset
                probe.inputs.append(tensor)
    graph_inputs = {id(t) for t in probe.inputs}
    # Declared intermediate shapes may be stale: let inference recompute them.
    forget_shapes(t for t in probe.tensors().values() if id(t) not in graph_inputs)
    try:
        model = gs.export_onnx(probe, do_type_check=False)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        report.batch_errors.append(f"shape inference failed, shapes not folded: {first_line(exc)}")
        return {}
    found: dict[str, list[int | None]] = {}
    graph_info = inferred.graph
    for info in [*graph_info.input, *graph_info.value_info, *graph_info.output]:
        if info.name in names and info.type.tensor_type.HasField("shape"):
            found[info.name] = [
                d.dim_value if d.HasField("dim_value") else None
                for d in info.type.tensor_type.shape.dim
            ]
    return found


# ---------------------------------------------------------------------------- node helpers


def _excluded(node: gs.Node, report: FoldReport) -> bool:
    """True (and recorded) for constant-input nodes that must stay computed."""
    reason = None
    if node.op in RANDOM_OPS:
        reason = "random output: folding would freeze one draw"
    elif node.op == "Dropout" and _dropout_may_train(node):
        reason = "Dropout in training mode has a random output"
    elif node.op in NON_TENSOR_OPS:
        reason = "produces a sequence or optional, not a tensor"
    elif any(_is_low_bit_constant(t) for t in node.inputs):
        reason = "reads low-bit stored weights (codebook indices, quantized): folding inflates them"
    if reason is None:
        return False
    report.skip(node, reason)
    return True


LOW_BIT_DTYPES = frozenset(
    {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
)


def _is_low_bit_constant(tensor: gs.Tensor) -> bool:
    if not isinstance(tensor, gs.Constant):
        return False
    dtype = tensor.export_dtype
    if isinstance(dtype, int):
        return dtype in LOW_BIT_DTYPES
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in LOW_BIT_DTYPES
    except (TypeError, KeyError, ValueError):
        return False


def _dropout_may_train(node: gs.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return False
    mode = node.inputs[2]
    return not isinstance(mode, gs.Constant) or bool(np.any(mode.values))


def _foldable_now(node: gs.Node) -> bool:
    """Has outputs, only constant inputs, and is not one of the ops never folded."""
    if not node.outputs or node.op in NEVER_FOLDED_OPS:
        return False
    if node.op == "Constant":  # string / sparse values: graphsurgeon keeps these as nodes
        return False
    return all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty())


def _leftover_reason(node: gs.Node, threshold: int) -> str | None:
    """Why a node whose inputs are all constant is still in the graph after folding."""
    if not _foldable_now(node):
        return None
    if any(True for _ in node.subgraphs()):
        return "its subgraph reads tensors that are not constant"
    return f"its result, or one computed from it, exceeds size_threshold={threshold} bytes"


def _evaluate_alone(node: gs.Node, graph: gs.Graph) -> dict[str, np.ndarray]:
    """Run ``node`` by itself in onnxruntime on its constant inputs."""
    constants: dict[str, gs.Constant] = {}
    inputs = []
    for tensor in node.inputs:
        if tensor.is_empty():
            inputs.append(gs.Variable.empty())
        else:
            if tensor.name not in constants:
                constants[tensor.name] = gs.Constant(tensor.name, tensor.values)
                _keep_exportable(constants[tensor.name])
            inputs.append(constants[tensor.name])
    outputs = [gs.Variable.empty() if t.is_empty() else gs.Variable(t.name) for t in node.outputs]
    alone = gs.Node(
        node.op, node.name, dict(node.attrs), inputs=inputs, outputs=outputs, domain=node.domain
    )
    wanted = [t for t in outputs if not t.is_empty()]
    mini = gs.Graph(
        nodes=[alone], outputs=wanted, opset=graph.opset, import_domains=graph.import_domains,
        functions=graph.functions, ir_version=graph.ir_version,  # >= 4, set by run()
    )  # fmt: skip
    session = runtime.make_session(gs.export_onnx(mini, do_type_check=False))
    names = [t.name for t in wanted]
    return dict(zip(names, session.run(names, {})))


def _label(node: gs.Node) -> str:
    """The node's name, or its first output for unnamed nodes."""
    return node.name or f"<{node.op} -> {node.outputs[0].name}>"


def _keep_strings_exportable(graph: gs.Graph) -> None:
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            _keep_exportable(tensor)


def _keep_exportable(tensor: gs.Constant) -> None:
    """Hold string values as a TensorProto: graphsurgeon exports numpy arrays as raw
    bytes, which onnx refuses for strings (and reading ``.values`` of a lazily loaded
    string tensor turns it back into a numpy array)."""
    if tensor.dtype.kind in "OUS":
        proto = numpy_helper.from_array(np.asarray(tensor.values).astype(object), tensor.name)
        tensor.values = LazyValues(proto)


def _make_constant(tensor: gs.Tensor, values: np.ndarray) -> None:
    tensor.to_constant(values)
    tensor.inputs.clear()  # detaches the producer; cleanup drops it if nothing else uses it


def _count_nodes(graph: gs.Graph) -> int:
    total = len(graph.nodes)
    for node in graph.nodes:
        total += sum(len(sub.nodes) for sub in node.subgraphs(recursive=True))
    return total


def _result(report: FoldReport) -> PassResult:
    not_folded = sorted(report.not_folded.values(), key=lambda r: (r.op, r.subject))
    notes = [f"not folded: {skip_label(r)}" for r in not_folded]
    if len(notes) > MAX_NOTES:
        notes = [*notes[:MAX_NOTES], f"... and {len(notes) - MAX_NOTES} more (see details)"]
    notes += report.batch_errors[:1]
    for note in notes:
        log.info("fold-constants: %s", note)
    counts = {
        "nodes_folded": report.nodes_folded,
        "constants_created": report.constants_created,
        "shape_values_folded": report.shape_values,
        SKIPPED: len(not_folded),
    }
    details = {
        "folded_ops": dict(sorted(report.folded_ops.items())),
        "batch_errors": report.batch_errors,
    }
    changed = bool(report.nodes_folded or report.constants_created)
    return PassResult(changed, counts, details, notes, skipped=not_folded)
