"""Outcomes for tools/fuzz.py: the classes a case ends in, crash signatures, the
checks an output must pass, and the reported bugs (``KNOWN_BUGS``)."""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from fuzz_seeds import _CODE_DIRS

if TYPE_CHECKING:
    from fuzz import Case


# ---------------------------------------------------------------------------- outcomes

OK, OK_TOLERATED, CLEAR_ERROR, CHECK_FAILED, CRASH = (
    "ok",
    "ok (input already failed the checker)",
    "clear error",
    "check failed",
    "crash",
)
OUTCOMES = (OK, OK_TOLERATED, CLEAR_ERROR, CHECK_FAILED, CRASH)

# Core bugs this fuzzer found and reported (id -> crash-signature regex, summary). Each
# has an xfail(strict=True) regression test in tests/test_fuzz.py; drop the entry when
# the fix lands and that test flips.
# Crash signatures (regex on "<kind> in <file>:<function> <- ...") of reported bugs that
# are not fixed yet, each with a regression test in tests/test_fuzz.py. Empty: the core
# bugs B1-B12 found by the first 5,000-case run are fixed (docs/hardening.md).
KNOWN_BUGS: dict[str, tuple[str, str]] = {}


def known_bug(outcome: Outcome) -> str | None:
    """The KNOWN_BUGS id a crash belongs to, or None for a new crash."""
    for bug, (pattern, _) in KNOWN_BUGS.items():
        if outcome.signature and re.search(pattern, outcome.signature):
            return bug
    return None


@dataclass
class Outcome:
    index: int
    outcome: str
    kind: str  # error kind: the first words of the message, paths and numbers removed
    case: str = ""
    seconds: float = 0.0
    detail: str = ""  # crash: exception line / what was wrong
    signature: str = ""  # crash: exception type and the innermost onnxopt frame
    traceback: str = ""
    raised: list[str] = field(default_factory=list)  # steps rolled back because a pass raised
    command: str = ""  # inspect | compare | the pipeline's last pass (CLI and API)


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case (BaseException: the CLI must not catch it)."""


def _error_kind(message: str, folder: Path) -> str:
    text = message.replace(str(folder.resolve()), "").replace(str(folder), "")
    text = re.sub(r"^onnxopt: (error|check failed|internal error): ", "", text.strip())
    text = re.sub(r"/?m/mutant\.onnx:?|/?original\.onnx:?", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return " ".join(text.split()[:6]) or "(empty message)"


def _stray_files(folder: Path, produced_ok: bool) -> list[str]:
    """Files in the output folder that must not be there."""
    names = sorted(p.name for p in (folder / "out").iterdir())
    allowed = {"out.onnx", "out.onnx.data", "report.json"} if produced_ok else {"report.json"}
    return [n for n in names if n not in allowed]


def _check_output(folder: Path, mutant: Path) -> str | None:
    """None if out.onnx loads, passes the checker and onnxruntime loads it; else why not.
    Returns "tolerated" when only the checker fails and the mutant fails it too."""
    from onnxopt.model import load_model
    from onnxopt.runtime import make_session

    out = folder / "out" / "out.onnx"
    if not out.exists():
        return "exit 0 but no output file"
    try:
        proto = onnx.load(str(out))
    except Exception as exc:
        return f"output does not load: {_first_line(exc)}"
    try:
        make_session(load_model(out).proto)
    except Exception as exc:
        return f"onnxruntime cannot load the output: {_first_line(exc)}"
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        try:
            onnx.checker.check_model(onnx.load(str(mutant)))
        except Exception:
            return "tolerated"
        return f"output fails the onnx checker, the input passed it: {_first_line(exc)}"
    return None


def _bad_output_signature(problem: str) -> str:
    text = re.sub(r"/\S*/", "", problem)
    text = re.sub(r"'[^']*'", "'…'", text)
    return "bad output: " + re.sub(r"\d+", "N", text)[:160]


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:200]}"


def _signature(exc: BaseException) -> str:
    """Exception type and the two innermost onnxopt frames: what groups crashes by bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_CODE_DIRS)]
    ours = [f for f in ours if f.name != "main"] or ours or frames[-1:]
    places = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}" for f in ours]
    name = type(exc).__name__
    if type(exc).__module__.startswith("onnxruntime"):
        name = "onnxruntime error"
    return f"{name} in " + " <- ".join(reversed(places[-2:])) if places else name


def classify_cli(case: Case, folder: Path, rc: int, stderr: str) -> tuple[str, str, str]:
    """(outcome, kind, detail) of a CLI run from its exit code and printed stderr."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    message = lines[-1] if lines else ""
    kind = _error_kind(message, folder)
    if "Traceback" in stderr:
        return CRASH, kind, "traceback on stderr"
    if rc == 0:
        stray = _stray_files(folder, produced_ok=True)
        if stray:
            return CRASH, "stray files", f"left {stray}"
        if case.kind != "optimize":
            return OK, "", ""
        problem = _check_output(folder, folder / "m" / "mutant.onnx")
        if problem == "tolerated":
            return OK_TOLERATED, "", ""
        return (CRASH, "bad output", problem) if problem else (OK, "", "")
    stray = _stray_files(folder, produced_ok=False)
    if stray:
        return CRASH, kind, f"exit {rc} and left {stray}"
    if rc == 2 and len(lines) == 1 and lines[0].startswith("onnxopt: error: "):
        return CLEAR_ERROR, kind, ""
    if rc == 1 and lines and lines[-1].startswith(("onnxopt: check failed", "over budget")):
        return CHECK_FAILED, kind, ""
    if rc == 1 and case.kind == "compare":
        return CHECK_FAILED, "compare over budget", ""
    return CRASH, kind, f"exit {rc}: {message[:300]}"
