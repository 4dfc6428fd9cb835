"""What a pass returns: ``PassResult``, and what it left alone: ``Skipped``.

A pass reports every tensor, node or channel group it chose not to rewrite in one
typed form, ``Skipped(subject, kind, reason, op)``, added with ``PassResult.skip``.
The report stores them per step under ``"skipped"`` (one list of
``{"subject", "kind", "op", "reason"}`` records) and counts them under the one
count key ``"skipped"``; :func:`skip_label` is the one way to print one. Inside a
pass, a helper that finds a reason deep in its call chain may ``raise Skip(reason)``
and let the loop that called it record the skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SkipKind = Literal["tensor", "node", "group"]
SKIPPED = "skipped"  # the count key and the report key


class Skip(Exception):
    """Raised inside a pass: this subject is left alone; the message is the reason."""


@dataclass(frozen=True)
class Skipped:
    """One tensor, node or channel group a pass left alone, and why."""

    subject: str  # the tensor's or node's name, or "group N"
    kind: SkipKind
    reason: str
    op: str = ""  # the op type of the node (or of the tensor's reader), when known

    def as_dict(self) -> dict[str, str]:
        return {"subject": self.subject, "kind": self.kind, "op": self.op, "reason": self.reason}


def skip_label(skipped: Skipped | dict[str, str]) -> str:
    """``tensor 'fc1.bias' (Gemm): would not be smaller`` — a Skipped or its record."""
    record = skipped.as_dict() if isinstance(skipped, Skipped) else skipped
    op = f" ({record['op']})" if record.get("op") else ""
    return f"{record['kind']} {record['subject']!r}{op}: {record['reason']}"


@dataclass
class PassResult:
    """What a pass did. ``counts`` are small numbers for tables; ``details`` anything
    JSON-serializable for the report (per-tensor stats, curves...); ``skipped`` what it
    left alone (``skip``), counted as ``counts["skipped"]``."""

    changed: bool
    counts: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.skipped:
            self.counts[SKIPPED] = len(self.skipped)

    def skip(self, subject: str, kind: SkipKind, reason: str, op: str = "") -> Skipped:
        """Record that ``subject`` was left alone, and why."""
        entry = Skipped(subject, kind, reason, op)
        self.skipped.append(entry)
        self.counts[SKIPPED] = len(self.skipped)
        return entry

    def merge(self, other: PassResult) -> PassResult:
        counts = dict(self.counts)
        for key, value in other.counts.items():
            counts[key] = counts.get(key, 0) + value
        return PassResult(
            self.changed or other.changed,
            counts,
            {**self.details, **other.details},
            self.notes + other.notes,
            self.skipped + other.skipped,
        )
