"""The distillation adjunct's environment: a venv with onnxruntime-training.

onnxruntime-training (last release 1.19.2) cannot share an environment with current
onnxruntime — both install the module ``onnxruntime`` — and it needs ``onnx<1.18`` and
imports torch at import time. Training therefore runs in a separate interpreter, the
*adjunct*, as a worker process (see :mod:`onnxopt.train.client`).

Which interpreter (:func:`find_python`), first match wins:

1. an explicit ``python=`` argument (``--python`` on the command line);
2. ``$ONNXOPT_TRAIN_PYTHON``;
3. the venv that :func:`create_env` (``onnxopt train-env``) made at
   ``$ONNXOPT_TRAIN_ENV`` or, by default, ``$XDG_CACHE_HOME/onnxopt/train-env``
   (``~/.cache/onnxopt/train-env``).

:func:`create_env` is idempotent: a marker file in the venv records the pinned
requirements; a second call finds it and returns at once. It builds the venv with the
current interpreter when that is CPython 3.8-3.12 (onnxruntime-training 1.19.2 ships
cp38-cp312 wheels only), otherwise with the newest ``python3.12``...``python3.9`` on
``PATH``, or with ``base_python=``. A failed install removes the half-built venv and
raises :class:`TrainEnvError` with the end of pip's output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from onnxopt.errors import UsageError

log = logging.getLogger(__name__)

# torch must be pinned: an unpinned `pip install torch` pulls a multi-GB CUDA build.
REQUIREMENTS = (
    "onnxruntime-training==1.19.2",
    "onnx==1.17.0",
    "torch==2.13.0",
    "numpy<2",
)
SUPPORTED = ((3, 8), (3, 12))  # onnxruntime-training 1.19.2 wheels: cp38 ... cp312
MARKER = "onnxopt-train-env.json"
ENV_PYTHON_VAR = "ONNXOPT_TRAIN_PYTHON"
ENV_DIR_VAR = "ONNXOPT_TRAIN_ENV"

# Run inside the adjunct: proves the training API imports and reports versions.
PROBE = r"""
import json, sys
import numpy, onnx, onnxruntime
from onnxruntime.training import artifacts, onnxblock
from onnxruntime.training.api import CheckpointState, Module, Optimizer
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "numpy": numpy.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}))
"""


class TrainEnvError(UsageError):
    """The training environment is missing, unusable, or could not be created."""


def default_env_dir() -> Path:
    """Where ``onnxopt train-env`` puts the venv (``$ONNXOPT_TRAIN_ENV`` overrides)."""
    if os.environ.get(ENV_DIR_VAR):
        return Path(os.environ[ENV_DIR_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "onnxopt" / "train-env"


def env_python(env_dir: Path) -> Path:
    if os.name == "nt":  # pragma: no cover - not a target platform, but keep paths right
        return env_dir / "Scripts" / "python.exe"
    return env_dir / "bin" / "python"


def find_python(python: str | os.PathLike | None = None) -> Path:
    """The adjunct interpreter to run the worker with (see the module docstring).

    Explicit interpreters are checked for existence and Python version here; whether
    onnxruntime-training imports is checked by the worker itself, which reports a
    clear error when it does not.
    """
    explicit = python or os.environ.get(ENV_PYTHON_VAR)
    if explicit:
        source = "--python" if python else f"${ENV_PYTHON_VAR}"
        path = _resolve_interpreter(str(explicit), source)
        check_version(path, source)
        return path
    env_dir = default_env_dir()
    marker = env_dir / MARKER
    path = env_python(env_dir)
    if not marker.is_file() or not path.exists():
        raise TrainEnvError(
            f"no training environment at {env_dir}: run `onnxopt train-env` once to create it "
            f"(a venv with {', '.join(REQUIREMENTS[:3])}), or point ${ENV_PYTHON_VAR} / "
            "--python at an interpreter that has onnxruntime-training"
        )
    return path


def _resolve_interpreter(text: str, source: str) -> Path:
    path = Path(text).expanduser()
    if path.parent == Path(".") and not path.exists():
        found = shutil.which(text)
        if found:
            path = Path(found)
    if not path.exists():
        raise TrainEnvError(f"{source}: Python interpreter {text!r} not found")
    if path.is_dir():
        raise TrainEnvError(f"{source}: {text!r} is a directory, expected a Python interpreter")
    if not os.access(path, os.X_OK):
        raise TrainEnvError(f"{source}: {text!r} is not executable")
    return path


def python_version(python: Path) -> tuple[int, int, int]:
    """``(major, minor, micro)`` of ``python``; TrainEnvError when it does not run."""
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrainEnvError(f"cannot run {python}: {exc}") from None
    text = done.stdout.strip()
    parts = text.split(".")
    if done.returncode != 0 or len(parts) != 3 or not all(p.isdigit() for p in parts):
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise TrainEnvError(
            f"{python} does not run as a Python interpreter"
            + (f": {detail[-1]}" if detail else f" (exit code {done.returncode})")
        )
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def check_version(python: Path, source: str = "interpreter") -> tuple[int, int, int]:
    """Refuse interpreters outside onnxruntime-training's cp38-cp312 wheels."""
    version = python_version(python)
    low, high = SUPPORTED
    if not low <= version[:2] <= high:
        shown = ".".join(map(str, version))
        raise TrainEnvError(
            f"{source}: {python} is Python {shown}; onnxruntime-training 1.19.2 has wheels "
            f"for Python {low[0]}.{low[1]}-{high[0]}.{high[1]} only. Use a Python 3.12 or "
            "older (e.g. `onnxopt train-env --base-python python3.12`)"
        )
    return version


def probe(python: Path, timeout: float = 300) -> dict[str, str]:
    """Import the training API in ``python``; return its versions or raise TrainEnvError."""
    try:
        done = subprocess.run(
            [str(python), "-c", PROBE], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrainEnvError(f"cannot run {python}: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise TrainEnvError(
            f"{python} cannot import onnxruntime.training: "
            + (lines[-1] if lines else f"exit code {done.returncode}")
            + "; run `onnxopt train-env` to create a working environment"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_marker(env_dir: Path) -> dict | None:
    try:
        return json.loads((env_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_ready(env_dir: Path) -> bool:
    marker = read_marker(env_dir)
    return (
        marker is not None
        and marker.get("requirements") == list(REQUIREMENTS)
        and env_python(env_dir).exists()
    )


def create_env(
    env_dir: str | os.PathLike | None = None,
    *,
    base_python: str | os.PathLike | None = None,
    force: bool = False,
    pip_args: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
) -> tuple[Path, bool]:
    """Create the adjunct venv once; return ``(python, created)``.

    ``say`` receives progress lines (the CLI prints them). ``force`` rebuilds an
    existing environment. ``pip_args`` are appended to the ``pip install`` command
    (e.g. an extra index for a CPU torch build on machines without a local wheel).
    """
    target = Path(env_dir).expanduser() if env_dir else default_env_dir()
    say = say or log.info
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_ready(target) and not force:
            return env_python(target), False
        base = _pick_base_python(base_python)
        _remove_stale(target)
        try:
            _build(target, base, pip_args, say)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return env_python(target), True


def _pick_base_python(base_python: str | os.PathLike | None) -> Path:
    if base_python:
        path = _resolve_interpreter(str(base_python), "--base-python")
        check_version(path, "--base-python")
        return path
    low, high = SUPPORTED
    if low <= sys.version_info[:2] <= high and sys.implementation.name == "cpython":
        return Path(sys.executable)
    for minor in range(high[1], low[1], -1):
        found = shutil.which(f"python3.{minor}")
        if found:
            return Path(found)
    raise TrainEnvError(
        f"this Python ({sys.version.split()[0]}) is too new for onnxruntime-training 1.19.2 "
        f"(wheels for Python {low[0]}.{low[1]}-{high[0]}.{high[1]}) and no python3.12 ... "
        "python3.9 is on PATH; install one and run `onnxopt train-env --base-python PATH`"
    )


def _remove_stale(target: Path) -> None:
    if not target.exists():
        return
    if target.is_dir() and (not any(target.iterdir()) or (target / "pyvenv.cfg").exists()):
        shutil.rmtree(target)
        return
    raise TrainEnvError(
        f"{target} exists and is not a virtual environment; remove it or choose another "
        f"place with --path / ${ENV_DIR_VAR}"
    )


def _build(target: Path, base: Path, pip_args: Sequence[str], say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    say(f"creating a venv at {target} with {base}")
    _run([str(base), "-m", "venv", str(target)], "python -m venv", say, show=False)
    python = env_python(target)
    say("installing " + " ".join(REQUIREMENTS) + " (first time: a few minutes)")
    command = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    _run([*command, *REQUIREMENTS, *pip_args], "pip install", say, show=True)
    versions = probe(python)
    marker = {
        "requirements": list(REQUIREMENTS),
        "versions": versions,
        "base_python": str(base),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    say(
        f"ready in {time.perf_counter() - started:.0f} s: Python {versions['python']}, "
        f"onnxruntime-training {versions['onnxruntime']}, onnx {versions['onnx']}, "
        f"numpy {versions['numpy']}"
    )


_SHOWN_PIP_LINES = ("Collecting", "Downloading", "Installing", "Successfully", "ERROR")


def _run(command: list[str], what: str, say: Callable[[str], None], show: bool) -> None:
    tail: list[str] = []
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except OSError as exc:
        raise TrainEnvError(f"{what} could not start: {exc}") from None
    assert process.stdout is not None
    with process:
        for line in process.stdout:
            line = line.rstrip()
            tail = [*tail[-29:], line]
            if show and line.lstrip().startswith(_SHOWN_PIP_LINES):
                say("  " + line.strip())
    if process.returncode != 0:
        hint = ""
        if what.startswith("python -m venv") and any("ensurepip" in t for t in tail):
            hint = " (on Debian/Ubuntu install the python3-venv package)"
        raise TrainEnvError(
            f"{what} failed with exit code {process.returncode}{hint}:\n  "
            + "\n  ".join(tail[-12:])
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize concurrent `train-env` runs (two test processes, two shells)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, creation is rare anyway
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
