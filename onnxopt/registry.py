"""The ``Pass`` base class and the registry of passes by name.

``@register_pass`` adds a pass class (kebab-case name, dataclass ``Options``) and
rejects a duplicate name; ``registry()`` imports ``onnxopt.passes`` (whose module
list registers the built-ins) and returns every pass; ``get_pass`` names the valid
passes when a name is unknown."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from onnxopt.check import (
    LOSSLESS_BUDGET,
    LOSSY_BUDGET,
    Budget,
)
from onnxopt.errors import UsageError
from onnxopt.options import NoOptions
from onnxopt.results import PassResult

if TYPE_CHECKING:
    from onnxopt.context import PassContext


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``lossless``, ``Options`` and
    implement ``run``. A pass mutates the graph it is given; it never loads or saves
    files and never runs checks itself (use ``ctx.evaluate`` to *measure*)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    fixed_point: ClassVar[bool] = False  # rerun until it reports no change
    default_budget: ClassVar[Budget | None] = None
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def budget(cls) -> Budget:
        if cls.default_budget is not None:
            return cls.default_budget
        return LOSSLESS_BUDGET if cls.lossless else LOSSY_BUDGET


_REGISTRY: dict[str, type[Pass]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry; duplicate names are an error."""
    if not _NAME.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"duplicate pass name {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Pass]]:
    """All registered passes (importing ``onnxopt.passes`` registers the built-ins)."""
    import onnxopt.passes  # noqa: F401  (explicit module list lives there)

    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        close = [n for n in passes if n.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown pass {name!r}{hint}; valid passes: {', '.join(sorted(passes))}")
    return passes[name]
