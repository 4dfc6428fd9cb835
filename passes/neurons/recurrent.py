"""Hidden units of LSTM / GRU / RNN: analysis handler and rewriter.

Hidden unit ``j`` owns, in every direction and every gate ``g``, row ``g*H + j`` of W
``[D, G*H, I]`` and R ``[D, G*H, H]``, column ``j`` of R, bias rows ``g*H + j`` and
``G*H + g*H + j`` of B ``[D, 2*G*H]``, peephole rows of P ``[D, 3*H]``, and position
``j`` of the initial states ``[D, B, H]`` and of the outputs Y ``[T, D, B, H]`` /
``[B, T, D, H]`` and Y_h / Y_c. The unit is one channel atom, shared by the
directions (a bidirectional layer loses the same units both ways, so Y stays one
tensor). The input X is a consumer on its feature axis (W loses columns).

Blocked, with the reason: weights or biases that are not constants, an initial
state computed at run time (e.g. a graph input: the state's interface would change),
``sequence_lens``-free models are fine. ``hidden_size`` is rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.neurons.groups import ChannelGraph
from onnxopt.passes.neurons.handlers import HANDLERS, input_at
from onnxopt.passes.neurons.magnitudes import _reduce
from onnxopt.passes.neurons.rewrite import REWRITERS, Rewriter

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h (, initial_c) inputs


def _recurrent(node: gs.Node, cg: ChannelGraph) -> None:
    x, w, r = (input_at(node, i) for i in range(3))
    reasons = _blocking_reasons(node)
    constant = not any("weights" in reason for reason in reasons)
    hidden = node.attrs.get("hidden_size")
    if hidden is None and not isinstance(r, gs.Constant):
        cg.block(node, "its hidden size is unknown")
        return
    hidden = int(hidden if hidden is not None else r.shape[-1])
    layout = cg.layout(x)
    if layout is not None and (not constant or layout.axis != 2 or len(layout) != w.shape[-1]):
        cg.block(node, "its input is not tracked on the feature axis of constant weights")
        layout = None
    if layout is not None:
        cg.sink(node, 0, layout)
        cg.contribute(layout.atoms, lambda norm: _reduce(w.values, norm, (0, 1)))
    out = cg.new_producer(node, hidden, 3, 4, None)
    for extra in node.outputs[1:]:
        cg.set_layout(extra, out.moved(2, 3))  # Y_h / Y_c: [D, B, H] or [B, D, H]
    for reason in reasons:
        cg.pin(out, f"{node.op} {node.name!r}: {reason}")
    if constant:
        gates = GATES[node.op]
        cg.contribute(out.atoms, lambda norm: _per_unit(w.values, gates, norm))
        cg.contribute(out.atoms, lambda norm: _per_unit(r.values, gates, norm))
        cg.contribute(out.atoms, lambda norm: _reduce(r.values, norm, (0, 1)))


def _blocking_reasons(node: gs.Node) -> list[str]:
    """Why the hidden units of ``node`` cannot be removed (empty: they can)."""
    reasons = []
    w, r, b = (input_at(node, i) for i in (1, 2, 3))
    if (
        not isinstance(w, gs.Constant)
        or not isinstance(r, gs.Constant)
        or (b is not None and not isinstance(b, gs.Constant))
    ):
        reasons.append("its weights or biases are computed at run time")
    for index in STATES[node.op]:
        state = input_at(node, index)
        if state is not None and not isinstance(state, gs.Constant) and not zero_state(state):
            reasons.append(f"its initial state {state.name!r} is computed at run time "
                           "(the state interface would change)")  # fmt: skip
    peephole = input_at(node, 7) if node.op == "LSTM" else None
    if peephole is not None and not isinstance(peephole, gs.Constant):
        reasons.append("its peepholes are computed at run time")
    return reasons


def zero_state(tensor: gs.Tensor) -> bool:
    """An initial state that is zero whatever its computed shape (torch exports
    ``Expand(zeros, Concat(D, batch, H))``): the same as no initial state."""
    if len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if producer.op == "Expand" and isinstance(producer.inputs[0], gs.Constant):
        return not np.any(producer.inputs[0].values)
    if producer.op == "ConstantOfShape":
        value = producer.attrs.get("value")
        return value is None or not np.any(getattr(value, "values", value))
    return False


def _per_unit(weight: np.ndarray, gates: int, norm: str) -> np.ndarray:
    """One value per hidden unit: rows ``g*H + j`` of every direction and gate."""
    directions, rows = weight.shape[:2]
    grouped = weight.reshape(directions, gates, rows // gates, -1)
    return _reduce(grouped, norm, (0, 1, 3))


def _rewrite(node: gs.Node, rw: Rewriter) -> None:
    gates = GATES[node.op]
    w = node.inputs[1].values
    keep_in = rw.mask(node.inputs[0], w.shape[-1])
    hidden = int(node.attrs.get("hidden_size", node.inputs[2].values.shape[-1]))
    produced = [t for t in node.outputs if rw.cg.layout(t) is not None]
    keep = rw.mask(produced[0]) if produced else np.ones(hidden, dtype=bool)
    rows = np.tile(keep, gates)
    rw.replace(node, 1, w[:, rows][:, :, keep_in])
    rw.replace(node, 2, node.inputs[2].values[:, rows][:, :, keep])
    if rw.values(node, 3) is not None:
        rw.replace(node, 3, node.inputs[3].values[:, np.tile(rows, 2)])
    for index in STATES[node.op]:
        if rw.values(node, index) is not None:
            rw.replace(node, index, node.inputs[index].values[..., keep])
        elif index < len(node.inputs) and zero_state(node.inputs[index]):
            node.inputs[index] = gs.Variable.empty()  # zeros: the default state
    if node.op == "LSTM" and rw.values(node, 7) is not None:
        rw.replace(node, 7, node.inputs[7].values[:, np.tile(keep, 3)])
    node.attrs["hidden_size"] = int(keep.sum())


for _op in GATES:
    HANDLERS[_op] = _recurrent
    REWRITERS[_op] = _rewrite
