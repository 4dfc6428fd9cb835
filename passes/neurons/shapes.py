"""Resolve shape parameters computed at run time into constants (exact rewrite).

Exporters compute Reshape shapes and Slice bounds from ``Shape`` (``x.view(b, s,
heads, d)``, ``x.chunk(2, dim=1)``): ``Shape -> Gather -> Add/Div/Mul -> Concat``.
The channel analysis can only rewrite parameters that are constants, so before it
runs, these small integer computations are evaluated on the *symbolic* shapes from
ONNX shape inference: every entry is an int, a symbol (``"seq"``: a dynamic
dimension, the same symbol meaning the same value; an unknown dimension is its own
symbol ``"tensor#axis"``).

A parameter whose entries are all ints becomes a constant. A Reshape entry equal to
the symbol of the same axis of its input becomes ``0`` (copy that dimension; only
without ``allowzero``), so ``[b, s, 12, 32]`` computed from a dynamic ``s`` becomes
``[1, 0, 12, 32]``. Anything else is left as it was (the analysis then blocks it
with its reason). The old computation is removed once nothing reads it.

Handled integer ops: Shape (start/end), Constant, Identity, Cast, Gather (axis 0,
constant indices), Unsqueeze / Squeeze of scalars and 1-D values, Concat, Slice of
1-D values with constant bounds, and elementwise Add / Sub / Mul / Div (integer
division rounds toward zero, as onnxruntime does) on ints.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Entry = int | str | None
Value = list[Entry]
MAX_ENTRIES = 16
# the inputs that carry shape parameters, per op (index -> must the value be all ints)
SLOTS: dict[str, tuple[int, ...]] = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Split": (1,)}


def symbolic_dims(graph: gs.Graph) -> dict[str, list[Entry]]:
    """Every tensor's dimensions from ONNX shape inference: int, symbol or None."""
    from onnxopt.passes.neurons.layout import shape_inferred_model, value_infos

    model = shape_inferred_model(graph)
    dims: dict[str, list[Entry]] = {}
    for info in value_infos(model.graph):
        tensor_type = info.type.tensor_type
        if info.type.WhichOneof("value") != "tensor_type" or not tensor_type.HasField("shape"):
            continue
        dims[info.name] = [_entry(d) for d in tensor_type.shape.dim]
    return dims


def _entry(dim: onnx.TensorShapeProto.Dimension) -> Entry:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    return dim.dim_param or None


# ---------------------------------------------------------------------------- evaluation


def _constant(tensor: gs.Tensor) -> Value | None:
    if not isinstance(tensor, gs.Constant) or tensor.values.dtype.kind not in "iu":
        return None
    values = np.asarray(tensor.values)
    if values.ndim > 1 or values.size > MAX_ENTRIES:
        return None
    return [int(v) for v in values.ravel()]


def _shape(node, values, dims) -> Value | None:
    entries = dims.get(node.inputs[0].name)
    if entries is None:
        return None
    entries = _named(node.inputs[0].name, entries)
    rank = len(entries)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = max(0, start + rank if start < 0 else start)
    end = rank if end is None else min(rank, int(end) + rank if int(end) < 0 else int(end))
    return list(entries[start:end])


def _named(tensor: str, entries: list[Entry]) -> list[Entry]:
    """Unknown dims get a symbol of their own: axis ``i`` of ``tensor`` is itself."""
    return [f"{tensor}#{i}" if e is None else e for i, e in enumerate(entries)]


def _gather(node, values, dims) -> Value | None:
    data, indices = values
    if int(node.attrs.get("axis", 0)) != 0 or indices is None or data is None:
        return None
    try:
        return [data[i] for i in indices]
    except IndexError:
        return None


def _concat(node, values, dims) -> Value | None:
    if any(v is None for v in values):
        return None
    return [entry for value in values for entry in value]


def _slice(node, values, dims) -> Value | None:
    data, *bounds = values
    if data is None or any(b is None for b in bounds[:2]) or len(bounds) < 2:
        return None
    step = bounds[3][0] if len(bounds) > 3 and bounds[3] else 1
    if not isinstance(step, int) or not all(isinstance(b[0], int) for b in bounds[:2]):
        return None
    return data[bounds[0][0] : bounds[1][0] : step]


ARITHMETIC: dict[str, Callable[[int, int], int]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: int(a / b) if b else None,
}


def _arithmetic(node, values, dims) -> Value | None:
    a, b = values
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    rule = ARITHMETIC[node.op]
    return [rule(x, y) if isinstance(x, int) and isinstance(y, int) else None for x, y in zip(a, b)]


def _same(node, values, dims) -> Value | None:
    return values[0]


EVALUATORS = {
    "Shape": _shape,
    "Gather": _gather,
    "Concat": _concat,
    "Slice": _slice,
    "Identity": _same,
    "Cast": _same,
    "Unsqueeze": _same,  # of scalars / 1-D values: the entries do not change
    "Squeeze": _same,
    **dict.fromkeys(ARITHMETIC, _arithmetic),
}


def evaluate(graph: gs.Graph, dims: dict[str, list[Entry]]) -> dict[str, Value]:
    """Entries of every small integer tensor computable from shapes and constants."""
    from onnxopt.passes.neurons.groups import toposorted

    known: dict[str, Value] = {}

    def value_of(tensor: gs.Tensor) -> Value | None:
        if tensor.is_empty():
            return None
        return known.get(tensor.name) if not isinstance(tensor, gs.Constant) else _constant(tensor)

    for node in toposorted(graph):
        rule = EVALUATORS.get(node.op)
        if rule is None or len(node.outputs) != 1:
            continue
        if node.op in ("Unsqueeze", "Squeeze") and len(dims.get(node.outputs[0].name, [0, 0])) > 1:
            continue
        inputs = [value_of(t) for t in node.inputs] if node.op != "Shape" else []
        result = rule(node, inputs, dims)
        if result is not None and len(result) <= MAX_ENTRIES:
            known[node.outputs[0].name] = result
    return known


# ---------------------------------------------------------------------------- rewrite


def resolve_shape_parameters(graph: gs.Graph, dims: dict[str, list[Entry]] | None = None) -> int:
    """Replace computed shape parameters of Reshape / Slice / Split by constants;
    return how many inputs were replaced. ``dims``: symbolic dims of a subgraph's
    tensors (from the whole model's inference); by default inferred on ``graph``."""
    candidates = [
        (node, index)
        for node in graph.nodes
        for index in SLOTS.get(node.op, ())
        if index < len(node.inputs)
        and not node.inputs[index].is_empty()
        and not isinstance(node.inputs[index], gs.Constant)
    ]
    if not candidates:
        return 0
    dims = symbolic_dims(graph) if dims is None else dims
    known = evaluate(graph, dims)
    replaced = 0
    made: dict[tuple[str, tuple[int, ...]], gs.Constant] = {}
    for node, index in candidates:
        value = known.get(node.inputs[index].name)
        if value is None:
            continue
        if node.op == "Reshape" and not int(node.attrs.get("allowzero", 0)):
            source = _named(node.inputs[0].name, dims.get(node.inputs[0].name) or [])
            value = [
                0 if isinstance(e, str) and j < len(source) and source[j] == e else e
                for j, e in enumerate(value)
            ]
        if not all(isinstance(e, int) for e in value):
            continue
        source = node.inputs[index]
        key = (source.name, tuple(value))
        if key not in made:
            dtype = np.int32 if source.dtype == np.int32 else np.int64
            shape = dims.get(source.name)
            array = np.array(value, dtype=dtype).reshape(() if shape == [] else (-1,))
            made[key] = gs.Constant(f"{source.name}_resolved_{len(made)}", array)
        node.inputs[index] = made[key]
        replaced += 1
    if replaced:
        graph.cleanup(remove_unused_graph_inputs=False)
    return replaced
