"""Seeded fuzzer for onnxopt: mutate valid models, run the CLI and the API on them,
and classify every outcome.

Usage::

    python tools/fuzz.py --cases 5000 --seed 0          # counts, crash groups, reproducers
    python tools/fuzz.py --seed 0 --case 123            # replay one case with its traceback
    python tools/fuzz.py --cases 300 --keep /tmp/crash  # keep crashing cases' files

A *case* is drawn from ``numpy.random.default_rng([seed, index, stream])`` alone, so
``--seed S --case I`` reproduces it anywhere. It takes a seed model (the committed sample models,
tiny ``onnx.helper`` models with If/Loop/Scan bodies, Constant-node weights, opset 1 and
99, empty graphs..., and small onnx backend-test models), applies 1-3 mutations
(initializer dtype / dims / raw_data length, dangling inputs, duplicate names, cycles,
unknown ops and domains, opsets, empty graphs, If/Loop/Scan bodies, missing outputs,
external data pointing at nothing or outside the folder...; sometimes truncated or
flipped bytes), writes the mutant, and runs one command on it:

- ``onnxopt inspect MUTANT``
- ``onnxopt compare ORIGINAL MUTANT``
- ``onnxopt optimize MUTANT -o OUT --passes P`` for every registered pass P (cheap options)
- the Python API ``onnxopt.optimize(MUTANT, P)`` + ``Result.save(OUT)``

The CLI runs in-process (``onnxopt.cli.main``) inside worker processes; a case has a
timeout (SIGALRM, then the worker is killed) and a per-worker address-space limit.

Outcomes:

- **ok**: exit 0; an output file, if any, loads, passes the onnx checker and
  onnxruntime loads it (**ok (input already failed the checker)**: the checker fails
  on the output *and* on the mutant; onnxopt tolerates checks the input already fails);
- **clear error**: exit 2 with exactly one ``onnxopt: error:`` line on stderr, no
  traceback, no output file (API: an ``onnxopt.OnnxoptError``);
- **check failed**: exit 1 (``--on-fail abort`` or ``compare --budget``), no output file
  (API: ``onnxopt.CheckFailed``);
- **crash**: anything else: exit 3 (internal error), an exception other than
  ``OnnxoptError`` from the API, a traceback, a hang, a dead worker, a file left in the
  output folder after an error, or an output that is not a valid model.

Crashes are grouped by signature (exception type and the two innermost onnxopt
frames) and matched against ``KNOWN_BUGS`` (reported core bugs, each with an xfail
regression test in ``tests/test_fuzz.py``); the exit code is 1 when a crash matches
none of them. Steps the PassManager rolled back because the *pass raised* are not
crashes (the run goes on), but they are pass bugs: the summary lists them too.

Modules: ``fuzz_seeds.py`` (seed models), ``fuzz_data_mutations.py`` (picking helpers,
tensor-data mutations), ``fuzz_mutations.py`` (graph mutations, byte damage, ``mutate``),
``fuzz_outcomes.py`` (outcome classes, crash signatures, output checks, ``KNOWN_BUGS``);
this file builds and runs the cases (worker pool, summary, replay, determinism).

``--preload MODULE`` imports a module in every worker first (to try a fix, or to
silence a known bug and look past it); ``--determinism-out DIR`` writes every pass's
output on every sample model (``tests/test_fuzz.py`` runs it twice and compares bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fuzz_data_mutations import _choice
from fuzz_mutations import mutate
from fuzz_outcomes import (
    CHECK_FAILED,
    CLEAR_ERROR,
    CRASH,
    KNOWN_BUGS,
    OK,
    OK_TOLERATED,
    OUTCOMES,
    CaseTimeout,
    Outcome,
    _bad_output_signature,
    _check_output,
    _error_kind,
    _first_line,
    _signature,
    _stray_files,
    classify_cli,
    known_bug,
)
from fuzz_seeds import FAMILIES, MODELS, all_seeds

# ---------------------------------------------------------------------------- commands

# Cheap option sets per pass; a pass not listed runs with its defaults.
PASS_VARIANTS: dict[str, tuple[str, ...]] = {
    "prune-initializers": (
        "prune-initializers(sparsity=0.5,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=0.5,min_size=16)",
        "prune-initializers(pattern=2:4,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=0.5,store=sparse,reconstruct=false,min_size=1)",
        "prune-initializers(sparsity=auto,reconstruct=false,min_size=1)",
    ),
    "clip-weights": ("clip-weights(percentile=99,min_size=1)", "clip-weights(sigma=3)"),
    "share-weights": (
        "share-weights(bits=4,min_size=1,max_iter=20)",
        "share-weights(bits=2,granularity=channel,min_size=1,max_iter=10)",
        "share-weights(bits=4,materialize=true,min_size=1)",
        "share-weights(bits=4,index_dtype=uint4,upgrade_opset=true,min_size=1)",
    ),
    "remove-neurons": (
        "remove-neurons(ratio=0.3)",
        "remove-neurons(ratio=0.5,compensate=true)",
        "remove-neurons(target_macs=0.7)",
    ),
    "quantize-int8": (
        "quantize-int8(method=minmax,rounding=nearest,fallback=none,latency=false)",
        "quantize-int8(weights_only=true,latency=false)",
        "quantize-int8(method=percentile,activations=int8,rounding=nearest,latency=false)",
    ),
    "dedupe-initializers": ("dedupe-initializers", "dedupe-initializers(min_size=0)"),
    "fold-constants": ("fold-constants", "fold-constants(shapes=false,size_threshold=64)"),
}
# Passes the fuzzer never runs, with the reason.
SKIPPED_PASSES = {"distill": "trains in a separate environment (onnxopt train-env)"}
OPTIONAL_PASS_MODULES = ("onnxopt.passes.quantize",)
SAMPLE_ARGS = ["--calib-samples", "8", "--val-samples", "4"]


def load_passes() -> list[str]:
    """Registered pass names the fuzzer runs (importing optional pass packages first)."""
    for module in OPTIONAL_PASS_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    from onnxopt.pipeline import registry

    return sorted(name for name in registry() if name not in SKIPPED_PASSES)


def pipelines_for(name: str) -> tuple[str, ...]:
    return PASS_VARIANTS.get(name, (name,))


@dataclass
class Case:
    """One fuzz case: a mutant of a seed model and one command run on it."""

    index: int
    seed_model: str
    mutations: list[str]
    kind: str  # inspect | compare | optimize | api
    pipeline: str = ""
    argv: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"inspect": "inspect", "compare": "compare"}.get(self.kind, "")
        what = what or f"{self.kind} --passes {self.pipeline!r}"
        return f"{self.seed_model} + [{'; '.join(self.mutations)}] -> {what}"


def _pick_seed(rng: np.random.Generator) -> str:
    weights = np.array([w if seeds else 0.0 for seeds, w in FAMILIES])
    family = FAMILIES[int(rng.choice(len(FAMILIES), p=weights / weights.sum()))][0]
    return _choice(rng, sorted(family))


def _pick_command(rng: np.random.Generator, passes: list[str]) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.12:
        return "inspect", ""
    if roll < 0.24:
        return "compare", ""
    pipeline = _choice(rng, pipelines_for(_choice(rng, passes)))
    if rng.random() < 0.1:
        pipeline = f"cleanup,{pipeline}"
    return ("api" if roll < 0.4 else "optimize"), pipeline


def build_case(run_seed: int, index: int, folder: Path, passes: list[str]) -> Case:
    """Write ``original.onnx`` and ``m/mutant.onnx`` (+ external files) into ``folder``.

    Everything is drawn from ``default_rng([run_seed, index, stream])``: a case is
    reproducible from the two numbers alone. The mutant and the command use separate
    streams, so a pass registered later changes the commands, never the mutants.
    """
    model_rng = np.random.default_rng([run_seed, index, 0])
    command_rng = np.random.default_rng([run_seed, index, 1])
    seed_model = _pick_seed(model_rng)
    kind, pipeline = _pick_command(command_rng, passes)
    model = all_seeds()[seed_model]()
    (folder / "m").mkdir(parents=True, exist_ok=True)
    (folder / "out").mkdir(exist_ok=True)
    (folder / "original.onnx").write_bytes(model.SerializeToString())
    data, mutations = mutate(model, model_rng, folder)
    (folder / "m" / "mutant.onnx").write_bytes(data)
    case = Case(index, seed_model, mutations, kind, pipeline)
    case.argv = command_argv(case, folder, command_rng)
    return case


def command_argv(case: Case, folder: Path, rng: np.random.Generator) -> list[str]:
    mutant, original = str(folder / "m" / "mutant.onnx"), str(folder / "original.onnx")
    if case.kind == "inspect":
        return ["inspect", mutant] + (["--json"] if rng.random() < 0.3 else [])
    if case.kind == "compare":
        budget = ["--budget", "cosine>=0.99"] if rng.random() < 0.3 else []
        return ["compare", original, mutant, "--samples", "4", *budget]
    argv = [
        "optimize",
        mutant,
        "-o",
        str(folder / "out" / "out.onnx"),
        "--passes",
        case.pipeline,
        *SAMPLE_ARGS,
    ]
    if rng.random() < 0.15:
        argv += ["--on-fail", "abort"]
    if rng.random() < 0.1:
        argv += ["--report", str(folder / "out" / "report.json")]
    return argv


# ---------------------------------------------------------------------------- running


class _LogCapture(logging.Handler):
    """Root handler installed before the CLI's basicConfig (which then adds none)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


_LOGS = _LogCapture()


def _prepare_process(memory_gb: float, preload: Sequence[str] = ()) -> None:
    for module in preload:
        importlib.import_module(module)
    logging.getLogger().addHandler(_LOGS)
    warnings.simplefilter("ignore")
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    load_passes()


def _call_cli(argv: list[str]) -> tuple[int, str, str, BaseException | None]:
    from onnxopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except CaseTimeout:
            raise
        except BaseException as exc:  # the CLI let something through
            rc, escaped = -1, exc
    return rc, out.getvalue(), err.getvalue(), escaped


_ROLLED_BACK = re.compile(r"^rolled back: step \d+ ([a-z0-9-]+)\S*: (pass raised .*)$", re.M)


def _raised_in_steps(steps: Iterable[tuple[str, str]]) -> list[str]:
    """``pass: ExceptionType: message`` for steps rolled back because the pass raised."""
    found = []
    for step, reason in steps:
        first = reason.splitlines()[0] if reason else ""
        if first.startswith("pass raised "):
            found.append(f"{step.split('(')[0]}: {first.removeprefix('pass raised ')[:200]}")
    return found


def _run_api(case: Case, folder: Path) -> Outcome:
    import onnxopt

    mutant = folder / "m" / "mutant.onnx"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = onnxopt.optimize(
                str(mutant), case.pipeline, seed=0, calibration_samples=8, validation_samples=4
            )
            result.save(folder / "out" / "out.onnx")
    except onnxopt.CheckFailed as exc:
        stray = _stray_files(folder, produced_ok=False)
        if stray:
            return Outcome(case.index, CRASH, "stray files", detail=f"left {stray}")
        steps = [(r.step, r.reason) for r in exc.outcome.steps] if exc.outcome else []
        return Outcome(
            case.index, CHECK_FAILED, _error_kind(str(exc), folder), raised=_raised_in_steps(steps)
        )
    except onnxopt.OnnxoptError as exc:
        stray = _stray_files(folder, produced_ok=False)
        if stray:
            return Outcome(case.index, CRASH, "stray files", detail=f"left {stray}")
        return Outcome(case.index, CLEAR_ERROR, _error_kind(str(exc), folder))
    except CaseTimeout:
        raise
    except BaseException as exc:
        return Outcome(
            case.index,
            CRASH,
            _error_kind(f"{type(exc).__name__}: {exc}", folder),
            detail=_first_line(exc),
            signature=_signature(exc),
            traceback=traceback.format_exc(),
        )
    raised = _raised_in_steps((s["step"], s["reason"]) for s in result.steps)
    problem = _check_output(folder, mutant)
    if problem == "tolerated":
        return Outcome(case.index, OK_TOLERATED, "", raised=raised)
    if problem:
        return Outcome(
            case.index,
            CRASH,
            "bad output",
            detail=problem,
            raised=raised,
            signature=_bad_output_signature(problem),
        )
    return Outcome(case.index, OK, "", raised=raised)


def _run_cli(case: Case, folder: Path) -> Outcome:
    rc, stdout, stderr, escaped = _call_cli(case.argv)
    if escaped is not None:
        return Outcome(
            case.index,
            CRASH,
            _error_kind(f"{type(escaped).__name__}: {escaped}", folder),
            detail=f"escaped the CLI: {_first_line(escaped)}",
            signature=_signature(escaped),
            traceback="".join(traceback.format_exception(escaped)),
        )
    outcome, kind, detail = classify_cli(case, folder, rc, stderr)
    signature = _bad_output_signature(detail) if kind == "bad output" else ""
    raised = [
        f"{m.group(1)}: {m.group(2).removeprefix('pass raised ')[:200]}"
        for m in _ROLLED_BACK.finditer(stdout)
    ]
    result = Outcome(case.index, outcome, kind, detail=detail, raised=raised, signature=signature)
    if outcome == CRASH and rc == 3:
        _explain_internal_error(case, folder, result)
    return result


def _explain_internal_error(case: Case, folder: Path, result: Outcome) -> None:
    """Re-run an exit-3 case with -v (exceptions propagate) to get its traceback."""
    for leftover in (folder / "out").iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    from onnxopt.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*case.argv, "-v"])
        except CaseTimeout:
            raise
        except BaseException as exc:
            result.signature = _signature(exc)
            result.traceback = "".join(traceback.format_exception(exc))


def run_case(run_seed: int, index: int, passes: list[str], timeout: float, keep: Path | None):
    """Build and run one case in this process; return its Outcome."""
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{index}-"))
    started = time.perf_counter()
    case = None
    _LOGS.records.clear()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        case = build_case(run_seed, index, folder, passes)
        outcome = _run_api(case, folder) if case.kind == "api" else _run_cli(case, folder)
    except CaseTimeout as exc:
        outcome = Outcome(index, CRASH, "hang", detail=f"no result after {timeout:g} s")
        outcome.traceback = "".join(traceback.format_exception(exc))
        outcome.signature = "hang in " + _signature(exc).split(" in ", 1)[-1]
    except Exception as exc:  # a fuzzer bug, reported as such
        outcome = Outcome(index, CRASH, "fuzzer error", detail=_first_line(exc))
        outcome.traceback = traceback.format_exc()
        outcome.signature = "fuzzer error: " + _signature(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome.seconds = time.perf_counter() - started
    outcome.case = case.describe() if case else f"case {index} (not built)"
    if case:
        steps = re.findall(r"(?:^|,)([a-z][a-z0-9-]*)(?=\(|,|$)", case.pipeline)
        outcome.command = steps[-1] if steps else case.kind
    if keep is not None and outcome.outcome == CRASH:
        target = keep / f"case-{run_seed}-{index}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, symlinks=True)
        (target / "outcome.txt").write_text(_outcome_text(outcome, case, run_seed))
    shutil.rmtree(folder, ignore_errors=True)
    return outcome


def _on_alarm(signum, frame):
    raise CaseTimeout()


def _outcome_text(outcome: Outcome, case: Case | None, run_seed: int) -> str:
    if case and case.kind == "api":
        command = (
            f"onnxopt.optimize('m/mutant.onnx', {case.pipeline!r}, seed=0, "
            "calibration_samples=8, validation_samples=4).save('out/out.onnx')"
        )
    else:
        argv = " ".join(shlex.quote(a) for a in case.argv) if case else ""
        command = f"onnxopt {argv}"
    return (
        f"case {outcome.index} of seed {run_seed}: {outcome.case}\n"
        f"command: {command}\n{outcome.outcome}: {outcome.kind}: {outcome.detail}\n"
        f"{outcome.signature}\n\n{outcome.traceback}"
    )


# ---------------------------------------------------------------------------- worker pool


def _worker(conn, run_seed, timeout, memory_gb, keep: str | None, preload) -> None:
    _prepare_process(memory_gb, preload)
    passes = load_passes()
    keep_dir = Path(keep) if keep else None
    while True:
        try:
            index = conn.recv()
        except EOFError:
            return
        if index is None:
            return
        outcome = run_case(run_seed, index, passes, timeout, keep_dir)
        conn.send(dataclasses.asdict(outcome))


@dataclass
class _Slot:
    process: Any
    conn: Any
    index: int | None = None
    started: float = 0.0


class Pool:
    """Worker processes that each run one case at a time. A worker that does not answer
    within ``timeout + grace`` seconds (a hang in native code) or dies (a segfault) is
    replaced, and its case is a crash."""

    grace = 15.0

    def __init__(self, workers, run_seed, timeout, memory_gb, keep, preload=()) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.args = (run_seed, timeout, memory_gb, str(keep) if keep else None, tuple(preload))
        self.timeout = timeout
        self.slots = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Slot:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(child, *self.args), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def run(self, indices: Iterable[int], deadline: float | None) -> Iterator[Outcome]:
        pending = iter(indices)
        for slot in self.slots:
            self._dispatch(slot, pending, deadline)
        while any(slot.index is not None for slot in self.slots):
            busy = [slot for slot in self.slots if slot.index is not None]
            ready = multiprocessing.connection.wait([slot.conn for slot in busy], timeout=1.0)
            for slot in busy:
                outcome, dead = self._collect(slot, ready)
                if outcome is None:
                    continue
                yield outcome
                if dead:
                    self._respawn(slot)
                slot.index = None
                self._dispatch(slot, pending, deadline)

    def _dispatch(self, slot: _Slot, pending: Iterator[int], deadline: float | None) -> None:
        if deadline is not None and time.time() > deadline:
            return
        index = next(pending, None)
        if index is not None:
            slot.index, slot.started = index, time.perf_counter()
            slot.conn.send(index)

    def _collect(self, slot: _Slot, ready) -> tuple[Outcome | None, bool]:
        """(outcome, worker is dead) for a finished, dead or hung worker; (None, False)
        while it is still within its time."""
        if slot.conn in ready:
            try:
                return Outcome(**slot.conn.recv()), False
            except (EOFError, OSError):
                slot.process.join(5)
                code = slot.process.exitcode
                return Outcome(
                    slot.index,
                    CRASH,
                    "worker died",
                    detail=f"worker process died (exit code {code}) during the case",
                    signature=f"worker died (exit code {code})",
                ), True
        if time.perf_counter() - slot.started > self.timeout + self.grace:
            slot.process.kill()
            slot.process.join(5)
            return Outcome(
                slot.index,
                CRASH,
                "hang",
                detail=f"worker killed after {self.timeout + self.grace:g} s",
                signature="hang (killed)",
            ), True
        return None, False

    def _respawn(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            slot.conn.close()
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        fresh = self._spawn()
        slot.process, slot.conn = fresh.process, fresh.conn

    def close(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):
                slot.conn.send(None)
        for slot in self.slots:
            slot.process.join(10)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)


# ---------------------------------------------------------------------------- summary


@dataclass
class Summary:
    seed: int
    cases: int
    seconds: float
    outcomes: list[Outcome]

    def counts(self) -> dict[str, int]:
        counts = {name: 0 for name in OUTCOMES}
        for o in self.outcomes:
            counts[o.outcome] += 1
        return counts

    def kinds(self, outcome: str) -> list[tuple[str, int]]:
        tally: dict[str, int] = {}
        for o in self.outcomes:
            if o.outcome == outcome:
                tally[o.kind] = tally.get(o.kind, 0) + 1
        return sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))

    @property
    def crashes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome == CRASH]

    @property
    def new_crashes(self) -> list[Outcome]:
        """Crashes that match no KNOWN_BUGS entry."""
        return [o for o in self.crashes if known_bug(o) is None]

    def crash_signatures(self) -> list[tuple[str, list[Outcome]]]:
        groups: dict[str, list[Outcome]] = {}
        for o in self.crashes:
            groups.setdefault(o.signature or f"{o.kind}: {o.detail[:80]}", []).append(o)
        return sorted(groups.items(), key=lambda kv: -len(kv[1]))

    def by_command(self) -> str:
        """A table: cases per command (inspect, compare, each pass) and outcome."""
        table: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            row = table.setdefault(o.command or "?", {name: 0 for name in OUTCOMES})
            row[o.outcome] += 1
        short = ["ok", "ok*", "error", "check", "crash"]
        lines = [f"{'command':<22}{'cases':>7}" + "".join(f"{h:>7}" for h in short)]
        for command in sorted(table):
            row = table[command]
            cells = "".join(f"{row[name]:>7}" for name in OUTCOMES)
            lines.append(f"{command:<22}{sum(row.values()):>7}{cells}")
        lines.append("(ok* = ok, input already failed the checker; error = clear error)")
        return "\n".join(lines)

    def raised_groups(self) -> list[tuple[str, list[Outcome]]]:
        groups: dict[str, list[Outcome]] = {}
        for o in self.outcomes:
            for entry in o.raised:
                name, _, rest = entry.partition(": ")
                key = f"{name}: " + " ".join(re.sub(r"\d+", "N", rest).split()[:6])
                groups.setdefault(key, []).append(o)
        return sorted(groups.items(), key=lambda kv: -len(kv[1]))

    def format(self, show_crashes: int = 3) -> str:
        lines = [
            f"{len(self.outcomes)} cases (seed {self.seed}) in {self.seconds:.0f} s",
            "",
            "outcome                                   cases",
        ]
        for name, count in self.counts().items():
            lines.append(f"{name:<40}  {count:>6}")
        lines += ["", self.by_command()]
        for name in (CLEAR_ERROR, CHECK_FAILED):
            kinds = self.kinds(name)
            if kinds:
                lines += ["", f"{name} by kind:"]
                lines += [f"  {count:>6}  {kind}" for kind, count in kinds]
        raised = self.raised_groups()
        if raised:
            lines += ["", "steps rolled back because the pass raised (not crashes; pass bugs):"]
        for key, members in raised:
            lines.append(f"  {len(members):>5} x {key}")
            for o in members[:show_crashes]:
                lines.append(f"          case {o.index}: {o.case}")
        groups = self.crash_signatures()
        if groups:
            lines += ["", f"crashes: {len(self.crashes)} in {len(groups)} groups"]
        for signature, members in groups:
            bug = known_bug(members[0])
            tag = f"  [known {bug}: {KNOWN_BUGS[bug][1]}]" if bug else "  [NEW]"
            lines.append(f"  {len(members):>5} x {signature}{tag}")
            for o in sorted(members, key=lambda o: o.seconds)[:show_crashes]:
                lines.append(f"          case {o.index}: {o.case}")
                lines.append(f"            -> {o.detail or o.kind}")
                lines.append(
                    f"{'':12}reproduce: python tools/fuzz.py --seed {self.seed} --case {o.index}"
                )
        return "\n".join(lines)


def run_fuzz(
    cases: int = 300,
    seed: int = 0,
    *,
    workers: int = 2,
    timeout: float = 60.0,
    time_limit: float | None = None,
    memory_gb: float = 4.0,
    keep: Path | None = None,
    progress: bool = False,
    preload: Sequence[str] = (),
) -> Summary:
    """Run cases ``0..cases-1`` of ``seed`` on ``workers`` processes."""
    started = time.time()
    deadline = started + time_limit if time_limit else None
    pool = Pool(workers, seed, timeout, memory_gb, keep, preload)
    outcomes: list[Outcome] = []
    try:
        for outcome in pool.run(range(cases), deadline):
            outcomes.append(outcome)
            if progress and len(outcomes) % 50 == 0:
                crashes = sum(o.outcome == CRASH for o in outcomes)
                print(
                    f"  {len(outcomes)}/{cases} cases, {crashes} crashes, "
                    f"{time.time() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        pool.close()
    outcomes.sort(key=lambda o: o.index)
    return Summary(seed, cases, time.time() - started, outcomes)


def replay(
    seed: int, index: int, keep: Path | None, preload: Sequence[str] = (), memory_gb: float = 4.0
) -> int:
    """Run one case in this process (same memory limit as a worker) and print
    everything about it."""
    _prepare_process(memory_gb, preload)
    passes = load_passes()
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-replay-{index}-"))
    case = build_case(seed, index, folder, passes)
    shutil.rmtree(folder)
    outcome = run_case(seed, index, passes, 600.0, keep)
    print(_outcome_text(outcome, case, seed))
    if _LOGS.records:
        print("logs:\n  " + "\n  ".join(_LOGS.records[:20]))
    if outcome.raised:
        _print_pass_tracebacks(seed, index, passes)
    return 1 if outcome.outcome == CRASH else 0


def _print_pass_tracebacks(seed: int, index: int, passes: list[str]) -> None:
    """Re-run a case whose steps were rolled back because a pass raised, with the
    manager's debug logging on (it then keeps each traceback in the step's reason)."""
    import onnxopt

    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-replay-{index}-"))
    try:
        case = build_case(seed, index, folder, passes)
        logging.getLogger("onnxopt").setLevel(logging.DEBUG)
        try:
            steps = onnxopt.optimize(
                str(folder / "m" / "mutant.onnx"),
                case.pipeline,
                calibration_samples=8,
                validation_samples=4,
            ).outcome.steps
        except onnxopt.CheckFailed as exc:
            steps = exc.outcome.steps if exc.outcome else []
        for record in steps:
            if record.reason.startswith("pass raised"):
                print(f"\nstep {record.index} {record.step}: {record.reason}")
    finally:
        logging.getLogger("onnxopt").setLevel(logging.WARNING)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- determinism

DETERMINISM_SEED = 7


def determinism_pipelines() -> list[str]:
    """Every fuzzed pass with its default options, plus its first cheap variant."""
    from onnxopt.errors import UsageError
    from onnxopt.pipeline import Pipeline

    pipelines = []
    for name in load_passes():
        for text in dict.fromkeys([name, *pipelines_for(name)[:1]]):
            with contextlib.suppress(UsageError):  # some passes need an option set
                pipelines.append(str(Pipeline.parse(text)) and text)
    return pipelines


def write_determinism_outputs(folder: Path) -> list[str]:
    """Optimize every sample model with every pipeline of ``determinism_pipelines``
    (seed ``DETERMINISM_SEED``, lossy budgets off so lossy results are kept) and save
    the results into ``folder``; return the file names. Two runs, in two processes
    with different hash seeds, must write byte-identical files."""
    import onnxopt

    load_passes()
    names = []
    for model in sorted(MODELS.glob("*.onnx")):
        for index, pipeline in enumerate(determinism_pipelines()):
            result = onnxopt.optimize(
                model,
                pipeline,
                data=MODELS / "digits_train.npz",
                budget="none",
                seed=DETERMINISM_SEED,
            )
            name = f"{model.stem}__{index:02d}.onnx"
            result.save(folder / name)
            statuses = ",".join(step["status"] for step in result.steps)
            (folder / f"{name}.txt").write_text(f"{pipeline}: {statuses}\n")
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds",
    )
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=60.0,
        help="a case running longer is a hang (default 60 s)",
    )
    parser.add_argument(
        "--memory-gb", type=float, default=4.0, help="address-space limit per worker (0: none)"
    )
    parser.add_argument(
        "--case",
        type=int,
        action="append",
        help="replay this case in-process with its traceback (repeatable)",
    )
    parser.add_argument("--keep", type=Path, help="copy crashing cases' files here")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--show", type=int, default=3, help="reproducers shown per crash group")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE in every worker first (e.g. to try a fix before it lands)",
    )
    parser.add_argument(
        "--determinism-out",
        type=Path,
        metavar="DIR",
        help="write every pass's output on every sample model to DIR (determinism check)",
    )
    args = parser.parse_args(argv)
    if args.determinism_out:
        args.determinism_out.mkdir(parents=True, exist_ok=True)
        logging.getLogger("onnxopt").setLevel(logging.ERROR)
        print("\n".join(write_determinism_outputs(args.determinism_out)))
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.case:
        return max(
            replay(args.seed, index, args.keep, args.preload, args.memory_gb) for index in args.case
        )
    summary = run_fuzz(
        args.cases,
        args.seed,
        workers=args.workers,
        timeout=args.case_timeout,
        time_limit=args.time_limit,
        memory_gb=args.memory_gb,
        keep=args.keep,
        progress=True,
        preload=args.preload,
    )
    print(summary.format(args.show))
    if args.json:
        args.json.write_text(
            json.dumps([dataclasses.asdict(o) for o in summary.outcomes], indent=1)
        )
    return 1 if summary.new_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
