"""``fold-batchnorm`` — fold inference BatchNormalization into the preceding layer (lossless).

Rewrite: ``Y = BN(Conv(X, W, b))`` becomes ``Y = Conv(X, W', b')`` with, per output
channel ``c`` and ``s = gamma / sqrt(var + eps)``::

    W'[c] = W[c] * s[c]          b' = (b - mean) * s + beta

computed in float64 and cast back to the weight's dtype. The layer takes over the
BatchNormalization's output tensor, so graph outputs keep their names; the BN node
and its parameters disappear.

Cases handled:
- ``Conv`` (any rank, any ``group``): output channels are axis 0 of ``W``.
- ``ConvTranspose``: ``W`` is ``[C_in, C_out/group, k...]``; output channel
  ``g * C_out/group + j`` is ``W[g*C_in/group:(g+1)*C_in/group, j]``.
- ``Gemm`` followed by a BatchNormalization over ``(N, C)``: output features are the
  columns of ``B`` (``transB=0``) or its rows (``transB=1``); ``alpha`` is kept, the
  new bias ``C' = (beta_gemm * C - mean) * s + beta`` is written with ``beta=1``.
- A layer without bias gets one (Conv/ConvTranspose input 2, Gemm input C).
- A weight or bias shared with other nodes is not modified: the folded values go to
  a new initializer, the other users keep the original.

Does nothing (reported as skipped, with the reason: ``PassResult.skip``) when:
- the BN is in training mode (``training_mode=1``), uses ``spatial=0`` (opset < 9),
  or any of its extra outputs (running/saved statistics) is used;
- its input is not produced by Conv / ConvTranspose / Gemm, that output has other
  consumers or is a graph output;
- the weight, the bias or any BN parameter is not a constant, is not float16/32/64,
  or the BN parameters do not have one value per output channel.
A BN whose input comes from another op (e.g. a Relu) is simply left alone. Subgraph
bodies (If/Loop/Scan) are not visited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import unique_name
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass
from onnxopt.results import SKIPPED, Skip, skip_label

log = logging.getLogger(__name__)

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class Folded:
    """New weight and bias values of a layer that absorbs a BatchNormalization."""

    weight: np.ndarray
    bias: np.ndarray


@register_pass
class FoldBatchNormPass(Pass):
    name = "fold-batchnorm"
    summary = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm."
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._names = set(graph.tensors())
        folded = dict.fromkeys(FOLDABLE_PRODUCERS, 0)
        records: list[dict[str, str]] = []
        result = PassResult(False)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            try:
                layer = self._try_fold(graph, bn)
            except Skip as reason:
                label = bn.name or f"<BatchNormalization -> {bn.outputs[0].name}>"
                result.skip(label, "node", str(reason), bn.op)
                continue
            folded[layer.op] += 1
            records.append(
                {"batchnorm": bn.name, "into": layer.name, "output": layer.outputs[0].name}
            )
        result.counts = {f"{op.lower()}_folded": n for op, n in folded.items()}
        result.counts[SKIPPED] = len(result.skipped)
        result.notes = [skip_label(s) for s in result.skipped]
        for note in result.notes:
            log.info("fold-batchnorm: %s", note)
        result.changed = bool(records)
        result.details = {"folded": records}
        return result

    def _try_fold(self, graph: gs.Graph, bn: gs.Node) -> gs.Node:
        """Fold ``bn`` into its producer and return the producer, or raise Skip."""
        _check_inference_bn(graph, bn)
        source = bn.inputs[0]
        layer = source.inputs[0] if len(source.inputs) == 1 else None
        if layer is None or layer.op not in FOLDABLE_PRODUCERS:
            found = layer.op if layer is not None else "a graph input or constant"
            raise Skip(f"input comes from {found}, not Conv/ConvTranspose/Gemm")
        if source in graph.outputs:
            raise Skip(f"{layer.op} output {source.name!r} is also a graph output")
        if len(source.outputs) != 1:
            raise Skip(f"{layer.op} output {source.name!r} has {len(source.outputs)} consumers")
        scale, shift = _bn_affine(bn)
        folded = FOLD_RULES[layer.op](layer, scale, shift)
        self._assign(graph, layer, 1, folded.weight)
        self._assign(graph, layer, 2, folded.bias)
        if layer.op == "Gemm":
            layer.attrs["beta"] = 1.0
        self._take_over_output(graph, layer, bn)
        return layer

    def _assign(self, graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Set input ``index`` of ``node`` to ``values`` without touching shared tensors."""
        current = node.inputs[index] if index < len(node.inputs) else None
        if current is not None and not current.is_empty():
            shared = len(current.outputs) != 1 or current in graph.outputs
            if not shared:
                current.values = values  # a new array: Graph.copy() shares the old one
                return
            base = f"{current.name}_bnfold"
        else:
            base = f"{node.name or node.outputs[0].name}_bias"
        tensor = gs.Constant(self._fresh_name(base), values)
        if index < len(node.inputs):
            node.inputs[index] = tensor
            return
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(tensor)

    def _fresh_name(self, base: str) -> str:
        return unique_name(base, self._names)

    @staticmethod
    def _take_over_output(graph: gs.Graph, layer: gs.Node, bn: gs.Node) -> None:
        out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        layer.outputs[0] = out
        graph.nodes.remove(bn)


# ---------------------------------------------------------------------------- matching


def _check_inference_bn(graph: gs.Graph, bn: gs.Node) -> None:
    if int(bn.attrs.get("training_mode", 0)):
        raise Skip("training_mode=1")
    if int(bn.attrs.get("spatial", 1)) == 0:
        raise Skip("spatial=0 (per-activation statistics)")
    for extra in bn.outputs[1:]:
        if extra.is_empty():
            continue
        if extra.outputs or extra in graph.outputs:
            raise Skip(f"its statistics output {extra.name!r} is used")
    if len(bn.inputs) != 5:
        raise Skip(f"expected 5 inputs, found {len(bn.inputs)}")


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` in float64 such that ``BN(y) = y * s + t`` per channel."""
    params = []
    for tensor in bn.inputs[1:5]:
        params.append(_constant(tensor, "BatchNormalization parameter"))
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if len({p.shape for p in (gamma, beta, mean, var)}) != 1 or gamma.ndim != 1:
        raise Skip("BatchNormalization parameters are not four 1-D tensors of one length")
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _constant(tensor: gs.Tensor, role: str) -> np.ndarray:
    if not isinstance(tensor, gs.Constant):
        raise Skip(f"{role} {tensor.name!r} is not a constant")
    values = tensor.values
    if values.dtype not in FLOAT_DTYPES or tensor.export_dtype not in FLOAT_DTYPES:
        raise Skip(f"{role} {tensor.name!r} has dtype {tensor.export_dtype}, not float16/32/64")
    return values


def _bias(layer: gs.Node, channels: int) -> np.ndarray:
    if len(layer.inputs) > 2 and not layer.inputs[2].is_empty():
        return _constant(layer.inputs[2], f"{layer.op} bias").astype(np.float64)
    return np.zeros(channels, dtype=np.float64)


def _require_channels(scale: np.ndarray, channels: int, layer: gs.Node) -> None:
    if scale.shape != (channels,):
        raise Skip(f"BatchNormalization has {scale.shape[0]} channels, {layer.op} has {channels}")


# ---------------------------------------------------------------------------- folding rules


def _fold_conv(layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> Folded:
    weight = _constant(layer.inputs[1], "Conv weight")
    channels = weight.shape[0]
    _require_channels(scale, channels, layer)
    bias = _bias(layer, channels)
    if bias.shape != (channels,):
        raise Skip(f"Conv bias has shape {bias.shape}, expected ({channels},)")
    per_channel = scale.reshape((channels,) + (1,) * (weight.ndim - 1))
    new_weight = (weight.astype(np.float64) * per_channel).astype(weight.dtype)
    return Folded(new_weight, (bias * scale + shift).astype(weight.dtype))


def _fold_conv_transpose(layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> Folded:
    weight = _constant(layer.inputs[1], "ConvTranspose weight")
    group = int(layer.attrs.get("group", 1))
    in_channels, per_group = weight.shape[0], weight.shape[1]
    if in_channels % group:
        raise Skip(
            f"ConvTranspose has {in_channels} input channels, not divisible by group={group}"
        )
    channels = group * per_group
    _require_channels(scale, channels, layer)
    bias = _bias(layer, channels)
    if bias.shape != (channels,):
        raise Skip(f"ConvTranspose bias has shape {bias.shape}, expected ({channels},)")
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape((group, in_channels // group, per_group, *kernel))
    per_channel = scale.reshape((group, 1, per_group) + (1,) * len(kernel))
    new_weight = (grouped * per_channel).reshape(weight.shape).astype(weight.dtype)
    return Folded(new_weight, (bias * scale + shift).astype(weight.dtype))


def _fold_gemm(layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> Folded:
    weight = _constant(layer.inputs[1], "Gemm B")
    if weight.ndim != 2:
        raise Skip(f"Gemm B has rank {weight.ndim}")
    trans_b = int(layer.attrs.get("transB", 0))
    channels = weight.shape[0] if trans_b else weight.shape[1]
    _require_channels(scale, channels, layer)
    per_feature = scale[:, None] if trans_b else scale[None, :]
    new_weight = (weight.astype(np.float64) * per_feature).astype(weight.dtype)
    if len(layer.inputs) > 2 and not layer.inputs[2].is_empty():
        bias = _constant(layer.inputs[2], "Gemm C").astype(np.float64)
        bias = bias * float(layer.attrs.get("beta", 1.0))
    else:
        bias = np.zeros(channels, dtype=np.float64)
    # C broadcasts to (M, N); folding keeps it broadcastable: (N,), (1, N) or (M, N).
    return Folded(new_weight, (bias * scale + shift).astype(weight.dtype))


FOLD_RULES = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
}
