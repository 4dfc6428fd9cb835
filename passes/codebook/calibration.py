"""What calibration data tells ``share-weights`` about each weight: importances and bias
correction.

A weight ``W[o, i]`` reads input feature ``x_i`` (a Conv input channel, the ``K`` axis
of a MatMul/Gemm operand, a row of a Gather table). Sharing moves it by ``dW``, and
output ``o`` moves by ``sum_i dW[o, i] x_i``. Over the calibration samples that error has

- a **mean part**, ``sum_i dW[o, i] mu_i``: a constant shift of output channel ``o``.
  On real models it dominates — after a ReLU/HardSwish the inputs are mostly their
  mean (PP-OCR rec: ``mu^2 / E[x^2]`` = 0.91 per channel, the diagonal of ``E[x x^T]``
  holds 1 % of its mass). **Bias correction** removes it exactly: the shift is
  subtracted from the output's bias (Conv ``B``, Gemm ``C``, the constant of an ``Add``
  right after a MatMul, or the running mean of the BatchNormalization that reads the
  Conv; a Conv with neither gets a bias). PP-OCR rec, 4-bit codebooks per channel:
  probabilities' cosine 0.940 -> 0.980.
- a **fluctuating part**, ``E[(sum_i dW[o, i] (x_i - mu_i))^2] ~ sum_i dW[o, i]^2
  Var(x_i)`` (the Hessian's diagonal, as SqueezeLLM weighs its k-means): each weight's
  **importance** is the variance of the feature it reads, so weights that move the
  outputs more get the finer clusters. Without a bias to correct, the mean stays in the
  error and the importance is ``E[x_i^2]`` instead.

For a Gather table the importance of a row is how often the calibration data reads it:
``1 + rows * share of the reads`` (a row read as often as under a uniform draw counts
twice an unread one; unread rows still count, for the tokens calibration did not see).

Statistics are streamed over at most ``MAX_SAMPLES`` calibration samples (one
onnxruntime run each, every needed activation as an extra output): per feature the mean
and the mean square, nothing per sample is kept. A weight read by several nodes, or
at an operand position not listed here, gets neither importance nor correction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import runtime

MAX_SAMPLES = 32  # calibration samples streamed for the statistics
IMPORTANCE_FLOOR = 0.01  # x the mean importance: a dead feature still counts a little


@dataclass
class Reader:
    """How one weight tensor reads its input: the activation, its feature axis, and
    which feature each weight element multiplies."""

    node: gs.Node
    weight: gs.Constant
    activation: gs.Tensor  # the input whose features the weight multiplies
    feature_axis: int  # axis of the activation holding the features
    kind: str  # conv | matmul | gemm | gather

    def features(self, count: int) -> np.ndarray:
        """Integer array broadcastable to the weight: the feature of each element."""
        w = self.weight.values
        if self.kind == "conv":
            out, per_group = w.shape[:2]
            groups = int(self.node.attrs.get("group", 1))
            index = (np.arange(out)[:, None] // max(out // groups, 1)) * per_group
            index = index + np.arange(per_group)[None, :]
            return index.reshape(out, per_group, *([1] * (w.ndim - 2)))
        if self.kind == "matmul":
            return np.arange(count).reshape(-1, 1)
        if self.kind == "gemm":
            transposed = int(self.node.attrs.get("transB", 0))
            return np.arange(count).reshape((1, -1) if transposed else (-1, 1))
        return np.arange(count).reshape(-1, *([1] * (w.ndim - 1)))  # gather rows


@dataclass
class FeatureStats:
    mean: np.ndarray
    square: np.ndarray  # E[x^2]
    mean_map: np.ndarray | None = None  # Conv input: the mean sample [C, *spatial]

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.square - self.mean**2, 0.0)


@dataclass
class Calibration:
    """Per weight tensor name: its reader and its input's feature statistics."""

    readers: dict[str, Reader] = field(default_factory=dict)
    stats: dict[str, FeatureStats] = field(default_factory=dict)  # by activation name
    hessians: dict = field(default_factory=dict)  # by weight name: feedback.Hessian

    def importance(self, name: str, corrected: bool) -> np.ndarray | None:
        """Importance of each element of weight ``name`` (broadcastable), or None."""
        reader = self.readers.get(name)
        stats = self.stats.get(reader.activation.name) if reader else None
        if stats is None:
            return None
        if reader.kind == "gather":
            per_row = 1.0 + stats.mean * stats.mean.size  # mean = share of the reads
            return per_row[reader.features(per_row.size)]
        per_feature = stats.variance if corrected else stats.square
        per_feature = per_feature + IMPORTANCE_FLOOR * max(float(per_feature.mean()), 1e-30)
        return per_feature[reader.features(per_feature.size)]

    def output_shift(self, name: str, delta: np.ndarray) -> np.ndarray | None:
        """Mean shift of each output channel when weight ``name`` moves by ``delta``."""
        reader = self.readers.get(name)
        stats = self.stats.get(reader.activation.name) if reader else None
        if stats is None or reader.kind == "gather":
            return None
        mu = stats.mean
        if reader.kind == "conv":
            out, per_group = delta.shape[:2]
            taps = _tap_means(reader.node, stats.mean_map, delta.shape[2:])
            if taps is None:  # per-channel means: exact away from the borders
                summed = delta.reshape(out, per_group, -1).sum(axis=2)
                return np.sum(summed * mu[reader.features(mu.size).reshape(out, per_group)], 1)
            read = taps[reader.features(mu.size).reshape(out, per_group)]  # [O, I/g, k...]
            return np.sum((delta * read).reshape(out, -1), axis=1)
        if reader.kind == "gemm":
            shift = delta @ mu if int(reader.node.attrs.get("transB", 0)) else mu @ delta
            return float(reader.node.attrs.get("alpha", 1.0)) * shift
        return mu @ delta


def readers(candidates) -> dict[str, Reader]:
    """The weights whose reads calibration can describe (one use, a known position)."""
    found = {}
    for candidate in candidates:
        if len(candidate.uses) != 1:
            continue
        node, index = candidate.uses[0]
        reader = _reader(node, index, candidate.tensor)
        if reader is not None:
            found[candidate.tensor.name] = reader
    return found


def _reader(node: gs.Node, index: int, weight: gs.Constant) -> Reader | None:
    rank = len(weight.shape)
    if node.op == "Conv" and index == 1 and rank >= 3:
        return Reader(node, weight, node.inputs[0], 1, "conv")
    if node.op == "MatMul" and index == 1 and rank == 2:
        return Reader(node, weight, node.inputs[0], -1, "matmul")
    if node.op == "Gemm" and index == 1 and rank == 2:
        axis = 0 if int(node.attrs.get("transA", 0)) else 1
        return Reader(node, weight, node.inputs[0], axis, "gemm")
    if node.op == "Gather" and index == 0 and int(node.attrs.get("axis", 0)) == 0:
        return Reader(node, weight, node.inputs[1], 0, "gather")
    return None


def collect(
    found: dict[str, Reader], model, samples, hessians: dict | None = None
) -> dict[str, FeatureStats]:
    """Feature means and mean squares of every reader's activation over ``samples``
    (Gather: the share of the reads of each row, as ``mean``); each of ``hessians``
    (by weight name) is fed its reader's activation on the way."""
    hessians = hessians or {}
    wanted: dict[str, Reader] = {}
    for reader in found.values():
        if not isinstance(reader.activation, gs.Constant):
            wanted.setdefault(reader.activation.name, reader)
    if not wanted:
        return {}
    sums: dict[str, list] = {}
    maps: dict[str, list] = {}  # Conv inputs: [sum of samples, count], None if shapes vary
    names = sorted(wanted)
    for outputs in runtime.iter_activations(model, names, samples[:MAX_SAMPLES]):
        for name in names:
            reader, x = wanted[name], np.asarray(outputs[name])
            part = _feature_sums(reader, x)
            total = sums.setdefault(name, [0.0, 0.0, 0])
            for j in range(3):
                total[j] = total[j] + part[j]
            if reader.kind == "conv" and x.ndim in (3, 4):
                _add_map(maps, name, x)
        for weight, hessian in hessians.items():
            hessian.update(np.asarray(outputs[found[weight].activation.name]))
    stats = {}
    for name, (first, second, count) in sums.items():
        count = max(count, 1)
        mean_map = maps[name][0] / maps[name][1] if maps.get(name) else None
        stats[name] = FeatureStats(first / count, second / count, mean_map)
    return stats


def _add_map(maps: dict, name: str, x: np.ndarray) -> None:
    total = maps.setdefault(name, [np.zeros(x.shape[1:]), 0])
    if total is None or total[0].shape != x.shape[1:]:
        maps[name] = None  # samples of different sizes: per-channel means only
        return
    total[0] += x.sum(axis=0, dtype=np.float64)
    total[1] += x.shape[0]


def _tap_means(node: gs.Node, mean_map: np.ndarray | None, kernel: tuple) -> np.ndarray | None:
    """Mean input each kernel tap reads over the output positions, zero padding
    included: ``[C, *kernel]``. Exact bias correction at the borders (a 3x3 Conv on an
    8x8 map reads padding at 28 of 64 positions)."""
    if mean_map is None or len(kernel) != mean_map.ndim - 1 or len(kernel) not in (1, 2):
        return None
    spatial = mean_map.shape[1:]
    strides = list(node.attrs.get("strides", [1] * len(kernel)))
    dilations = list(node.attrs.get("dilations", [1] * len(kernel)))
    pads = _pads(node, spatial, kernel, strides, dilations)
    if pads is None:
        return None
    padded = np.pad(
        mean_map, [(0, 0)] + [(pads[i], pads[i + len(kernel)]) for i in range(len(kernel))]
    )
    sizes = [
        (spatial[i] + pads[i] + pads[i + len(kernel)] - dilations[i] * (kernel[i] - 1) - 1)
        // strides[i]
        + 1
        for i in range(len(kernel))
    ]
    if min(sizes) < 1:
        return None
    taps = np.empty((mean_map.shape[0], *kernel))
    for tap in np.ndindex(*kernel):
        window = tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * sizes[i], strides[i])
            for i in range(len(kernel))
        )
        taps[(slice(None), *tap)] = padded[(slice(None), *window)].reshape(len(padded), -1).mean(1)
    return taps


def _pads(node: gs.Node, spatial, kernel, strides, dilations) -> list[int] | None:
    mode = node.attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", "VALID"):
        pads = list(node.attrs.get("pads", [0] * 2 * len(kernel)))
        return [0] * 2 * len(kernel) if mode == "VALID" else pads
    begin, end = [], []
    for i, size in enumerate(spatial):
        out = -(-size // strides[i])
        total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _feature_sums(reader: Reader, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    if reader.kind == "gather":
        rows = reader.weight.shape[0]
        ids = x.astype(np.int64).ravel() % rows  # negative indices count from the end
        counts = np.bincount(ids, minlength=rows).astype(np.float64)
        return counts, counts, ids.size
    features = np.moveaxis(x, reader.feature_axis, -1).astype(np.float64)
    features = features.reshape(-1, features.shape[-1])
    return features.sum(axis=0), np.einsum("ij,ij->j", features, features), len(features)


# ---------------------------------------------------------------------------- bias


def has_bias_slot(reader: Reader) -> bool:
    """Whether ``correct_bias`` has somewhere to put a shift of this weight's outputs."""
    return _slot(reader) is not None


def correct_bias(reader: Reader, shift: np.ndarray, make_name: Callable[[], str]) -> str | None:
    """Subtract ``shift`` (per output channel) from the bias that follows the weight;
    returns the corrected (or added) tensor's name, or None when there is no place."""
    slot = _slot(reader)
    if slot is None:
        return None
    if slot[0] is None:  # Conv without bias or BN, Gemm without C: add one
        beta = float(reader.node.attrs.get("beta", 1.0)) if reader.kind == "gemm" else 1.0
        return _add_input(reader, -shift / beta, make_name())
    name, values = corrected_bias(reader, shift)
    slot[0].values = values
    return name


def corrected_bias(reader: Reader, shift: np.ndarray) -> tuple[str, np.ndarray] | None:
    """``(name, corrected values)`` of the existing bias that takes ``shift``, without
    changing the graph; None when there is none to correct."""
    slot = _slot(reader)
    if slot is None or slot[0] is None:
        return None
    bias, sign = slot
    if reader.kind == "gemm":
        shift = shift / float(reader.node.attrs.get("beta", 1.0))
    values = bias.values
    corrected = values.astype(np.float64) - sign * shift.reshape(values.shape)
    return bias.name, corrected.astype(values.dtype)


def _slot(reader: Reader) -> tuple[gs.Constant | None, float] | None:
    """``(bias to subtract from or None to add one, sign)``, or None: nowhere."""
    node = reader.node
    out = reader.weight.shape[0] if reader.kind == "conv" else None
    if reader.kind == "conv":
        if len(node.inputs) > 2 and not _absent(node.inputs[2]):
            return _bias(node.inputs[2], out)
        consumers = node.outputs[0].outputs
        if len(consumers) == 1 and consumers[0].op == "BatchNormalization":
            norm = consumers[0]
            if norm.inputs[0] is node.outputs[0] and len(norm.inputs) > 3:
                # BN reads (y - mean): a shift of y moves the running mean along with it
                found = _bias(norm.inputs[3], out, sign=-1.0)
                if found is not None:
                    return found
        return None, 1.0
    columns = reader.weight.shape[0 if int(node.attrs.get("transB", 0)) else 1]
    if reader.kind == "gemm":
        if not float(node.attrs.get("beta", 1.0)):
            return None
        if len(node.inputs) < 3 or _absent(node.inputs[2]):
            return None, 1.0
        return _bias(node.inputs[2], columns)
    if reader.kind == "matmul":
        consumers = node.outputs[0].outputs
        if len(consumers) != 1 or consumers[0].op != "Add":
            return None
        others = [t for t in consumers[0].inputs if t is not node.outputs[0]]
        return _bias(others[0], reader.weight.shape[1]) if len(others) == 1 else None
    return None


def _absent(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and not tensor.name  # an omitted optional input


def _bias(tensor: gs.Tensor, channels: int | None, sign: float = 1.0):
    """``(tensor, sign)`` if ``tensor`` is a float constant read once holding one value
    per output channel along its last axis, else None."""
    if not isinstance(tensor, gs.Constant) or len(tensor.outputs) != 1:
        return None
    shape = tuple(tensor.shape)
    if not shape or int(np.prod(shape)) != channels or shape[-1] != channels:
        return None
    if np.dtype(tensor.dtype).kind != "f":
        return None
    return tensor, sign


def _add_input(reader: Reader, values: np.ndarray, name: str) -> str:
    node = reader.node
    bias = gs.Constant(name, values.astype(reader.weight.values.dtype))
    while len(node.inputs) < 2:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == 2:
        node.inputs.append(bias)
    else:
        node.inputs[2] = bias
    return name
