"""Where trials run: a small interface and its two implementations.

An :class:`Engine` is opened once for a whole ``tune`` call (all its models), gets
each model's inputs once (:meth:`Engine.ship`), runs lists of trials and yields their
records as they finish (:meth:`Engine.run`), and is closed at the end or, on Ctrl-C,
with ``cancel=True`` (running trials are stopped, finished ones are already cached).

- ``local`` (:class:`LocalEngine`, the default): a pool of ``workers`` processes on
  this machine (``spawn``ed, so they start clean). Inputs are paths (shared file
  system); each worker saves its models straight into the cache folder. Workers
  ignore SIGINT: the driver stops them.
- ``ray`` (:class:`RayEngine`): each trial is a Ray task (``num_cpus=1``). With an
  address it joins that cluster; without one it starts a local cluster with
  ``workers`` CPUs and shuts it down when closed. The model and data go to Ray's
  object store once per model; a worker writes them to its own temporary folder the
  first time it needs them, and returns the trial's model as bytes, which the driver
  writes (the cluster's nodes need not share a file system with the driver; they do
  need onnxopt installed). Ray is the optional extra ``onnxopt[ray]``.

Threads: every worker gets ``ONNXOPT_THREADS`` (onnxruntime intra-op threads of the
checks' sessions) and the usual BLAS/OpenMP variables set to its share of the cores,
so ``workers`` trials side by side do not oversubscribe the machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from onnxopt.errors import UsageError
from onnxopt.tune.trial import Job, Settings, Shipment, bundle, data_files, model_files, run_trial

ENGINES = ("local", "ray")
THREAD_VARS = ("ONNXOPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class Engine(ABC):
    name: str
    workers: int
    shared_filesystem: bool  # workers save models into the cache folder themselves

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def ship(self, model: Path, data: Path | None, model_sha: str) -> Any:
        """Make one model's inputs available to the workers; the handle ``run`` takes."""

    @abstractmethod
    def run(
        self, jobs: Sequence[Job], shipped: Any, settings: Settings, output_dir: str | None
    ) -> Iterator[dict[str, Any]]:
        """Run ``jobs``; yield each record as soon as its trial finishes."""

    @abstractmethod
    def close(self, cancel: bool = False) -> None: ...

    def __enter__(self) -> Engine:
        self.open()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(cancel=kind is not None)


def make_engine(name: str, workers: int | None = None, address: str | None = None) -> Engine:
    if name not in ENGINES:
        raise UsageError(f"engine {name!r}; valid: {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    if address and name != "ray":
        raise UsageError("--ray-address needs --engine ray")
    if name == "ray":
        return RayEngine(workers, address)
    return LocalEngine(workers or os.cpu_count() or 1)


def thread_env(threads: int) -> dict[str, str]:
    return {var: str(threads) for var in THREAD_VARS}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------- local


def _init_local_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when to stop


class LocalEngine(Engine):
    name = "local"
    shared_filesystem = True

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = None

    def open(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        context = multiprocessing.get_context("spawn")
        # spawned workers inherit the environment at start: thread limits apply from
        # their first import of numpy/onnxruntime on
        with _environment(thread_env(threads)):
            self._pool = context.Pool(self.workers, initializer=_init_local_worker)

    def ship(self, model: Path, data: Path | None, model_sha: str) -> Shipment:
        return Shipment(model_sha, str(model), str(data) if data else None)

    def run(self, jobs, shipped, settings, output_dir):
        done: queue.Queue = queue.Queue()
        for job in jobs:
            self._pool.apply_async(
                run_trial,
                (job, shipped, settings, output_dir),
                callback=lambda record: done.put(("ok", record)),
                error_callback=lambda exc, job=job: done.put(("error", (job, exc))),
            )
        for _ in jobs:
            kind, payload = done.get()
            if kind == "error":  # the worker process itself failed (not the trial)
                job, exc = payload
                yield _worker_failure(job, exc)
            else:
                yield payload

    def close(self, cancel: bool = False) -> None:
        if self._pool is None:
            return
        if cancel:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()
        self._pool = None


def _worker_failure(job: Job, exc: BaseException) -> dict[str, Any]:
    return {
        "trial": job.number,
        "pipeline": job.pipeline,
        "key": job.key,
        "status": "error",
        "reason": f"worker failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
        "transient": True,  # not cached: the next run tries again
    }


# ------------------------------------------------------------------------ ray

RAY_MISSING = (
    "--engine ray needs Ray, an optional extra: pip install 'onnxopt[ray]' (or pip install ray)"
)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def _ray_trial(job: Job, shipment: Shipment, settings: Settings) -> dict[str, Any]:
    import ray

    record = run_trial(job, shipment, settings, None)
    node = ray.get_runtime_context().get_node_id()
    record["worker"] = f"node {node[:12]} {record['worker']}"
    return record


class RayEngine(Engine):
    name = "ray"
    shared_filesystem = False

    def __init__(self, workers: int | None, address: str | None) -> None:
        self.address = address
        self.workers = workers or (0 if address else os.cpu_count() or 1)
        self._ray = None
        self._started = False
        self._remote = None
        self._pending: list = []

    def open(self) -> None:
        ray = import_ray()
        runtime_env = {"env_vars": thread_env(1)}
        if self.address:
            ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(
                address="local",
                num_cpus=self.workers,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=runtime_env,
                configure_logging=False,
            )
            self._started = True
        if not self.workers:
            self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._ray = ray
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_trial)

    def ship(self, model: Path, data: Path | None, model_sha: str):
        files = model_files(model)
        shipment = Shipment(model_sha, model.name, model_files=bundle(model.parent, files))
        if data is not None:
            root, paths = data_files(data)
            name = str(data.relative_to(root)) if data.is_file() else "."
            shipment = Shipment(
                model_sha,
                model.name,
                model_files=shipment.model_files,
                data_files=bundle(root, paths),
                data_name=name,
            )
        return self._ray.put(shipment)

    def run(self, jobs, shipped, settings, output_dir):
        ray = self._ray
        futures = {self._remote.remote(job, shipped, settings): job for job in jobs}
        self._pending = list(futures)
        while self._pending:
            ready, self._pending = ray.wait(self._pending, num_returns=1)
            for ref in ready:
                try:
                    yield ray.get(ref)
                except Exception as exc:  # the task or its worker died
                    yield _worker_failure(futures[ref], exc)

    def close(self, cancel: bool = False) -> None:
        if self._ray is None:
            return
        if cancel:
            for ref in self._pending:
                with contextlib.suppress(Exception):
                    self._ray.cancel(ref, force=True)
        self._pending = []
        self._ray.shutdown()  # disconnects; also stops the cluster if we started it
        self._ray = None
