"""``upgrade-opset`` — convert the model to a newer default-domain opset (lossless).

Rewrite: ``onnx.version_converter.convert_version`` on the exported model, then the
converted graph replaces the contents of the graph in place (nodes, inputs, outputs,
opset). The quantization passes need opset 13 for per-channel QuantizeLinear /
DequantizeLinear (``axis``) and opset 21 for blocked INT4 DequantizeLinear; put
``upgrade-opset(target=13)`` in front of ``quantize-int8`` to have the conversion
checked as a step of its own with the strict lossless budget (``quantize-int8`` also
upgrades by itself when ``upgrade=true``, its default, and checks the converted model
against the original on the calibration samples before quantizing).

Does nothing when the opset is already at or above ``target``. Fails (the step is
rolled back, with onnx's message) when the converter has no adapter for an op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import runtime
from onnxopt.errors import UsageError
from onnxopt.graph import convert_opset
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def upgrade_graph(graph: gs.Graph, ctx: PassContext, target: int) -> int | None:
    """Convert ``graph`` in place to opset ``target``; return the old opset (None: no-op)."""
    old = default_opset(graph)
    if old >= target:
        return None
    try:
        convert_opset(graph, target, ctx.template)
    except ValueError as exc:
        raise UsageError(f"cannot upgrade opset {old} -> {target}: {exc}") from None
    log.info("upgraded opset %d -> %d", old, target)
    return old


def check_upgrade(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext) -> float:
    """Largest output difference between the two models on the calibration samples."""
    samples = ctx.calibration[:8]
    ref = runtime.run_samples(runtime.make_session(before), samples)
    got = runtime.run_samples(runtime.make_session(after), samples)
    worst = 0.0
    for a, b in zip(ref, got):
        for name, value in a.items():
            diff = np.abs(np.asarray(value, np.float64) - np.asarray(b[name], np.float64))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


@register_pass
class UpgradeOpsetPass(Pass):
    name = "upgrade-opset"
    summary = "Convert to a newer opset (13 enables per-channel QDQ) with onnx's converter."
    lossless = True

    @dataclass
    class Options:
        target: int = option(13, "default-domain opset to convert to", range=(7, 23))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        old = upgrade_graph(graph, ctx, self.options.target)
        if old is None:
            return PassResult(False, {"opset": default_opset(graph)})
        return PassResult(
            True,
            {"opset_before": old, "opset_after": self.options.target},
            notes=[f"opset {old} -> {self.options.target}"],
        )
