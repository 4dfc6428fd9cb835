"""``onnxopt passes NAME``: one pass explained for users.

What a user needs to run a pass: what it does (its one-line summary), whether it is
lossless, its options with their types written the way a user types them
(``mse | minmax``, ``true | false``, ``0 .. 1``), their defaults and help, the budget
its step is checked against, and one example command. The full specification (the
module docstring, written for developers) stays in the docs.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

from onnxopt.pipeline import Pass, option_fields

DOCS = "docs/passes/"


def type_text(hint: Any) -> str:
    """A type as a user writes its values: ``a | b``, ``true | false``, ``number``..."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(member) for member in typing.get_args(hint))
    if hint is type(None):
        return "none"
    if origin is Literal:
        return " | ".join(str(choice) for choice in typing.get_args(hint))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (str,)
        return f"[{type_text(inner)}, ...]"
    return {bool: "true | false", int: "integer", float: "number", str: "text"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def value_text(value: Any) -> str:
    """A default as it would be written in pipeline text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    return str(value)


def _hints(cls: type[Pass]) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls.Options, globalns=vars(module) if module else None)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def example_step(cls: type[Pass]) -> str:
    """The pass with one option set to another of its valid values, to show the syntax."""
    hints = _hints(cls)
    for field in option_fields(cls):
        hint, default = hints[field.name], _default(field)
        if typing.get_origin(hint) is Literal:
            others = [c for c in typing.get_args(hint) if c != default]
            if others:
                return f"{cls.name}({field.name}={value_text(others[0])})"
        if (
            hint in (int, float)
            and isinstance(default, (int, float))
            and field.metadata.get("range")
        ):
            return f"{cls.name}({field.name}={value_text(default)})"
    return cls.name


def describe_pass(cls: type[Pass], width: int = 80) -> str:
    lines = [f"{cls.name} ({'lossless' if cls.lossless else 'lossy'})"]
    lines += textwrap.wrap(cls.summary, width, initial_indent="  ", subsequent_indent="  ")
    fields = option_fields(cls)
    hints = _hints(cls)
    lines.append("")
    lines.append("options:" if fields else "options: none")
    rows = []
    for field in fields:
        kind = type_text(hints[field.name])
        bounds = field.metadata.get("range")
        if bounds and hints[field.name] in (int, float):
            low, high = bounds
            kind += f", >= {value_text(low)}" if high >= 1e9 else f", {low} .. {high}"
        rows.append((field.name, kind, value_text(_default(field)), field.metadata.get("help", "")))
    if rows:
        name_w = max(len(r[0]) for r in rows)
        for name, kind, default, help_text in rows:
            lines.append(f"  {name.ljust(name_w)}  {kind} (default {default})")
            if help_text:
                lines += textwrap.wrap(
                    help_text,
                    width,
                    initial_indent=" " * (name_w + 4),
                    subsequent_indent=" " * (name_w + 4),
                )
    compared = "the previous step" if cls.lossless else "the original model"
    lines += ["", f"checked against: {cls.budget()} (vs {compared}); override with --budget"]
    if not cls.lossless:
        lines.append('  or per step: name(budget="cosine>=0.98")')
    lines += [
        "",
        "example:",
        f'  onnxopt optimize model.onnx -o out.onnx --passes "{example_step(cls)}"'
        + (" --data calib.npz" if not cls.lossless else ""),
        "",
        f"full specification: {spec_location(cls)}",
    ]
    return "\n".join(lines)


def spec_location(cls: type[Pass]) -> str:
    """Where the pass family's full documentation lives."""
    family = cls.__module__.split(".")[2] if cls.__module__.count(".") >= 2 else ""
    doc = f"{DOCS}{family}.md"
    checkout = Path(__file__).resolve().parent.parent
    if family and (checkout / doc).is_file():
        return str(checkout / doc)
    return f"{DOCS} in the onnxopt repository, and the pass module's docstring"
