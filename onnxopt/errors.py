"""Exception types of the public API.

Every error a user can cause derives from :class:`OnnxoptError`; the CLI turns those
into one clear line and exit code 2. :class:`CheckFailed` (a step over budget with
``on_fail="abort"``) maps to exit code 1. Anything else is an internal bug and keeps
its traceback.
"""

from __future__ import annotations

# what ``onnxopt`` exports from here (first_line is internal)
__all__ = ["CheckFailed", "DataError", "ModelError", "OnnxoptError", "PassCannotRun", "UsageError"]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its type name if empty),
    cut to ``limit`` characters: onnx and onnxruntime errors run to many lines."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class OnnxoptError(Exception):
    """Base class for errors caused by the user's input (model, data, options)."""

    exit_code = 2


class UsageError(OnnxoptError):
    """Bad pipeline text, unknown pass or option, or an option value out of range."""


class ModelError(OnnxoptError):
    """The model cannot be read, is not ONNX, or is unsafe (external data escaping)."""


class DataError(OnnxoptError):
    """Input data does not match the model (missing inputs, wrong shapes or dtypes)."""


class PassCannotRun(OnnxoptError):
    """The pass cannot handle this model (an op, shape or layout it does not support).

    Not an error of the whole run: the pipeline rolls the step back, reports this
    message as the reason, and goes on with the next step.
    """


class CheckFailed(OnnxoptError):
    """A pipeline step broke its budget and the run was asked to abort."""

    exit_code = 1

    def __init__(self, message: str, outcome=None) -> None:
        super().__init__(message)
        self.outcome = outcome  # the RunOutcome up to the failed step
