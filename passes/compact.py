"""``compact`` — short tensor and node names, no value_info (lossless).

Rewrite: the names an exporter writes are often long (``/layers.0/attn/q/MatMul_output_0``)
and each tensor name is stored once per producer, per consumer and per initializer; on a
small model, or after a pass that shrinks the weights (``share-weights``), they become a
large part of the file (28 % of the 4-bit sample transformer). This pass:

- renames every tensor of the main graph except the graph's inputs and outputs to the
  shortest free C90 identifier (``a`` .. ``Z``, ``_``, then ``aa``, ``ab`` ...), in node
  order, so the same graph always gets the same names;
- renames the nodes the same way (``nodes=short``, default), drops their names
  (``nodes=drop``) or leaves them (``nodes=keep``);
- drops the intermediate tensors' ``value_info`` (shapes and types that onnx's shape
  inference, and onnxruntime, recompute) unless ``value_info=keep``;
- clears the graph's doc string.

Computation is unchanged: the PassManager checks it like every lossless pass. The
model's signature (graph input and output names, their types and shapes), initializer
values, opsets, model-level doc string and metadata are kept.

Options: ``names=all`` (default) renames initializers as well; ``names=activations``
keeps initializer names (weights stay recognisable, e.g. for ``exclude=`` globs of later
passes or for matching a training checkpoint). ``keep`` lists more names to leave alone
(globs).

Does nothing to: graph inputs and outputs, tensors whose name matches ``keep``, tensors
named in a subgraph body (If/Loop/Scan bodies are not visited, and a body may read an
outer tensor by name), local functions, optional-input placeholders (empty names). A
graph whose names are already the ones this pass would choose is left unchanged, so the
pass is idempotent.

Sparse initializers keep their names (graphsurgeon exports a sparse tensor as the proto
it was imported from, name included). A renamed initializer's TensorProto is copied
on export (``onnxopt.graph.to_model``), so the previous model keeps its names.
"""

from __future__ import annotations

import itertools
import logging
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from onnxopt.graph import iter_nodes
from onnxopt.pipeline import Pass, PassContext, PassResult, matches_any, option, register_pass

log = logging.getLogger(__name__)

FIRST = string.ascii_letters + "_"  # C90 identifiers: a letter or '_' first ...
REST = FIRST + string.digits  # ... then letters, digits and '_'
# fmt: off
C_KEYWORDS = frozenset((
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else",
    "enum", "extern", "float", "for", "goto", "if", "int", "long", "register", "return",
    "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union",
    "unsigned", "void", "volatile", "while",
))
# fmt: on


def short_names(taken: set[str]) -> Iterator[str]:
    """C90 identifiers, shortest first, skipping keywords and the names in ``taken``."""
    for length in itertools.count(1):
        for head in FIRST:
            for tail in itertools.product(REST, repeat=length - 1):
                name = head + "".join(tail)
                if name not in taken and name not in C_KEYWORDS:
                    yield name


@register_pass
class CompactPass(Pass):
    name = "compact"
    summary = "Short tensor and node names, no value_info (smaller file, same model)."
    lossless = True

    @dataclass
    class Options:
        names: Literal["all", "activations"] = option(
            "all", "rename initializers too (all), or only intermediate tensors (activations)"
        )
        nodes: Literal["short", "drop", "keep"] = option(
            "short", "node names: short identifiers, empty, or unchanged"
        )
        value_info: Literal["drop", "keep"] = option(
            "drop", "shapes/types of intermediate tensors (recomputed by shape inference)"
        )
        keep: tuple[str, ...] = option((), "tensor names to leave alone (globs)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _name_bytes(graph)
        tensors = self._rename_tensors(graph)
        nodes = self._rename_nodes(graph)
        shapes = self._drop_value_info(graph) if self.options.value_info == "drop" else 0
        doc = bool(graph.doc_string)
        graph.doc_string = None
        counts = {
            "tensors_renamed": tensors,
            "nodes_renamed": nodes,
            "value_info_dropped": shapes,
            "doc_string_dropped": int(doc),
            "name_bytes_saved": before - _name_bytes(graph),
        }
        if any(counts.values()):
            log.info("compact: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return PassResult(changed=any(counts.values()), counts=counts)

    # ------------------------------------------------------------------ tensors

    def _rename_tensors(self, graph: gs.Graph) -> int:
        order = list(self._renamable(graph))
        fixed = {t.name for t in graph.tensors().values()} - {t.name for t in order}
        names = short_names(fixed | _names_in_subgraphs(graph))
        renamed = 0
        for tensor, name in zip(order, names):
            if tensor.name != name:
                self._try_rename(tensor, name)
                renamed += 1
        return renamed

    def _renamable(self, graph: gs.Graph) -> Iterator[gs.Tensor]:
        """Tensors to rename, each once, in node order (inputs, then outputs)."""
        opts = self.options
        signature = {id(t) for t in (*graph.inputs, *graph.outputs)}
        in_bodies = _names_in_subgraphs(graph)
        seen: set[int] = set()
        for node in graph.nodes:
            for tensor in (*node.inputs, *node.outputs):
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if (
                    not tensor.name
                    or id(tensor) in signature
                    or tensor.name in in_bodies
                    or matches_any(tensor.name, opts.keep)
                    or (opts.names == "activations" and isinstance(tensor, gs.Constant))
                    or isinstance(getattr(tensor, "_values", None), SparseValues)
                ):
                    continue
                yield tensor

    @staticmethod
    def _try_rename(tensor: gs.Tensor, name: str) -> None:
        # a lazily loaded constant keeps its snapshot's proto intact: to_model gives a
        # renamed constant its own copy (graphsurgeon would rename the proto in place)
        tensor.name = name

    # ------------------------------------------------------------------ nodes, shapes

    def _rename_nodes(self, graph: gs.Graph) -> int:
        mode = self.options.nodes
        if mode == "keep":
            return 0
        names = short_names(set()) if mode == "short" else itertools.repeat("")
        renamed = 0
        for node, name in zip(graph.nodes, names):
            if (node.name or "") != name:
                node.name = name
                renamed += 1
        return renamed

    @staticmethod
    def _drop_value_info(graph: gs.Graph) -> int:
        signature = {id(t) for t in (*graph.inputs, *graph.outputs)}
        dropped = 0
        for tensor in graph.tensors().values():
            described = tensor.dtype is not None or tensor.shape is not None
            if isinstance(tensor, gs.Variable) and id(tensor) not in signature and described:
                tensor.dtype = tensor.shape = None
                dropped += 1
        return dropped


def _names_in_subgraphs(graph: gs.Graph) -> set[str]:
    main = set(map(id, graph.nodes))
    return {
        t.name
        for node in iter_nodes(graph)
        if id(node) not in main
        for t in (*node.inputs, *node.outputs)
    }


def _name_bytes(graph: gs.Graph) -> int:
    """Bytes of tensor and node names as stored (once per reference)."""
    total = sum(len(n.name or "") for n in graph.nodes)
    for node in graph.nodes:
        total += sum(len(t.name) for t in (*node.inputs, *node.outputs))
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    return total + sum(len(t.name) for t in constants)
