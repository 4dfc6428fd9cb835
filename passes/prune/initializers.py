"""``prune-initializers`` — zero weights, chosen and compensated on calibration data.

Eligible weights (:mod:`.weights`): the constant weight of Conv / ConvTranspose / Gemm /
MatMul and Gather tables (initializers and Constant-node weights alike), float16/32/64,
at least ``min_size`` elements, feeding only weight inputs of the listed ``ops``.

**How many zeros** each tensor gets:

- ``sparsity=s`` (default 0.5), ``scope=layer``: exactly ``round(s * size)`` per tensor;
  ``scope=global``: the tensor's share of one ranking of all eligible weights by
  ``|w| / rms(tensor)`` (float64; ties by tensor order, then position);
- ``threshold=t``: every ``|w| < t`` (the mask is fixed; ``0`` turns it off);
- ``pattern=N:M``: in every group of M consecutive weights along the reduction axis keep
  N (a trailing partial group counts its missing slots as zeros);
- ``sparsity=auto``: see :mod:`.auto` — the largest overall sparsity within the step's
  budget, distributed over the layers by their measured sensitivity.

**Which ones, and what happens to the rest** (``method``, see :mod:`.pruner`):

- ``sparsegpt`` (default): the SparseGPT sweep on the layer's input Hessian ``XᵀX``
  picks the mask block by block by the OBS saliency ``w² / [H⁻¹]ᵢᵢ`` and compensates
  the kept weights; then they are polished to the exact least-squares solution for that
  mask (:mod:`.sparsegpt`). Inputs come from the calibration samples, one onnxruntime
  run per stage (:mod:`.refit`): later stages see the earlier stages already pruned and
  are fitted to reproduce the *unpruned* outputs;
- ``wanda``: per output row, the lowest ``|w_j| * ||x_j||`` (one calibration run, column
  norms only); kept weights unchanged unless ``reconstruct=true``;
- ``magnitude``: the lowest ``|w|``, no calibration data (ties by position, exactly what
  a stable sort picks; an exact radix select, no sort); ``reconstruct=true`` refits the
  kept weights as SparseGPT does, on the magnitude mask. ``reconstruct=false`` without
  a method also means magnitude (SparseGPT always refits).

Weights no refit applies to (Gather tables, batched MatMul weights, ConvTranspose with
``output_shape``...) are pruned by magnitude, and a note says why. So is everything when
there are no calibration samples (the PassManager generates N(0,1) samples when no
``--data`` is given: pass real data for the refit to mean anything).

The reduction ("input") axis of each weight, along which N:M groups run, and the rows
a mask is chosen in: Conv ``W[O, I/g, k...]`` — per output channel, the flattened
``I/g * k``; ConvTranspose ``W[I, O/g, k...]`` — per output channel, its ``I/g * k``
inputs; Gemm B — K (``transB`` decides which stored axis that is); MatMul B ``[K, N]``
— K per column; Gather ``[V, D]`` — per row.

``store=sparse`` (:mod:`.storage`) writes each pruned tensor as an ONNX
``sparse_initializer`` when that is smaller; onnxruntime densifies it on load, outputs
are identical.

The pass runs numpy's BLAS on one thread: the refit's bits would otherwise depend on
the thread count (OpenBLAS's threaded Cholesky and some products), and the same model,
data and seed give the same file on any machine.

Idempotent: a tensor that already has at least the requested zeros (or whose N:M groups
already hold M - N zeros) is left alone; zeros a tensor already has are always kept
(they count towards its total). ``sparsity=0`` is a no-op. With ``threshold=`` and a
refit, a second run may zero refitted weights that fell below the threshold.

Report: ``details["tensors"]`` per tensor (``sparsity_before`` / ``_after``, ``zeroed``,
shape, op, storage, and ``output_error`` = the layer's relative output error on the
calibration inputs, for refitted tensors); counts ``eligible_sparsity``,
``weights_zeroed``, ``tensors_pruned``, ``tensors_refitted``, ``calibration_runs``,
``sparse_bytes_saved``. Subgraph bodies (If/Loop/Scan) are not visited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues
from threadpoolctl import threadpool_limits

from onnxopt.passes.prune import auto
from onnxopt.passes.prune.pruner import Outcome, Pruner, Request, request_counts
from onnxopt.passes.prune.selection import parse_pattern
from onnxopt.passes.prune.storage import try_store_sparse
from onnxopt.passes.prune.weights import PRUNABLE_OPS, Selection, check_ops, select_weights
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)

METHODS = ("sparsegpt", "wanda", "magnitude")


@register_pass
class PruneInitializersPass(Pass):
    name = "prune-initializers"
    summary = "Zero weights: SparseGPT on calibration data (default), Wanda, magnitude, N:M."
    lossless = False

    @dataclass
    class Options:
        sparsity: float | Literal["auto"] | None = option(
            None, "fraction of weights to zero, or auto (default 0.5 without threshold/pattern)"
        )
        threshold: float = option(0.0, "zero every |w| below this instead (0: off)")
        scope: Literal["layer", "global"] = option("layer", "count zeros per tensor or overall")
        pattern: str = option("unstructured", "unstructured or N:M (keep N of every M)")
        method: Literal["sparsegpt", "wanda", "magnitude"] = option(
            "sparsegpt", "how the mask is chosen (sparsegpt also refits)"
        )
        reconstruct: bool | None = option(
            None, "refit kept weights (default: sparsegpt yes, others no; false: magnitude)"
        )
        ops: tuple[str, ...] = option(PRUNABLE_OPS, "op types whose weights are pruned")
        exclude: tuple[str, ...] = option((), "node or tensor name globs to leave alone")
        min_size: int = option(256, "skip tensors with fewer elements", range=(0, 2**62))
        store: Literal["dense", "sparse"] = option("dense", "sparse: COO sparse_initializer")

        def validate(self) -> None:
            given = (
                (["sparsity"] if self.sparsity is not None else [])
                + (["threshold"] if self.threshold else [])
                + (["pattern"] if self.pattern != "unstructured" else [])
            )
            if len(given) > 1:
                raise ValueError(f"give one of sparsity=, threshold=, pattern=N:M, not {given}")
            if isinstance(self.sparsity, float) and not 0 <= self.sparsity <= 0.99:
                raise ValueError(f"sparsity={self.sparsity} must be in [0, 0.99] or auto")
            if self.threshold < 0:
                raise ValueError(f"threshold={self.threshold} must be >= 0")
            parse_pattern(self.pattern)
            check_ops(self.ops)

    @property
    def method(self) -> str:
        """The method in effect: SparseGPT always refits, so ``reconstruct=false``
        with it means magnitude pruning (what that option meant before there were
        methods)."""
        if self.options.method == "sparsegpt" and self.options.reconstruct is False:
            return "magnitude"
        return self.options.method

    @property
    def refits(self) -> bool:
        return self.method == "sparsegpt" or bool(self.options.reconstruct)

    @property
    def uses_calibration(self) -> bool:
        return self.method != "magnitude" or self.refits

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # OpenBLAS's threaded kernels (Cholesky, some matrix products) change the last
        # bits of a refit with the number of threads: one thread, the same file anywhere
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run(graph, ctx)

    def _run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        options = self.options
        selection = select_weights(graph, options.ops, options.exclude, options.min_size)
        details: dict = {}
        if options.sparsity == "auto":
            outcome, found = auto.search(graph, selection, ctx, self)
            details.update(found)
        else:
            outcome = self.prune(graph, selection, ctx, self.request(selection))
        saved = 0
        if options.store == "sparse":
            saved = store_sparse(graph, selection, outcome)
        details["tensors"] = outcome.stats
        counts = _counts(outcome, selection, saved)
        for note in outcome.notes:
            log.info("prune-initializers: %s", note)
        changed = counts["weights_zeroed"] > 0 or saved > 0
        return PassResult(changed, counts, details, outcome.notes, skipped=selection.skipped)

    def request(self, selection: Selection, sparsity: float | None = None) -> Request:
        """The pass's rule as a :class:`Request` (``sparsity`` overrides the option)."""
        options = self.options
        if options.pattern != "unstructured":
            return Request("pattern", pattern=parse_pattern(options.pattern))
        if options.threshold:
            return Request("threshold", threshold=options.threshold)
        if sparsity is None:
            sparsity = 0.5 if options.sparsity is None else float(options.sparsity)
        if not sparsity:
            return Request("none")
        counts = request_counts(selection, sparsity, options.scope)
        return Request("sparsity", counts, scope=options.scope, sparsity=sparsity)

    def prune(
        self,
        graph: gs.Graph,
        selection: Selection,
        ctx: PassContext,
        request: Request,
        *,
        statistics: dict | None = None,
    ) -> Outcome:
        """Prune ``selection`` by ``request``; ``statistics`` (from :mod:`.auto`) are
        reused instead of collected, and then the refit is one-shot."""
        return self._pruner(graph, selection, ctx, statistics).run(request)

    def probe(self, graph, target, ctx: PassContext, request: Request, stats) -> float:
        """Relative output error of ``target`` pruned alone (graph unchanged)."""
        pruner = self._pruner(graph, Selection([target]), ctx, {target.name: stats})
        return pruner.probe(target, stats, request)

    def _pruner(self, graph, selection, ctx, statistics) -> Pruner:
        return Pruner(
            graph,
            selection,
            ctx,
            method=self.method,
            reconstruct=self.refits,
            statistics=statistics,
        )


def store_sparse(graph: gs.Graph, selection: Selection, outcome: Outcome) -> int:
    if graph.ir_version is not None and 0 < graph.ir_version < 6:
        outcome.notes.append(f"IR version {graph.ir_version} < 6 has no sparse_initializer")
        return 0
    saved = 0
    by_name = {s["tensor"]: s for s in outcome.stats}
    for target in selection.targets:
        saved += try_store_sparse(target.tensor)
        stored = "sparse" if isinstance(target.tensor._values, SparseValues) else "dense"
        by_name[target.name]["stored"] = stored
    return saved


def _counts(outcome: Outcome, selection: Selection, saved: int) -> dict:
    stats = outcome.stats
    total = sum(s["size"] for s in stats)
    zeros = sum(round(s["sparsity_after"] * s["size"]) for s in stats)
    return {
        "eligible_tensors": len(stats),
        "tensors_pruned": sum(1 for s in stats if s["zeroed"] > 0),
        "weights_zeroed": sum(s["zeroed"] for s in stats),
        "eligible_sparsity": round(zeros / total, 4) if total else 0.0,
        "skipped": len(selection.skipped),
        "tensors_refitted": outcome.refitted,
        "calibration_runs": outcome.runs,
        "calibration_macs": outcome.macs,
        "sparse_bytes_saved": saved,
    }
