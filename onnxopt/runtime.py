"""onnxruntime sessions for checks and for passes that need intermediate tensors.

Sessions built for *checks* run with graph optimizations disabled (the model is
measured as written, not as onnxruntime would rewrite it); ``optimize=True`` is for
benchmarks and for inspecting the kernels onnxruntime actually picks.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.model import densify_sparse_initializers, initializers_as_inputs, materialized
from onnxopt.protos import tensor_nbytes
from onnxopt.stored import stored_nbytes

Feed = Mapping[str, np.ndarray]

NO_PREPACK_BYTES = 256 * 2**20
THREADS_VAR = "ONNXOPT_THREADS"  # intra-op threads when the caller names none (tune workers)

# onnxruntime's default logger prints optimizer chatter ("cannot remove node") to
# stderr from sessions graphsurgeon and the checks create; errors still raise.
ort.set_default_logger_severity(4)


def make_session(
    model: onnx.ModelProto,
    *,
    optimize: bool = False,
    threads: int | None = None,
    optimized_model_path: str | None = None,
    prepack: bool = True,
) -> ort.InferenceSession:
    """A CPU session. ``optimize``: onnxruntime's graph optimizations (as deployed);
    off by default so that checks measure the model as written. ``prepack=False`` keeps
    weights in place for a large model (pre-packing copies them; numerics are the same).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4  # failures raise with their message; no stderr noise
    threads = threads or _env_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    large = stored_nbytes(model) >= NO_PREPACK_BYTES
    if large:
        # graphsurgeon graphs are reference cycles: a pass's dropped candidates (and the
        # weights they loaded) wait for the cyclic collector, whose timing depends on
        # allocation counts; before mapping another copy of a large model, collect now
        # (measured: 1.3 GB of the quantize-int8 peak on the 2 GiB model, run by run)
        gc.collect()
    if large and (not optimize or not prepack):
        # weights on disk (onnxopt.store): onnxruntime maps them, and pre-packing would
        # copy every MatMul/Conv weight into its own layout (checks run a few samples,
        # so what packing saves is not worth a second copy of a large model)
        options.add_session_config_entry("session.disable_prepacking", "1")
    with materialized(model) as source:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _env_threads() -> int | None:
    raw = os.environ.get(THREADS_VAR, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def feedable(session: ort.InferenceSession) -> set[str]:
    """Names a feed may set: inputs plus inputs with a default (overridable initializers)."""
    names = {i.name for i in session.get_inputs()}
    return names | {i.name for i in session.get_overridable_initializers()}


def _owned(value):
    """A copy of an onnxruntime output array, which otherwise points into its session's
    arena and keeps the whole arena alive, even after the session is deleted: 32
    PP-OCRv4 det outputs at 640x640 (52 MB) held 134 MB."""
    if isinstance(value, np.ndarray) and value.base is not None:
        return np.array(value, copy=True)
    return value


def run_samples(
    session: ort.InferenceSession,
    samples: Sequence[Feed],
    output_names: Sequence[str] | None = None,
    progress: Iterable | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run every sample; one dict of outputs per sample, arrays that own their memory
    (callers keep them across runs and sessions)."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    wanted = feedable(session)
    results = []
    for sample in progress if progress is not None else samples:
        feed = {k: v for k, v in sample.items() if k in wanted}
        results.append({n: _owned(v) for n, v in zip(names, session.run(names, feed))})
    return results


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the intermediate tensors ``names``."""
    model = toposorted(model)  # shape inference types nothing past an out-of-order node
    wanted = set(names)
    view = typed_view(densify_sparse_initializers(model))
    if any(info.name in wanted for info in view.graph.value_info):
        # a declared value_info may be stale or wrong (onnxruntime ignores it for
        # intermediates, but not once the tensor is a graph output): infer it afresh
        if view is model:
            view = onnx.ModelProto()
            view.CopyFrom(model)
        _drop_value_info(view, wanted)
    inferred = onnx.shape_inference.infer_shapes(view)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    known.update({vi.name: vi for vi in inferred.graph.input})
    known.update({vi.name: vi for vi in inferred.graph.output})
    for init in model.graph.initializer:
        known.setdefault(
            init.name, onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _drop_value_info(out, wanted)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name in existing:
            continue
        if name not in known or not known[name].type.HasField("tensor_type"):
            raise ValueError(f"cannot expose tensor {name!r}: its type is unknown")
        info = onnx.ValueInfoProto()
        info.CopyFrom(known[name])
        info.type.tensor_type.ClearField("shape")
        out.graph.output.append(info)
    return out


def _drop_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [info for info in model.graph.value_info if info.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its main-graph nodes are in topological order, else a copy
    that is (stable Kahn order; nodes in a cycle or with missing inputs go last)."""
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needs = [
        {producer[x] for x in node.input if x in producer} - {i} for i, node in enumerate(nodes)
    ]
    if all(all(j < i for j in deps) for i, deps in enumerate(needs)):
        return model
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for j in deps:
            users.setdefault(j, []).append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order: list[int] = []
    while ready:
        ready.sort()
        i = ready.pop(0)
        order.append(i)
        for k in users.get(i, ()):
            waiting[k] -= 1
            if waiting[k] == 0:
                ready.append(k)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes[i] for i in order)
    return copy


TYPED_VIEW_MIN_BYTES = 1 << 20


def typed_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """For shape inference only: ``model`` with every initializer over 1 MB replaced by a
    typed graph input (same name, dtype and dims, no data).

    onnx's shape inference serializes the model, which fails above 2 GB; large weights
    never decide a shape, so their types are all it needs. Small initializers (shape
    constants) keep their values. Returns ``model`` itself when nothing is large.
    """
    view, _, _ = initializers_as_inputs(model, lambda t: tensor_nbytes(t) > TYPED_VIEW_MIN_BYTES)
    if view is not model:
        view.ir_version = max(model.ir_version, 4)  # inputs without initializers
    return view


def iter_activations(
    model: onnx.ModelProto, names: Sequence[str], samples: Iterable[Feed]
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the tensors ``names`` for one sample at a time (memory stays per-sample)."""
    session = make_session(with_outputs(model, names))
    wanted = feedable(session)
    for sample in samples:
        feed = {k: v for k, v in sample.items() if k in wanted}
        yield dict(zip(names, session.run(list(names), feed)))


T = TypeVar("T")


def split_within(items: Iterable[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """``items`` in order, cut into consecutive runs whose ``size`` adds up to at most
    ``budget`` bytes (an item larger than ``budget`` makes a run of its own); how
    passes bound the memory one calibration run fetches or holds."""
    runs: list[list[T]] = []
    held = 0
    for item in items:
        nbytes = size(item)
        if not runs or held + nbytes > budget:
            runs.append([])
            held = 0
        runs[-1].append(item)
        held += nbytes
    return runs
