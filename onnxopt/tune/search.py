"""The search loop of one model: Optuna asks, the engine runs, the cache remembers.

Trials are asked in **rounds** of ``space.round_size`` (8 by default): a round's
trials are asked together, run on the engine in parallel, and told to Optuna in trial
order once all have finished. What Optuna sees therefore does not depend on which
worker was faster, how many workers there are or which engine ran them: the same
seed gives the same trials, and the same Pareto points, from any engine. (The cost:
at the end of a round, workers may wait for the round's slowest trial.)

The first round starts with the space's *anchor* trials (each alternative alone at
its anchor values, e.g. int8 with its defaults, 4-bit codebooks) so that a small
budget of trials still covers every family; Optuna's sampler (multi-objective TPE by
default, NSGA-II on request, both seeded) chooses the rest. Trials over budget are
told as infeasible (a constraint), trials that crashed as failed.

A pipeline already tried (or already asked in the round) is not a new trial: the
sampler is asked again (the repeat is told as failed), then, after 10 repeats, a seeded
random proposal is drawn instead.

A resumed search replays: the sampler is seeded, so it asks for the same pipelines
again, and the cache answers them at once until the first trial that never ran.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.tune.cache import TrialCache, trial_key
from onnxopt.tune.engines import Engine
from onnxopt.tune.front import objective_vector, pareto_front
from onnxopt.tune.space import SearchSpace
from onnxopt.tune.trial import STATUS_ERROR, STATUS_OK, Job, Settings

log = logging.getLogger(__name__)

# stand-ins told to Optuna for values an infeasible trial does not have
_MISSING = {"size": 1e18, "latency": 1e6, "fidelity": -1e6}
_FIDELITY_CAP = 1e6  # sqnr is inf for an unchanged model; Optuna wants finite values


@dataclass
class Progress:
    """What the caller (the CLI) shows after each finished trial."""

    model: str
    done: int
    total: int
    record: dict[str, Any]
    cached: bool
    best: dict[str, Any] | None  # the best budget-meeting trial so far (first objective)
    front: int  # Pareto points so far
    eta_seconds: float | None


@dataclass
class SearchRun:
    model: str  # display name
    model_sha: str
    data_sha: str
    space: SearchSpace
    settings: Settings
    objective: str
    trials: int
    seed: int
    cache: TrialCache
    shipped: Any = None
    model_path: Path | None = None
    data_path: Path | None = None
    original_size: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    fresh: int = 0  # trials that ran (not from the cache)
    seconds: float = 0.0


def run_search(
    run: SearchRun, engine: Engine, on_progress: Callable[[Progress], None] | None = None
) -> list[dict[str, Any]]:
    """Run ``run.trials`` trials; return every record in trial order."""
    study = _study(run)
    start = time.perf_counter()
    while len(run.records) < run.trials:
        count = min(run.space.round_size, run.trials - len(run.records))
        asked, jobs = [], []
        for _ in range(count):
            trial, job = _ask_new(study, run, len(run.records) + len(jobs), jobs)
            asked.append(trial)
            jobs.append(job)
        results = _run_round(run, engine, jobs, on_progress, start)
        for trial, job in zip(asked, jobs):
            record = dict(results[job.key], trial=job.number, pipeline=job.pipeline)
            run.records.append(record)
            _tell(study, trial, record, run)
    run.seconds = time.perf_counter() - start
    return run.records


def _ask_new(study, run: SearchRun, number: int, pending: list[Job]):
    """Ask until the sampler proposes a pipeline not tried yet (a sampler over few
    categorical choices repeats itself); a repeat is told as failed, so the sampler's
    model does not change, and costs no trial. After ``_REASKS`` repeats the proposal is
    drawn at random (seeded by the trial number); after ``2 * _REASKS`` (a space nearly
    exhausted) the repeat is accepted and answered by the cache."""
    import optuna

    seen = {r["pipeline"] for r in run.records} | {j.pipeline for j in pending}
    sampler = study.sampler
    try:
        for attempt in range(2 * _REASKS):
            if attempt == _REASKS:
                study.sampler = optuna.samplers.RandomSampler(seed=run.seed * 100_003 + number)
            trial = study.ask()
            job = _job(run, trial, number)
            if job.pipeline not in seen or attempt == 2 * _REASKS - 1:
                return trial, job
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        study.sampler = sampler
    raise AssertionError("unreachable")


_REASKS = 10


def _job(run: SearchRun, trial, number: int) -> Job:
    from onnxopt import Pipeline

    pipeline = str(Pipeline.parse(run.space.suggest(trial)))  # canonical text
    key = trial_key(run.model_sha, run.data_sha, pipeline, run.settings)
    return Job(number, pipeline, key)


def _run_round(run, engine, jobs, on_progress, start) -> dict[str, dict[str, Any]]:
    """Records by key for the round's jobs: from the cache, or run on the engine."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    for job in jobs:
        if job.key in results or any(j.key == job.key for j in todo):
            continue  # the same pipeline twice in one round runs once
        cached = run.cache.load(job.key)
        if cached is not None and _usable(cached, run.cache):
            results[job.key] = dict(cached, cached=True)
            _report(run, results[job.key], True, len(jobs), results, on_progress, start)
        else:
            todo.append(job)
    if todo:
        output_dir = str(run.cache.folder) if engine.shared_filesystem else None
        for record in engine.run(todo, run.shipped, run.settings, output_dir):
            files = record.pop("files", None)
            if not record.get("transient"):
                run.cache.store(record, files)
            run.fresh += 1
            results[record["key"]] = dict(record, cached=False)
            _report(run, results[record["key"]], False, len(jobs), results, on_progress, start)
    return results


def _usable(record: dict[str, Any], cache: TrialCache) -> bool:
    """A cached trial that met the budget needs its model unless it was pruned as
    dominated (``model_dropped``); a model pruned then is only needed again if the
    objective changed, which the final check catches (see tune.api)."""
    if record.get("status") != STATUS_OK or record.get("model_dropped"):
        return True
    return cache.has_model(record["key"])


def _report(run, record, cached, round_count, results, on_progress, start) -> None:
    if on_progress is None:
        return
    done = len(run.records) + len(results)
    current = run.records + list(results.values())
    front = pareto_front(
        [dict(r, trial=i) for i, r in enumerate(current)], run.objective, run.space.fidelity
    )
    best = front[0] if front else None
    eta = None
    elapsed = time.perf_counter() - start
    if run.fresh and done < run.trials:
        eta = elapsed / max(done, 1) * (run.trials - done)
    on_progress(Progress(run.model, done, run.trials, record, cached, best, len(front), eta))


def _tell(study, trial, record: dict[str, Any], run: SearchRun) -> None:
    import optuna

    status = record.get("status")
    vector = objective_vector(record, run.objective, run.space.fidelity)
    if status == STATUS_ERROR or (status == STATUS_OK and vector is None):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    trial.set_user_attr("constraint", [0.0 if status == STATUS_OK else 1.0])
    values = _told_values(record, run, vector)
    study.tell(trial, values)


def _told_values(record, run: SearchRun, vector) -> list[float]:
    if vector is not None:
        values = list(vector)
    else:  # over budget: tell what the failing candidate had, stand-ins for the rest
        values = []
        names = {"size": ["size"], "latency": ["latency"], "both": ["size", "latency"]}
        for name in names[run.objective]:
            key = "size_bytes" if name == "size" else "latency_ratio"
            values.append(float(record.get(key) or _MISSING[name]))
        from onnxopt.tune.front import fidelity

        fid = fidelity(record, run.space.fidelity)
        values.append(-fid if fid is not None else -_MISSING["fidelity"])
    values[-1] = max(values[-1], -_FIDELITY_CAP)  # values[-1] is -fidelity
    return [v if math.isfinite(v) else _MISSING["size"] for v in values]


def _constraints(frozen) -> Sequence[float]:
    return frozen.user_attrs.get("constraint", [1.0])


def _study(run: SearchRun):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize"] * (3 if run.objective == "both" else 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constraints_func is marked experimental
        if run.space.sampler == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(
                seed=run.seed,
                population_size=max(2, run.space.round_size),
                constraints_func=_constraints,
            )
        else:
            sampler = optuna.samplers.TPESampler(
                seed=run.seed,
                n_startup_trials=run.space.round_size,
                constraints_func=_constraints,
            )
        study = optuna.create_study(directions=directions, sampler=sampler)
        if run.space.anchors:
            for params in run.space.anchor_params()[: run.trials]:
                study.enqueue_trial(params, skip_if_exists=False)
    return study
