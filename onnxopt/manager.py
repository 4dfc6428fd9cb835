"""The PassManager: runs a pipeline step by step and checks every step.

It computes the original model's outputs once, then for every step: imports the last
accepted model into a fresh graph, runs the pass, exports, runs the structural checks
and the numeric comparison, and accepts the step or rolls it back. Because each step
starts from the serialized accepted model, a rollback can never see weight arrays a
failed pass touched (docs/design.md, "One step of a run")."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as graph_utils
from onnxopt import runtime
from onnxopt.check import (
    Budget,
    OutputMetrics,
    class_score_outputs,
    compare_outputs,
    structural_checks,
    suspect_reference,
)
from onnxopt.context import Evaluation, PassContext
from onnxopt.data import Feed
from onnxopt.errors import (
    CheckFailed,
    DataError,
    ModelError,
    OnnxoptError,
    PassCannotRun,
    UsageError,
    first_line,
)
from onnxopt.pipeline_text import Pipeline, Step
from onnxopt.progress import SILENT, Progress
from onnxopt.protos import tensor_nbytes
from onnxopt.registry import Requirement
from onnxopt.results import PassResult
from onnxopt.store import WeightStore, spill_threshold
from onnxopt.stored import stored_path
from onnxopt.wire import compressed_size, proto_nbytes

log = logging.getLogger(__name__)


COMPRESS_LIMIT = 64 * 2**20  # deflating bigger models costs more than it tells


@dataclass
class ModelStats:
    nodes: int
    params: int
    size: int
    ops: dict[str, int]
    compressed: int | None = None  # deflate-compressed size (what zeros and codebooks shrink)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelStats:
        graph = graph_utils.to_graph(model)
        size = proto_nbytes(model)
        return cls(
            len(graph.nodes),
            graph_utils.param_count(graph),
            size,
            graph_utils.op_histogram(graph),
            compressed_size(model) if size <= COMPRESS_LIMIT else None,
        )


@dataclass
class StepRecord:
    index: int
    step: str
    status: str  # accepted | no-op | rolled back | skipped (a prerequisite failed)
    lossless: bool
    budget: str
    seconds: float = 0.0
    reason: str = ""
    before: ModelStats | None = None
    after: ModelStats | None = None
    vs_original: dict[str, OutputMetrics] = field(default_factory=dict)
    vs_previous: dict[str, OutputMetrics] = field(default_factory=dict)
    # lossy steps: the candidate as onnxruntime deploys it (graph optimizations on: QDQ
    # pairs fused into integer kernels, whose arithmetic can differ from the QDQ math)
    vs_original_deployed: dict[str, OutputMetrics] = field(default_factory=dict)
    result: PassResult | None = None
    iterations: int = 1
    required_by: str = ""  # a prerequisite step: the step whose pass declared it
    prerequisites: list[StepRecord] = field(default_factory=list)  # run before this step


@dataclass
class RunOutcome:
    model: onnx.ModelProto
    steps: list[StepRecord]
    baseline_failures: dict[str, str]
    original: ModelStats
    final: ModelStats
    pipeline: str
    data_source: str
    seconds: float
    aborted: bool = False
    store: WeightStore | None = None  # where ``model``'s weights live, for large models


def needs_store(model: onnx.ModelProto, threshold: int | None = None) -> bool:
    """Whether a run keeps ``model``'s weights on disk: its initializers reach the
    spill threshold, or it was loaded without its external data (``load_model(lazy=)``)."""
    threshold = spill_threshold() if threshold is None else threshold
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and stored_path(tensor) is None:
            return True
        total += tensor_nbytes(tensor)
    return total >= threshold


class PassManager:
    """Runs a pipeline step by step, validating each step against its budget."""

    max_fixed_point_iterations = 10

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        budget: Budget | None = None,
        on_fail: Literal["rollback", "abort"] = "rollback",
        seed: int = 0,
        progress: Progress = SILENT,
        allow_suspect_data: bool = False,
    ) -> None:
        if on_fail not in ("rollback", "abort"):
            raise UsageError(f"on_fail must be 'rollback' or 'abort', not {on_fail!r}")
        self.pipeline = pipeline
        self.global_budget = budget
        self.on_fail = on_fail
        self.seed = seed
        self.progress = progress
        self.allow_suspect_data = allow_suspect_data

    def budget_for(self, step: Step) -> Budget:
        if step.budget is not None:
            return step.budget
        if step.pass_cls.lossless:
            return step.pass_cls.budget()
        return self.global_budget if self.global_budget is not None else step.pass_cls.budget()

    def run(
        self,
        model: onnx.ModelProto,
        calibration: Sequence[Feed],
        validation: Sequence[Feed],
        data_source: str = "",
        base_dir: str | os.PathLike | None = None,
    ) -> RunOutcome:
        """Run the pipeline. ``base_dir`` is the folder of a model loaded without its
        external data. Large models run with their weights on disk (onnxopt.store):
        the outcome's model then refers to ``outcome.store`` until that is closed."""
        store = None
        if needs_store(model):
            store = WeightStore()
            log.info("weights on disk in %s (large model)", store.folder)
            model = store.adopt(model, Path(base_dir) if base_dir is not None else None)
        try:
            outcome = self._run(model, calibration, validation, data_source, store)
        except CheckFailed as exc:
            if exc.outcome is not None:
                exc.outcome.store = store
            raise
        except BaseException:
            if store is not None:
                store.close()
            raise
        outcome.store = store
        return outcome

    def _run(self, model, calibration, validation, data_source, store) -> RunOutcome:
        start = time.perf_counter()
        baseline, _ = structural_checks(model)
        for check, message in baseline.failures.items():
            log.warning("original model fails %s: %s (not held against the steps)", check, message)
        reference = original_outputs(
            model, self.progress(validation, "reference outputs", total=len(validation))
        )
        self._check_reference(reference)
        state = _RunState(
            original=model,
            calibration=calibration,
            validation=validation,
            reference=reference,
            tolerated=dict(baseline.failures),
            accepted=model,
            accepted_stats=ModelStats.of(model),
            previous=reference,
            class_scores=class_score_outputs(model),
            store=store,
        )
        original_stats = state.accepted_stats
        records: list[StepRecord] = []
        aborted = False
        for index, step in enumerate(self.pipeline.steps, 1):
            done, blocked = self._prerequisites(index, step, state, store)
            if blocked:
                record = StepRecord(
                    index, str(step), "skipped", step.pass_cls.lossless,
                    str(self.budget_for(step)), reason=blocked, before=state.accepted_stats,
                    after=state.accepted_stats,
                )  # fmt: skip
            else:
                record, candidate, outputs = self._run_step(index, step, state)
            record.prerequisites = done
            records.append(record)
            log.info("step %d %s: %s %s", index, step, record.status, record.reason)
            if record.status == "accepted":
                state.accepted, state.previous = candidate, _reuse_equal(state.reference, outputs)
                state.accepted_stats = record.after
            elif record.status != "no-op" and self.on_fail == "abort":
                aborted = True
                break
            if store is not None:  # data files of rolled-back or superseded candidates
                store.collect([state.original, state.accepted])
        outcome = RunOutcome(
            model=state.accepted,
            steps=records,
            baseline_failures=state.tolerated,
            original=original_stats,
            final=state.accepted_stats,
            pipeline=str(self.pipeline),
            data_source=data_source,
            seconds=time.perf_counter() - start,
            aborted=aborted,
        )
        if aborted:
            failed = records[-1]
            raise CheckFailed(
                f"step {failed.index} {failed.step} failed: {failed.reason}", outcome=outcome
            )
        return outcome

    def _prerequisites(self, index: int, step: Step, state, store) -> tuple[list, str]:
        """Run what ``step``'s pass requires of the accepted model (``Pass.requires``:
        one requirement or several, in order) first, each as a checked step of its own;
        ``(their records, why the step cannot run or "")``. An accepted prerequisite
        becomes the accepted model; a failed one that is not optional blocks the step."""
        needs = step.pass_cls(step.options).requires(state.accepted)
        if needs is None:
            return [], ""
        records = []
        for need in [needs] if isinstance(needs, Requirement) else needs:
            (provider,) = Pipeline.parse(need.step).steps
            record, candidate, outputs = self._run_step(index, provider, state)
            record.required_by = str(step)
            records.append(record)
            log.info("step %d %s: %s %s", index, record.step, record.status, record.reason)
            if record.status == "accepted":
                state.accepted, state.previous = candidate, _reuse_equal(state.reference, outputs)
                state.accepted_stats = record.after
            elif store is not None:
                store.collect([state.original, state.accepted])
            if record.status not in ("accepted", "no-op") and not need.optional:
                return records, f"{need.reason}: {provider} was {record.status} ({record.reason})"
        return records, ""

    def _check_reference(self, reference: list[dict]) -> None:
        """Refuse a reference that cannot tell a good step from a bad one (see
        check.suspect_reference), unless ``allow_suspect_data``."""
        problems, notes = suspect_reference(reference)
        if problems and not self.allow_suspect_data:
            raise DataError(
                "the original model's outputs on the validation data cannot be trusted: "
                + "; ".join(problems)
                + "; give other data (or allow it: --allow-suspect-data, "
                "allow_suspect_data=True)"
            )
        for note in [*notes, *problems]:
            log.warning("%s", note)

    def _run_step(self, index: int, step: Step, state: _RunState):
        budget = self.budget_for(step)
        record = StepRecord(index, str(step), "accepted", step.pass_cls.lossless, str(budget))
        record.before = state.accepted_stats
        started = time.perf_counter()
        accepted = state.accepted
        target = state.previous if step.pass_cls.lossless else state.reference

        # The last candidate the pass evaluated: when the pass returns exactly that
        # model, the manager's check reuses its onnxruntime outputs instead of running
        # the same session on the same samples again (PP-OCRv4 det's quantize-int8: 9 s)
        last: dict[str, Any] = {}

        def evaluate(graph: gs.Graph) -> Evaluation:
            candidate = graph_utils.to_model(graph, accepted, state.store)
            last.clear()
            try:
                session = runtime.make_session(candidate)
                outputs = runtime.run_samples(session, state.validation)
                del session  # its arena, before the comparison and the deployed run
            except DataError:  # the data file failed, not the candidate
                raise
            except Exception as exc:  # a candidate that cannot run fails its budget
                return Evaluation({}, [f"onnxruntime cannot run the candidate: {first_line(exc)}"])
            last.update(key=_fingerprint(candidate), outputs=outputs)
            metrics = compare_outputs(target, outputs, budget.tolerance, state.class_scores)
            problems = budget.violations(metrics)
            if not step.pass_cls.lossless and not problems:
                deployed, more = _deployed_check(candidate, state, budget)
                last["deployed"] = (deployed, more)
                problems += more
                metrics = _worse_of(metrics, deployed)
            return Evaluation(metrics, problems)

        ctx = PassContext(
            calibration=state.calibration,
            rng=np.random.default_rng(self.seed + index),
            seed=self.seed,
            template=accepted,
            original=state.original,
            budget=budget,
            progress=self.progress,
            evaluator=evaluate,
            store=state.store,
        )
        candidate = outputs = None
        try:
            graph = graph_utils.to_graph(accepted)
            result = self._apply(step, graph, ctx, record)
            record.result = result
            if not result.changed:
                record.status, record.after = "no-op", record.before
                return record, None, None
            candidate = graph_utils.to_model(graph, accepted, state.store)
            del graph, ctx  # the pass's new weight arrays: not needed once exported
            # graphsurgeon graphs are reference cycles (nodes <-> tensors): without a
            # collection, the pass's graphs and the weights they cached stay alive
            # through validation (2 GiB on the 2 GiB model's quantize-int8 step)
            gc.collect()
            outputs, problems = self._validate(
                candidate,
                state,
                record,
                budget,
                rounding_floor=step.budget is None,
                evaluated=last if last.get("key") == _fingerprint(candidate) else None,
            )
        except PassCannotRun as exc:
            # this model is out of the pass's reach (e.g. an op training has no gradient
            # for): the step is rolled back with the reason, the run goes on
            problems = [first_line(exc, 500)]
            record.reason = problems[0]
        except OnnxoptError as exc:
            # the user's input cannot work with this pass (e.g. no calibration data):
            # that is a usage error for the whole run, not a pass bug to roll back
            message = str(exc)
            if not message.startswith(step.name):
                message = f"{step.name}: {message}"
            raise type(exc)(message) from exc
        except Exception as exc:  # a pass bug must not take the run down: roll back
            log.debug("step %s raised", step, exc_info=True)
            problems = [f"pass raised {type(exc).__name__}: {first_line(exc)}"]
            record.reason = problems[0]
            if log.isEnabledFor(logging.DEBUG):
                record.reason += "\n" + traceback.format_exc()
        record.seconds = time.perf_counter() - started
        if problems:
            record.status, record.after = "rolled back", record.before
            record.reason = record.reason or "; ".join(problems)
            return record, None, None
        record.after = ModelStats.of(candidate)
        return record, candidate, outputs

    def _apply(
        self, step: Step, graph: gs.Graph, ctx: PassContext, record: StepRecord
    ) -> PassResult:
        instance = step.pass_cls(step.options)
        # NumPy's floating-point warnings (overflow in a cast, invalid value...) would
        # print raw to the terminal mid-table: they become notes of the step instead
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            result = instance.run(graph, ctx)
            total = result
            while (
                step.pass_cls.fixed_point
                and result.changed
                and record.iterations < self.max_fixed_point_iterations
            ):
                result = instance.run(graph, ctx)
                record.iterations += 1
                if result.changed:
                    total = total.merge(result)
        total.notes.extend(_warning_notes(caught))
        return total

    def _validate(
        self,
        candidate,
        state: _RunState,
        record: StepRecord,
        budget: Budget,
        rounding_floor: bool = False,
        evaluated: dict[str, Any] | None = None,
    ):
        """Structural checks, session build, numeric comparison -> (outputs, problems).

        ``rounding_floor``: a lossless step over its strict budget is still accepted
        where it stays within the float rounding of this model (``_within_rounding``).
        ``evaluated``: the onnxruntime outputs (and deployed check) the pass's own
        ``ctx.evaluate`` measured on this very model (same bytes), reused as they are."""
        report, _ = structural_checks(candidate)
        problems = [
            f"{check}: {msg}"
            for check, msg in report.failures.items()
            if check not in state.tolerated
        ]
        if problems:
            return None, problems
        if evaluated is not None:
            outputs = evaluated["outputs"]
        else:
            try:
                session = runtime.make_session(candidate)
            except Exception as exc:
                return None, [f"onnxruntime cannot load the result: {first_line(exc)}"]
            samples = state.validation
            progress = self.progress(samples, desc=f"checking {record.step}", total=len(samples))
            try:
                outputs = runtime.run_samples(session, progress)
            except DataError:  # the data file failed, not the result
                raise
            except Exception as exc:  # e.g. out of memory on shapes the original never needed
                return None, [f"onnxruntime cannot run the result: {first_line(exc)}"]
            del session  # its arena, before the comparisons and the deployed run
        scores = state.class_scores
        record.vs_original = compare_outputs(state.reference, outputs, budget.tolerance, scores)
        record.vs_previous = compare_outputs(state.previous, outputs, budget.tolerance, scores)
        if record.lossless:
            problems = budget.violations(record.vs_previous)
            if problems and rounding_floor:
                problems = _within_rounding(state, record, budget)
            return outputs, problems
        problems = budget.violations(record.vs_original)
        if evaluated is not None and "deployed" in evaluated:
            record.vs_original_deployed, deployed_problems = evaluated["deployed"]
        else:
            deployed = _deployed_check(candidate, state, budget)
            record.vs_original_deployed, deployed_problems = deployed
        return outputs, problems + deployed_problems


ROUNDING_MARGIN = 2.0  # x onnxruntime's own deviation; two roundings of one fold differ


def _within_rounding(state: _RunState, record: StepRecord, budget: Budget) -> list[str]:
    """The violations of a lossless step that remain once float rounding is allowed
    for: an output over the strict ``atol/rtol`` is accepted when its max abs error is
    within ``ROUNDING_MARGIN`` x what onnxruntime's own graph optimizations (Conv+BN
    fusion, Gemm fusion...) change on the *original* model, on the same samples, and
    its SQNR within 6 dB of theirs. Deep networks amplify fp32 re-rounding: on
    PP-OCRv4 rec onnxruntime's optimizations move the softmax by 5.6e-4 (90 dB) while
    fold-batchnorm moved it by 5.8e-5, ten times less, and was rolled back by the
    strict budget. Anything else (new NaN/Inf, integer outputs, a larger error) stays
    a violation. The step gets a note saying so."""
    if state.rounding is None:
        state.rounding = _runtime_rounding(state)
    problems, excused = [], []
    for name, m in record.vs_previous.items():
        found = budget.violations({name: m})
        floor = state.rounding.get(name)
        if (
            found
            and floor is not None
            and floor.max_abs > 0
            and m.is_float
            and m.nonfinite == 0
            and all(p.startswith(f"{name}: max_abs") for p in found)
            and m.max_abs <= ROUNDING_MARGIN * floor.max_abs
            and m.sqnr >= floor.sqnr - 6.0
        ):
            excused.append(
                f"{name}: max_abs {m.max_abs:.3g} ({m.sqnr:.1f} dB) is over {budget} but "
                f"onnxruntime's own optimizations move the original's output by "
                f"{floor.max_abs:.3g} ({floor.sqnr:.1f} dB)"
            )
        else:
            problems += found
    if problems:
        return problems
    if record.result is not None:
        record.result.notes.extend(f"lossless within float rounding: {e}" for e in excused)
    return []


def _runtime_rounding(state: _RunState) -> dict[str, OutputMetrics]:
    """How far onnxruntime's graph optimizations move the original's outputs."""
    try:
        session = runtime.make_session(state.original, optimize=True, prepack=False)
        outputs = runtime.run_samples(session, state.validation)
        del session
        return compare_outputs(state.reference, outputs, None, state.class_scores)
    except Exception:  # no yardstick: the strict budget stands
        return {}


def _fingerprint(model: onnx.ModelProto) -> bytes:
    """A digest of the model's bytes (light protos of stored runs: their stubs)."""
    return hashlib.blake2b(model.SerializeToString(), digest_size=20).digest()


def _deployed_check(
    candidate: onnx.ModelProto, state: _RunState, budget: Budget
) -> tuple[dict[str, OutputMetrics], list[str]]:
    """The candidate run as it will be deployed (onnxruntime graph optimizations on),
    compared with the original outputs: onnxruntime fuses QDQ pairs into integer
    kernels whose arithmetic is not the QDQ math the as-written check runs (on x86
    without VNNI, u8 x s8 products are summed in saturating int16: measured 42 -> 25 dB
    on the digits MLP). Both must meet the budget.

    A candidate without quantization ops skips it: its deployed form only fuses float
    ops (Conv+BatchNorm, Gemm+activation), whose differences stay at float rounding
    (5.6e-4 absolute on PP-OCRv4 rec's softmax, 90 dB), far inside any lossy budget; the
    second session build and run doubled the check's time and, on a 512 MiB model,
    its memory."""
    if not has_quantized_ops(candidate):
        return {}, []
    try:
        session = runtime.make_session(candidate, optimize=True, prepack=False)
        outputs = runtime.run_samples(session, state.validation)
        del session
    except Exception as exc:
        return {}, [f"onnxruntime cannot run the result optimized: {first_line(exc)}"]
    metrics = compare_outputs(state.reference, outputs, budget.tolerance, state.class_scores)
    return metrics, [f"as deployed: {p}" for p in budget.violations(metrics)]


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """One note per distinct warning raised during a pass, with its count; warnings
    other than RuntimeWarning go back to Python's own handling."""
    counts: dict[tuple[str, str], int] = {}
    for w in caught:
        if not issubclass(w.category, RuntimeWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            continue
        where = f"{os.path.basename(w.filename)}:{w.lineno}"
        key = (str(w.message), where)
        counts[key] = counts.get(key, 0) + 1
    return [
        f"numpy warning during the pass: {message} (at {where}"
        + (f", {count} times)" if count > 1 else ")")
        for (message, where), count in counts.items()
    ]


_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"}


def has_quantized_ops(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime may run part of ``model`` in integer kernels (QDQ pairs,
    QLinear*/*Integer ops, MatMulNBits), in the main graph or any subgraph."""

    def walk(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            op = node.op_type
            if op in _QUANTIZED_OPS or op.startswith("QLinear") or op.endswith("Integer"):
                return True
        return any(walk(body) for body in graph_utils.graph_bodies(graph))

    return walk(model.graph)


def _worse_of(
    first: dict[str, OutputMetrics], second: dict[str, OutputMetrics]
) -> dict[str, OutputMetrics]:
    """Per output, whichever measurement is further from the original (by SQNR)."""
    merged = dict(first)
    for name, metrics in second.items():
        if name in merged and metrics.is_float and metrics.sqnr < merged[name].sqnr:
            merged[name] = metrics
    return merged


def _reuse_equal(reference: list[dict], outputs: list[dict]) -> list[dict]:
    """``outputs`` with every array that is bit-identical to the reference's replaced by
    the reference's own: a lossless step that changes nothing (an opset upgrade) then
    holds no second copy of the outputs (52 MB for PP-OCRv4 det at 640x640)."""
    shared = []
    for ref, out in zip(reference, outputs):
        sample = {}
        for name, value in out.items():
            kept = ref.get(name)
            sample[name] = kept if _same_bits(kept, value) else value
        shared.append(sample)
    return shared


def _same_bits(a, b) -> bool:
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.dtype.hasobject:
        return False
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def original_outputs(model: onnx.ModelProto, samples: Iterable[Feed]) -> list[dict]:
    """Run the user's model on the samples; its failures are input errors (exit 2)."""
    try:
        session = runtime.make_session(model)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc, 400)}") from None
    try:
        return runtime.run_samples(session, samples)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"onnxruntime cannot run the model on the samples: {first_line(exc, 400)}; "
            "pass real inputs with --data (or other --shape values)"
        ) from None


@dataclass
class _RunState:
    """What the steps of one run share: the original, the data, the last accepted model."""

    original: onnx.ModelProto
    calibration: Sequence[Feed]
    validation: Sequence[Feed]
    reference: list[dict[str, np.ndarray]]
    tolerated: dict[str, str]
    accepted: onnx.ModelProto
    accepted_stats: ModelStats
    previous: list[dict[str, np.ndarray]]
    # Outputs a classifier head computes: the only ones judged by top-1 agreement.
    class_scores: frozenset[str] = frozenset()
    # onnxruntime's own optimizations vs the original, measured when first needed
    rounding: dict[str, OutputMetrics] | None = None
    store: WeightStore | None = None  # a large model's run: its weights on disk
