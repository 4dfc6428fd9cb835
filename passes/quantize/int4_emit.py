"""quantize-int4's graph writing: each quantized weight in one of its three forms.

- ``DequantizeLinear`` (blocked along the reduction axis, opset 21), which onnxruntime
  fuses with MatMul into MatMulNBits;
- the cast form ``Reshape((Cast(q) - Cast(zero_point)) * scale)`` on the same 4-bit
  constants, which onnxruntime folds into a float32 weight when a session loads;
- onnxruntime's ``MatMulNBits`` (``format=matmulnbits``).

Which form a weight takes and what its levels are is decided in ``int4``; this module
only writes them, with names fresh in the graph, and counts what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.graph import unique_name
from onnxopt.passes.quantize import numerics
from onnxopt.passes.quantize.int4_grid import Grid, Layout

if TYPE_CHECKING:
    from onnxopt.passes.quantize.int4 import Levels, Target

MS_DOMAIN = "com.microsoft"


@dataclass
class Counts:
    """What the emitter wrote: weights by form, op and bits, and their bytes."""

    weights: int = 0
    matmulnbits: int = 0
    cast: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    by_bits: dict[str, int] = field(default_factory=dict)


class Emitter:
    """Writes quantized weights into ``graph``, naming new tensors fresh among
    ``names`` (which it extends), and counts them in ``counts``."""

    def __init__(self, graph: gs.Graph, names: set[str], options: Any) -> None:
        self.graph, self.names, self.options = graph, names, options
        self.counts = Counts()

    def finish(self) -> Counts:
        """Declare the com.microsoft domain when MatMulNBits was written; drop the
        float weights no node reads any more; sort."""
        if self.counts.matmulnbits:
            _import_domain(self.graph, MS_DOMAIN, 1)
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return self.counts

    def quantize(self, target: Target, levels: Levels) -> None:
        """Replace ``target``'s weight by ``levels`` in the form the options ask for."""
        node, weight = target.node, target.node.inputs[target.index]
        q, scale, zero = levels.q, levels.scale, levels.zero
        counts = self.counts
        counts.weights += 1
        counts.by_op[node.op] = counts.by_op.get(node.op, 0) + 1
        key = f"int{target.grid.bits}"
        counts.by_bits[key] = counts.by_bits.get(key, 0) + 1
        counts.bytes_before += weight.values.nbytes
        if target.matmulnbits:
            counts.matmulnbits += 1
            counts.bytes_after += self._emit_matmulnbits(target, q, scale, zero)
        elif self.options.unfused == "dq" or not _cast_form_fits(target, weight.values.shape):
            counts.bytes_after += self._emit_dq(target, weight, q, scale, zero)
        else:
            counts.cast += 1
            counts.bytes_after += self._emit_cast(target, weight, q, scale, zero)

    def _fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def _emit_dq(
        self, target: Target, weight: gs.Constant, q: np.ndarray, scale: np.ndarray,
        zero: np.ndarray | None,
    ) -> int:  # fmt: skip
        bits = target.grid.bits
        tag = f"int{bits}"
        values = self._integers(f"{weight.name}_{tag}", target.grid, q)
        scale_t = gs.Constant(self._fresh(f"{weight.name}_scale"), scale.astype(np.float32))
        inputs = [values, scale_t]
        size = _nbytes(values) + scale.astype(np.float32).nbytes
        if zero is not None:
            inputs.append(self._integers(f"{weight.name}_zero_point", target.grid, zero))
            size += _nbytes(inputs[-1])
        out = gs.Variable(self._fresh(f"{weight.name}_dequantized"), np.float32, list(q.shape))
        attrs = {"axis": target.layout.axis}
        if target.layout.block is not None:
            attrs["block_size"] = target.layout.block
        dq = gs.Node("DequantizeLinear", self._fresh(f"{weight.name}_DequantizeLinear"), attrs,
                     inputs=inputs, outputs=[out])  # fmt: skip
        target.node.inputs[target.index] = out
        self.graph.nodes.append(dq)
        return size

    def _emit_cast(
        self, target: Target, weight: gs.Constant, q: np.ndarray, scale: np.ndarray,
        zero: np.ndarray | None,
    ) -> int:  # fmt: skip
        """``Reshape((Cast(q) - Cast(zero)) * scale)``: constants only, so onnxruntime folds
        it into a float32 weight when the session loads (fp32 speed, small file)."""
        layout, name = target.layout, weight.name
        q, scale, zero, merged = _broadcast_form(q, scale, zero, layout)
        values = self._integers(f"{name}_q", target.grid, q)
        size = _nbytes(values) + scale.astype(np.float32).nbytes
        x = self._node("Cast", [values], f"{name}_f", to=TensorProto.FLOAT)
        if zero is not None:
            zero_t = self._integers(f"{name}_zp", target.grid, zero)
            size += _nbytes(zero_t)
            zero_f = self._node("Cast", [zero_t], f"{name}_zpf", to=TensorProto.FLOAT)
            x = self._node("Sub", [x, zero_f], f"{name}_c")
        scale_t = gs.Constant(self._fresh(f"{name}_s"), scale.astype(np.float32))
        x = self._node("Mul", [x, scale_t], f"{name}_w")
        if merged is not None:
            target_shape = gs.Constant(self._fresh(f"{name}_shape"), np.array(merged))
            x = self._node("Reshape", [x, target_shape], f"{name}_r")
        target.node.inputs[target.index] = x
        return size

    def _node(self, op: str, inputs: list, out: str, **attrs) -> gs.Variable:
        """One unnamed node, its output undeclared: names and value_info cost file bytes
        (on PP-OCR cls, 10 % of the quantized file)."""
        tensor = gs.Variable(self._fresh(out))
        node = gs.Node(op, "", attrs, inputs=inputs, outputs=[tensor])
        self.graph.nodes.append(node)
        return tensor

    def _integers(self, base: str, grid: Grid, values: np.ndarray) -> gs.Constant:
        name = self._fresh(base)
        if grid.bits == 8:
            return gs.Constant(name, values.astype(grid.carrier))
        dtype = TensorProto.INT4 if grid.symmetric else TensorProto.UINT4
        packed = numerics.pack_int4(values)
        proto = helper.make_tensor(name, dtype, list(values.shape), packed, True)
        return gs.Constant(name, LazyValues(proto))

    def _emit_matmulnbits(
        self, target: Target, q: np.ndarray, scale: np.ndarray,
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
        self.graph.nodes.append(replacement)
        return size


def _broadcast_form(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, layout: Layout
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int] | None]:
    """Levels, scale and zero point shaped to broadcast elementwise, and the shape to
    reshape their product to (None: already the weight's). A blocked axis of ``C``
    elements splits into ``[C / block, block]`` (conv blocks tile ``C`` exactly)."""
    axis = layout.axis
    if layout.block is None:  # 1-D per-channel parameters
        shape = [1] * q.ndim
        shape[axis] = -1
        return q, scale.reshape(shape), None if zero is None else zero.reshape(shape), None
    blocks = q.shape[axis] // layout.block
    if blocks == 1:  # the scale already broadcasts along the axis
        return q, scale, zero, None
    split = [*q.shape[:axis], blocks, layout.block, *q.shape[axis + 1 :]]
    scale = np.expand_dims(scale, axis + 1)
    zero = None if zero is None else np.expand_dims(zero, axis + 1)
    return q.reshape(split), scale, zero, list(q.shape)


def _cast_form_fits(target: Target, shape: tuple[int, ...]) -> bool:
    """Cast form for weights onnxruntime cannot fuse with a DequantizeLinear (it fuses
    DQ -> MatMul and MatMul-like Gemm into MatMulNBits) whose blocks tile the axis."""
    node, layout = target.node, target.layout
    if node.op == "MatMul" or (node.op == "Gemm" and gemm_is_matmul(node)):
        return False
    return layout.block is None or shape[layout.axis] % layout.block == 0


def _nbytes(constant: gs.Constant) -> int:
    values = constant._values
    if isinstance(values, LazyValues):
        return len(values.tensor.raw_data)
    return int(values.nbytes)


def gemm_is_matmul(node: gs.Node) -> bool:
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


def _import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    domains = list(graph.import_domains or [helper.make_opsetid("", int(graph.opset))])
    if not any(d.domain == domain for d in domains):
        domains.append(helper.make_opsetid(domain, version))
    graph.import_domains = domains
