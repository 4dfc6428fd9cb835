"""Activation-aware cross-layer equalisation (``equalize=true``), before placement.

Activations are quantized per tensor, so one channel with a wide range sets the step
for every channel of the tensor and the quiet channels round to a few levels. For a
pair ``Conv1 -> [Relu | LeakyRelu | PRelu | nothing] -> Conv2`` these activations are
positively homogeneous (``f(k x) = k f(x)`` for ``k > 0``), so channel ``c`` of the
tensor between them can be multiplied by ``k_c`` — ``W1[c]`` and ``b1[c]`` times
``k_c``, Conv2's input channel ``c`` times ``1 / k_c`` — and the float model computes
exactly the same. (HardSwish, Clip(0, 6) and Sigmoid are not homogeneous: never.)

``k_c`` comes from the per-channel ranges ``a_c = max |x_c|`` measured on the
calibration samples (one float run) and, for a dense Conv2, its input-column ranges
``r_c = max |W2[:, c]|``, as fractions of their maxima ``A`` and ``R``:

- Conv2 depthwise (one input channel per group): its weights are quantized per
  output channel, so scaling them costs nothing — every channel is brought to the
  widest one, ``k_c = A / a_c``;
- Conv2 dense (``group=1``): its per-output-channel weight scale sees the column
  changes, so activation and weight are balanced as in cross-layer equalisation
  (Nagel et al., 2019) with activation ranges in place of ``W1``'s:
  ``k_c = sqrt((r_c / R) / (a_c / A))``.

``k`` is clipped to ``[1/MAX_GAIN, MAX_GAIN]``; dead channels (``a_c = 0``) keep 1.
Conv1's weights are quantized per output channel, so multiplying ``W1[c]`` changes
nothing there. Conv1's output must have exactly one reader (the activation or
Conv2), the activation one (Conv2, as its data input), none of them a graph output,
and both weights (and Conv1's bias) private float constants; grouped Conv2 other than
depthwise is left alone. All pairs are measured in one float run: scaling one pair
never changes another pair's tensor (each Conv2 compensates its own input).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.quantize import calibrate
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
MAX_GAIN = 32.0


@dataclass
class Pair:
    first: gs.Node
    second: gs.Node
    tensor: str  # the tensor between them (activation output, or first's output)
    depthwise: bool


def find_pairs(graph: gs.Graph) -> list[Pair]:
    pairs = []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        pair = _pair_after(node, outputs)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _pair_after(first: gs.Node, outputs: set[str]) -> Pair | None:
    if first.op != "Conv" or not _private_float(first, 1):
        return None
    if len(first.inputs) > 2 and not first.inputs[2].is_empty() and not _private_float(first, 2):
        return None
    tensor = first.outputs[0]
    if len(tensor.outputs) != 1 or tensor.name in outputs:
        return None
    second = tensor.outputs[0]
    if second.op in HOMOGENEOUS:
        if second.op == "PRelu" and not _prelu_ok(second):
            return None
        tensor = second.outputs[0]
        if len(tensor.outputs) != 1 or tensor.name in outputs:
            return None
        second = tensor.outputs[0]
    if second.op != "Conv" or second.inputs[0] is not tensor or not _private_float(second, 1):
        return None
    channels = first.inputs[1].values.shape[0]
    group = int(second.attrs.get("group", 1))
    weight = second.inputs[1].values
    depthwise = group == channels and weight.shape[1] == 1
    if group != 1 and not depthwise:
        return None
    if not depthwise and weight.shape[1] != channels:
        return None
    return Pair(first, second, tensor.name, depthwise)


def _private_float(node: gs.Node, index: int) -> bool:
    if index >= len(node.inputs):
        return False
    tensor = node.inputs[index]
    return (
        isinstance(tensor, gs.Constant)
        and tensor.values.dtype == np.float32
        and all(reader is node for reader in tensor.outputs)
    )


def _prelu_ok(node: gs.Node) -> bool:
    slope = node.inputs[1]
    return isinstance(slope, gs.Constant)


class ChannelRange:
    """Running per-channel max |x| of an ``[N, C, ...]`` tensor."""

    def __init__(self) -> None:
        self.values: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        peak = np.max(np.abs(np.nan_to_num(x, posinf=0.0, neginf=0.0)), axis=axes)
        self.values = peak if self.values is None else np.maximum(self.values, peak)


def equalize(graph: gs.Graph, ctx: PassContext) -> dict[str, int]:
    """Rescale every pair in place; returns counts for the report."""
    pairs = find_pairs(graph)
    if not pairs or not ctx.calibration:
        return {"pairs": 0}
    ranges = {p.tensor: ChannelRange() for p in pairs}
    calibrate.collect(ctx, graph, [], {name: [r.update] for name, r in ranges.items()},
                      desc="equalize: channel ranges")  # fmt: skip
    done = 0
    for pair in pairs:
        activation = ranges[pair.tensor].values
        if activation is None:
            continue
        gains = channel_gains(activation, pair)
        _apply(pair, gains)
        done += 1
    return {"pairs": done, "depthwise": sum(p.depthwise for p in pairs)}


def channel_gains(activation: np.ndarray, pair: Pair) -> np.ndarray:
    a = activation.astype(np.float64)
    alive = a > 0
    if not alive.any():
        return np.ones_like(a)
    top = a.max()
    if pair.depthwise:
        gains = np.where(alive, top / np.where(alive, a, 1.0), 1.0)
    else:
        w = np.abs(pair.second.inputs[1].values.astype(np.float64))
        columns = w.max(axis=tuple(i for i in range(w.ndim) if i != 1))
        r = columns / max(columns.max(), 1e-30)
        ratio = np.where(alive & (r > 0), r / np.where(alive, a / top, 1.0), 1.0)
        gains = np.sqrt(ratio)
    return np.clip(gains, 1.0 / MAX_GAIN, MAX_GAIN)


def _apply(pair: Pair, gains: np.ndarray) -> None:
    first, second = pair.first, pair.second
    w1 = first.inputs[1]
    shape = (-1,) + (1,) * (w1.values.ndim - 1)
    first.inputs[1] = gs.Constant(w1.name, (w1.values * gains.reshape(shape)).astype(np.float32))
    if len(first.inputs) > 2 and not first.inputs[2].is_empty():
        b1 = first.inputs[2]
        first.inputs[2] = gs.Constant(b1.name, (b1.values * gains).astype(np.float32))
    w2 = second.inputs[1]
    values = w2.values.astype(np.float64)
    if pair.depthwise:
        per_out = np.repeat(1.0 / gains, values.shape[0] // len(gains))
        values = values * per_out.reshape((-1,) + (1,) * (values.ndim - 1))
    else:
        values = values * (1.0 / gains).reshape((1, -1) + (1,) * (values.ndim - 2))
    second.inputs[1] = gs.Constant(w2.name, values.astype(np.float32))
