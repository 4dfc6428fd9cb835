"""``upgrade-opset`` — convert the model to a newer default-domain opset (lossless).

Rewrite: ``onnx.version_converter.convert_version`` on the exported model, then the
converted graph replaces the contents of the graph in place (nodes, inputs, outputs,
opset). Passes declare the opset they need (``quantize-int8``: 13, for per-channel
QuantizeLinear / DequantizeLinear ``axis``; ``quantize-int4``: 21 for blocked INT4
DequantizeLinear; ``share-weights``: 21 for uint4 indices) and the PassManager runs this
pass in front of them as a checked step of its own, with the strict lossless budget,
recorded in the report with ``required_by``. Written in a pipeline, it does the same.

Does nothing when the opset is already at or above ``target``. Cannot run (the step is
rolled back with the reason, the run goes on; a pass that needed it is skipped) when
the converter has no adapter for an op, or the model has local functions (onnx's
converter leaves their bodies at the old opset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.errors import PassCannotRun
from onnxopt.graph import convert_opset
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(graph: gs.Graph) -> int:
    return int(graph.opset)


def upgrade_graph(graph: gs.Graph, ctx: PassContext, target: int) -> int | None:
    """Convert ``graph`` in place to opset ``target``; return the old opset (None: no-op).
    Raises PassCannotRun (graph unchanged) when onnx's converter cannot."""
    old = default_opset(graph)
    if old >= target:
        return None
    if graph.functions:
        raise PassCannotRun(
            f"cannot upgrade opset {old} -> {target}: the model has local functions, "
            "which onnx's version converter does not convert"
        )
    try:
        convert_opset(graph, target, ctx.template, validate=True, store=ctx.store)
    except ValueError as exc:
        raise PassCannotRun(f"cannot upgrade opset {old} -> {target}: {exc}") from None
    log.info("upgraded opset %d -> %d", old, target)
    return old


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
