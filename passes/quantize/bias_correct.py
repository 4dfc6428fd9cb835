"""Bias correction (``bias_correction=true``): the expected output shift of each
quantized Conv/Gemm/MatMul, measured on the calibration samples, subtracted from its
bias.

Rounding noise averages out, but clipping does not, and neither does the product of
a weight's rounding error with a non-zero mean input: a quantized layer's output is
shifted, per output channel, by ``E[y_q - y]``. Every later layer sees the shift as a
signal (a Relu moves its threshold, a softmax its logits). Following the "empirical"
bias correction of Nagel et al. (2019) and NNCF's fast bias correction, the shift is
measured layer by layer, with float inputs: for each quantized node, one
auxiliary graph computes, beside the float model, the node again on its input passed
through the activation QuantizeLinear/DequantizeLinear of the built placement and
with its dequantized (rounded) weights, and the per-channel mean of the difference
with the float output (``ReduceMean`` in the graph: only one value per channel is
fetched). All nodes are measured in one run per calibration sample
(``MAX_SAMPLES`` at most). The correction of node ``n`` is ``-E[y_q - y]``:

- Conv, Gemm: added to the bias (a zero bias is created when there is none);
- MatMul: added to the constant of the ``Add`` that reads its output, when that is a
  private 1-D constant along the output axis (transformer projections); otherwise
  nothing.

The corrections are measured once, on the full placement, and applied by the
rewriter to every node that is quantized in a later build (fallback keeps some float:
they get nothing). Local (float inputs) rather than sequential (quantized inputs): a
node's correction does not depend on which upstream nodes are quantized, so the
fallback's rebuilds stay consistent and one run measures every node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.graph import unique_name
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

MAX_SAMPLES = 32
MIN_T = 2.0  # shift / its standard error: below, it shrinks toward 0 (see measure)
OPS = ("Conv", "Gemm", "MatMul")


def matmul_bias(node: gs.Node, channels: int) -> gs.Node | None:
    """The ``Add`` adding a private 1-D constant of ``channels`` values to a MatMul's
    output (its only reader), or None."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if not isinstance(other, gs.Constant) or other.values.dtype != np.float32:
        return None
    if other.values.shape != (channels,) or any(r is not add for r in other.outputs):
        return None
    return add


def _dequantized_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The float values of ``DequantizeLinear(constant, scale, zero point)``."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear":
        return None
    q, scale, zero = producer.inputs[0], producer.inputs[1], producer.inputs[2]
    if not all(isinstance(t, gs.Constant) for t in (q, scale, zero)):
        return None
    values = q.values.astype(np.float64)
    scale_v, zero_v = scale.values.astype(np.float64), zero.values.astype(np.float64)
    if scale_v.ndim:
        axis = int(producer.attrs.get("axis", 1)) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale_v, zero_v = scale_v.reshape(shape), zero_v.reshape(shape)
    return ((values - zero_v) * scale_v).astype(np.float32)


def _input_qdq(tensor: gs.Tensor) -> tuple[gs.Constant, gs.Constant] | None:
    """Scale and zero point of the activation DequantizeLinear feeding a node."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear":
        return None
    scale, zero = producer.inputs[1], producer.inputs[2]
    if not isinstance(scale, gs.Constant) or not isinstance(zero, gs.Constant):
        return None
    return scale, zero


def measure(
    ctx: PassContext, float_graph: gs.Graph, built_graph: gs.Graph, core: list[str]
) -> dict[str, np.ndarray]:
    """Node name -> per-output-channel correction ``-E[y_q - y]`` (float32)."""
    if not ctx.calibration:
        return {}
    aux = float_graph.copy()
    names = {t for t in aux.tensors()}
    nodes = {n.name: n for n in aux.nodes}
    built = {n.name: n for n in built_graph.nodes}
    opset = int(aux.opset or 13)
    fetch: dict[str, str] = {}  # node -> tensor of its mean difference

    def fresh(base: str) -> str:
        return unique_name(base, names)

    for name in core:
        node, quantized = nodes.get(name), built.get(name)
        if node is None or quantized is None or node.op not in OPS:
            continue
        qdq_in = _input_qdq(quantized.inputs[0])
        weight = _dequantized_constant(quantized.inputs[1])
        if qdq_in is None or weight is None:
            continue
        scale, zero = qdq_in
        x = node.inputs[0]
        xq = gs.Variable(fresh(f"{name}_bc_q"), zero.values.dtype)
        xdq = gs.Variable(fresh(f"{name}_bc_dq"), np.float32)
        s = gs.Constant(fresh(f"{name}_bc_scale"), np.array(scale.values, np.float32))
        z = gs.Constant(fresh(f"{name}_bc_zero"), np.array(zero.values))
        aux.nodes.append(gs.Node("QuantizeLinear", fresh(f"{name}_bc_Q"), inputs=[x, s, z],
                                 outputs=[xq]))  # fmt: skip
        aux.nodes.append(gs.Node("DequantizeLinear", fresh(f"{name}_bc_DQ"), inputs=[xq, s, z],
                                 outputs=[xdq]))  # fmt: skip
        inputs = [xdq, gs.Constant(fresh(f"{name}_bc_w"), weight), *node.inputs[2:]]
        yq = gs.Variable(fresh(f"{name}_bc_y"), np.float32)
        aux.nodes.append(gs.Node(node.op, fresh(f"{name}_bc"), dict(node.attrs), inputs, [yq]))
        diff = gs.Variable(fresh(f"{name}_bc_diff"), np.float32)
        aux.nodes.append(gs.Node("Sub", fresh(f"{name}_bc_Sub"), inputs=[yq, node.outputs[0]],
                                 outputs=[diff]))  # fmt: skip
        if node.op == "Conv":
            axes = [0, *range(2, weight.ndim)]
        else:  # Gemm / MatMul: every axis but the last, after a reshape to 2-D
            flat = gs.Variable(fresh(f"{name}_bc_flat"), np.float32)
            channels = weight.shape[0] if node.op == "Gemm" and node.attrs.get("transB") else (
                weight.shape[-1])  # fmt: skip
            shape = gs.Constant(fresh(f"{name}_bc_shape"), np.array([-1, channels], np.int64))
            aux.nodes.append(gs.Node("Reshape", fresh(f"{name}_bc_Reshape"),
                                     inputs=[diff, shape], outputs=[flat]))  # fmt: skip
            diff, axes = flat, [0]
        mean = gs.Variable(fresh(f"{name}_bc_mean"), np.float32)
        if opset >= 18:
            axes_t = gs.Constant(fresh(f"{name}_bc_axes"), np.array(axes, np.int64))
            reduce = gs.Node("ReduceMean", fresh(f"{name}_bc_ReduceMean"), {"keepdims": 0},
                             inputs=[diff, axes_t], outputs=[mean])  # fmt: skip
        else:
            attrs = {"axes": axes, "keepdims": 0}
            reduce = gs.Node("ReduceMean", fresh(f"{name}_bc_ReduceMean"), attrs,
                             inputs=[diff], outputs=[mean])  # fmt: skip
        aux.nodes.append(reduce)
        fetch[name] = mean.name
    if not fetch:
        return {}
    samples = ctx.calibration[:MAX_SAMPLES]
    wanted = list(fetch.values())
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    model = ctx.to_model(aux)
    stream = runtime.iter_activations(model, wanted, ctx.progress(samples, desc="bias correction",
                                                                  total=len(samples)))  # fmt: skip
    for sample in stream:
        for name, tensor in fetch.items():
            value = np.nan_to_num(np.asarray(sample[tensor], np.float64).reshape(-1))
            sums[name] = sums.get(name, 0.0) + value
            squares[name] = squares.get(name, 0.0) + value * value
    count = len(samples)
    corrections = {}
    for name, total in sums.items():
        mean = total / count
        if not np.all(np.isfinite(mean)):
            continue
        spread = np.sqrt(np.maximum(squares[name] / count - mean * mean, 0.0))
        error = spread / np.sqrt(max(count - 1, 1))  # standard error of the mean shift
        # shrink toward 0 where the shift is not clearly above its own estimation noise
        t2 = np.where(error > 0, (mean / np.where(error > 0, error, 1.0)) ** 2, np.inf)
        keep = np.clip(1.0 - MIN_T**2 / np.maximum(t2, 1e-30), 0.0, 1.0)
        correction = -mean * keep
        if np.any(correction):
            corrections[name] = correction.astype(np.float32)
    return corrections


def apply(
    node: gs.Node, correction: np.ndarray, bias_index: int | None, fresh: Callable[[str], str]
) -> None:
    """Add ``correction`` to ``node``'s bias (Conv/Gemm: input ``bias_index``, created
    when absent; MatMul: the constant of the Add reading its output). The graph's
    constants are replaced, never written in place (copies share weight arrays)."""
    if node.op == "MatMul":
        add = matmul_bias(node, correction.size)
        if add is None:
            return
        index = 1 if add.inputs[0] is node.outputs[0] else 0
        old = add.inputs[index]
        add.inputs[index] = gs.Constant(old.name, (old.values + correction).astype(np.float32))
        return
    if bias_index is None:
        return
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if bias_index < len(node.inputs) and not node.inputs[bias_index].is_empty():
        old = node.inputs[bias_index]
        values = old.values.reshape(-1).astype(np.float64) * beta + correction
        node.inputs[bias_index] = gs.Constant(
            old.name, values.reshape(old.values.shape).astype(np.float32)
        )
    else:
        while len(node.inputs) < bias_index:
            node.inputs.append(gs.Variable.empty())
        bias = gs.Constant(fresh(f"{node.name}_bias"), correction.astype(np.float32))
        if len(node.inputs) == bias_index:
            node.inputs.append(bias)
        else:
            node.inputs[bias_index] = bias
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
