"""Differentiable forms of ops onnxruntime-training cannot train through (training only).

Each rewrite replaces one node of the student's *training copy* by ops that have a CPU
gradient in onnxruntime-training 1.19.2 and compute the same values (checked on the
caller's samples by ``convert.prepare``, and per rewrite by the tests). The trained
tensors keep their names and shapes (a weight is only ever read through Reshape /
Split nodes), so the trained values go back into the student's
original graph and the exported model keeps its ops.

=====================  ==========================================================
op                     training form
=====================  ==========================================================
HardSigmoid            ``Clip(x * alpha + beta, 0, 1)``
HardSwish              ``x * Clip(x / 6 + 1/2, 0, 1)``
PRelu                  ``Relu(x) + slope * Min(x, 0)``
Softplus               ``Relu(x) + Log(1 + Exp(-|x|))`` (stable for large x)
Elu                    ``Relu(x) + alpha * (Exp(Min(x, 0)) - 1)``
Sum, Mean (variadic)   a chain of Add (times 1/n for Mean)
Resize                 nearest, constant integer scales, a coordinate mode where
                       that means repeating each element:
                       ``Reshape(Expand(Unsqueeze(x)), Shape(x) * scales)``
AveragePool            no ceil_mode or dilations, pads only with count_include_pad:
                       a depthwise Conv with constant 1/(kh*kw) weights (its own
                       gradient crashes with a symbolic batch; PP-OCR rec)
ConvTranspose          2-D, kernel == stride, no padding or dilation, group 1 (the
                       usual learned x2 upsampling): ``MatMul`` on the channels
                       and a pixel-shuffle of Reshape / Transpose
LSTM                   forward, static sequence length, default activations, no
                       peepholes, clip or input_forget: unrolled into Gemm /
                       Sigmoid / Tanh per time step
=====================  ==========================================================

Not rewritten (distill names them and offers ``freeze=``): Einsum, ReduceMax /
ReduceMin / ReduceProd, GlobalMaxPool, Resize in linear / cubic mode or with sizes,
GRU, bidirectional LSTM, Pad in reflect / edge mode, Round / Floor / Sign / Mod, ...
Ops that need no rewrite (probed): Erf, Gelu, Where, Clip with tensor bounds,
ReduceMean with axes as attribute or input, Pad in constant mode, LayerNormalization
(once it exposes its statistics, a training edit of ``student.py``).

Every rewrite targets opsets 13-21 (the training copy's range). It is a ``check``
(``None`` when it applies to a node, else the reason it does not) and a ``build`` that
appends the replacing nodes to a :class:`_Builder`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

Check = Callable[[gs.Node], "str | None"]
Build = Callable[["_Builder", gs.Node], None]


class Rewrite(NamedTuple):
    check: Check  # None when the rewrite applies to the node, else why not
    build: Build  # appends the nodes that replace it


REWRITES: dict[str, Rewrite] = {}


def _applies(node: gs.Node) -> str | None:
    return None


def training_rewrite(op: str, check: Check = _applies):
    """Register ``build(b, node)`` as the training form of ``op``, for the nodes on
    which ``check(node)`` returns None."""

    def register(build: Build) -> Build:
        if op in REWRITES:
            raise ValueError(f"duplicate training rewrite for {op}")
        REWRITES[op] = Rewrite(check, build)
        return build

    return register


def why_not(node: gs.Node) -> str | None:
    """None when a rewrite applies to ``node``; else why not ("" when none exists)."""
    entry = REWRITES.get(node.op)
    return "" if entry is None else entry.check(node)


def rewrite(graph: gs.Graph, node: gs.Node) -> bool:
    """Replace ``node`` by its training form; False when no rewrite applies."""
    entry = REWRITES.get(node.op)
    if entry is None or entry.check(node) is not None:
        return False
    b = _Builder(graph, node)
    entry.build(b, node)
    b.replace(node)
    return True


# ---------------------------------------------------------------------------- building


class _Builder:
    """Appends nodes that replace ``node``; the last one writes the node's output."""

    _ids = itertools.count()

    def __init__(self, graph: gs.Graph, node: gs.Node) -> None:
        self.graph = graph
        self.prefix = f"{node.name or node.outputs[0].name}/train"
        self.nodes: list[gs.Node] = []

    def const(self, value, dtype=np.float32) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/c{next(self._ids)}", np.asarray(value, dtype=dtype))

    def ints(self, value) -> gs.Constant:
        return self.const(value, np.int64)

    def op(self, op: str, inputs, out: gs.Variable | None = None, dtype=np.float32, **attrs):
        out = out or gs.Variable(f"{self.prefix}/{op}_{next(self._ids)}", dtype=dtype)
        self.nodes.append(
            gs.Node(op, f"{self.prefix}/{op}_{next(self._ids)}", attrs, list(inputs), [out])
        )
        return out

    def split(self, tensor: gs.Tensor, sizes: list[int], axis: int) -> list[gs.Variable]:
        outs = [gs.Variable(f"{self.prefix}/Split_{next(self._ids)}", np.float32) for _ in sizes]
        name = f"{self.prefix}/Split_{next(self._ids)}"
        self.nodes.append(gs.Node("Split", name, {"axis": axis}, [tensor, self.ints(sizes)], outs))
        return outs

    def replace(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.extend(self.nodes)


def _const_value(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _single_output(node: gs.Node) -> str | None:
    return None if len(node.outputs) == 1 else f"{len(node.outputs)} outputs"


def _first_failure(checks: list[tuple[bool, str]]) -> str | None:
    """The reason of the first check that is not ok; None when all are."""
    return next((reason for ok, reason in checks if not ok), None)


# ---------------------------------------------------------------------------- activations


@training_rewrite("HardSigmoid")
def _hard_sigmoid(b: _Builder, node: gs.Node) -> None:
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    scaled = b.op("Add", [b.op("Mul", [node.inputs[0], b.const(alpha)]), b.const(beta)])
    b.op("Clip", [scaled, b.const(0.0), b.const(1.0)], out=node.outputs[0])


@training_rewrite("HardSwish")
def _hard_swish(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    gate = b.op("Add", [b.op("Mul", [x, b.const(1.0 / 6.0)]), b.const(0.5)])
    gate = b.op("Clip", [gate, b.const(0.0), b.const(1.0)])
    b.op("Mul", [x, gate], out=node.outputs[0])


@training_rewrite("PRelu")
def _prelu(b: _Builder, node: gs.Node) -> None:
    x, slope = node.inputs[:2]
    _relu_plus(b, node, x, b.op("Mul", [slope, b.op("Min", [x, b.const(0.0)])]))


def _relu_plus(b: _Builder, node: gs.Node, x: gs.Tensor, rest: gs.Tensor) -> None:
    """``node``'s output becomes Relu(x) + rest (PRelu, Softplus, Elu)."""
    b.op("Add", [b.op("Relu", [x]), rest], out=node.outputs[0])


@training_rewrite("Softplus")
def _softplus(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    tail = b.op("Exp", [b.op("Neg", [b.op("Abs", [x])])])
    _relu_plus(b, node, x, b.op("Log", [b.op("Add", [tail, b.const(1.0)])]))


@training_rewrite("Elu")
def _elu(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    negative = b.op("Sub", [b.op("Exp", [b.op("Min", [x, b.const(0.0)])]), b.const(1.0)])
    _relu_plus(b, node, x, b.op("Mul", [negative, b.const(node.attrs.get("alpha", 1.0))]))


def _has_inputs(node: gs.Node) -> str | None:
    return None if any(t.name for t in node.inputs) else "no inputs"


def _add_up(b: _Builder, node: gs.Node, mean: bool) -> None:
    inputs = [t for t in node.inputs if t.name]
    if len(inputs) == 1:
        b.op("Identity", inputs, out=node.outputs[0])
        return
    total = inputs[0]
    for index, tensor in enumerate(inputs[1:], start=2):
        last = index == len(inputs) and not mean
        total = b.op("Add", [total, tensor], out=node.outputs[0] if last else None)
    if mean:
        b.op("Mul", [total, b.const(1.0 / len(inputs))], out=node.outputs[0])


@training_rewrite("Sum", check=_has_inputs)
def _sum(b: _Builder, node: gs.Node) -> None:
    _add_up(b, node, mean=False)


@training_rewrite("Mean", check=_has_inputs)
def _mean(b: _Builder, node: gs.Node) -> None:
    _add_up(b, node, mean=True)


# ---------------------------------------------------------------------------- resampling

# (coordinate_transformation_mode, nearest_mode) pairs under which an integer scale s
# maps output index i to input index floor(i / s): each element repeated s times.
REPEATING_MODES = {
    ("asymmetric", "floor"),
    ("asymmetric", "round_prefer_floor"),
    ("half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_floor"),
}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _resize_check(node: gs.Node) -> str | None:
    mode = _text(node.attrs.get("mode", "nearest"))
    coords = _text(node.attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(node.attrs.get("nearest_mode", "round_prefer_floor"))
    if mode != "nearest":
        return f"mode={mode} (only nearest is rewritten)"
    if (coords, nearest) not in REPEATING_MODES:
        return f"coordinate_transformation_mode={coords}, nearest_mode={nearest}"
    if node.attrs.get("axes") is not None:
        return "the axes attribute"
    scales = _const_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if scales is None or scales.size == 0:
        return "scales are not a constant (sizes, or computed at run time)"
    if len(node.inputs) > 3 and node.inputs[3].name:
        return "sizes are given"
    factors = _resize_factors(scales)
    if np.any(factors < 1) or not np.allclose(factors, scales):
        return f"scales {scales.tolist()} are not integers >= 1"
    return None


def _resize_factors(scales: np.ndarray) -> np.ndarray:
    return np.asarray(scales, dtype=np.float64).round().astype(np.int64)


@training_rewrite("Resize", check=_resize_check)
def _resize(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    factors = _resize_factors(_const_value(node.inputs[2]))
    upsampled = [axis for axis, f in enumerate(factors) if f > 1]
    # [.., H, W] -> [.., H, 1, W, 1] -> expand to [.., H, sH, W, sW] -> [.., H*sH, W*sW]
    positions = [axis + 1 + k for k, axis in enumerate(upsampled)]
    unsqueezed = b.op("Unsqueeze", [x, b.ints(positions)])
    rank = len(factors) + len(upsampled)
    expand = np.ones(rank, np.int64)
    expand[positions] = factors[upsampled]
    repeated = b.op("Expand", [unsqueezed, b.ints(expand)])
    shape = b.op("Mul", [b.op("Shape", [x], dtype=np.int64), b.ints(factors)], dtype=np.int64)
    b.op("Reshape", [repeated, shape], out=node.outputs[0])


def _pool_window(node: gs.Node) -> tuple[list[int], list[int]]:
    """AveragePool's kernel and pads ([0] when it has none)."""
    kernel = [int(k) for k in node.attrs.get("kernel_shape", [])]
    return kernel, list(node.attrs.get("pads", [0] * 2 * len(kernel)) or [0])


def _average_pool_check(node: gs.Node) -> str | None:
    x = node.inputs[0]
    _, pads = _pool_window(node)
    checks = [
        (x.shape is not None and len(x.shape) >= 3, "the input rank is unknown"),
        (x.shape is not None and isinstance(x.shape[1], int), "the channel count is unknown"),
        (not node.attrs.get("ceil_mode", 0), "ceil_mode=1"),
        (set(node.attrs.get("dilations", [1])) <= {1}, "dilations"),
        (not any(pads) or node.attrs.get("count_include_pad", 0), "pads without count_include_pad"),
        (_text(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID"), "auto_pad"),
    ]
    return _first_failure(checks)


@training_rewrite("AveragePool", check=_average_pool_check)
def _average_pool(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    kernel, pads = _pool_window(node)
    channels = int(x.shape[1])
    weight = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), np.float32)
    attrs = {
        "kernel_shape": kernel,
        "strides": list(node.attrs.get("strides", [1] * len(kernel))),
        "pads": pads if any(pads) else [0] * 2 * len(kernel),
        "group": channels,
    }
    b.op("Conv", [x, b.const(weight)], out=node.outputs[0], **attrs)


def _conv_transpose_check(node: gs.Node) -> str | None:
    weight = node.inputs[1]
    if weight.shape is None or len(weight.shape) != 4:
        return "not a 2-D ConvTranspose with a known weight shape"
    kernel = [int(k) for k in weight.shape[2:]]
    strides = list(node.attrs.get("strides", [1, 1]))
    checks = [
        (node.attrs.get("group", 1) == 1, "group > 1"),
        (strides == kernel, f"strides {strides} differ from the kernel {kernel}"),
        (not any(node.attrs.get("pads", [0]) or [0]), "padding"),
        (set(node.attrs.get("dilations", [1])) <= {1}, "dilations"),
        (not any(node.attrs.get("output_padding", [0]) or [0]), "output_padding"),
        ("output_shape" not in node.attrs, "output_shape"),
        (_text(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID"), "auto_pad"),
    ]
    return _first_failure(checks)


@training_rewrite("ConvTranspose", check=_conv_transpose_check)
def _conv_transpose(b: _Builder, node: gs.Node) -> None:
    x, weight = node.inputs[:2]
    cin, cout, kh, kw = (int(d) for d in weight.shape)
    # y[n, o, i*kh + a, j*kw + c] = sum_ci x[n, ci, i, j] * W[ci, o, a, c]
    matrix = b.op("Reshape", [weight, b.ints([cin, cout * kh * kw])])
    rows = b.op("Transpose", [x], perm=[0, 2, 3, 1])  # [N, H, W, Cin]
    product = b.op("MatMul", [rows, matrix])  # [N, H, W, Cout*kh*kw]
    blocks = b.op("Reshape", [product, b.ints([0, 0, 0, cout, kh, kw])])
    shuffled = b.op("Transpose", [blocks], perm=[0, 3, 1, 4, 2, 5])  # [N, Cout, H, kh, W, kw]
    shape = b.op("Shape", [x], dtype=np.int64)
    shape = b.op("Mul", [shape, b.ints([1, 0, kh, kw])], dtype=np.int64)
    shape = b.op("Add", [shape, b.ints([0, cout, 0, 0])], dtype=np.int64)
    if len(node.inputs) > 2 and node.inputs[2].name:
        out = b.op("Reshape", [shuffled, shape])
        bias = b.op("Reshape", [node.inputs[2], b.ints([cout, 1, 1])])
        b.op("Add", [out, bias], out=node.outputs[0])
    else:
        b.op("Reshape", [shuffled, shape], out=node.outputs[0])


# ---------------------------------------------------------------------------- recurrent


def _lstm_check(node: gs.Node) -> str | None:
    x = node.inputs[0]
    checks = [
        (_text(node.attrs.get("direction", "forward")) == "forward", "direction is not forward"),
        (node.attrs.get("layout", 0) == 0, "layout=1"),
        (not node.attrs.get("input_forget", 0), "input_forget"),
        (node.attrs.get("clip") is None, "clip"),
        (node.attrs.get("activations") in (None, ["Sigmoid", "Tanh", "Tanh"]), "activations"),
        (len(node.inputs) < 5 or not node.inputs[4].name, "sequence_lens"),
        (len(node.inputs) < 8 or not node.inputs[7].name, "peepholes"),
        (x.shape is not None and isinstance(x.shape[0], int), "the sequence length is dynamic"),
        (x.shape is not None and isinstance(x.shape[-1], int), "the input size is unknown"),
    ]
    reason = _first_failure(checks)
    if reason is None and int(x.shape[0]) > 256:
        return f"sequence length {x.shape[0]} > 256 (unrolled per step)"
    return reason


@training_rewrite("LSTM", check=_lstm_check)
def _lstm(b: _Builder, node: gs.Node) -> None:
    x = node.inputs[0]
    hidden = int(node.attrs["hidden_size"])
    size = int(x.shape[2])
    # Reshape + Gemm(transB=1), not Squeeze + Transpose: the latter on a trained tensor
    # fails while onnxruntime-training optimizes the graph ("_Map_base::at")
    w = b.op("Reshape", [node.inputs[1], b.ints([4 * hidden, size])])
    r = b.op("Reshape", [node.inputs[2], b.ints([4 * hidden, hidden])])
    bias = None
    if len(node.inputs) > 3 and node.inputs[3].name:
        flat = b.op("Reshape", [node.inputs[3], b.ints([8 * hidden])])
        bias = b.op("Add", b.split(flat, [4 * hidden, 4 * hidden], 0))
    # Split, not Gather or Slice per step: onnxruntime-training's GatherSliceToSplitFusion
    # fails on those ("_Map_base::at") while building the gradient graph
    length = int(x.shape[0])
    steps_in = b.split(x, [1] * length, 0) if length > 1 else [x]
    inputs = [b.op("Squeeze", [t, b.ints([0])]) for t in steps_in]  # [B, I] each
    # a missing initial state is zeros [B, H]; R stays in the graph even for one step
    zeros = b.op("MatMul", [inputs[0], b.const(np.zeros((size, hidden)))])
    h, c = _initial_state(b, node, 5), _initial_state(b, node, 6)
    h, c = (zeros if state is None else state for state in (h, c))
    steps = []
    for xt in inputs:
        gates = b.op("Gemm", [xt, w] + ([bias] if bias is not None else []), transB=1)
        gates = b.op("Add", [gates, b.op("Gemm", [h, r], transB=1)])
        i, o, f, g = b.split(gates, [hidden] * 4, 1)
        i, o, f = (b.op("Sigmoid", [v]) for v in (i, o, f))
        cell = b.op("Mul", [i, b.op("Tanh", [g])])
        c = b.op("Add", [b.op("Mul", [f, c]), cell])
        h = b.op("Mul", [o, b.op("Tanh", [c])])
        steps.append(h)
    outputs = list(node.outputs) + [None] * (3 - len(node.outputs))
    y, y_h, y_c = (o if o is not None and o.name else None for o in outputs)
    if y is not None:
        parts = [b.op("Unsqueeze", [s, b.ints([0, 1])]) for s in steps]
        if len(parts) == 1:
            b.op("Identity", parts, out=y)
        else:
            b.op("Concat", parts, out=y, axis=0)
    if y_h is not None:
        b.op("Unsqueeze", [h, b.ints([0])], out=y_h)
    if y_c is not None:
        b.op("Unsqueeze", [c, b.ints([0])], out=y_c)


def _initial_state(b: _Builder, node: gs.Node, index: int):
    if len(node.inputs) > index and node.inputs[index].name:
        return b.op("Squeeze", [node.inputs[index], b.ints([0])])  # [B, H]
    return None
