"""Client side of the worker protocol: the job folder and the worker process.

:func:`run_job` writes a job folder (layout in :mod:`onnxopt.train.worker`) into a
fresh temporary directory, starts ``ADJUNCT_PYTHON worker.py JOB`` in its own process
group, turns the worker's JSON progress lines into ``on_event`` calls (and a progress
bar), enforces ``timeout`` and reads back the results. The folder is removed in every
case — success, worker error, crash, timeout, Ctrl-C — unless
``$ONNXOPT_TRAIN_KEEP=1`` asks to keep it for debugging.

Errors are :class:`TrainingError` with the worker's own message (its ``error`` event),
or, when it died without one, its exit status and the end of its stderr.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import PassCannotRun
from onnxopt.model import save_model

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("worker.py")
PROTOCOL = 1
KEEP_VAR = "ONNXOPT_TRAIN_KEEP"
POLL_SECONDS = 0.2
Event = dict[str, Any]


class TrainingError(PassCannotRun):
    """The training worker failed, crashed or timed out (a distill step rolls back)."""


@dataclass
class Job:
    """Everything the worker needs; arrays are indexed by row (or by sample)."""

    student: onnx.ModelProto
    options: dict[str, Any]
    inputs: list[np.ndarray]
    teachers: list[np.ndarray]
    labels: np.ndarray | None = None


@dataclass
class JobResult:
    params: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    best_epoch: int
    train_samples: int
    heldout_samples: int
    check_indices: np.ndarray
    check_outputs: list[np.ndarray]
    seconds: float
    worker: dict[str, Any] = field(default_factory=dict)  # python / onnxruntime versions


def run_job(
    python: Path,
    job: Job,
    *,
    timeout: float | None = None,
    on_event: Callable[[Event], None] | None = None,
    progress: bool = False,
    workdir: str | os.PathLike | None = None,
) -> JobResult:
    """Run ``job`` in the adjunct ``python``; see the module docstring."""
    folder = Path(tempfile.mkdtemp(prefix="onnxopt-distill-", dir=workdir))
    try:
        write_job(folder, job)
        events = _run_worker(python, folder, timeout, on_event, progress, job.options)
        return read_result(folder, events)
    finally:
        if os.environ.get(KEEP_VAR) == "1":
            log.warning("keeping the training job folder %s ($%s=1)", folder, KEEP_VAR)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def write_job(folder: Path, job: Job) -> None:
    data = folder / "data"
    data.mkdir()
    save_model(job.student, folder / "student.onnx")
    for k, array in enumerate(job.inputs):
        np.save(data / f"input_{k}.npy", array)
    for k, array in enumerate(job.teachers):
        np.save(data / f"teacher_{k}.npy", array)
    if job.labels is not None:
        np.save(data / "labels.npy", job.labels)
    options = {**job.options, "protocol": PROTOCOL, "labels": job.labels is not None}
    (folder / "options.json").write_text(json.dumps(options, indent=1))


# ---------------------------------------------------------------------------- process


def _run_worker(python, folder, timeout, on_event, progress, options) -> list[Event]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"  # a user-site onnxruntime must not shadow the adjunct's
    stderr_path = folder / "worker.log"
    command = [str(python), "-u", str(WORKER), str(folder)]
    log.debug("starting the training worker: %s", " ".join(command))
    with open(stderr_path, "w") as stderr:
        try:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=folder,
                env=env,
                text=True,
                start_new_session=True,  # Ctrl-C reaches us, not the worker: we stop it
            )
        except OSError as exc:
            raise TrainingError(f"cannot start the training worker with {python}: {exc}") from None
        bar = _ProgressBar(options.get("epochs", 0)) if progress else None
        try:
            events = _pump(process, timeout, on_event, bar)
        except BaseException:
            _kill(process)
            raise
        finally:
            if bar is not None:
                bar.close()
    _raise_for_failure(process.returncode, events, stderr_path)
    return events


def _pump(process, timeout, on_event, bar) -> list[Event]:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = None if not timeout else time.monotonic() + timeout
    events: list[Event] = []
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            raise TrainingError(_timeout_message(timeout, events))
        try:  # short waits keep Ctrl-C and the deadline responsive
            line = lines.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        if line is None:
            break
        event = _parse_event(line)
        if event is None:
            continue
        events.append(event)
        if bar is not None:
            bar.update(event)
        if on_event is not None:
            on_event(event)
    try:
        process.wait(timeout=None if deadline is None else max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise TrainingError(_timeout_message(timeout, events)) from None
    return events


def _parse_event(line: str) -> Event | None:
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        log.debug("worker: %s", line)
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _timeout_message(timeout: float, events: Sequence[Event]) -> str:
    epochs = [e for e in events if e.get("event") == "epoch"]
    where = (
        f" during epoch {epochs[-1]['epoch'] + 1} of {epochs[-1].get('epochs')}"
        if epochs
        else " before the first epoch"
    )
    return (
        f"training timed out after {timeout:g} s{where}; raise the timeout or train for fewer "
        "epochs"
    )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


def _raise_for_failure(code: int, events: Sequence[Event], stderr_path: Path) -> None:
    errors = [e for e in events if e.get("event") == "error"]
    if errors:
        log.debug("worker traceback:\n%s", errors[-1].get("traceback", ""))
        raise TrainingError("training worker failed: " + _shorten(errors[-1].get("message", "")))
    if code == 0 and any(e.get("event") == "done" for e in events):
        return
    tail = _stderr_tail(stderr_path)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        status = f"was killed by signal {name}"
    else:
        status = f"exited with code {code}" if code else "exited without finishing"
    raise TrainingError(f"training worker {status}" + (f": {tail}" if tail else ""))


def _stderr_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # onnxruntime-training logs graph transformations at info level: not the cause
    kept = [line for line in text.splitlines() if line.strip() and "[I:onnxruntime" not in line]
    return " | ".join(kept[-lines:])


def _shorten(message: str, limit: int = 800) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


# ---------------------------------------------------------------------------- results


def read_result(folder: Path, events: Sequence[Event]) -> JobResult:
    out = folder / "out"
    try:
        summary = json.loads((out / "result.json").read_text())
        with np.load(out / "params.npz") as archive:
            params = {name: archive[name] for name in archive.files}
        with np.load(out / "check.npz") as archive:
            indices = archive["indices"]
            count = len([k for k in archive.files if k.startswith("target_")])
            outputs = [archive[f"target_{k}"] for k in range(count)]
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"the training worker left no readable results: {exc}") from exc
    start = next((e for e in events if e.get("event") == "start"), {})
    return JobResult(
        params=params,
        history=summary["history"],
        best_epoch=int(summary["best_epoch"]),
        train_samples=int(summary["train_samples"]),
        heldout_samples=int(summary["heldout_samples"]),
        check_indices=indices,
        check_outputs=outputs,
        seconds=float(summary["seconds"]),
        worker={k: start[k] for k in ("python", "onnxruntime") if k in start},
    )


class _ProgressBar:
    """One tqdm bar over epochs, showing the held-out figures of the last epoch."""

    def __init__(self, epochs: int) -> None:
        import sys

        from tqdm import tqdm

        self.bar = tqdm(total=epochs, desc="distilling", unit="epoch", file=sys.stderr, leave=False)

    def update(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "start":
            self.bar.set_postfix_str("generating training artifacts")
        if event.get("event") != "epoch":
            return
        shown = {}
        for key in ("train_loss", "heldout_loss", "agreement", "accuracy", "worst_sqnr_db"):
            if event.get(key) is not None:
                shown[key] = f"{event[key]:.4g}"
        self.bar.set_postfix(shown)
        if event.get("epoch", 0) > 0:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
