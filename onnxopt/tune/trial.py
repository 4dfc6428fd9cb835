"""One trial of ``onnxopt tune``, run wherever the engine puts it.

A trial is an ordinary checked ``onnxopt.optimize`` run of its pipeline text with
``on_fail="abort"``: a step that breaks the budget ends the trial as *over budget*
(the record keeps the failing step, its reason, and the size and metrics of the
candidate that failed), so a trial that succeeds meets the budget at every step and
its pipeline is exactly what ran. The model is then timed in onnxruntime against the
original, interleaved (``onnxopt.bench.measure_latency``, ``threads`` intra-op
threads), which gives ``latency_ms`` and a ``latency_ratio`` that machine noise
affects much less.

Inputs reach a worker once (:class:`Shipment`): as paths on a shared file system
(the local pool) or as file bundles that the worker writes to its own temporary
folder the first time it sees them (Ray's object store). The model is saved either
straight into the cache folder (shared file system) or returned as file bundles that
the driver writes.

A record is plain JSON-ready data::

    {"trial", "pipeline", "status": "ok" | "over budget" | "error", "reason",
     "size_bytes", "deflated_bytes", "latency_ms", "original_latency_ms",
     "latency_ratio", "metrics" (worst over outputs, vs the original), "steps"
     (name: status), "seconds", "worker"}
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxopt.protos import main_graph_tensors

STATUS_OK = "ok"
STATUS_OVER = "over budget"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class Settings:
    """What every trial of one model shares; all of it is part of the cache key."""

    budget: str | None
    seed: int
    shapes: tuple[str, ...] = ()
    calibration_samples: int | None = None
    validation_samples: int | None = None
    threads: int = 1  # latency measurement
    latency_rounds: int = 10


@dataclass(frozen=True)
class Job:
    number: int
    pipeline: str
    key: str


@dataclass(frozen=True)
class Shipment:
    """A model and its data, as paths (shared file system) or as file bundles."""

    model_sha: str
    model_path: str | None = None
    data_path: str | None = None
    model_files: dict[str, bytes] | None = None  # relative name -> bytes
    data_files: dict[str, bytes] | None = None
    data_name: str | None = None  # the data path inside the data bundle


# ---------------------------------------------------------------- files and hashes


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    names: list[str] = []
    for tensor in main_graph_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in names:
                names.append(location)
    return [path] + [path.parent / name for name in names]


def files_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, files) of a data argument: one file, or every file of a folder."""
    path = Path(path)
    if path.is_dir():
        return path, sorted(p for p in path.rglob("*") if p.is_file())
    return path.parent, [path]


def bundle(root: Path, files: list[Path]) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def unbundle(files: dict[str, bytes], folder: Path) -> None:
    for name, payload in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)


# ------------------------------------------------------------------ the trial

_LOCAL: dict[str, tuple[str, str | None]] = {}  # shipment -> paths, once per process


def _materialize(shipment: Shipment) -> tuple[str, str | None]:
    """Paths of the model and data in this process (written once for bundles)."""
    if shipment.model_files is None:
        return shipment.model_path, shipment.data_path
    if shipment.model_sha not in _LOCAL:
        folder = Path(tempfile.mkdtemp(prefix="onnxopt-tune-"))
        atexit.register(shutil.rmtree, folder, True)
        unbundle(shipment.model_files, folder / "model")
        data = None
        if shipment.data_files is not None:
            unbundle(shipment.data_files, folder / "data")
            data = str(folder / "data" / shipment.data_name)
        _LOCAL[shipment.model_sha] = (str(folder / "model" / shipment.model_path), data)
    return _LOCAL[shipment.model_sha]


def worker_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def run_trial(
    job: Job, shipment: Shipment, settings: Settings, output_dir: str | None
) -> dict[str, Any]:
    """Run one trial; save its model to ``output_dir/<key>.onnx`` or return the files."""
    from onnxopt import CheckFailed, optimize
    from onnxopt.errors import first_line

    start = time.perf_counter()
    model_path, data_path = _materialize(shipment)
    record: dict[str, Any] = {"trial": job.number, "pipeline": job.pipeline, "key": job.key}
    try:
        result = optimize(
            model_path,
            job.pipeline,
            data=data_path,
            budget=settings.budget,
            seed=settings.seed,
            on_fail="abort",
            shapes=list(settings.shapes) or None,
            calibration_samples=settings.calibration_samples,
            validation_samples=settings.validation_samples,
        )
    except CheckFailed as exc:
        record.update(_over_budget(exc))
    except Exception as exc:  # a pass that crashes is this trial's failure, not the search's
        record.update(status=STATUS_ERROR, reason=f"{type(exc).__name__}: {first_line(exc, 300)}")
    else:
        try:
            record.update(_finish(result, model_path, data_path, settings, job, output_dir))
        finally:
            result.close()
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["worker"] = worker_name()
    return record


def _over_budget(exc) -> dict[str, Any]:
    from onnxopt.report import build_report

    out: dict[str, Any] = {"status": STATUS_OVER, "reason": str(exc)}
    if exc.outcome is None:
        return out
    report = build_report(exc.outcome)
    failed = [s for s in report["steps"] if s["status"] != "accepted" and s["status"] != "no-op"]
    out["steps"] = {f"{s['index']} {s['step']}": s["status"] for s in report["steps"]}
    if failed:
        step = failed[-1]
        out["size_bytes"] = (step.get("after") or {}).get("size")
        out["deflated_bytes"] = (step.get("after") or {}).get("compressed")
        out["metrics"] = step.get("worst_vs_original") or {}
    return out


def _finish(result, model_path, data_path, settings, job, output_dir) -> dict[str, Any]:
    out: dict[str, Any] = {"status": STATUS_OK, "reason": ""}
    report = result.report
    out["steps"] = {f"{s['index']} {s['step']}": s["status"] for s in report["steps"]}
    out["metrics"] = final_metrics(report)
    out["deflated_bytes"] = (report.get("final") or {}).get("compressed")
    with tempfile.TemporaryDirectory(prefix="onnxopt-trial-") as scratch:
        folder = Path(output_dir) if output_dir else Path(scratch)
        saved = result.save(folder / f"{job.key}.onnx")
        files = model_files(saved)
        out["size_bytes"] = files_size(files)
        out.update(_latency(model_path, data_path, saved, settings))
        if not output_dir:
            out["files"] = bundle(folder, files)
    return out


def final_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Worst metrics vs the original of the last step that changed the model
    (empty: no step changed it, the model computes exactly what the original did)."""
    for step in reversed(report["steps"]):
        if step["status"] == "accepted" and step.get("worst_vs_original"):
            return dict(step["worst_vs_original"])
    return {}


def _latency(model_path, data_path, saved: Path, settings: Settings) -> dict[str, Any]:
    from onnxopt import load_model
    from onnxopt.bench import measure_latency
    from onnxopt.data import timing_feed

    original = load_model(model_path).proto
    shapes = list(settings.shapes) or None
    feed = timing_feed(original, data_path, shapes=shapes, seed=settings.seed)
    candidate = load_model(saved).proto
    timings = measure_latency(
        [("original", original), ("trial", candidate)],
        feed,
        threads=(settings.threads,),
        rounds=settings.latency_rounds,
        runs_per_round=5,
        warmup=3,
    )
    base, trial = timings
    return {
        "latency_ms": round(trial.median_ms, 4),
        "original_latency_ms": round(base.median_ms, 4),
        "latency_ratio": round(trial.ratio, 4),
    }
