"""``cleanup`` — remove what does not contribute to the outputs (lossless).

Rewrites:
- ``Identity`` nodes are bypassed (consumers read the input directly);
- ``Dropout`` nodes are bypassed (inference semantics: output = input) unless their
  ``mask`` output is used or ``training_mode`` is a non-constant / true input;
- dead nodes and unused initializers are dropped (onnx-graphsurgeon ``cleanup``);
- nodes are sorted topologically.

Does nothing to: graph inputs (never removed, even if unused — the model's signature
is kept), subgraph bodies of If/Loop/Scan, nodes in custom domains (kept if used).
When an Identity/Dropout output is a graph output, its producer takes over the
output's name so the model keeps its output names.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import bypass_node, is_topologically_sorted
from onnxopt.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
class CleanupPass(Pass):
    name = "cleanup"
    summary = "Drop Identity/Dropout, dead nodes and unused initializers; toposort."
    lossless = True
    fixed_point = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        consts_before = _constant_names(graph)
        bypassed = {"Identity": 0, "Dropout": 0}
        for node in list(graph.nodes):
            if node.op in bypassed and self._try_bypass(graph, node):
                bypassed[node.op] += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        reordered = not is_topologically_sorted(graph)
        if reordered:  # graphsurgeon's toposort may reorder a valid order: only sort if needed
            graph.toposort()
        removed_consts = len(consts_before - _constant_names(graph))
        dead = nodes_before - len(graph.nodes) - sum(bypassed.values())
        counts = {
            "identity_removed": bypassed["Identity"],
            "dropout_removed": bypassed["Dropout"],
            "dead_nodes_removed": dead,
            "initializers_removed": removed_consts,
        }
        counts["reordered"] = int(reordered)
        changed = any(counts.values())
        return PassResult(changed=changed, counts=counts)

    def _try_bypass(self, graph: gs.Graph, node: gs.Node) -> bool:
        if not node.inputs or not node.outputs:
            return False
        if node.op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                return False  # mask is consumed
            if len(node.outputs) > 1 and node.outputs[1] in graph.outputs:
                return False
            if not _dropout_is_inference(node):
                return False
        return bypass_node(graph, node)


def _dropout_is_inference(node: gs.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return True
    mode = node.inputs[2]
    return isinstance(mode, gs.Constant) and not bool(np.any(mode.values))


def _constant_names(graph: gs.Graph) -> set[str]:
    return {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
