"""What of a student model trains, and the graph edits its *training copy* needs.

Trainable parameters (:func:`trainable_parameters`): float32 initializers that play
the role of a learned parameter —

- weights and biases of Conv / ConvTranspose / Gemm / MatMul and Gather tables
  (``onnxopt.graph.weight_refs``), the scale and bias of BatchNormalization,
  LayerNormalization, InstanceNormalization and GroupNormalization, PRelu slopes,
  the W / R / B tensors of LSTM / GRU / RNN;
- a constant operand of Add / Mul with more than one element whose other operand is
  not a graph input: biases of MatMul+Add, positional embeddings, layer scales (but
  not input preprocessing such as ``Mul(input, std)``);
- also when the constant reaches that input through Reshape / Transpose / Identity /
  Squeeze / Unsqueeze / Flatten / Cast / Expand or the data input of a Gather, so a
  ``share-weights`` codebook (``W = Gather(codebook, Cast(indices))``) trains its
  codebook values.

Everything else is frozen: integer tensors (codebook indices, shapes, axes), scalar
constants (GELU's ``sqrt(2)``, attention scales), BatchNormalization running
statistics, float16/bfloat16/float64 tensors (reported in ``notes``).

Training edits (:func:`edit_for_training`) make onnxruntime-training compute what
inference computes; each is checked numerically by the caller:

- inference BatchNormalization becomes ``(x - mean) * (scale / sqrt(var + eps)) + B``
  with the same parameter tensors: onnxruntime-training would otherwise run it in
  training mode (batch statistics) while the exported model uses running statistics;
- LayerNormalization gets its optional Mean / InvStdDev outputs, which
  onnxruntime-training's gradient of LayerNormalization requires;
- ``Cast`` of a constant integer tensor to an integer type is folded (uint4 codebook
  indices, which the training runtime cannot cast).

Quantized students (QuantizeLinear / DequantizeLinear, QLinear*, *Integer ops,
MatMulNBits...) are refused by :func:`refuse_quantized`: distill before quantizing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import PassCannotRun, UsageError
from onnxopt.graph import weight_refs

log = logging.getLogger(__name__)

NORM_PARAMS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
    "LSTM": (1, 2, 3),  # W, R, B (trained through the unrolled training form)
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
}
AFFINE_OPS = ("Add", "Mul")
# op -> index of the input that carries the value through unchanged (up to layout)
PASS_THROUGH: dict[str, int] = {
    "Reshape": 0,
    "Transpose": 0,
    "Identity": 0,
    "Squeeze": 0,
    "Unsqueeze": 0,
    "Flatten": 0,
    "Cast": 0,
    "Expand": 0,
    "Gather": 0,
}
QUANTIZED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "MatMulNBits",
    "QGemm",
    "QAttention",
    "DynamicQuantizeMatMul",
)
_INT_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def refuse_quantized(graph: gs.Graph, what: str = "student") -> None:
    """UsageError when ``graph`` holds quantized ops (training needs float weights)."""
    found = Counter(
        n.op for n in graph.nodes if n.op in QUANTIZED_OPS or n.op.startswith("QLinear")
    )
    if found:
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(found.items()))
        raise UsageError(
            f"the {what} model is quantized ({ops}); distillation trains float weights: "
            "distill before quantizing (e.g. put distill(...) before quantize-int8)"
        )


# ---------------------------------------------------------------------------- selection


def trainable_parameters(graph: gs.Graph) -> tuple[list[str], list[str]]:
    """Names of the initializers that train, plus notes about frozen float tensors."""
    graph_io = {t.name for t in (*graph.inputs, *graph.outputs)}
    found: dict[str, gs.Constant] = {}
    for tensor in _parameter_slots(graph):
        source = _source_constant(tensor)
        if source is not None and source.name not in graph_io:
            found.setdefault(source.name, source)
    names, notes = [], []
    for name, tensor in found.items():
        dtype = np.dtype(_dtype(tensor))
        if dtype == np.float32:
            names.append(name)
        elif dtype.kind == "f" or str(dtype) == "bfloat16":
            notes.append(f"{name}: {dtype} parameter frozen (only float32 trains)")
    return sorted(names), notes


def _parameter_slots(graph: gs.Graph) -> Iterable[gs.Tensor]:
    for ref in weight_refs(graph):
        yield ref.tensor
    inputs = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for index in NORM_PARAMS.get(node.op, ()):
            if index < len(node.inputs):
                yield node.inputs[index]
        if node.op in AFFINE_OPS and len(node.inputs) == 2:
            for index, tensor in enumerate(node.inputs):
                other = node.inputs[1 - index]
                if _from_graph_input(other, inputs):
                    continue
                constant = _source_constant(tensor)
                if constant is not None and int(np.prod(constant.shape or [1])) > 1:
                    yield tensor
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            for tensor in node.inputs[:3]:  # weights rebuilt by a Gather/Reshape chain
                if isinstance(tensor, gs.Variable) and _source_constant(tensor) is not None:
                    yield tensor


def _view_of(tensor: gs.Tensor, stop, depth: int = 8) -> gs.Tensor | None:
    """The first tensor up ``tensor``'s chain of pass-through producers (Reshape,
    Gather of data...) for which ``stop`` holds, within ``depth`` steps; else None."""
    for _ in range(depth):
        if stop(tensor):
            return tensor
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in PASS_THROUGH:
            return None
        node = tensor.inputs[0]
        tensor = node.inputs[PASS_THROUGH[node.op]]
    return None


def _source_constant(tensor: gs.Tensor) -> gs.Constant | None:
    """The constant ``tensor`` is a (reshaped, gathered...) view of, if any."""
    return _view_of(tensor, lambda t: isinstance(t, gs.Constant))


def _from_graph_input(tensor: gs.Tensor, inputs: set[int]) -> bool:
    return _view_of(tensor, lambda t: id(t) in inputs) is not None


def _dtype(tensor: gs.Constant):
    # export_dtype covers sub-byte / bfloat16 tensors whose numpy values are wider
    return getattr(tensor, "export_dtype", None) or tensor.values.dtype


# ---------------------------------------------------------------------------- edits


def edit_for_training(graph: gs.Graph) -> dict[str, int]:
    """Apply the training edits in place; return how many of each were made."""
    counts = {
        "batchnorm_decomposed": _decompose_batchnorms(graph),
        "layernorm_stats_exposed": _expose_layernorm_stats(graph),
        "integer_casts_folded": _fold_integer_casts(graph),
    }
    graph.cleanup().toposort()
    return {k: v for k, v in counts.items() if v}


def _decompose_batchnorms(graph: gs.Graph) -> int:
    batchnorms = [n for n in graph.nodes if n.op == "BatchNormalization"]
    return sum(_try_decompose_batchnorm(graph, node) for node in batchnorms)


def _try_decompose_batchnorm(graph: gs.Graph, node: gs.Node) -> bool:
    """``y = (x - mean) * (scale / sqrt(var + eps)) + B``, params reshaped to [C, 1, ...]."""
    if node.attrs.get("training_mode", 0) or len(node.outputs) != 1:
        return False
    x, scale, bias, mean, var = node.inputs[:5]
    rank = _rank(x)
    if rank is None:
        raise PassCannotRun(
            f"BatchNormalization {node.name!r}: the rank of its input {x.name!r} is "
            "unknown, so it cannot be rewritten for training; export the model with "
            "static ranks or fold it first (fold-batchnorm)"
        )
    prefix = f"{node.name or node.outputs[0].name}/train"
    channels = int(scale.shape[0]) if scale.shape else -1
    dims = np.array([channels] + [1] * (rank - 2), np.int64)
    shape = gs.Constant(f"{prefix}/shape", dims)
    epsilon = np.array(node.attrs.get("epsilon", 1e-5), dtype=np.float32)
    eps = gs.Constant(f"{prefix}/epsilon", epsilon)
    s, b, m, v, std, factor, centered, scaled, added = (
        gs.Variable(f"{prefix}/{name}", dtype=np.float32)
        for name in ("scale", "bias", "mean", "var", "std", "factor", "centered", "x", "eps")
    )
    y = node.outputs[0]
    node.outputs = []
    node.inputs = []
    graph.nodes += [
        gs.Node("Reshape", f"{prefix}/Reshape_scale", inputs=[scale, shape], outputs=[s]),
        gs.Node("Reshape", f"{prefix}/Reshape_bias", inputs=[bias, shape], outputs=[b]),
        gs.Node("Reshape", f"{prefix}/Reshape_mean", inputs=[mean, shape], outputs=[m]),
        gs.Node("Reshape", f"{prefix}/Reshape_var", inputs=[var, shape], outputs=[v]),
        gs.Node("Add", f"{prefix}/AddEps", inputs=[v, eps], outputs=[added]),
        gs.Node("Sqrt", f"{prefix}/Sqrt", inputs=[added], outputs=[std]),
        gs.Node("Div", f"{prefix}/Div", inputs=[s, std], outputs=[factor]),
        gs.Node("Sub", f"{prefix}/Sub", inputs=[x, m], outputs=[centered]),
        gs.Node("Mul", f"{prefix}/Mul", inputs=[centered, factor], outputs=[scaled]),
        gs.Node("Add", f"{prefix}/Add", inputs=[scaled, b], outputs=[y]),
    ]
    return True


def _rank(tensor: gs.Tensor) -> int | None:
    """The rank of ``tensor``: inferred, or that of the Conv weight that produced it
    (shape inference loses ranks behind Shape-computed Reshapes, as in PP-OCR rec)."""
    if tensor.shape is not None:
        return len(tensor.shape)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op in ("Conv", "ConvTranspose"):
        weight = producer.inputs[1]
        if weight.shape is not None:
            return len(weight.shape)
    return None


def _expose_layernorm_stats(graph: gs.Graph) -> int:
    count = 0
    for node in graph.nodes:
        if node.op == "LayerNormalization" and len(node.outputs) == 1:
            prefix = node.name or node.outputs[0].name
            node.outputs.append(gs.Variable(f"{prefix}/train_mean", dtype=np.float32))
            node.outputs.append(gs.Variable(f"{prefix}/train_inv_std", dtype=np.float32))
            count += 1
    return count


def _fold_integer_casts(graph: gs.Graph) -> int:
    count = 0
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Cast" or not isinstance(node.inputs[0], gs.Constant):
            continue
        out = node.outputs[0]
        target = node.attrs.get("to")
        if target not in _INT_TYPES or not _is_integer(node.inputs[0]) or id(out) in outputs:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(target)
        folded = gs.Constant(out.name, np.asarray(node.inputs[0].values).astype(dtype))
        for consumer in list(out.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    consumer.inputs[i] = folded
        node.outputs.clear()
        count += 1
    return count


def _is_integer(tensor: gs.Constant) -> bool:
    name = str(_dtype(tensor))
    return "int" in name and "float" not in name
