"""SmoothQuant-style activation -> weight scale migration (``smooth=true``), before
placement.

Transformer activations (LayerNorm outputs above all) carry a few channels far wider
than the rest; one per-tensor activation scale then rounds the quiet channels to a
few levels, while the weights, quantized per output channel, have room to spare
along their input axis. For an activation ``X`` read by MatMul/Gemm nodes with
constant weights, channel ``j`` of ``X`` is divided by ``s_j`` and row ``j`` of each
reader's weight multiplied by it, an exact rewrite in float
(Xiao et al., 2023, SmoothQuant):

    s_j = a_j ** alpha / w_j ** (1 - alpha)

with ``a_j = max |X[..., j]|`` over the calibration samples (one float run for every
tensor), ``w_j`` the largest ``|W[j, :]|`` over the readers and ``alpha = 0.5``
(``SMOOTH_ALPHA``), normalised so that ``max s = 1`` is not required (the
quantizer's scales follow), clipped to ``[1/MAX_GAIN, MAX_GAIN]``; dead channels keep
1. Only tensors with outlier channels (``max a >= OUTLIER_RATIO x median a``) are
smoothed. Where the division goes:

- into the producer when it is a ``LayerNormalization`` (constant scale and bias,
  private) whose output is read only by those MatMul/Gemm: exact and free;
- otherwise (BERT's LayerNorm output also feeds the residual ``Add``) a ``Mul`` by
  ``1/s`` in front of the MatMul/Gemm readers only (one float elementwise op on the
  activation; the other readers keep the original tensor).

Only normalization outputs (``NORMS``: on MiniLM smoothing the six LayerNorm outputs
raises the worst output SQNR from 23.1 to 25.2 dB, smoothing also the GELU outputs and
attention contexts lowers it to 21.6 dB) read as input 0 of at least one MatMul (2-D
constant float32 weight, private) or Gemm (``transA=0``, private constant B) are
smoothed, and only when no reader's weight is shared with another node. Tensors
with non-finite or huge calibrated values (attention masks) are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import unique_name
from onnxopt.passes.quantize import calibrate
from onnxopt.pipeline import PassContext

log = logging.getLogger(__name__)

SMOOTH_ALPHA = 0.5
MAX_GAIN = 64.0
HUGE = 1e30
# producers whose outputs carry the outlier channels SmoothQuant is for; smoothing
# other MatMul inputs (MiniLM's GELU output, attention context) measured worse
NORMS = ("LayerNormalization", "RMSNormalization")
# a tensor is smoothed only when its widest channel is this many times its median
# channel: MiniLM's LayerNorm outputs 3.8-17x, the digits transformer's 1.2-1.4x
# (where smoothing cost 0.9 dB)
OUTLIER_RATIO = 2.5


@dataclass
class Site:
    tensor: gs.Variable
    readers: list[gs.Node]  # MatMul/Gemm reading the tensor as input 0 with a private weight


def _weight_rows(node: gs.Node) -> np.ndarray | None:
    """The weight as ``[K, N]`` (input channels first), or None when not eligible."""
    if len(node.inputs) < 2 or node.inputs[0].is_empty():
        return None
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.dtype != np.float32:
        return None
    if weight.values.ndim != 2 or any(reader is not node for reader in weight.outputs):
        return None
    if node.op == "MatMul":
        return weight.values
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return weight.values.T if node.attrs.get("transB", 0) else weight.values
    return None


def find_sites(graph: gs.Graph) -> list[Site]:
    sites = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Variable) or not tensor.inputs:
            continue
        if tensor.inputs[0].op not in NORMS:
            continue
        readers = [
            node
            for node in tensor.outputs
            if node.op in ("MatMul", "Gemm")
            and node.inputs[0] is tensor
            and _weight_rows(node) is not None
        ]
        if readers:
            sites.append(Site(tensor, readers))
    return sorted(sites, key=lambda s: s.tensor.name)


class LastAxisRange:
    """Running max |x| along the last axis."""

    def __init__(self) -> None:
        self.values: np.ndarray | None = None
        self.finite = True

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if not np.all(np.isfinite(x)):
            self.finite = False
            return
        peak = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        self.values = peak if self.values is None else np.maximum(self.values, peak)


def smooth(graph: gs.Graph, ctx: PassContext, alpha: float = SMOOTH_ALPHA) -> dict[str, int]:
    """Migrate activation ranges into the weights at every site; counts for the report."""
    sites = find_sites(graph)
    if not sites or not ctx.calibration:
        return {"tensors": 0}
    ranges = {s.tensor.name: LastAxisRange() for s in sites}
    calibrate.collect(ctx, graph, [], {name: [r.update] for name, r in ranges.items()},
                      desc="smooth: channel ranges")  # fmt: skip
    names = set(graph.tensors())
    done, folded, readers = 0, 0, 0
    for site in sites:
        observed = ranges[site.tensor.name]
        if observed.values is None or not observed.finite or observed.values.max() >= HUGE:
            continue
        if observed.values.max() < OUTLIER_RATIO * np.median(observed.values):
            continue  # no outlier channels: balancing only moves noise around
        rows = [_weight_rows(node) for node in site.readers]
        if any(w.shape[0] != observed.values.size for w in rows):
            continue
        w = np.max([np.abs(r.astype(np.float64)).max(axis=1) for r in rows], axis=0)
        gains = channel_gains(observed.values, w, alpha)
        if np.allclose(gains, 1.0):
            continue
        if _fold_into_layernorm(site, gains):
            folded += 1
        else:
            _insert_mul(graph, site, gains, names)
        for node in site.readers:
            _scale_rows(node, gains)
        done += 1
        readers += len(site.readers)
    if done:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return {"tensors": done, "folded": folded, "readers": readers}


def channel_gains(a: np.ndarray, w: np.ndarray, alpha: float = SMOOTH_ALPHA) -> np.ndarray:
    """``s_j = a_j^alpha / w_j^(1-alpha)``, 1 where either side is 0, clipped."""
    a = a.astype(np.float64)
    w = w.astype(np.float64)
    alive = (a > 0) & (w > 0)
    if not alive.any():
        return np.ones_like(a)
    safe_a, safe_w = np.where(alive, a, 1.0), np.where(alive, w, 1.0)
    s = np.where(alive, safe_a**alpha / safe_w ** (1.0 - alpha), 1.0)
    # centre the gains geometrically so that the tensor's overall scale stays put
    s = np.where(alive, s / np.exp(np.mean(np.log(s[alive]))), 1.0)
    return np.clip(s, 1.0 / MAX_GAIN, MAX_GAIN)


def _fold_into_layernorm(site: Site, gains: np.ndarray) -> bool:
    tensor = site.tensor
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "LayerNormalization" or len(producer.outputs) < 1:
        return False
    if producer.outputs[0] is not tensor or len(tensor.outputs) != len(site.readers):
        return False
    if int(producer.attrs.get("axis", -1)) != -1:
        return False
    params = producer.inputs[1:3]
    for param in params:
        if not isinstance(param, gs.Constant) or param.values.dtype != np.float32:
            return False
        if param.values.shape != gains.shape or any(r is not producer for r in param.outputs):
            return False
    for index in range(1, len(producer.inputs)):
        old = producer.inputs[index]
        producer.inputs[index] = gs.Constant(old.name, (old.values / gains).astype(np.float32))
    return True


def _insert_mul(graph: gs.Graph, site: Site, gains: np.ndarray, names: set[str]) -> None:
    tensor = site.tensor
    base = tensor.name
    factor = gs.Constant(unique_name(f"{base}_smooth_scale", names),
                         (1.0 / gains).astype(np.float32))  # fmt: skip
    smoothed = gs.Variable(unique_name(f"{base}_smoothed", names), np.float32, tensor.shape)
    graph.nodes.append(gs.Node("Mul", unique_name(f"{base}_smooth_Mul", names),
                               inputs=[tensor, factor], outputs=[smoothed]))  # fmt: skip
    for node in site.readers:
        node.inputs[0] = smoothed


def _scale_rows(node: gs.Node, gains: np.ndarray) -> None:
    weight = node.inputs[1]
    values = weight.values.astype(np.float64)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        values = values * gains[None, :]
    else:
        values = values * gains[:, None]
    node.inputs[1] = gs.Constant(weight.name, values.astype(np.float32))
