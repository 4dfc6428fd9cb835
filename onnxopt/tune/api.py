"""``onnxopt.tune.tune(models, outdir, ...)``: search pipelines for each model, write
the Pareto front. The CLI's ``onnxopt tune`` is a thin layer over this function.

Output folder (one model: OUTDIR itself; several: ``OUTDIR/<model name>/`` each, plus
``OUTDIR/summary.json``; the cache is shared in ``OUTDIR/cache``)::

    pareto.json        engine, budget, objective, points, every trial (see below)
    pareto.html        the Pareto plot and tables (onnxopt.tune.page)
    models/trial-NNN.onnx   the model of every Pareto point (size == its size_bytes)
    cache/             the trial cache (onnxopt.tune.cache)

``pareto.json``: ``{"engine", "budget", "objective", "fidelity", "seed", "model",
"original": {size_bytes, latency_ms}, "points": [{"pipeline", "model" (path relative
to pareto.json), "size_bytes", "deflated_bytes", "latency_ms", "latency_ratio",
"fidelity", "metrics", "worker", "trial"}], "trials": [every trial: status "ok" /
"over budget" / "error", reason, the same figures when known, "pareto", "cached"],
...}``. Only trials that met the budget are points. Files are written atomically;
``pareto.json`` last, after the models it names; models of earlier runs that are no
longer points are removed after it.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxopt import __version__
from onnxopt.errors import UsageError
from onnxopt.tune import page
from onnxopt.tune.cache import TrialCache, link_or_copy, write_atomic
from onnxopt.tune.engines import make_engine
from onnxopt.tune.front import OBJECTIVES, fidelity, pareto_front
from onnxopt.tune.search import Progress, SearchRun, run_search
from onnxopt.tune.space import SearchSpace, default_space, load_space
from onnxopt.tune.trial import (
    STATUS_OK,
    Job,
    Settings,
    data_files,
    files_size,
    model_files,
    sha256_files,
)

DataArg = str | os.PathLike | Mapping[str, str | os.PathLike] | None


@dataclass
class ModelOutcome:
    name: str
    model: Path
    folder: Path
    pareto: dict[str, Any]


@dataclass
class TuneResult:
    outdir: Path
    outcomes: list[ModelOutcome]
    summary: list[dict[str, Any]]


def tune(
    models: Sequence[str | os.PathLike] | str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    data: DataArg = None,
    budget: str | None = None,
    objective: str = "size",
    trials: int = 20,
    seed: int = 0,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    space: SearchSpace | str | os.PathLike | None = None,
    shapes: Sequence[str] | None = None,
    calibration_samples: int | None = None,
    validation_samples: int | None = None,
    threads: int = 1,
    on_progress: Callable[[Progress], None] | None = None,
) -> TuneResult:
    """Search each model's pipelines; write pareto.json, the models and the page.

    ``models``: model paths and/or folders (every ``*.onnx`` in them). ``data``: one
    data path for every model, or ``{model name: path}``. Raises
    :class:`~onnxopt.errors.OnnxoptError` subclasses for bad input, before any trial
    runs; ``KeyboardInterrupt`` leaves finished trials in the cache.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer, not {trials!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed!r}")
    if threads < 1:
        raise UsageError(f"threads must be >= 1, not {threads}")
    paths = _model_paths(models)
    outdir = _outdir(outdir)
    names = _names(paths)
    settings = Settings(
        budget=_budget_text(budget),
        seed=seed,
        shapes=tuple(shapes or ()),
        calibration_samples=calibration_samples,
        validation_samples=validation_samples,
        threads=threads,
    )
    loaded_space = load_space(space) if isinstance(space, (str, os.PathLike)) else space
    cache = TrialCache(outdir / "cache")
    runs = [
        _prepare(path, name, _data_for(data, name, path), settings, loaded_space, cache)
        for path, name in zip(paths, names)
    ]
    for run in runs:
        run.objective, run.trials, run.seed = objective, trials, seed
    single = len(runs) == 1
    outcomes = []
    with make_engine(engine, workers, ray_address) as pool:
        for run in runs:
            folder = outdir if single else outdir / run.model
            folder.mkdir(exist_ok=True)
            run.shipped = pool.ship(run.model_path, run.data_path, run.model_sha)
            run_search(run, pool, on_progress)
            _ensure_point_models(run, pool)
            pareto = _write_outputs(run, folder, pool)
            outcomes.append(ModelOutcome(run.model, run.model_path, folder, pareto))
    summary = [_summary_row(o, outdir) for o in outcomes]
    if not single:
        write_atomic(outdir / "summary.json", json.dumps(summary, indent=2).encode())
    return TuneResult(outdir, outcomes, summary)


# --------------------------------------------------------------------- inputs


def _model_paths(models) -> list[Path]:
    items = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    if not items:
        raise UsageError("no model given")
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.onnx"))
            if not found:
                raise UsageError(f"folder {path} holds no .onnx model")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"model {path} does not exist")
    return paths


def _outdir(outdir) -> Path:
    path = Path(outdir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} is a file")
    if not path.parent.resolve().is_dir():
        raise UsageError(f"output folder's parent {path.parent} does not exist")
    path.mkdir(exist_ok=True)
    return path


def _names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name, n = path.stem, 2
        while name in names or name == "cache":
            name, n = f"{path.stem}-{n}", n + 1
        names.append(name)
    return names


def _data_for(data: DataArg, name: str, path: Path) -> Path | None:
    if data is None:
        return None
    if isinstance(data, Mapping):
        chosen = data.get(name) or data.get(path.stem)
        if chosen is None:
            return None  # generated inputs for this model
        return Path(chosen)
    return Path(data)


def _budget_text(budget: str | None) -> str | None:
    if budget is None:
        return None
    from onnxopt import Budget

    return str(Budget.parse(budget))


def _prepare(path, name, data, settings, space, cache) -> SearchRun:
    """Load and check everything a trial needs, in the driver: bad input fails here."""
    from onnxopt import load_model
    from onnxopt.data import prepare_samples

    loaded = load_model(path)
    if data is not None and not data.exists():
        raise UsageError(f"data {data} does not exist")
    prepare_samples(
        loaded.proto,
        data,
        shapes=list(settings.shapes) or None,
        seed=settings.seed,
        calibration_samples=settings.calibration_samples or 64,
        validation_samples=settings.validation_samples or 32,
    )
    chosen = space if space is not None else default_space(loaded.proto)
    chosen.validate()
    files = model_files(path)
    if data is None:
        data_sha = "generated"
    else:
        root, paths = data_files(data)
        data_sha = sha256_files(paths, root)
    run = SearchRun(
        model=name,
        model_sha=sha256_files(files),
        data_sha=data_sha,
        space=chosen,
        settings=settings,
        objective="size",
        trials=0,
        seed=settings.seed,
        cache=cache,
    )
    run.model_path, run.data_path = path, data
    run.original_size = files_size(files)
    return run


# -------------------------------------------------------------------- outputs


def _ensure_point_models(run: SearchRun, pool) -> None:
    """Rerun Pareto trials whose cached model was pruned (the objective changed)."""
    for _ in range(2):
        front = pareto_front(run.records, run.objective, run.space.fidelity)
        missing = [r for r in front if not run.cache.has_model(r["key"])]
        if not missing:
            return
        jobs = [Job(r["trial"], r["pipeline"], r["key"]) for r in missing]
        output_dir = str(run.cache.folder) if pool.shared_filesystem else None
        fresh = {}
        for record in pool.run(jobs, run.shipped, run.settings, output_dir):
            files = record.pop("files", None)
            run.cache.store(record, files)
            fresh[record["key"]] = record
        run.records = [
            dict(fresh[r["key"]], trial=r["trial"], cached=False) if r["key"] in fresh else r
            for r in run.records
        ]


def _write_outputs(run: SearchRun, folder: Path, pool) -> dict[str, Any]:
    front = pareto_front(run.records, run.objective, run.space.fidelity)
    on_front = {r["trial"] for r in front}
    models_dir = folder / "models"
    models_dir.mkdir(exist_ok=True)
    points, written = [], set()
    for record in front:
        name = f"trial-{record['trial']:03d}.onnx"
        sources = model_files(run.cache.model_path(record["key"]))
        link_or_copy(sources[0], models_dir / name)
        for extra in sources[1:]:
            link_or_copy(extra, models_dir / extra.name)
        written |= {name, *(p.name for p in sources[1:])}
        points.append(_point(record, f"models/{name}", run.space.fidelity))
    pareto = _pareto_document(run, pool, points, on_front)
    write_atomic(folder / "pareto.json", json.dumps(pareto, indent=2, default=str).encode())
    page.write(pareto, folder / "pareto.html")
    for stale in models_dir.iterdir():
        if stale.name not in written:
            stale.unlink()
    _prune_cache(run, on_front)
    return pareto


def _point(record: dict[str, Any], model: str, metric: str) -> dict[str, Any]:
    return {
        "pipeline": record["pipeline"],
        "model": model,
        "size_bytes": record["size_bytes"],
        "deflated_bytes": record.get("deflated_bytes"),
        "latency_ms": record.get("latency_ms"),
        "latency_ratio": record.get("latency_ratio"),
        "fidelity": _json_number(fidelity(record, metric)),
        "metrics": record.get("metrics", {}),
        "worker": record.get("worker"),
        "trial": record["trial"],
    }


def _json_number(value: float | None):
    if value is None:
        return None
    return value if value == value and abs(value) != float("inf") else str(value)


def _pareto_document(run: SearchRun, pool, points, on_front) -> dict[str, Any]:
    trials = []
    for record in run.records:
        item = {k: v for k, v in record.items() if k not in ("files", "transient")}
        item["fidelity"] = _json_number(fidelity(record, run.space.fidelity))
        item["pareto"] = record["trial"] in on_front
        trials.append(item)
    latencies = [r["original_latency_ms"] for r in run.records if r.get("original_latency_ms")]
    return {
        "onnxopt_version": __version__,
        "engine": pool.name,
        "workers": pool.workers,
        "budget": run.settings.budget or "default",
        "objective": run.objective,
        "fidelity": run.space.fidelity,
        "seed": run.seed,
        "model": str(run.model_path),
        "model_sha256": run.model_sha,
        "data": str(run.data_path) if run.data_path else "generated",
        "threads": run.settings.threads,
        "trials_requested": run.trials,
        "trials_run": run.fresh,
        "seconds": round(run.seconds, 2),
        "original": {
            "size_bytes": run.original_size,
            "latency_ms": round(statistics.median(latencies), 4) if latencies else None,
        },
        "space": run.space.as_dict(),
        "points": points,
        "trials": trials,
    }


def _prune_cache(run: SearchRun, on_front: set[int]) -> None:
    """Keep cached models of Pareto points only (a dominated trial stays dominated)."""
    keep = {r["key"] for r in run.records if r["trial"] in on_front}
    for record in run.records:
        if record.get("status") != STATUS_OK or record["key"] in keep:
            continue
        if record.get("model_dropped"):
            continue
        run.cache.drop_model(record["key"])
        stored = run.cache.load(record["key"])
        if stored is not None:
            stored["model_dropped"] = True
            run.cache.store(stored)


def _summary_row(outcome: ModelOutcome, outdir: Path) -> dict[str, Any]:
    pareto = outcome.pareto
    counts: dict[str, int] = {}
    for trial in pareto["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    points = pareto["points"]
    original = pareto["original"]["size_bytes"]
    smallest = min(points, key=lambda p: p["size_bytes"]) if points else None
    return {
        "model": outcome.name,
        "folder": str(outcome.folder.relative_to(outdir)) if outcome.folder != outdir else ".",
        "trials": len(pareto["trials"]),
        "ok": counts.get(STATUS_OK, 0),
        "over_budget": counts.get("over budget", 0),
        "errors": counts.get("error", 0),
        "points": len(points),
        "original_bytes": original,
        "smallest_bytes": smallest["size_bytes"] if smallest else None,
        "smallest_ratio": round(smallest["size_bytes"] / original, 4) if smallest else None,
        "smallest_fidelity": smallest["fidelity"] if smallest else None,
        "smallest_pipeline": smallest["pipeline"] if smallest else None,
        "seconds": pareto["seconds"],
    }
