"""Small helpers over onnx-graphsurgeon shared by the core and by several passes.

The conversion pair ``to_graph`` / ``to_model`` is the only place where a ModelProto
becomes a ``gs.Graph`` and back. ``to_graph`` lifts weights stored as ``Constant``
nodes (Paddle2ONNX, older exporters) into initializers so that every pass sees one
kind of weight; ``to_model`` restores what graphsurgeon drops on export (model
metadata, doc strings, model version).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt.model import initializers_as_inputs, sparse_to_dense
from onnxopt.store import WeightStore, wrap_stored
from onnxopt.stored import stored_path
from onnxopt.weights import WEIGHT_INPUTS as WEIGHT_INPUTS
from onnxopt.weights import WeightRef as WeightRef
from onnxopt.weights import eligible_weights

log = logging.getLogger(__name__)

# The weight-role table lives in onnxopt.weights; these names stay importable from here.
weight_refs = eligible_weights

_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` as a graphsurgeon graph with Constant-node weights lifted.

    From IR 4 on, a graph input that also has an initializer is an input with a
    default value the caller may override; graphsurgeon would silently turn it into a
    constant and drop the input. It is kept as an input here (passes cannot fold it)
    and its default value is re-attached by ``to_model``. In IR 3 every initializer had
    to be listed as an input, so there the listing means nothing and is dropped.
    """
    graph = gs.import_onnx(model)
    _keep_io_declarations(graph, model)
    _keep_sparse_dtypes(graph)
    wrap_stored(graph)
    if model.ir_version >= 4:
        _keep_overridable_inputs(graph, model)
    lifted = lift_constant_nodes(graph)
    if lifted:
        log.debug("lifted %d Constant nodes into initializers", lifted)
    return graph


class _SparseValues(SparseValues):
    """graphsurgeon's SparseValues loads as float64 and misreads ``raw_data``; decode
    in the stored dtype. Still a SparseValues, so an untouched tensor exports sparse."""

    def load(self) -> np.ndarray:
        return sparse_to_dense(self.tensor)


def _keep_io_declarations(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """graphsurgeon lets a ``value_info`` entry for a graph input/output override the
    input/output's own declaration; onnxruntime does the opposite (and a stale or
    contradicting ``value_info`` would then change the model's interface on export)."""
    named = {v.name for v in model.graph.value_info}
    declared = [v for v in (*model.graph.input, *model.graph.output) if v.name in named]
    if not declared:
        return
    tensors = {t.name: t for t in (*graph.inputs, *graph.outputs)}
    for value in declared:
        tensor = tensors.get(value.name)
        if tensor is not None and value.type.HasField("tensor_type"):
            tensor.dtype = get_onnx_tensor_dtype(value)
            tensor.shape = get_onnx_tensor_shape(value)


def _keep_sparse_dtypes(graph: gs.Graph) -> None:
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is SparseValues:
            tensor._values = _SparseValues(tensor._values.tensor)


def _keep_overridable_inputs(graph: gs.Graph, model: onnx.ModelProto) -> None:
    initializers = {t.name: t for t in model.graph.initializer}
    if not any(v.name in initializers for v in model.graph.input):
        return
    existing = {t.name: t for t in graph.inputs}
    inputs = []
    for value in model.graph.input:
        if value.name not in initializers:
            inputs.append(existing[value.name])
            continue
        init = initializers[value.name]
        variable = gs.Variable(
            value.name,
            dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type),
            shape=list(init.dims),
        )
        # the constant may be read in the main graph, only in subgraph bodies, or nowhere
        for node in iter_nodes(graph):
            for i, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) and tensor.name == value.name:
                    node.inputs[i] = variable
        inputs.append(variable)
    graph.inputs = inputs


def iter_nodes(graph: gs.Graph):
    """Nodes of ``graph`` and, recursively, of its If/Loop/Scan bodies."""
    for node in graph.nodes:
        yield node
        for sub in node.subgraphs():  # its graph attributes, in order
            yield from iter_nodes(sub)


def to_model(
    graph: gs.Graph, template: onnx.ModelProto, store: WeightStore | None = None
) -> onnx.ModelProto:
    """Export ``graph``; restore what graphsurgeon does not carry: model-level fields,
    default values of overridable inputs (taken from ``template``, the model the graph
    was imported from), and outer-scope weights it copies into subgraph bodies.

    ``graph`` is left alone: the export works on a copy (``Graph.copy`` shares the
    weight arrays, so this costs the nodes and tensors, not the weights). With the
    ``store`` of a run whose weights are on disk (``onnxopt.store``; passes get it as
    ``ctx.store`` and export with ``ctx.to_model``), the copy's new weight arrays are
    first written to that store and replaced by stubs, so the model is light."""
    graph = graph.copy()
    if (graph.ir_version or template.ir_version) < 4:
        # IR 3 requires every initializer to be listed as a graph input; lifting
        # Constant nodes would break that. IR 4 drops the rule and runs everywhere.
        graph.ir_version = 4
    if store is not None:  # a large model's run: new weight arrays go to disk first
        store.spill_graph(graph)
    _detach_renamed_constants(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    _restore_input_defaults(model, template)
    _hoist_outer_initializers(model, template)
    _share_body_initializers(model.graph)
    model.doc_string = template.doc_string
    model.domain = template.domain
    model.model_version = template.model_version
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if template.producer_name and not model.producer_name:
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
    return model


def _detach_renamed_constants(graph: gs.Graph) -> None:
    """graphsurgeon exports a lazily loaded constant as the TensorProto it was imported
    from, renaming that proto *in place* — the proto belongs to the model the graph was
    imported from (the run's accepted snapshot). A constant a pass renamed gets its own
    copy of the proto first, so the snapshot keeps its names."""
    for sub in _all_graphs(graph):
        for tensor in sub.tensors().values():
            values = getattr(tensor, "_values", None)
            if (
                isinstance(values, LazyValues)
                and isinstance(values.tensor, onnx.TensorProto)
                and values.tensor.name != tensor.name
            ):
                proto = onnx.TensorProto()
                proto.CopyFrom(values.tensor)
                detached = copy.copy(values)
                detached.tensor = proto
                tensor._values = detached


def _all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    yield graph
    for sub in graph.subgraphs():  # node by node, each node's graph attributes in order
        yield from _all_graphs(sub)


def _restore_input_defaults(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    if template.ir_version < 4:
        return
    defaults = {t.name: t for t in template.graph.initializer}
    present = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in defaults and value.name not in present:
            model.graph.initializer.append(defaults[value.name])


def _hoist_outer_initializers(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """graphsurgeon exports an outer-scope constant read inside an If/Loop/Scan body as
    an initializer *of each body* (stored twice for an If). Constants that were
    main-graph initializers in ``template`` go back to the main graph; initializers a
    body declared itself stay in the body."""
    outer = {t.name for t in template.graph.initializer}
    main = model.graph
    present = {t.name for t in main.initializer}
    for body in graph_bodies(main):
        _hoist_from(body, main, outer, present)


def _hoist_from(body: onnx.GraphProto, main: onnx.GraphProto, outer: set[str], present: set[str]):
    for init in body.initializer:
        if init.name in outer and init.name not in present:
            main.initializer.append(init)
            present.add(init.name)
    _drop_initializers(body, outer)
    for sub in graph_bodies(body):  # nested bodies
        _hoist_from(sub, main, outer, present)


def graph_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The If/Loop/Scan bodies of ``graph``'s nodes (one level), in node order."""
    for node in graph.node:
        for attr in node.attribute:
            yield from [attr.g] if attr.HasField("g") else attr.graphs


def _drop_initializers(body: onnx.GraphProto, names: set[str]) -> None:
    keep = [t for t in body.initializer if t.name not in names]
    if len(keep) != len(body.initializer):
        del body.initializer[:]
        body.initializer.extend(keep)


def _share_body_initializers(graph: onnx.GraphProto) -> dict[str, list]:
    """One copy of a constant that graphsurgeon exported into several bodies.

    A weight that was a ``Constant`` node of a body (Silero VAD's LSTM weights, inside
    an ``If`` branch) and that nested bodies read from the outer scope is exported as an
    initializer *of each nested body* once a pass has made it a graphsurgeon constant:
    remove-neurons made silero_vad.onnx 1.38x larger that way. Identical initializers of
    one name found in the bodies of two or more of ``graph``'s nodes or attributes move
    to ``graph`` itself, the closest scope all their readers see. Returns the
    initializers below ``graph`` that were left in place, by name (for the caller)."""
    found: dict[str, list] = {}
    for body in graph_bodies(graph):
        below = _share_body_initializers(body)
        for init in body.initializer:
            below.setdefault(init.name, []).append((body, init))
        for name, places in below.items():
            found.setdefault(name, []).append(places)
    declared = {t.name for t in graph.initializer}
    left: dict[str, list] = {}
    for name, groups in found.items():
        places = [place for group in groups for place in group]
        first = places[0][1].SerializeToString()
        if (
            len(groups) < 2
            or name in declared
            or any(init.SerializeToString() != first for _, init in places[1:])
        ):
            left[name] = places
            continue
        graph.initializer.append(places[0][1])
        for body, _ in places:
            _drop_initializers(body, {name})
    return left


def replace_contents(graph: gs.Graph, source: gs.Graph) -> None:
    """Make ``graph`` hold ``source``'s nodes, inputs, outputs and opsets, in place
    (a pass must mutate the graph object it was given)."""
    graph.nodes = source.nodes
    graph.inputs = source.inputs
    graph.outputs = source.outputs
    graph.opset = source.opset
    graph.import_domains = source.import_domains
    graph.ir_version = max(graph.ir_version or 0, source.ir_version or 0) or None


def convert_opset(
    graph: gs.Graph,
    target: int,
    template: onnx.ModelProto,
    *,
    validate: bool = False,
    store: WeightStore | None = None,
) -> None:
    """Convert ``graph`` in place to default-domain opset ``target`` with onnx's version
    converter (it works on a ModelProto: export, convert, re-import, swap contents).

    Raises ValueError with the converter's reason, leaving the graph unchanged.
    ``validate`` also runs onnx's checker on the converted model. The converter runs
    shape inference; only the value_info the graph already described is kept.
    """
    from onnxopt.errors import first_line

    # stored (on-disk) weights go in as typed inputs: the converter reads every byte
    model, stubs, added = initializers_as_inputs(
        to_model(graph, template, store), lambda t: stored_path(t) is not None
    )
    try:
        converted = onnx.version_converter.convert_version(model, target)
        if validate:
            onnx.checker.check_model(converted)
    except Exception as exc:  # onnx raises RuntimeError/ConvertError naming the op
        raise ValueError(first_line(exc, 200)) from None
    if stubs:
        inputs = [v for v in converted.graph.input if v.name not in added]
        del converted.graph.input[:]
        converted.graph.input.extend(inputs)
        converted.graph.initializer.extend(stubs)
    described = {
        t.name
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    }
    kept = [info for info in converted.graph.value_info if info.name in described]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    replace_contents(graph, to_graph(converted))


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Replace ``Constant`` nodes of the main graph by initializers; return how many."""
    output_names = {t.name for t in graph.outputs}
    keep: list[gs.Node] = []
    lifted = 0
    for node in graph.nodes:
        values = _constant_node_values(node) if node.op == "Constant" else None
        if values is None or len(node.outputs) != 1 or node.outputs[0].name in output_names:
            keep.append(node)
            continue
        out = node.outputs[0]
        replace_uses(out, gs.Constant(out.name, values))
        node.outputs.clear()
        lifted += 1
    graph.nodes = keep
    return lifted


def _constant_node_values(node: gs.Node) -> np.ndarray | None:
    for key in _CONSTANT_VALUE_ATTRS:
        if key not in node.attrs:
            continue
        value = node.attrs[key]
        if _is_string_tensor(value):
            return None  # graphsurgeon cannot export string arrays as initializers
        if isinstance(value, gs.Constant):
            return value.values
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        if key == "value_float":
            return np.array(value, dtype=np.float32)
        if key == "value_floats":
            return np.array(value, dtype=np.float32)
        if key in ("value_int", "value_ints"):
            return np.array(value, dtype=np.int64)
    return None  # value_string(s) / sparse_value: leave as a node


def _is_string_tensor(value) -> bool:
    if isinstance(value, onnx.TensorProto):
        return value.data_type == onnx.TensorProto.STRING
    if isinstance(value, gs.Constant):
        return value.dtype.kind in "OUS" or value.export_dtype == onnx.TensorProto.STRING
    return False


# ---------------------------------------------------------------------------- queries


def is_topologically_sorted(graph: gs.Graph) -> bool:
    """True when every node comes after the producers of its inputs."""
    seen: set[int] = set()
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.inputs and id(tensor.inputs[0]) not in seen:
                return False
        seen.add(id(node))
    return True


def constants(graph: gs.Graph) -> list[gs.Constant]:
    """All distinct constant tensors of the main graph."""
    return [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]


def param_count(graph: gs.Graph) -> int:
    """Elements in constant tensors, excluding int64 tensors (shapes, axes, indices)."""
    total = 0
    for tensor in constants(graph):
        # shape/dtype come from the lazily loaded proto: counting never loads weights
        if tensor.export_dtype in (np.int64, onnx.TensorProto.INT64) or tensor.dtype == np.int64:
            continue
        total += int(np.prod(tensor.shape, dtype=np.int64))
    return total


def op_histogram(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        key = node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def forget_shapes(tensors: Iterable[gs.Tensor]) -> None:
    """Drop (possibly stale) shape info of variables so shape inference recomputes it."""
    for tensor in tensors:
        if isinstance(tensor, gs.Variable):
            tensor.shape = None


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, else ``base_1``, ``base_2``...: the first name not in ``taken``, which
    it then joins (so the next call cannot return it)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def replace_uses(old: gs.Tensor, new: gs.Tensor, readers: Iterable[gs.Node] | None = None) -> None:
    """Make every node that reads ``old`` (or only ``readers``) read ``new`` instead, at
    every input position; graph outputs are left to the caller."""
    for reader in list(old.outputs) if readers is None else list(readers):
        for i, tensor in enumerate(reader.inputs):
            if tensor is old:
                reader.inputs[i] = new


def bypass_node(graph: gs.Graph, node: gs.Node, keep_input: int = 0) -> bool:
    """Remove a single-output node by wiring its consumers to ``node.inputs[keep_input]``.

    Returns False (and changes nothing) when the node's output is a graph output that
    cannot be redirected without renaming a model output.
    """
    source = node.inputs[keep_input]
    out = node.outputs[0]
    if out in graph.outputs:
        if source in graph.inputs or source in graph.outputs or isinstance(source, gs.Constant):
            return False
        # Keep the model's output name: the source tensor takes over the name.
        upstream = producer(source)
        if upstream is None:
            return False
        index = graph.outputs.index(out)
        replace_uses(source, out, [c for c in source.outputs if c is not node])
        out.inputs.clear()
        upstream.outputs[upstream.outputs.index(source)] = out
        graph.outputs[index] = out
        node.inputs.clear()
        return True
    replace_uses(out, source)
    node.outputs.clear()
    node.inputs.clear()
    return True
