"""Passes, the pass registry, pipelines and the PassManager.

A pipeline is text — ``fold-batchnorm,prune-initializers(sparsity=0.5,scope=global)``
— that parses through the registry and prints back canonically (default options
omitted), or a TOML file (see ``docs/pipeline.md``). The PassManager computes the
original model's outputs once, then for every step: imports the last accepted model
into a fresh graph, runs the pass, exports, runs the structural checks and the numeric
comparison, and accepts the step or rolls it back. Because each step starts from the
serialized accepted model, a rollback can never see weight arrays a failed pass
touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import logging
import os
import re
import time
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import graph as graph_utils
from onnxopt import runtime
from onnxopt.check import (
    LOSSLESS_BUDGET,
    LOSSY_BUDGET,
    Budget,
    OutputMetrics,
    class_score_outputs,
    compare_outputs,
    structural_checks,
    suspect_reference,
    worst,
)
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
from onnxopt.model import compressed_size, proto_nbytes, stored_path, tensor_nbytes
from onnxopt.progress import SILENT, Progress
from onnxopt.results import PassResult as PassResult
from onnxopt.results import Skipped as Skipped
from onnxopt.store import WeightStore, spill_threshold

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- options


def option(default: Any, help: str, *, range: tuple[float, float] | None = None) -> Any:
    """A pass option: default, one-line help and an optional inclusive numeric range."""
    return field(default=default, metadata={"help": help, "range": range})


@dataclass
class NoOptions:
    pass


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``lossless``, ``Options`` and
    implement ``run``. A pass mutates the graph it is given; it never loads or saves
    files and never runs checks itself (use ``ctx.evaluate`` to *measure*)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    fixed_point: ClassVar[bool] = False  # rerun until it reports no change
    default_budget: ClassVar[Budget | None] = None
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def budget(cls) -> Budget:
        if cls.default_budget is not None:
            return cls.default_budget
        return LOSSLESS_BUDGET if cls.lossless else LOSSY_BUDGET


_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry; duplicate names are an error."""
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"duplicate pass name {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Pass]]:
    """All registered passes (importing ``onnxopt.passes`` registers the built-ins)."""
    import onnxopt.passes  # noqa: F401  (explicit module list lives there)

    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        close = [n for n in passes if n.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown pass {name!r}{hint}; valid passes: {', '.join(sorted(passes))}")
    return passes[name]


def option_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Options))


def _hints(cls: type[Pass]) -> dict[str, Any]:
    import sys

    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls.Options, globalns=vars(module) if module else None)


def make_options(cls: type[Pass], raw: Mapping[str, Any]) -> Any:
    """Build ``cls.Options`` from strings (pipeline text) or TOML values, validating
    names, types and ranges; errors name the pass, the option and the valid values."""
    fields = {f.name: f for f in option_fields(cls)}
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "(this pass takes no options)"
            raise UsageError(f"{cls.name}: unknown option {key!r}; valid options: {valid}")
        try:
            values[key] = coerce(value, hints[key])
        except ValueError as exc:
            raise UsageError(f"{cls.name}: option {key}={value!r}: {exc}") from None
        bounds = fields[key].metadata.get("range")
        if bounds and isinstance(values[key], (int, float)) and not isinstance(values[key], bool):
            low, high = bounds
            if not low <= values[key] <= high:
                raise UsageError(
                    f"{cls.name}: option {key}={value} is out of range [{low}, {high}]"
                )
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UsageError(f"{cls.name}: {exc}") from None
    return options


def coerce(value: Any, hint: Any) -> Any:
    """Convert ``value`` (often a string from pipeline text) to the type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for member in typing.get_args(hint):
            try:
                return coerce(value, member)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; or ".join(errors))
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        raise ValueError("expected none")
    if origin is Literal:
        choices = typing.get_args(hint)
        text = value if not isinstance(value, str) else value.strip()
        for choice in choices:
            if text == choice or str(text) == str(choice):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (str,)
        items = value if isinstance(value, (list, tuple)) else _split_list(str(value))
        return (
            [coerce(item, inner) for item in items]
            if origin is list
            else tuple(coerce(item, inner) for item in items)
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
        if not np.isfinite(result):
            raise ValueError("expected a finite number")
        return result
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    raise ValueError(f"unsupported option type {hint}")


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip() for part in re.split(r"[,|]", text) if part.strip()]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_.:*/+\-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------- pipelines


@dataclass
class Step:
    pass_cls: type[Pass]
    options: Any
    budget: Budget | None = None  # per-step override

    @property
    def name(self) -> str:
        return self.pass_cls.name

    def __str__(self) -> str:
        defaults = self.pass_cls.Options()
        args = [
            f"{f.name}={format_value(getattr(self.options, f.name))}"
            for f in option_fields(self.pass_cls)
            if format_value(getattr(self.options, f.name))
            != format_value(getattr(defaults, f.name))
        ]
        if self.budget is not None:
            args.append(f'budget="{self.budget}"')
        return self.name + (f"({','.join(args)})" if args else "")

    @classmethod
    def build(cls, name: str, raw: Mapping[str, Any]) -> Step:
        pass_cls = get_pass(name)
        raw = dict(raw)
        budget_text = raw.pop("budget", None)
        budget = None
        if budget_text is not None:
            try:
                budget = Budget.parse(str(budget_text))
            except UsageError as exc:
                raise UsageError(f"{name}: {exc}") from None
        return cls(pass_cls, make_options(pass_cls, raw), budget)


@dataclass
class Pipeline:
    steps: list[Step]

    def __str__(self) -> str:
        return ",".join(str(step) for step in self.steps)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        steps = [Step.build(name, args) for name, args in _parse_pipeline_text(text)]
        if not steps:
            raise UsageError("empty pipeline: name at least one pass (see `onnxopt passes`)")
        return cls(steps)


_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|'[^']*')|(?P<list>\[[^\]]*\])|(?P<punct>[(),=])|(?P<word>[^\s(),="'\[\]]+))"""
)


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise UsageError(
                f"pipeline text: cannot parse at column {pos + 1}: {text[pos : pos + 20]!r}"
            )
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "str":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        yield kind, value, match.start(kind)
        pos = match.end()


def _parse_pipeline_text(text: str) -> list[tuple[str, dict[str, str]]]:
    """``a,b(k=v,k2="x,y"),c`` -> ``[("a", {}), ("b", {"k": "v", "k2": "x,y"}), ("c", {})]``."""
    tokens = list(_tokens(text))
    steps: list[tuple[str, dict[str, str]]] = []
    i = 0

    def expect(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens):
            raise UsageError(f"pipeline text {text!r}: unexpected end, expected {value or kind}")
        k, v, col = tokens[i]
        if k != kind or (value is not None and v != value):
            raise UsageError(
                f"pipeline text {text!r}: expected {value or kind} at column {col + 1}, got {v!r}"
            )
        i += 1
        return v

    while i < len(tokens):
        name = expect("word")
        args: dict[str, str] = {}
        if i < len(tokens) and tokens[i][1] == "(" and tokens[i][0] == "punct":
            i += 1
            while True:
                key = expect("word")
                expect("punct", "=")
                if i >= len(tokens):
                    raise UsageError(f"pipeline text {text!r}: missing value for {key!r}")
                kind, value, _ = tokens[i]
                if kind == "punct":
                    raise UsageError(f"pipeline text {text!r}: missing value for {key!r}")
                i += 1
                if key in args:
                    raise UsageError(f"pipeline text: option {key!r} given twice for {name}")
                args[key] = value
                if i < len(tokens) and tokens[i][:2] == ("punct", ")"):
                    i += 1
                    break
                expect("punct", ",")
        steps.append((name, args))
        if i < len(tokens):
            expect("punct", ",")
    return steps


# ---------------------------------------------------------------------------- context


@dataclass
class Evaluation:
    """One measurement of a candidate graph against the step's budget."""

    metrics: dict[str, OutputMetrics]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def worst(self) -> dict[str, float | None]:
        return worst(self.metrics)


@dataclass
class PassContext:
    """What a pass may use: calibration data, a seeded RNG, progress, measurement."""

    calibration: list[Feed]
    rng: np.random.Generator
    seed: int
    template: onnx.ModelProto
    original: onnx.ModelProto
    budget: Budget
    progress: Progress = SILENT
    evaluator: Callable[[gs.Graph], Evaluation] | None = None

    def evaluate(self, graph: gs.Graph) -> Evaluation:
        """Measure ``graph`` exactly as the PassManager will (budget, reference). A graph
        onnxruntime cannot load or run comes back failed, with the reason as violation."""
        if self.evaluator is None:
            raise RuntimeError("no evaluator in this context")
        return self.evaluator(graph)

    def to_model(self, graph: gs.Graph) -> onnx.ModelProto:
        return graph_utils.to_model(graph.copy(), self.template)

    def activations(
        self, graph: gs.Graph, names: Sequence[str], desc: str = "calibrating"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Intermediate tensors ``names`` for each calibration sample, one at a time."""
        if not self.calibration:
            raise UsageError(
                "this pass needs calibration samples; pass --data or raise --calib-samples"
            )
        model = self.to_model(graph)
        samples = self.progress(self.calibration, desc=desc, total=len(self.calibration))
        return runtime.iter_activations(model, names, samples)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Glob match used by ``exclude=`` / ``ops=`` style options."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------- manager


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
    status: str  # accepted | no-op | rolled back | failed
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
        calibration: list[Feed],
        validation: list[Feed],
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
        with store.activated() if store is not None else contextlib.nullcontext():
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
        )
        records: list[StepRecord] = []
        aborted = False
        for index, step in enumerate(self.pipeline.steps, 1):
            record, candidate, outputs = self._run_step(index, step, state)
            records.append(record)
            log.info("step %d %s: %s %s", index, step, record.status, record.reason)
            if record.status == "accepted":
                state.accepted, state.previous = candidate, outputs
                state.accepted_stats = record.after
            elif record.status == "rolled back" and self.on_fail == "abort":
                aborted = True
                break
            if store is not None:  # data files of rolled-back or superseded candidates
                store.collect([state.original, state.accepted])
        outcome = RunOutcome(
            model=state.accepted,
            steps=records,
            baseline_failures=state.tolerated,
            original=records[0].before if records else state.accepted_stats,
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

        def evaluate(graph: gs.Graph) -> Evaluation:
            candidate = graph_utils.to_model(graph.copy(), accepted)
            try:
                session = runtime.make_session(candidate)
                outputs = runtime.run_samples(session, state.validation)
            except Exception as exc:  # a candidate that cannot run fails its budget
                return Evaluation({}, [f"onnxruntime cannot run the candidate: {first_line(exc)}"])
            metrics = compare_outputs(target, outputs, budget.tolerance, state.class_scores)
            problems = budget.violations(metrics)
            if not step.pass_cls.lossless and not problems:
                deployed, more = _deployed_check(candidate, state, budget)
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
        )
        candidate = outputs = None
        try:
            graph = graph_utils.to_graph(accepted)
            result = self._apply(step, graph, ctx, record)
            record.result = result
            if not result.changed:
                record.status, record.after = "no-op", record.before
                return record, None, None
            candidate = graph_utils.to_model(graph, accepted)
            del graph, ctx  # the pass's new weight arrays: not needed once exported
            # graphsurgeon graphs are reference cycles (nodes <-> tensors): without a
            # collection, the pass's graphs and the weights they cached stay alive
            # through validation (2 GiB on the 2 GiB model's quantize-int8 step)
            gc.collect()
            outputs, problems = self._validate(
                candidate, state, record, budget, rounding_floor=step.budget is None
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
    ):
        """Structural checks, session build, numeric comparison -> (outputs, problems).

        ``rounding_floor``: a lossless step over its strict budget is still accepted
        where it stays within the float rounding of this model (``_within_rounding``)."""
        report, _ = structural_checks(candidate)
        problems = [
            f"{check}: {msg}"
            for check, msg in report.failures.items()
            if check not in state.tolerated
        ]
        if problems:
            return None, problems
        try:
            session = runtime.make_session(candidate)
        except Exception as exc:
            return None, [f"onnxruntime cannot load the result: {first_line(exc)}"]
        samples = state.validation
        try:
            outputs = runtime.run_samples(
                session, self.progress(samples, desc=f"checking {record.step}", total=len(samples))
            )
        except Exception as exc:  # e.g. out of memory on shapes the original never needed
            return None, [f"onnxruntime cannot run the result: {first_line(exc)}"]
        scores = state.class_scores
        record.vs_original = compare_outputs(state.reference, outputs, budget.tolerance, scores)
        record.vs_previous = compare_outputs(state.previous, outputs, budget.tolerance, scores)
        if record.lossless:
            problems = budget.violations(record.vs_previous)
            if problems and rounding_floor:
                problems = _within_rounding(state, record, budget)
            return outputs, problems
        problems = budget.violations(record.vs_original)
        record.vs_original_deployed, deployed_problems = _deployed_check(candidate, state, budget)
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
        return compare_outputs(state.reference, outputs, None, state.class_scores)
    except Exception:  # no yardstick: the strict budget stands
        return {}


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
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                if any(walk(g) for g in subgraphs):
                    return True
        return False

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


def original_outputs(model: onnx.ModelProto, samples: Iterable[Feed]) -> list[dict]:
    """Run the user's model on the samples; its failures are input errors (exit 2)."""
    try:
        session = runtime.make_session(model)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc, 400)}") from None
    try:
        return runtime.run_samples(session, samples)
    except Exception as exc:
        raise DataError(
            f"onnxruntime cannot run the model on the samples: {first_line(exc, 400)}; "
            "pass real inputs with --data (or other --shape values)"
        ) from None


@dataclass
class _RunState:
    """What the steps of one run share: the original, the data, the last accepted model."""

    original: onnx.ModelProto
    calibration: list[Feed]
    validation: list[Feed]
    reference: list[dict[str, np.ndarray]]
    tolerated: dict[str, str]
    accepted: onnx.ModelProto
    accepted_stats: ModelStats
    previous: list[dict[str, np.ndarray]]
    # Outputs a classifier head computes: the only ones judged by top-1 agreement.
    class_scores: frozenset[str] = frozenset()
    # onnxruntime's own optimizations vs the original, measured when first needed
    rounding: dict[str, OutputMetrics] | None = None


# ---------------------------------------------------------------------------- TOML files

PIPELINE_FILE_KEYS = {"seed", "budget", "on_fail", "data", "step"}
DATA_KEYS = {"path", "calibration_samples", "validation_samples", "shapes"}


def load_pipeline_file(path: str) -> tuple[Pipeline, dict[str, Any]]:
    """Read a TOML pipeline file; return the pipeline and its run settings.

    Settings keys: ``seed``, ``budget`` (global, for lossy steps), ``on_fail`` and a
    ``[data]`` table (``path`` relative to the file, ``calibration_samples``,
    ``validation_samples``, ``shapes = {input = "1x3x224x224"}``).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    file = Path(path)
    try:
        config = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"pipeline file not found: {file}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: not valid TOML ({exc})") from None
    unknown = set(config) - PIPELINE_FILE_KEYS
    if unknown:
        raise UsageError(
            f"{file}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(PIPELINE_FILE_KEYS))}"
        )
    raw_steps = config.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f'{file}: no [[step]] tables; each needs pass = "name"')
    steps = []
    for number, table in enumerate(raw_steps, 1):
        table = dict(table)
        name = table.pop("pass", None)
        if not isinstance(name, str):
            raise UsageError(f'{file}: step {number} has no pass = "name"')
        try:
            steps.append(Step.build(name, table))
        except UsageError as exc:
            raise UsageError(f"{file}: step {number}: {exc}") from None
    settings: dict[str, Any] = {k: config[k] for k in ("seed", "budget", "on_fail") if k in config}
    data = config.get("data", {})
    if not isinstance(data, dict) or set(data) - DATA_KEYS:
        raise UsageError(f"{file}: [data] accepts {', '.join(sorted(DATA_KEYS))}")
    if "path" in data:
        settings["data"] = str(file.parent / data["path"])
    for key in ("calibration_samples", "validation_samples", "shapes"):
        if key in data:
            settings[key] = data[key]
    return Pipeline(steps), settings
