"""``quantize-int4`` — blocked 4-bit weight-only quantization (lossy).

Rewrite: the constant weight of each MatMul (``B``, 2-D ``[K, N]``), Gemm (``B``) and
Gather (the embedding table, 2-D) is split into blocks of ``block_size`` consecutive
elements along the reduction axis K (along the embedding dimension for Gather); each
block gets one float32 scale — symmetric (``symmetric=true``, default): int4 values
in ``[-7, 7]``, ``scale = max|w| / 7``; asymmetric: uint4 ``[0, 15]`` with a uint4 zero
point per block. Activations and biases stay float.

Two output forms (``format=``):

- ``dq`` (default): a standard ONNX ``DequantizeLinear`` with an INT4/UINT4 input,
  ``axis`` and ``block_size`` (opset 21 — the graph is converted with
  ``upgrade-opset``'s converter when older). onnxruntime fuses DQ→MatMul (and
  DQ→Gemm with ``transB=0``, ``alpha=beta=1``) into its ``MatMulNBits`` kernel.
- ``matmulnbits``: onnxruntime's ``com.microsoft.MatMulNBits`` written directly
  (MatMul, and Gemm with ``transA=0``, ``transB=0``, ``alpha=1``, ``beta=1`` and a
  bias of N values, which becomes its bias input) whose K is a multiple of
  ``block_size``; other weights use the ``dq`` form (no padded blocks in the file).
  Other runtimes cannot run it.

``rounding=gptq`` (default when calibration samples exist) rounds MatMul/Gemm weights
with GPTQ error feedback (``gptq.py``) under the blocked scales; Gather tables and
``rounding=nearest`` round to nearest.

Size: symmetric, ``block_size=32``: 4 bits + 32 bits / 32 = 5 bits per weight,
0.156x float32.

Does nothing (no-op) when no MatMul/Gemm/Gather has a float32 2-D constant weight;
weights already quantized (fed by DequantizeLinear) are not constants and are left
alone, so a second run is a no-op. ``op_types=`` and ``exclude=`` (node-name globs)
restrict the targets. Weights shared by several nodes are quantized once per node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.passes.quantize import calibrate, gptq, numerics, upgrade
from onnxopt.pipeline import Pass, PassContext, PassResult, matches_any, option, register_pass

log = logging.getLogger(__name__)

TARGET_OPS = ("MatMul", "Gemm", "Gather")
MS_DOMAIN = "com.microsoft"


@dataclass
class Target:
    node: gs.Node
    index: int  # input index of the weight
    axis: int  # blocked axis of the stored weight (the reduction axis)
    matmulnbits: bool = False  # emitted as MatMulNBits (format=matmulnbits, MatMul-like)


@dataclass
class Counts:
    weights: int = 0
    matmulnbits: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


@register_pass
class QuantizeInt4Pass(Pass):
    name = "quantize-int4"
    summary = "Blocked 4-bit weight-only quantization (INT4 DequantizeLinear or MatMulNBits)."
    lossless = False

    @dataclass
    class Options:
        block_size: Literal[32, 64, 128] = option(32, "elements per scale along K")
        symmetric: bool = option(True, "int4 [-7, 7] without zero point; false: uint4 + zero point")
        format: Literal["dq", "matmulnbits"] = option(
            "dq", "INT4 DequantizeLinear (opset 21) or onnxruntime's MatMulNBits"
        )
        op_types: list[str] = option((), "restrict to these of MatMul, Gemm, Gather")
        exclude: list[str] = option((), "node-name globs kept float")
        rounding: Literal["gptq", "nearest"] = option(
            "gptq", "GPTQ error feedback on calibration data (MatMul/Gemm), or nearest"
        )
        accuracy_level: int = option(
            0, "MatMulNBits accuracy_level (0: default; 4: int8 compute)", range=(0, 4)
        )

        def validate(self) -> None:
            unknown = [op for op in self.op_types if op not in TARGET_OPS]
            if unknown:
                raise ValueError(
                    f"op_types: {', '.join(unknown)} not supported; valid: {', '.join(TARGET_OPS)}"
                )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        targets = [t for t in map(self._target, graph.nodes) if t is not None]
        if not targets:
            return PassResult(False, notes=["no float32 2-D MatMul/Gemm/Gather weight"])
        notes: list[str] = []
        needs_dq = any(not t.matmulnbits for t in targets)
        if needs_dq and upgrade.default_opset(graph) < 21:
            old = upgrade.upgrade_graph(graph, ctx, 21)
            notes.append(f"opset {old} upgraded to 21 (blocked INT4 DequantizeLinear)")
            targets = [t for t in map(self._target, graph.nodes) if t is not None]
        hessians = self._hessians(graph, ctx, targets)
        self._graph = graph
        self._names = set(graph.tensors())
        counts = Counts()
        for target in targets:
            self._quantize(graph, target, hessians.get(target.node.name), counts)
        if counts.matmulnbits:
            _import_domain(graph, MS_DOMAIN, 1)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ratio = counts.bytes_after / counts.bytes_before if counts.bytes_before else 1.0
        result_counts = {
            "weights_quantized": counts.weights,
            "matmulnbits": counts.matmulnbits,
            "weight_bytes_before": counts.bytes_before,
            "weight_bytes_after": counts.bytes_after,
            "weight_size_ratio": round(ratio, 4),
            "gptq_weights": len(hessians),
        }
        details = {"by_op": counts.by_op, "gptq_nodes": sorted(hessians)}
        return PassResult(True, result_counts, details, notes)

    # -- selection

    def _target(self, node: gs.Node) -> Target | None:
        opts = self.options
        if node.op not in TARGET_OPS or node.domain not in ("", "ai.onnx", None):
            return None
        if (opts.op_types and node.op not in opts.op_types) or matches_any(node.name, opts.exclude):
            return None
        index = 0 if node.op == "Gather" else 1
        if index >= len(node.inputs):
            return None
        weight = node.inputs[index]
        if not isinstance(weight, gs.Constant) or weight.values.dtype != np.float32:
            return None
        if weight.values.ndim != 2:
            return None
        if node.op == "Gather":
            if int(node.attrs.get("axis", 0)) != 0:
                return None
            return Target(node, 0, axis=1)
        if node.op == "Gemm":
            if not isinstance(node.inputs[0], gs.Variable):
                return None
            axis = 1 if int(node.attrs.get("transB", 0)) else 0
            nbits = self._nbits(weight.values.shape[0]) and _gemm_is_matmul(node)
            return Target(node, 1, axis=axis, matmulnbits=nbits)
        if not isinstance(node.inputs[0], gs.Variable):
            return None
        return Target(node, 1, axis=0, matmulnbits=self._nbits(weight.values.shape[0]))

    def _nbits(self, k: int) -> bool:
        # MatMulNBits pads K to whole blocks; when K is not a multiple of the block the
        # exact-size DequantizeLinear form is written instead (onnxruntime fuses it too)
        return self.options.format == "matmulnbits" and k % self.options.block_size == 0

    def _hessians(
        self, graph: gs.Graph, ctx: PassContext, targets: list[Target]
    ) -> dict[str, gptq.Hessian]:
        if self.options.rounding != "gptq" or not ctx.calibration:
            return {}
        hessians: dict[str, gptq.Hessian] = {}
        observers: dict[str, list] = {}
        for target in targets:
            node = target.node
            if node.op == "Gather" or not gptq.Hessian.supports(node):
                continue
            hessians[node.name] = gptq.Hessian(node, ctx.rng)
            observers.setdefault(node.inputs[0].name, []).append(hessians[node.name].update)
        if observers:
            calibrate.collect(ctx, graph, [], observers, desc="int4: GPTQ statistics")
        return {name: h for name, h in hessians.items() if h.rows}

    # -- rewrite

    def _quantize(
        self, graph: gs.Graph, target: Target, hessian: gptq.Hessian | None, counts: Counts
    ) -> None:
        node, weight = target.node, target.node.inputs[target.index]
        stored = weight.values if target.axis == 0 else weight.values.T  # [K, N]: blocks on K
        q, scale, zero = self._blocked(node, stored, hessian)
        counts.weights += 1
        counts.by_op[node.op] = counts.by_op.get(node.op, 0) + 1
        counts.bytes_before += weight.values.nbytes
        if target.matmulnbits:
            counts.matmulnbits += 1
            counts.bytes_after += self._emit_matmulnbits(graph, target, q, scale, zero)
        else:
            if target.axis == 1:  # back to the stored layout: blocks along axis 1
                q, scale = q.T, scale.T
                zero = zero.T if zero is not None else None
            counts.bytes_after += self._emit_dq(target, weight, q, scale, zero)

    def _blocked(
        self, node: gs.Node, stored: np.ndarray, hessian: gptq.Hessian | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``[K, N]`` levels, ``[blocks, N]`` scales, zero points (asymmetric)."""
        opts = self.options
        q, scale, zero = numerics.quantize_blocked(stored, opts.block_size, opts.symmetric)
        if hessian is None:
            return q, scale, zero
        k = stored.shape[0]
        per_element = np.repeat(scale, opts.block_size, axis=0)[:k].T  # [N, K]
        zero_element = None
        if zero is not None:
            zero_element = np.repeat(zero, opts.block_size, axis=0)[:k].T.astype(np.float32)
        qmin, qmax = (-7, 7) if opts.symmetric else (0, 15)
        spans = gptq.column_blocks(k)
        blocks = hessian.blocks(0)
        pieces = [
            gptq._gptq(stored.T[:, a:b], h, per_element[:, a:b], qmin, qmax,
                       None if zero_element is None else zero_element[:, a:b])
            for (a, b), h in zip(spans, blocks)
        ]  # fmt: skip
        levels = np.concatenate(pieces, axis=1).T
        return levels.astype(q.dtype), scale, zero

    def _fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def _emit_dq(
        self, target: Target, weight: gs.Constant, q: np.ndarray, scale: np.ndarray,
        zero: np.ndarray | None,
    ) -> int:  # fmt: skip
        symmetric = self.options.symmetric
        dtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
        values = _packed_constant(self._fresh(f"{weight.name}_int4"), dtype, q)
        scale_t = gs.Constant(self._fresh(f"{weight.name}_scale"), scale.astype(np.float32))
        inputs = [values, scale_t]
        size = len(values._values.tensor.raw_data) + scale.astype(np.float32).nbytes
        if zero is not None:
            inputs.append(_packed_constant(self._fresh(f"{weight.name}_zero_point"), dtype, zero))
            size += len(inputs[-1]._values.tensor.raw_data)
        out = gs.Variable(self._fresh(f"{weight.name}_dequantized"), np.float32, list(q.shape))
        attrs = {"axis": target.axis, "block_size": self.options.block_size}
        dq = gs.Node("DequantizeLinear", self._fresh(f"{weight.name}_DequantizeLinear"), attrs,
                     inputs=inputs, outputs=[out])  # fmt: skip
        target.node.inputs[target.index] = out
        self._graph.nodes.append(dq)
        return size

    def _emit_matmulnbits(
        self, graph: gs.Graph, target: Target, q: np.ndarray, scale: np.ndarray,
        zero: np.ndarray | None,
    ) -> int:  # fmt: skip
        node, opts = target.node, self.options
        k, n = q.shape
        bs = opts.block_size
        blocks = -(-k // bs)
        stored = q.astype(np.int16) + (8 if opts.symmetric else 0)  # uint4 carrier
        padded = np.full((blocks * bs, n), 8 if opts.symmetric else 0, np.int16)
        padded[:k] = stored
        if zero is not None:  # padding rows dequantize to 0 with their block's zero point
            padded[k:] = np.repeat(zero, bs, axis=0)[k:]
        columns = padded.T.reshape(n, blocks, bs)
        packed = (columns[..., 0::2] | (columns[..., 1::2] << 4)).astype(np.uint8)
        base = node.inputs[1].name
        inputs = [
            node.inputs[0],
            gs.Constant(self._fresh(f"{base}_nbits"), packed),
            gs.Constant(self._fresh(f"{base}_scales"), scale.T.reshape(-1).astype(np.float32)),
        ]
        size = packed.nbytes + scale.astype(np.float32).nbytes
        if zero is not None:
            zeros = zero.T.astype(np.uint8)  # [n, blocks] -> two per byte along blocks
            if blocks % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
            packed_zero = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
            inputs.append(gs.Constant(self._fresh(f"{base}_zero_points"), packed_zero))
            size += packed_zero.nbytes
        if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            while len(inputs) < 5:
                inputs.append(gs.Variable.empty())
            inputs.append(node.inputs[2])  # bias
        attrs = {"K": k, "N": n, "bits": 4, "block_size": bs}
        if opts.accuracy_level:
            attrs["accuracy_level"] = opts.accuracy_level
        outputs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        replacement = gs.Node("MatMulNBits", node.name, attrs, inputs=inputs, outputs=outputs,
                              domain=MS_DOMAIN)  # fmt: skip
        graph.nodes.append(replacement)
        return size


def _gemm_is_matmul(node: gs.Node) -> bool:
    attrs = node.attrs
    if int(attrs.get("transA", 0)) or int(attrs.get("transB", 0)):
        return False
    if float(attrs.get("alpha", 1.0)) != 1.0:
        return False
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        bias = node.inputs[2]
        n = node.inputs[1].values.shape[1]
        if float(attrs.get("beta", 1.0)) != 1.0 or not isinstance(bias, gs.Constant):
            return False
        if bias.values.shape != (n,):
            return False
    return True


def _packed_constant(name: str, dtype: int, values: np.ndarray) -> gs.Constant:
    proto = helper.make_tensor(name, dtype, list(values.shape), numerics.pack_int4(values), True)
    return gs.Constant(name, LazyValues(proto))


def _import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    domains = list(graph.import_domains or [helper.make_opsetid("", int(graph.opset))])
    if not any(d.domain == domain for d in domains):
        domains.append(helper.make_opsetid(domain, version))
    graph.import_domains = domains
