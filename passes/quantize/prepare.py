"""The float graph that int8 placement starts from (lossless, ``prepare=true``).

onnxruntime's fp32 session fuses a Conv's trailing per-channel affine ops (a
BatchNormalization, Paddle's ``Conv -> Mul(scale) -> Add(bias)`` "learnable affine"
blocks, a bias exported as a separate ``Add``) into the convolution. In a QDQ graph it
cannot: QLinearConv needs its output quantized, so those ops would run in float
*after* a QuantizeLinear/DequantizeLinear pair — one more rounding step at the wrong
place (before the scale), more float ops and more Q/DQ than the fp32 model has. So
before calibrating, in float64 and exactly:

1. ``fold-constants`` and ``fold-batchnorm`` (the registered passes, run as they are):
   biases computed from constants become constants, BatchNormalization goes into the
   layer;
2. :func:`fold_affine`: a Conv whose only reader is ``Mul(c)`` or ``Add(c)`` with a
   constant ``c`` of one value, or one value per output channel (shape ``[C]``,
   ``[C, 1, ...]``, ``[1, C, 1, ...]``), takes it over: ``W[o] *= c[o]``,
   ``b[o] = b[o] * c[o]`` for Mul, ``b[o] += c[o]`` for Add; repeated while chains
   remain (``Conv -> Mul -> Add``). A constant that would broadcast the output to a
   larger shape, a reader that is a graph output with a constant-side producer, or a
   weight shared with other nodes stops the fold for that Conv.

Nothing is approximated: the manager's strict lossless tolerance would accept every
step of this on its own.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import bypass_node
from onnxopt.pipeline import PassContext, get_pass

log = logging.getLogger(__name__)

PREREQUISITES = ("fold-constants", "fold-batchnorm")


def prepare(graph: gs.Graph, ctx: PassContext) -> dict[str, int]:
    """Run the lossless folds in place; return what each did (counts)."""
    done: dict[str, int] = {}
    for name in PREREQUISITES:
        pass_ = get_pass(name)()
        result = pass_.run(graph, ctx)
        done[name] = int(result.changed)
    done["affine_folded"] = fold_affine(graph)
    if any(done.values()):
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done


def fold_affine(graph: gs.Graph) -> int:
    """Fold per-channel constant Mul/Add readers of Conv outputs into the Conv."""
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in [n for n in graph.nodes if n.op == "Conv"]:
            if _try_fold(graph, conv):
                folded += 1
                changed = True
    return folded


def _try_fold(graph: gs.Graph, conv: gs.Node) -> bool:
    out = conv.outputs[0]
    if len(out.outputs) != 1 or out in graph.outputs:
        return False
    reader = out.outputs[0]
    if reader.op not in ("Mul", "Add") or len(reader.inputs) != 2:
        return False
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    if not _private_constant(weight, conv):
        return False
    channels = weight.values.shape[0]
    other = reader.inputs[1] if reader.inputs[0] is out else reader.inputs[0]
    values = _per_channel(other, channels, weight.values.ndim)
    if values is None:
        return False
    bias = _bias(conv, channels)
    if bias is None:
        return False
    if reader.op == "Mul":
        shape = (channels,) + (1,) * (weight.values.ndim - 1)
        new_weight = weight.values.astype(np.float64) * values.reshape(shape)
        new_bias = bias * values
    else:
        new_weight = None
        new_bias = bias + values
    if not bypass_node(graph, reader, keep_input=reader.inputs.index(out)):
        return False
    dtype = weight.values.dtype
    taken = graph.tensors()
    if new_weight is not None:
        conv.inputs[1] = gs.Constant(_fresh(taken, weight.name), new_weight.astype(dtype))
    new_bias_tensor = gs.Constant(_fresh(taken, f"{conv.name}_bias"), new_bias.astype(dtype))
    if len(conv.inputs) > 2:
        conv.inputs[2] = new_bias_tensor
    else:
        conv.inputs.append(new_bias_tensor)
    return True


def _fresh(taken, base: str) -> str:
    name, k = f"{base}_affine", 0
    while name in taken:
        k += 1
        name = f"{base}_affine_{k}"
    return name


def _private_constant(tensor: gs.Tensor | None, reader: gs.Node) -> bool:
    return (
        isinstance(tensor, gs.Constant)
        and tensor.values.dtype in (np.float32, np.float64)
        and all(node is reader for node in tensor.outputs)
    )


def _per_channel(tensor: gs.Tensor, channels: int, rank: int) -> np.ndarray | None:
    """``[channels]`` float64 values when ``tensor`` is a constant scalar or per-channel
    vector broadcasting along axis 1 of an ``NC...`` output (never widening it)."""
    if not isinstance(tensor, gs.Constant) or tensor.values.dtype not in (np.float32,):
        return None
    values = np.asarray(tensor.values, np.float64)
    if values.size == 1:
        if values.ndim > rank:
            return None
        return np.full(channels, float(values.ravel()[0]))
    if values.size != channels or values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape  # right-aligned broadcasting
    if shape[1] != channels:
        return None
    return values.ravel()


def _bias(conv: gs.Node, channels: int) -> np.ndarray | None:
    if len(conv.inputs) < 3 or conv.inputs[2].is_empty():
        return np.zeros(channels)
    bias = conv.inputs[2]
    if not _private_constant(bias, conv) or bias.values.size != channels:
        return None
    return np.asarray(bias.values, np.float64).ravel()
