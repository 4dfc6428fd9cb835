"""Dead channels: channels whose value at every consumer is one constant.

*Provably* constant channels are found by the analysis (``Layout.const``): a producer
channel with all-zero weights outputs its bias, and pass-through ops keep such a
channel constant unless they mix it with a varying tensor or pad it. Their values are
read from one run of the model (any input gives the same value). *Data-dependent*
dead channels are constant (usually zero after a ReLU) on every calibration sample.

A channel can be removed when, at every consumer reading it, its value ``v`` is
either 0 or can be folded into the consumer's bias exactly:

- Conv without padding: ``b[o] += v * sum(W[o, c])`` (a padded Conv sees zeros at the
  border instead of ``v``, so only ``v == 0`` is exact there);
- Gemm: ``C += alpha / beta * v @ B[removed rows]`` (a missing C is created);
- MatMul: an ``Add`` of ``v @ W[removed rows]`` is inserted after it;
- ConvTranspose: only ``v == 0`` (border outputs receive fewer contributions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.groups import ChannelGraph, Sink
from onnxopt.passes.neurons.rewrite import Rewriter, _fresh

RELATIVE_SPREAD = 1e-6  # data-dependent constant: (max - min) <= this * max(1, |mean|)


@dataclass
class SinkValues:
    """Per position of a sink tensor: mean value and whether it was constant."""

    mean: np.ndarray
    constant: np.ndarray


def measure(cg: ChannelGraph, activations) -> dict[str, SinkValues]:
    """Reduce the sinks' activations (one dict per sample) to per-position stats."""
    layouts = {s.node.inputs[s.index].name: s.layout for s in cg.sinks}
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    total: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for sample in activations:
        for name, value in sample.items():
            layout = layouts[name]
            flat = np.moveaxis(np.asarray(value, np.float64), layout.axis, 0)
            flat = flat.reshape(len(layout), -1)
            low[name] = np.minimum(low.get(name, np.inf), flat.min(axis=1))
            high[name] = np.maximum(high.get(name, -np.inf), flat.max(axis=1))
            total[name] = total.get(name, 0.0) + flat.sum(axis=1)
            count[name] = count.get(name, 0) + flat.shape[1]
    result = {}
    for name in low:
        mean = total[name] / count[name]
        spread = high[name] - low[name]
        constant = spread <= RELATIVE_SPREAD * np.maximum(1.0, np.abs(mean))
        mean = np.where(spread == 0, low[name], mean)
        result[name] = SinkValues(mean, constant)
    return result


def sink_names(cg: ChannelGraph) -> list[str]:
    return sorted({s.node.inputs[s.index].name for s in cg.sinks})


def _foldable(node: gs.Node) -> bool:
    """A bias can take the removed channels' values (exactly or, for a padded Conv,
    except at the border)."""
    weight = node.inputs[1]
    return node.op != "MatMul" or (isinstance(weight, gs.Constant) and weight.values.ndim == 2)


def _folds_exactly(node: gs.Node) -> bool:
    if node.op == "Conv":
        pads = node.attrs.get("pads", [])
        return node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads)
    if node.op == "Gemm":
        return True
    if node.op == "MatMul":
        weight = node.inputs[1]
        return isinstance(weight, gs.Constant) and weight.values.ndim == 2
    return False


def dead_classes(
    cg: ChannelGraph, values: dict[str, SinkValues], use_data: bool
) -> dict[int, np.ndarray]:
    """``{group: class indices}`` of channels that are constant at every consumer and
    whose constant every consumer can absorb exactly."""
    ok = np.ones(len(cg.atom_group), dtype=bool)
    for sink in cg.sinks:
        name = sink.node.inputs[sink.index].name
        stats = values.get(name)
        if stats is None:
            ok[sink.layout.atoms] = False
            continue
        constant = sink.layout.const | (stats.constant if use_data else False)
        absorbable = _folds_exactly(sink.node) | (stats.mean == 0)
        bad = sink.layout.atoms[~(constant & absorbable)]
        ok[bad] = False
    result = {}
    for group in cg.groups:
        if group.blocked or group.size == 0:
            continue
        atoms = np.flatnonzero(cg.atom_group == group.index)
        failing = np.bincount(cg.atom_class[atoms], weights=~ok[atoms], minlength=group.size)
        result[group.index] = np.flatnonzero(failing == 0)
    return result


# ---------------------------------------------------------------------------- folding


def fold(rw: Rewriter, values: dict[str, SinkValues]) -> int:
    """Fold the removed channels' values (their mean) into their consumers; return
    how many consumers changed. Must run before the weights are sliced."""
    folded = 0
    for sink in rw.cg.sinks:
        if sink.node.op not in FOLDERS or not _foldable(sink.node):
            continue
        removed = ~rw.keep[sink.layout.atoms]
        stats = values.get(sink.node.inputs[sink.index].name)
        if stats is None or not removed.any():
            continue
        v = np.where(removed, stats.mean, 0.0)
        if not np.any(v):
            continue
        FOLDERS[sink.node.op](rw, sink, v)
        folded += 1
    return folded


def _conv(rw: Rewriter, sink: Sink, v: np.ndarray) -> None:
    node = sink.node
    weight = node.inputs[1].values
    group = int(node.attrs.get("group", 1))
    out_channels, per_group = weight.shape[:2]
    grouped = weight.astype(np.float64).reshape(group, out_channels // group, per_group, -1)
    contribution = np.einsum("goc,gc->go", grouped.sum(axis=3), v.reshape(group, per_group))
    _add_bias(rw, node, 2, contribution.ravel(), weight.dtype)


def _gemm(rw: Rewriter, sink: Sink, v: np.ndarray) -> None:
    node = sink.node
    b = node.inputs[1].values.astype(np.float64)
    b = b.T if int(node.attrs.get("transB", 0)) else b
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    has_c = len(node.inputs) > 2 and not node.inputs[2].is_empty() and beta != 0
    if not has_c:
        node.attrs["beta"] = beta = 1.0
    _add_bias(rw, node, 2, alpha / beta * (v @ b), node.inputs[1].values.dtype, replace=has_c)


def _matmul(rw: Rewriter, sink: Sink, v: np.ndarray) -> None:
    node = sink.node
    weight = node.inputs[1].values
    contribution = (v @ weight.astype(np.float64)).astype(weight.dtype)
    out = node.outputs[0]
    inner = gs.Variable(_fresh(rw, f"{out.name}_before_fold"), dtype=out.dtype)
    node.outputs[0] = inner
    bias = gs.Constant(_fresh(rw, f"{node.name or out.name}_folded_bias"), contribution)
    add = gs.Node("Add", name=_fresh(rw, f"{node.name or out.name}_folded"), inputs=[inner, bias])
    add.outputs.append(out)
    rw.graph.nodes.append(add)
    rw.cg.layouts[inner.name] = rw.cg.layouts[out.name]
    rw.inserted = True


def _add_bias(rw, node, index, contribution, dtype, replace: bool | None = None) -> None:
    present = index < len(node.inputs) and not node.inputs[index].is_empty()
    if replace is None:
        replace = present
    if replace:
        current = node.inputs[index].values.astype(np.float64)
        rw.replace(node, index, (current + contribution).astype(dtype))
        return
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    name = _fresh(rw, f"{node.name or node.outputs[0].name}_bias")
    tensor = gs.Constant(name, contribution.astype(dtype))
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


FOLDERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}
