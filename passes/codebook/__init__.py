"""``share-weights`` — codebook weight sharing with 1-D k-means (lossy, Deep Compression style).

Rewrite: the values of each eligible weight ``W`` are clustered into ``K = 2**bits``
shared values (``bits=auto``, the default: a width per weight, 2..8 or float16, the
smallest file that meets the step's budget, ``passes/codebook/auto.py``; ``bits=4``
under the default budget was rolled back on four of the five zoo models). ``W`` is
then stored as integer *indices* plus a small float *codebook*, and rebuilt in front
of its consumers (``passes/codebook/rewrite.py``)::

    tensor:   W = Gather(codebook[K], Cast<int32>(indices))
    channel:  W = Gather(codebook[C*K], Add(Cast<int32>(indices), offsets))
    scaled:   W = Mul(Gather(codebook[K], Cast<int32>(indices)), scales[C, 1, ...])
    small constants: C1, C2, ... = Split(Cast<float>(float16 values))  (or a pooled codebook)

``indices`` has ``W``'s shape and layout (UINT8, or packed UINT4 — two per byte — when
``bits <= 4`` and the opset is >= 21); ``offsets`` (int32, ``c*K`` along the channel axis)
selects channel ``c``'s part of the flat codebook; ``scales`` (one per output channel,
float16-exact) multiply one shared codebook. The rebuilt tensor keeps ``W``'s name and
every consumer reads it. The rebuild depends only on constants: onnxruntime folds it
back into a float initializer when the session is created (level BASIC and above), so
the *file* shrinks while speed and memory are those of the float model.
``materialize=true`` snaps ``W`` in place instead (float storage, same graph, same
outputs). Generated names are short (``sw3.idx``, ``sw3.cb`` ...).

What is shared (``passes/codebook/selection.py``):

- **weights** (both scopes): constant weight/embedding inputs of Conv, ConvTranspose,
  Gemm, MatMul and Gather, and constants that reach only such inputs or LSTM/GRU/RNN
  ``W``/``R`` through layout ops (``LAYOUT_INPUTS``: Slice, Concat, Unsqueeze, Reshape,
  ... — torch exports recurrent weights that way), holding at least
  ``max(min_size, SMALL_SHARE x all weights)`` elements: one codebook each.
- ``scope=all`` (default) also takes every other float constant read (directly or
  through layout ops) only at a position of ``CONSTANT_INPUTS`` — biases, Batch/Layer/
  Instance/GroupNormalization parameters, PRelu slopes, Add/Sub/Mul/Div/Concat
  operands, recurrent ``B`` — and the weights under that size. By default
  (``pool_bits=0``) they are stored as float16 (``passes/codebook/constants.py``): half
  the bytes at ~66 dB, where float16 holds them faithfully; ``pool_bits=2..8`` pools
  them into one codebook instead (measured: pooled biases of BatchNorm-folded Convs
  were the largest single error on PP-OCR rec). Tensors under 8 elements stay.
  Constants read anywhere else (Resize scales, Clip bounds, Pow exponents, shapes) are
  never touched.

Granularity (``granularity=auto``, the default): rows are output channels (Conv axis
0, ConvTranspose 1, Gemm/MatMul the output-feature axis, LSTM weights their gate rows,
Gather tables their rows — a table row is read whole, like a filter). A weight gets
one codebook **per channel** when a channel's codebook (``2**bits`` values) costs at
most ``CHANNEL_SHARE`` (half) of its indices at 2-4 bits (rows of >= 256 float32 at 4
bits), ``CHANNEL_SHARE_HIGH`` (an eighth) above; otherwise one codebook with
one **scale** per channel (each row divided by its largest magnitude, so no channel is
crushed by another's range: BatchNorm-folded weights have row scales 1e-3..1) when
that makes the mean relative row error ``SCALED_GAIN`` times smaller than one codebook
for the **tensor** does; else the tensor's single codebook. float16 weights and
``materialize=true`` use no scales.

Calibration (``calibrate=true`` and calibration samples, ``passes/codebook/calibration.py``):
each weight's importance is the variance of the input feature it reads (read counts
for table rows), and k-means weighs each value by it (SqueezeLLM-style sensitivity
weighting) where no error feedback runs; with ``feedback=true`` the indices of
Conv/Gemm/MatMul weights (with enough calibration rows; their k-means is unweighted)
are chosen column by column, each column's error fed forward through the inputs'
covariance (GPTQ's error feedback with codebook snapping, ``passes/codebook/feedback.py``);
then the output channels' mean shift ``sum_i dW[o, i] mu_i`` is subtracted from the
following bias (Conv/Gemm bias, the Add after a MatMul, the running mean of a
BatchNormalization reading the Conv, or a new Conv bias) — bias correction. On real
models the activations are mostly their mean, and this removes most of the error.

k-means (``passes/codebook/kmeans.py``): one dimension, per row, weighted Lloyd
iterations from prefix sums (O(K log n) each) until the assignment stops changing (or
``max_iter``); ``init=best`` keeps, per codebook, the smallest error of three starts:
``linear`` (Deep Compression's, best before retraining the codebook), ``density``
(quantiles) and ``cuberoot`` (point density ~ p^(1/3), the high-rate optimum: 8-bit
k-means on heavy-tailed weights went from 27 to 39 dB). Exact zeros stay exactly
zero (a centroid is fixed at 0.0); a row with at most K distinct values keeps them
exactly; centroids are stored in the tensor's dtype and indices point to the nearest
*stored* centroid, so the reported error is the file's; codebook entries are numbered
by use. Nothing is random: the output is byte-identical run to run.

- ``upgrade_opset=auto``: when UINT4 indices are wanted and the opset is below 21,
  the pass declares it needs opset 21 and the PassManager runs
  ``upgrade-opset(target=21)`` before it, as a checked step of its own; when that step
  fails, indices are stored as UINT8 with a note. ``true`` (or ``index_dtype=uint4``)
  makes opset 21 a hard requirement: the step is skipped with the reason instead.
  ``false`` never converts. UINT4 raises the IR version to 10.

Does nothing to (reported as skipped, with the reason): non-float or
too-small tensors, tensors with NaN/Inf, graph inputs and outputs, constants also read
inside a subgraph body, the codebook and scales of an existing rebuild (a second run
changes nothing), constants no ``ops`` glob matches or an ``exclude`` glob names,
encodings that would not be smaller than the tensor, float16 values float16 cannot hold.

Reported per tensor in ``details["tensors"]``: bits, granularity (tensor, channel,
scaled, pool, float16), axis, index/codebook names, codebooks, MSE and SQNR, zeros
kept, whether importances weighed the k-means (``weighted``) or error feedback chose the
indices (``feedback``; then the k-means is unweighted), which bias took the correction,
k-means iterations and seconds, bytes before/after.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxopt.errors import PassCannotRun, UsageError
from onnxopt.graph import to_graph
from onnxopt.passes.codebook import auto, calibration, feedback, sparse
from onnxopt.passes.codebook.constants import by_dtype, try_half, try_pool
from onnxopt.passes.codebook.kmeans import Encoded, encode, encode_scaled
from onnxopt.passes.codebook.measure import row_error, stats
from onnxopt.passes.codebook.rewrite import Rewriter
from onnxopt.passes.codebook.selection import Candidate, Selection, select
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass
from onnxopt.registry import Requirement, default_opset
from onnxopt.results import Skip

log = logging.getLogger(__name__)

UINT4_OPSET = 21  # first opset whose Cast accepts tensor(uint4)
UINT4_IR = 10  # first IR version with the UINT4 data type
# granularity=auto on short rows: one scale per row when that makes the mean relative row
# error this many times smaller than one codebook. 1.5 (to save the scales' bytes on tiny
# models) cost PP-OCR det 0.977 -> 0.969 worst-output cosine: any gain counts.
SCALED_GAIN = 1.0
# granularity=auto: one codebook per channel when it costs at most this share of the
# channel's indices: half at 2-4 bits (what keeps PP-OCR and MiniLM above cosine 0.98),
# an eighth above 4 bits, where one scaled codebook is within round-off already and 4,000
# channels x 256 entries made the 10 M MatMul's 8-bit file 2.83x smaller instead of 4x
CHANNEL_SHARE = 0.5
CHANNEL_SHARE_HIGH = 0.125


@register_pass
class ShareWeightsPass(Pass):
    name = "share-weights"
    summary = "Cluster each weight tensor into 2^bits shared values (k-means codebook)."
    lossless = False

    @dataclass
    class Options:
        bits: int | Literal["auto"] = option(
            "auto",
            "codebook size 2^bits per tensor/channel; auto = a width (2..8, or float16) "
            "per weight from measured sensitivity, the smallest file within the budget "
            "(budget none: cosine>=0.99)",
            range=(2, 8),
        )
        granularity: Literal["auto", "tensor", "channel", "scaled"] = option(
            "auto",
            "one codebook per tensor; per output channel; scaled = one codebook, one scale "
            "per output channel; auto = channel where a channel's codebook costs at most "
            "half its indices (an eighth above 4 bits), else scaled when it balances the "
            "rows, else tensor",
        )
        scope: Literal["weights", "all"] = option(
            "all",
            "weights: Conv/Gemm/MatMul/Gather weights; all: also biases, normalization "
            "parameters, elementwise operands and weights under min_size, stored as "
            "float16 (or pooled at pool_bits)",
        )
        pool_bits: int = option(
            0,
            "0: scope=all constants in float16; 2..8: pooled into one codebook of "
            "2^pool_bits values (under min_size; larger ones get their own codebook)",
            range=(0, 8),
        )
        calibrate: bool = option(
            True,
            "with calibration data: importance-weighted k-means (input variance per "
            "feature, read counts per table row) and bias correction",
        )
        feedback: bool = option(
            True,
            "with calibration data: choose the indices column by column, feeding each "
            "column's error forward through the inputs' covariance (GPTQ-style)",
        )
        init: Literal["best", "linear", "density", "cuberoot"] = option(
            "best",
            "k-means start: evenly over [min, max], at the quantiles, at the quantiles of "
            "density^(1/3), or best = all three, keeping the smallest error per codebook",
        )
        index_dtype: Literal["auto", "uint8", "uint4"] = option(
            "auto", "index storage; auto = uint4 when bits<=4 and opset>=21, else uint8"
        )
        upgrade_opset: bool | Literal["auto"] = option(
            "auto",
            "convert to opset 21 for uint4 indices: auto = when it succeeds (else uint8, "
            "with a note), true = or fail, false = never",
        )
        materialize: bool = option(
            False, "snap weights to their centroids in place (float storage, no Gather)"
        )
        fold_batchnorm: bool = option(
            True,
            "fold BatchNormalization into the Conv/ConvTranspose/Gemm before it first "
            "(fold-batchnorm, a checked lossless prerequisite): one bias per channel "
            "instead of four parameters",
        )
        min_size: int = option(
            256, "own codebook for tensors with at least this many elements", range=(1, 2**62)
        )
        max_iter: int = option(100, "maximum Lloyd iterations", range=(1, 10000))
        ops: tuple[str, ...] = option(("*",), "consumer op types to consider (globs)")
        exclude: tuple[str, ...] = option((), "tensor or node names to leave alone (globs)")

        def validate(self) -> None:
            if self.bits == "auto" and self.materialize:
                raise ValueError("bits=auto writes codebooks; materialize=true needs a fixed bits")
            if self.pool_bits == 1:
                raise ValueError("pool_bits must be 0 (float16 constants) or 2..8")
            if self.index_dtype == "uint4" and self.bits != "auto" and self.bits > 4:
                raise ValueError(
                    f"index_dtype=uint4 holds 16 values, bits={self.bits} needs "
                    f"{2**self.bits}; use bits<=4 or index_dtype=uint8|auto"
                )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # one BLAS thread: threaded OpenBLAS changes the last bits of the feedback's
        # Cholesky with the thread count, and the output must be the same bytes
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run(graph, ctx)

    def _run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        chosen = select(graph, opts)
        notes: list[str] = []
        index_bits = 0
        if (chosen.own or chosen.pooled) and not opts.materialize:
            index_bits, notes = self._choose_index_bits(graph, chosen)
        found = self._calibrate(graph, ctx, chosen.own)
        self._encodings: dict[tuple[str, int], tuple[Encoded, bool]] = {}
        widths, searched = None, None
        if opts.bits == "auto" and chosen.own and not opts.materialize:
            widths, searched = self._auto_widths(graph, ctx, chosen, index_bits, found)
        skipped = chosen.skipped
        records = self._share_all(Rewriter(graph), chosen, widths, index_bits, found, skipped)
        if records and not opts.materialize:
            graph.toposort()  # the Gather chains were appended after their consumers
        result = self._result(records, skipped, notes, index_bits)
        if searched is not None:
            result.details["auto"] = searched
        return result

    def _share_all(
        self,
        rewriter: Rewriter,
        chosen: Selection,
        widths: dict[str, int] | None,
        index_bits: int,
        found: calibration.Calibration | None,
        skipped: list,
    ) -> list[dict[str, Any]]:
        """Encode ``chosen``'s weights (at ``widths``, or ``bits``), then its constants."""
        opts, records, halves = self.options, [], []
        for candidate in chosen.own:
            bits = opts.bits if widths is None else widths.get(candidate.tensor.name, 16)
            if bits == 16:  # bits=auto found no codebook good enough: float16
                halves.append(candidate)
                continue
            stored = 4 if bits <= 4 and index_bits == 4 else 8
            try:
                records.append(self._try_share(rewriter, candidate, stored, found, bits))
            except Skip as reason:
                skipped.append(candidate.skip(str(reason)))
        rewriter.finish()  # the sparse index stream's decoder, before the codebooks are told apart
        # again: bias correction may have changed or added constants
        graph = rewriter.graph
        pooled = select(graph, opts, chosen.floor).pooled if chosen.pooled else []
        # float16-exact codebooks of streamed weights join the float16 constants (lossless)
        for codebook, gather in rewriter.streamed_codebooks:
            if codebook.values.dtype != np.float16 and self._halve_codebook(codebook.values):
                pooled.append(Candidate(codebook, [(gather, 0)], frozenset()))
        groups = [(members, bool(opts.pool_bits)) for members in by_dtype(pooled)]
        groups += [(members, False) for members in by_dtype(halves)]
        for members, codebook in groups:
            try:
                if codebook:
                    records.append(try_pool(rewriter, opts, members, index_bits, skipped))
                elif record := try_half(rewriter, opts, members, skipped):
                    records.append(record)
            except Skip as reason:
                skipped.extend(m.skip(str(reason)) for m in members)
        return records

    def _halve_codebook(self, values: np.ndarray) -> bool:
        """Whether a streamed weight's codebook is rounded to float16 and stored with the
        float16 constants: float32 weights, ``scope=all`` with ``pool_bits=0``."""
        opts = self.options
        return values.dtype == np.float32 and opts.scope == "all" and not opts.pool_bits

    def _auto_widths(self, graph, ctx, chosen, index_bits, found):
        """``bits=auto``: ``(width per weight, search record)`` (``passes/codebook/auto.py``)."""
        weights, overrides = [], {}
        for candidate in chosen.own:
            if np.all(np.isfinite(candidate.tensor.values)):
                weight, trial = self._auto_options(candidate, index_bits, found)
                weights.append(weight)
                overrides[weight.name] = trial
        samples = ctx.calibration[: auto.SENSITIVITY_SAMPLES]
        if samples:
            measured = auto.measure_gains(ctx.to_model(graph), overrides, samples)
            for weight in weights:
                error = weight.error[auto.REFERENCE_BITS]
                weight.gain = measured[weight.name] / error if error > 0 else 0.0
            floor = auto.GAIN_FLOOR * float(np.median([w.gain for w in weights]))
            for weight in weights:
                weight.gain = max(weight.gain, floor)

        def check(widths: dict[str, int]) -> tuple[bool, float, int]:
            copy = graph.copy()
            mirror = select(copy, self.options, chosen.floor)
            twin = None
            if found is not None:
                twin = calibration.Calibration(calibration.readers(mirror.own), found.stats)
            records = self._share_all(Rewriter(copy), mirror, widths, index_bits, twin, [])
            copy.toposort()
            size = sum(r["bytes_after"] for r in records)
            try:
                evaluation = ctx.evaluate(copy)
            except RuntimeError:  # no evaluator (the pass run on its own): trust the model
                return True, sum(w.predicted(widths[w.name]) for w in weights), size
            cosine = evaluation.worst().get("cosine") if evaluation.metrics else None
            worst = 1.0 - cosine if cosine is not None else float("inf")
            return evaluation.ok and worst <= allowance, worst, size

        allowance = auto.target_error(ctx.budget)
        best, trials = auto.search(weights, allowance, check)
        chosen_trial = best or min(trials, key=lambda t: t.worst)
        record = {
            "allowance": allowance,
            "trials": [
                {
                    "worst_1_minus_cosine": t.worst,
                    "within_budget": t.ok,
                    "bytes": t.size,
                    "widths": _count_widths(t.widths),
                }
                for t in trials
            ],
            "widths": _count_widths(chosen_trial.widths),
        }
        return chosen_trial.widths, record

    def _auto_options(self, candidate, index_bits, found) -> tuple[auto.Weight, dict]:
        """A weight's bytes and relative error per width, and its 4-bit trial override."""
        values = candidate.tensor.values
        encoded, correctable = self._encode(candidate, auto.REFERENCE_BITS, found)
        shared = encoded.reconstruct()
        importance = found.importance(candidate.tensor.name, correctable) if found else None
        error = _relative_error(values, shared, importance)
        weight = auto.Weight(candidate.tensor.name, values.size, 1.0)
        allowed = [
            b for b in auto.WIDTHS if self.options.index_dtype != "uint4" or b in (2, 3, 4, 16)
        ]
        for bits in allowed:
            weight.bytes[bits] = self._width_bytes(candidate, values, encoded, bits, index_bits)
            weight.error[bits] = (
                auto.HALF_ERROR if bits == 16 else error * 4.0 ** (auto.REFERENCE_BITS - bits)
            )
        trial = {candidate.tensor.name: shared}
        reader = found.readers.get(candidate.tensor.name) if found else None
        if correctable and reader is not None:
            delta = shared.astype(np.float64) - values.astype(np.float64)
            shift = found.output_shift(candidate.tensor.name, delta)
            bias = calibration.corrected_bias(reader, shift) if shift is not None else None
            if bias is not None:
                trial[bias[0]] = bias[1]
        return weight, trial

    def _width_bytes(self, candidate, values, reference: Encoded, bits, index_bits) -> int:
        """Stored bytes of ``values`` at ``bits`` (16: float16)."""
        if bits == 16:
            return 2 * values.size
        stored = 4 if bits <= 4 and index_bits == 4 else 8
        item, entries = values.dtype.itemsize, 2**bits
        index = (values.size * stored + 7) // 8
        form, axis = self._granularity(candidate, values, bits)
        if form == "channel":
            return index + values.shape[axis] * (entries * item + 4)
        if form != "tensor" and reference.scales is not None:
            return index + entries * item + 2 * values.shape[axis]
        return index + entries * item

    # ------------------------------------------------------------------ index type

    def requires(self, model: onnx.ModelProto) -> tuple[Requirement, ...]:
        """``fold-batchnorm`` when a BatchNormalization reads a layer with a constant
        weight (optional), then opset 21 when uint4 indices are wanted (optional with
        ``upgrade_opset=auto``)."""
        needs = []
        if self.options.fold_batchnorm and _foldable_batchnorm(model):
            reason = "BatchNormalization parameters cost four float16 values per channel"
            needs.append(Requirement("fold-batchnorm", reason, optional=True))
        opset = self._requires_opset(model)
        return (*needs, opset) if opset is not None else tuple(needs)

    def _requires_opset(self, model: onnx.ModelProto) -> Requirement | None:
        opts = self.options
        if opts.materialize or opts.upgrade_opset is False:
            return None
        if default_opset(model) >= UINT4_OPSET:
            return None
        if not self._wants_uint4(select(to_graph(model), opts)):
            return None
        hard = opts.index_dtype == "uint4" or opts.upgrade_opset is True
        reason = f"uint4 indices need opset {UINT4_OPSET} (Cast from uint4)"
        return Requirement(f"upgrade-opset(target={UINT4_OPSET})", reason, optional=not hard)

    def _wants_uint4(self, chosen: Selection) -> bool:
        opts = self.options
        low = opts.bits == "auto" or opts.bits <= 4
        small = bool(chosen.own and low) or bool(chosen.pooled and 2 <= opts.pool_bits <= 4)
        return opts.index_dtype == "uint4" or (opts.index_dtype == "auto" and small)

    def _choose_index_bits(self, graph: gs.Graph, chosen: Selection) -> tuple[int, list[str]]:
        """``(index bits, notes)``: uint4 where wanted and the opset (21) allows it."""
        opts = self.options
        if not self._wants_uint4(chosen):
            return 8, []
        opset = int(graph.opset)
        if opset >= UINT4_OPSET:
            _raise_ir_version(graph)
            return 4, []
        message = f"opset {opset} < {UINT4_OPSET}: Cast from uint4 needs opset {UINT4_OPSET}"
        if opts.upgrade_opset is False:
            message += ", so indices are stored as uint8 (upgrade_opset=false)"
            if opts.index_dtype == "uint4":
                raise UsageError(f"share-weights: index_dtype=uint4 with {message}")
            return 8, [message]
        if opts.index_dtype == "uint4" or opts.upgrade_opset is True:
            raise PassCannotRun(
                f"share-weights: upgrade_opset={_text(opts.upgrade_opset)}: {message}; run "
                f"upgrade-opset(target={UINT4_OPSET}) first, or use upgrade_opset=auto to fall "
                "back to uint8 indices"
            )
        return 8, [f"{message} (the upgrade-opset step did not succeed); indices are uint8"]

    # ------------------------------------------------------------------ one codebook

    def _calibrate(
        self, graph: gs.Graph, ctx: PassContext, own: list[Candidate]
    ) -> calibration.Calibration | None:
        """Importances and bias-correction data from the calibration samples (or None)."""
        if not (self.options.calibrate and ctx.calibration and own):
            return None
        found = calibration.Calibration(calibration.readers(own))
        if self.options.feedback:
            for name, reader in found.readers.items():
                if feedback.supports(reader.node, reader.weight):
                    found.hessians[name] = feedback.Hessian(reader.node, np.random.default_rng(0))
        if found.readers:
            model = ctx.to_model(graph)
            found.stats = calibration.collect(found.readers, model, ctx.calibration, found.hessians)
        return found

    def _encode(
        self, candidate: Candidate, bits: int, found: calibration.Calibration | None
    ) -> tuple[Encoded, bool]:
        """The tensor's encoding at ``bits`` and whether its bias can be corrected."""
        opts = self.options
        values = candidate.tensor.values
        form, axis = self._granularity(candidate, values, bits)
        reader = found.readers.get(candidate.tensor.name) if found else None
        correctable = reader is not None and calibration.has_bias_slot(reader)
        key = (candidate.tensor.name, bits)
        if key in self._encodings:
            return self._encodings[key]
        hessian = _usable_hessian(found, candidate.tensor.name)
        importance = None  # with feedback, unweighted k-means (passes/codebook/feedback.py)
        if found is not None and hessian is None:
            importance = found.importance(candidate.tensor.name, correctable)
        settings = dict(init=opts.init, max_iter=opts.max_iter, weights=importance)
        encoded, _ = self._encode_fresh(values, bits, form, axis, settings, correctable)
        if hessian is not None:
            encoded = feedback.refine(encoded, values, hessian, correctable)
        self._encodings[key] = encoded, correctable
        return self._encodings[key]

    def _encode_fresh(self, values, bits, form, axis, settings, correctable):
        k = 2**bits
        if form == "channel":
            return encode(values, k, axis, **settings), correctable
        single = encode(values, k, None, **settings)
        if form == "tensor":
            return single, correctable
        scaled = encode_scaled(values, k, axis, **settings)
        if form == "scaled":
            return scaled, correctable
        balanced = row_error(values, scaled, axis, settings["weights"]) * SCALED_GAIN
        if balanced < row_error(values, single, axis, settings["weights"]):
            return scaled, correctable
        return single, correctable

    def _granularity(self, candidate: Candidate, values: np.ndarray, bits: int):
        """``(form, channel axis)``: tensor, channel, scaled, or auto-scaled (scaled when
        it balances the rows' errors clearly better than one codebook does)."""
        axis = candidate.row_axis(values.ndim)
        wanted = self.options.granularity
        if axis is None or wanted == "tensor" or values.shape[axis] < 2:
            return "tensor", None
        if wanted != "auto":
            return wanted, axis
        row = values.size // values.shape[axis]
        # a channel's own codebook (2^bits values) costs at most this share of its indices
        share = CHANNEL_SHARE if bits <= 4 else CHANNEL_SHARE_HIGH
        if share * row * bits / 8 >= 2**bits * values.dtype.itemsize:
            return "channel", axis
        if self.options.materialize or values.dtype == np.float16:
            return "tensor", None  # few distinct values / no float16 products
        return "auto-scaled", axis

    def _try_share(
        self,
        rewriter: Rewriter,
        candidate: Candidate,
        index_bits: int,
        found: calibration.Calibration | None,
        bits: int | None = None,
    ) -> dict[str, Any]:
        opts = self.options
        tensor = candidate.tensor
        bits = bits or opts.bits
        values = tensor.values
        if not np.all(np.isfinite(values)):
            raise Skip("has NaN or Inf values")
        encoded, correctable = self._encode(candidate, bits, found)
        names: dict[str, str] = {}
        streamed = False  # the indices join the step's sparse index stream
        if not opts.materialize:
            streamed = sparse.worth_it(encoded.indices, index_bits, int(rewriter.graph.opset))
            if streamed and self._halve_codebook(values):
                encoded = _half_codebook(encoded)
        shared = encoded.reconstruct()
        if opts.materialize:
            if encoded.exact_rows == encoded.channels and encoded.scales is None:
                raise Skip(f"already has at most {2**bits} distinct values per codebook")
            bytes_after = shared.nbytes
        else:
            bytes_after = encoded.stored_bytes(index_bits)
            if streamed:
                packed = (encoded.indices.size * index_bits + 7) // 8
                bytes_after += sparse.stream_bytes(encoded.indices) - packed
            if bytes_after >= values.nbytes:
                raise Skip(
                    f"indices + codebook ({bytes_after} bytes) would not be smaller than "
                    f"the tensor ({values.nbytes} bytes); use fewer bits or granularity=tensor"
                )
        corrected = None
        if correctable:
            corrected = _correct_bias(rewriter, found, candidate, values, shared)
        if opts.materialize:
            tensor.values = shared  # a new array: Graph.copy() shares the old one
        else:
            names = rewriter.rewire(tensor, encoded, index_bits, stream=streamed)
        record = stats(values, shared, encoded)
        fed = _usable_hessian(found, tensor.name) is not None
        axis = None
        if encoded.granularity != "tensor":
            axis = candidate.row_axis(values.ndim)
        record.update(
            tensor=tensor.name,
            shape=list(values.shape),
            consumers=sorted({node.name or node.op for node, _ in candidate.uses}),
            bits=bits,
            granularity=encoded.granularity,
            axis=axis,
            index_bits=index_bits or None,
            index_stream=streamed,
            weighted=bool(found and tensor.name in found.readers) and not fed,
            feedback=fed,
            bias_corrected=corrected,
            bytes_before=int(values.nbytes),
            bytes_after=int(bytes_after),
            **names,
        )
        return record

    # ------------------------------------------------------------------ report

    def _result(self, records, skipped, notes, index_bits) -> PassResult:
        before = sum(r["bytes_before"] for r in records)
        after = sum(r["bytes_after"] for r in records)
        seconds = sum(r["kmeans_seconds"] for r in records)
        pooled = sum(len(r.get("pool", ())) for r in records)
        counts = {
            "tensors_shared": sum(1 for r in records if "pool" not in r) + pooled,
            "pooled": pooled,
            "weights_shared": sum(int(np.prod(r["shape"])) for r in records),
            "skipped": len(skipped),
            "bytes_before": before,
            "bytes_after": after,
        }
        if records:
            form = "materialized" if self.options.materialize else f"uint{index_bits} indices"
            log.info(
                "share-weights: %d tensors (%d pooled), %d -> %d bytes (%s), k-means %.2f s",
                counts["tensors_shared"],
                pooled,
                before,
                after,
                form,
                seconds,
            )
        for note in notes:
            log.info("share-weights: %s", note)
        details = {
            "tensors": records,
            "index_bits": index_bits or None,
            "kmeans_seconds": round(seconds, 4),
        }
        return PassResult(bool(records), counts, details, notes, skipped=skipped)


# ---------------------------------------------------------------------------- helpers


def _relative_error(values: np.ndarray, shared: np.ndarray, importance) -> float:
    """``sum h dW^2 / sum h W^2`` (h: the importances, or ones)."""
    exact = values.astype(np.float64)
    delta = shared.astype(np.float64) - exact
    weights = 1.0 if importance is None else np.broadcast_to(importance, values.shape)
    power = float(np.sum(weights * exact * exact))
    return float(np.sum(weights * delta * delta)) / power if power > 0 else 0.0


def _half_codebook(encoded: Encoded) -> Encoded:
    """``encoded`` with its centroids rounded to float16 (kept in float32 here: what the
    float16 constants' Cast gives back; zero stays zero), unless one would overflow."""
    half = encoded.codebook.astype(np.float16)
    if not np.all(np.isfinite(half)):
        return encoded
    return dataclasses.replace(encoded, codebook=half.astype(encoded.codebook.dtype))


def _usable_hessian(found, name: str) -> feedback.Hessian | None:
    """The Hessian the error feedback uses for weight ``name``, or None."""
    hessian = found.hessians.get(name) if found else None
    return hessian if hessian is not None and hessian.usable() else None


def _count_widths(widths: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for bits in widths.values():
        label = "float16" if bits == 16 else f"{bits} bits"
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def _correct_bias(rewriter: Rewriter, found, candidate, values, shared) -> str | None:
    reader = found.readers[candidate.tensor.name]
    delta = shared.astype(np.float64) - values.astype(np.float64)
    shift = found.output_shift(candidate.tensor.name, delta)
    if shift is None:
        return None
    return calibration.correct_bias(reader, shift, lambda: rewriter.fresh(f"{rewriter.stem()}.b"))


def _text(value: bool | str) -> str:
    return value if isinstance(value, str) else str(value).lower()


def _foldable_batchnorm(model: onnx.ModelProto) -> bool:
    """Whether a BatchNormalization reads the output of a Conv, ConvTranspose or Gemm
    whose weight is an initializer or a Constant (what ``fold-batchnorm`` folds)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    layers = {
        n.output[0]
        for n in graph.node
        if n.op_type in ("Conv", "ConvTranspose", "Gemm")
        and n.input[1:2]
        and n.input[1] in constants
    }
    return any(n.op_type == "BatchNormalization" and n.input[0] in layers for n in graph.node)


def _raise_ir_version(graph: gs.Graph) -> None:
    if (graph.ir_version or 0) < UINT4_IR:
        graph.ir_version = UINT4_IR
