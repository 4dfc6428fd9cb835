"""The student's *training copy* for the adjunct, and the way back.

onnx<1.18 in the adjunct reads IR version <= 10 and opsets <= 21. :func:`prepare`
turns a student into a model it can train:

1. import through ``onnxopt.graph.to_graph`` (Constant-node weights become
   initializers); the exported result is the *base* the trained weights go back into;
2. refuse quantized students, pick the trainable initializers (minus those matched by
   the ``freeze`` globs) and apply the training edits (:mod:`onnxopt.train.student`);
3. convert the default-domain opset with ``onnx.version_converter``: above 21 down to
   21, below 13 up to 13 (the loss block uses opset-13 semantics of Softmax /
   SoftmaxCrossEntropyLoss); 13-21 is left alone. The IR version is lowered to 10
   when higher (tensor types newer than IR 10 are refused);
4. op coverage (:mod:`onnxopt.train.coverage`): every node on the trainable path whose
   op onnxruntime-training cannot differentiate is replaced by its training rewrite
   (:mod:`onnxopt.train.rewrites`); one without a rewrite stops here with
   :class:`~onnxopt.train.coverage.NoGradientError` (op, node, position, ``freeze=``);
5. validate: ``onnx.checker``, every trainable initializer still present with the same
   shape, and the copy's outputs equal the base's in onnxruntime (optimizations off)
   on the given samples within ``atol=1e-5, rtol=1e-4``. Any failure is an error that
   names the step; nothing is trained on an unverified conversion.

:func:`restore` writes trained values back into the *base* by initializer name, so
the result has the student's own graph, opset and IR version — only float weights
differ. Names, shapes and dtypes must match exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import graph as graph_utils
from onnxopt import runtime
from onnxopt.check import LOSSLESS_BUDGET, compare_outputs
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.model import opset_version
from onnxopt.protos import main_graph_tensors
from onnxopt.train import coverage as op_coverage
from onnxopt.train import rewrites
from onnxopt.train import student as student_graph

log = logging.getLogger(__name__)

MAX_IR = 10
MAX_OPSET = 21
MIN_OPSET = 13
MAX_TENSOR_TYPE = onnx.TensorProto.UINT4  # INT4 = 22, UINT4 = 21: newest types of IR 10


@dataclass
class TrainingCopy:
    """A student ready for the adjunct, and the base its trained weights go back into."""

    model: onnx.ModelProto
    base: onnx.ModelProto
    trainable: list[str]
    opset: tuple[int, int]  # (student's, training copy's)
    ir_version: tuple[int, int]
    edits: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    coverage: op_coverage.Coverage | None = None


def prepare(
    student: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    targets: Sequence[str] | None = None,
    freeze: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
) -> TrainingCopy:
    """Build and validate the training copy of ``student`` (see the module docstring).

    ``targets``: the distilled outputs (default: all); ``freeze``: glob patterns of
    tensor names that stay frozen although they could train; ``input_shapes``: the
    shapes the training data has (ints fix a dimension, strings leave it dynamic).
    """
    graph = graph_utils.to_graph(student)
    base = graph_utils.to_model(graph.copy(), student)
    student_graph.refuse_quantized(graph)
    trainable, notes = student_graph.trainable_parameters(graph)
    trainable, frozen = op_coverage.select_frozen(trainable, freeze)
    if not trainable:
        raise UsageError(
            "the student has no trainable float32 parameters (weights of Conv/Gemm/MatMul, "
            "normalization scales, biases...)"
            + (" left after freeze=" if frozen else "")
            + ": nothing to distill"
        )
    untyped = graph_utils.to_model(graph, student)
    _fix_input_shapes(untyped, input_shapes or {})
    typed = onnx.shape_inference.infer_shapes(untyped, data_prop=True)
    graph = graph_utils.to_graph(typed)
    edits = student_graph.edit_for_training(graph)
    edited = graph_utils.to_model(graph, student)
    original_opset = opset_version(base) or MIN_OPSET
    model, target = _convert_opset(edited, original_opset)
    outputs = list(targets) if targets else [o.name for o in model.graph.output]
    model, coverage = _cover(model, trainable, outputs)
    coverage.frozen = frozen
    ir = (base.ir_version, min(base.ir_version, MAX_IR))
    _lower_ir(model, ir[1])
    _check(model, trainable, base, samples)
    if target != original_opset:
        notes.append(f"trained at opset {target} (student has opset {original_opset})")
    for op, count in sorted(coverage.rewritten.items()):
        notes.append(
            f"training rewrite: {op} x{count} (differentiable form; the output keeps {op})"
        )
    for op, count in sorted(coverage.by_status("unknown").items()):
        notes.append(f"{op} x{count} on the trainable path was never probed for a gradient")
    if frozen:
        notes.append(f"frozen by freeze=: {len(frozen)} tensor(s)")
    return TrainingCopy(
        model, base, trainable, (original_opset, target), ir, edits, notes, coverage
    )


def _fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | str]]) -> None:
    """Give the training copy's inputs the data's static dimensions: onnxruntime-training
    1.19.2 crashes (SIGSEGV) in MaxPool's gradient when the spatial dimensions are
    symbolic, and static shapes let the rewrites see sequence lengths."""
    for value in model.graph.input:
        shape = shapes.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            continue
        for dim, size in zip(dims, shape):
            if isinstance(size, int) and not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = size
    del model.graph.value_info[:]  # re-inferred from the fixed inputs


def _cover(
    model: onnx.ModelProto, trainable: Sequence[str], targets: Sequence[str]
) -> tuple[onnx.ModelProto, op_coverage.Coverage]:
    """Classify the trainable path; rewrite what needs it; raise where nothing helps."""
    typed = onnx.shape_inference.infer_shapes(model)
    graph = graph_utils.to_graph(typed)
    graph.toposort()
    path = op_coverage.trainable_path(graph, trainable, targets)
    nodes = []
    for position, node, upstream in path:
        status, reason = op_coverage.classify(node, rewrites.why_not)
        nodes.append(op_coverage.PathNode(node.op, node.name, position, status, reason, upstream))
    coverage = op_coverage.Coverage(nodes, len(graph.nodes))
    blocked = [n for n in nodes if n.status == "none"]
    if blocked:
        raise op_coverage.no_gradient_error(blocked[0], len(graph.nodes), trainable)
    rewritten = [node for (_, node, _), n in zip(path, nodes) if n.status == "rewrite"]
    for node in rewritten:
        coverage.rewritten[node.op] = coverage.rewritten.get(node.op, 0) + 1
        if not rewrites.rewrite(graph, node):
            raise ModelError(f"the training rewrite of {node.op} {node.name!r} failed to apply")
    if not rewritten:
        return model, coverage
    graph.cleanup().toposort()
    return graph_utils.to_model(graph, model), coverage


def _convert_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, int]:
    target = min(max(opset, MIN_OPSET), MAX_OPSET)
    if target == opset:
        return model, opset
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        raise UsageError(
            f"cannot convert the student from opset {opset} to opset {target} for "
            f"onnxruntime-training (which reads opsets {MIN_OPSET}-{MAX_OPSET} here): "
            + first_line(exc, 10_000)
        ) from None
    return converted, target


def _lower_ir(model: onnx.ModelProto, ir: int) -> None:
    newest = max((t.data_type for t in main_graph_tensors(model)), default=0)
    if newest > MAX_TENSOR_TYPE:
        name = onnx.TensorProto.DataType.Name(newest)
        raise UsageError(
            f"the student uses tensor type {name}, newer than ONNX IR {MAX_IR} that "
            "onnxruntime-training reads; distill before converting weights to it"
        )
    model.ir_version = ir


def _check(model, trainable, base, samples) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(
            "the training copy of the student fails onnx.checker: " + first_line(exc, 10_000)
        ) from None
    names = {t.name: tuple(t.dims) for t in model.graph.initializer}
    original = {t.name: tuple(t.dims) for t in base.graph.initializer}
    lost = [n for n in trainable if names.get(n) != original.get(n)]
    if lost:
        raise ModelError(
            f"converting the student renamed or reshaped trainable tensors: {', '.join(lost[:5])}"
        )
    if not samples:
        raise UsageError("no samples to validate the student's conversion with")
    reference = runtime.run_samples(runtime.make_session(base), samples)
    try:
        got = runtime.run_samples(runtime.make_session(model), samples)
    except Exception as exc:
        raise ModelError(
            "onnxruntime cannot run the training copy of the student: " + first_line(exc, 10_000)
        ) from None
    metrics = compare_outputs(reference, got, LOSSLESS_BUDGET.tolerance)
    problems = LOSSLESS_BUDGET.violations(metrics)
    if problems:
        raise ModelError(
            "the training copy of the student does not compute what the student computes "
            "(conversion or training edits changed it): " + "; ".join(problems)
        )


def restore(base: onnx.ModelProto, params: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``base`` whose initializers named in ``params`` hold the new values."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    remaining = dict(params)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name not in remaining:
            continue
        value = np.asarray(remaining.pop(tensor.name))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if tuple(value.shape) != tuple(tensor.dims) or value.dtype != dtype:
            raise ModelError(
                f"trained tensor {tensor.name!r} is {value.dtype}{list(value.shape)}, the "
                f"student's is {np.dtype(dtype)}{list(tensor.dims)}"
            )
        if not np.all(np.isfinite(value)):
            raise ModelError(f"training produced non-finite values in {tensor.name!r}")
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    if remaining:
        raise ModelError(f"trained tensors not in the student: {', '.join(sorted(remaining))}")
    return model
