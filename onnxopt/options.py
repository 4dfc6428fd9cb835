"""Pass options: ``option()``, and turning text or TOML values into a pass's typed
``Options`` dataclass (``make_options``, ``coerce``) and back (``format_value``).

Options are validated before anything runs: an unknown option, a value of the wrong
type or out of its declared range is a ``UsageError`` naming the pass, the option and
what would be valid."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from onnxopt.errors import UsageError

if TYPE_CHECKING:
    from onnxopt.registry import Pass


def option(default: Any, help: str, *, range: tuple[float, float] | None = None) -> Any:
    """A pass option: default, one-line help and an optional inclusive numeric range."""
    return field(default=default, metadata={"help": help, "range": range})


@dataclass
class NoOptions:
    pass


def option_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Options))


def _hints(cls: type[Pass]) -> dict[str, Any]:
    import sys

    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls.Options, globalns=vars(module) if module else None)


def make_options(cls: type[Pass], raw: Mapping[str, Any]) -> Any:
    """Build ``cls.Options`` from strings (pipeline text) or TOML values, validating
    names, types and ranges; errors name the pass, the option and the valid values."""
    fields = {f.name: f for f in option_fields(cls)}
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "(this pass takes no options)"
            raise UsageError(f"{cls.name}: unknown option {key!r}; valid options: {valid}")
        try:
            values[key] = coerce(value, hints[key])
        except ValueError as exc:
            raise UsageError(f"{cls.name}: option {key}={value!r}: {exc}") from None
        bounds = fields[key].metadata.get("range")
        if bounds and isinstance(values[key], (int, float)) and not isinstance(values[key], bool):
            low, high = bounds
            if not low <= values[key] <= high:
                raise UsageError(
                    f"{cls.name}: option {key}={value} is out of range [{low}, {high}]"
                )
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UsageError(f"{cls.name}: {exc}") from None
    return options


def coerce(value: Any, hint: Any) -> Any:
    """Convert ``value`` (often a string from pipeline text) to the type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for member in typing.get_args(hint):
            try:
                return coerce(value, member)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; or ".join(errors))
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        raise ValueError("expected none")
    if origin is Literal:
        choices = typing.get_args(hint)
        text = value if not isinstance(value, str) else value.strip()
        for choice in choices:
            if text == choice or str(text) == str(choice):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (str,)
        items = value if isinstance(value, (list, tuple)) else _split_list(str(value))
        return (
            [coerce(item, inner) for item in items]
            if origin is list
            else tuple(coerce(item, inner) for item in items)
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
        if not np.isfinite(result):
            raise ValueError("expected a finite number")
        return result
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    raise ValueError(f"unsupported option type {hint}")


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip() for part in re.split(r"[,|]", text) if part.strip()]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_.:*/+\-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
