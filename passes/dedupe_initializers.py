"""``dedupe-initializers`` — share identical constant tensors (lossless).

Rewrite: constant tensors with the same dtype, shape and bytes are merged; every
consumer of a duplicate reads the one kept tensor instead (exact weight sharing),
and the duplicates disappear from the model.

Cases handled: initializers of the main graph, of any dtype with a fixed byte layout
(floats, integers, bool; float16/bfloat16/float8 are compared by their stored bits),
including scalars and shape constants (``min_size=1``). Tensors are grouped by
``(dtype, shape, sha256 of bytes)`` and a candidate is merged only after an exact byte
comparison. ``0.0`` and ``-0.0`` differ in bytes and are not merged; a NaN merges only
with the same NaN bit pattern. The kept tensor is the first one met in node order,
so the result is deterministic.

Does nothing to: tensors that are graph outputs (their name is part of the model's
signature), string tensors, tensors with fewer than ``min_size`` elements, tensors
used only inside subgraph bodies (If/Loop/Scan) or model-local functions. Sharing is
exact, so a later pass that rewrites one consumer's weight must not write into the
shared array (the project's rule: always assign a new array or a new Constant).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import replace_uses
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)

MAX_GROUPS_IN_DETAILS = 20


@register_pass
class DedupeInitializersPass(Pass):
    name = "dedupe-initializers"
    summary = "Share identical constant tensors (same dtype, shape and bytes)."
    lossless = True

    @dataclass
    class Options:
        min_size: int = option(1, "only tensors with at least this many elements", range=(0, 2**62))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        groups = self._identical_groups(graph)
        merged = saved = 0
        report = []
        for kept, duplicates in groups:
            for duplicate in duplicates:
                _rewire(duplicate, kept)
            nbytes = sum(int(d.values.nbytes) for d in duplicates)
            merged += len(duplicates)
            saved += nbytes
            merged_names = [d.name for d in duplicates]
            report.append({"kept": kept.name, "merged": merged_names, "bytes": nbytes})
        report.sort(key=lambda g: (-g["bytes"], g["kept"]))
        if merged:
            log.info("dedupe-initializers: merged %d tensors, %d bytes", merged, saved)
        return PassResult(
            changed=merged > 0,
            counts={"deduplicated": merged, "bytes_saved": saved, "groups": len(groups)},
            details={"groups": report[:MAX_GROUPS_IN_DETAILS]},
        )

    def _identical_groups(self, graph: gs.Graph) -> list[tuple[gs.Constant, list[gs.Constant]]]:
        """``(kept, duplicates)`` pairs, in the order the kept tensors are first used."""
        candidates = self._candidates(graph)
        by_layout: dict[tuple, list[gs.Constant]] = {}
        for tensor in candidates:  # cheap first cut, no bytes read: most shapes are unique
            by_layout.setdefault(_layout(tensor), []).append(tensor)
        groups: list[list[gs.Constant]] = []
        for same_layout in by_layout.values():
            if len(same_layout) > 1:
                groups += [bucket for bucket in _byte_buckets(same_layout) if len(bucket) > 1]
        order = {id(t): i for i, t in enumerate(candidates)}
        groups.sort(key=lambda bucket: order[id(bucket[0])])
        return [(bucket[0], bucket[1:]) for bucket in groups]

    def _candidates(self, graph: gs.Graph) -> list[gs.Constant]:
        """Constant node inputs of the main graph, each once, in node order."""
        protected = {id(t) for t in graph.outputs} | {id(t) for t in graph.inputs}
        seen: set[int] = set()
        found = []
        for node in graph.nodes:
            for tensor in node.inputs:
                if not isinstance(tensor, gs.Constant) or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if id(tensor) in protected or not self._eligible(tensor):
                    continue
                found.append(tensor)
        return found

    def _eligible(self, tensor: gs.Constant) -> bool:
        size = int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape is not None else 0
        if size < self.options.min_size:
            return False
        return np.dtype(tensor.dtype).kind not in "OUS"


def _layout(tensor: gs.Constant) -> tuple:
    return (str(tensor.dtype), str(tensor.export_dtype), tuple(tensor.shape))


def _byte_buckets(tensors: list[gs.Constant]) -> list[list[gs.Constant]]:
    """Split same-layout tensors into groups of byte-identical ones, keeping order."""
    by_digest: dict[str, list[list[gs.Constant]]] = {}
    buckets: list[list[gs.Constant]] = []
    for tensor in tensors:
        data = _raw(tensor)
        candidates = by_digest.setdefault(hashlib.sha256(data).hexdigest(), [])
        for bucket in candidates:
            if np.array_equal(_raw(bucket[0]), data):  # confirm: a hash match is not proof
                bucket.append(tensor)
                break
        else:
            candidates.append([tensor])
            buckets.append(candidates[-1])
    return buckets


def _raw(tensor: gs.Constant) -> np.ndarray:
    """The tensor's bytes as a flat uint8 view (no copy when already contiguous)."""
    return np.ascontiguousarray(tensor.values).reshape(-1).view(np.uint8)


def _rewire(duplicate: gs.Constant, kept: gs.Constant) -> None:
    replace_uses(duplicate, kept)
