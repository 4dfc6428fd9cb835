"""The ``Pass`` base class and the registry of passes by name.

``@register_pass`` adds a pass class (kebab-case name, dataclass ``Options``) and
rejects a duplicate name; ``registry()`` imports ``onnxopt.passes`` (whose module
list registers the built-ins) and returns every pass; ``get_pass`` names the valid
passes when a name is unknown.

**Prerequisites are declared.** A pass that needs something of the model before it
can run (an opset) says so: ``requires_opset = 13``, or a ``requires(model)`` hook
returning a :class:`Requirement` (or several, in order) — the pipeline step that
provides it and why. The PassManager runs that step first, as a checked step of its
own recorded in the report (``required_by``); when it fails, the pass's step is
skipped with the reason (a pass whose requirement is ``optional`` runs anyway and
copes). ``run`` may assume the
requirement holds; called directly, it checks and raises ``PassCannotRun``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxopt.check import LOSSLESS_BUDGET, LOSSY_BUDGET, Budget
from onnxopt.errors import UsageError
from onnxopt.options import NoOptions
from onnxopt.results import PassResult

if TYPE_CHECKING:
    from onnxopt.context import PassContext


@dataclass(frozen=True)
class Requirement:
    """What a pass needs before it runs: ``step`` (pipeline text) provides it."""

    step: str  # e.g. "upgrade-opset(target=13)"
    reason: str  # what the pass needs it for, for the report
    optional: bool = False  # the pass copes without it: runs even when the step fails


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset; 1 when it imports none."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else 1


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``lossless``, ``Options`` and
    implement ``run``. A pass mutates the graph it is given; it never loads or saves
    files and never runs checks itself (use ``ctx.evaluate`` to *measure*)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    fixed_point: ClassVar[bool] = False  # rerun until it reports no change
    requires_opset: ClassVar[int | None] = None  # default-domain opset run() needs
    default_budget: ClassVar[Budget | None] = None
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def requires(self, model: onnx.ModelProto) -> Requirement | tuple[Requirement, ...] | None:
        """What ``model`` lacks for ``run`` (None: nothing; several: run in order). By
        default: an opset below ``requires_opset``, provided by ``upgrade-opset``."""
        need = self.requires_opset
        if need is None or default_opset(model) >= need:
            return None
        return Requirement(f"upgrade-opset(target={need})", f"{self.name} needs opset {need}")

    @classmethod
    def budget(cls) -> Budget:
        if cls.default_budget is not None:
            return cls.default_budget
        return LOSSLESS_BUDGET if cls.lossless else LOSSY_BUDGET


def table_decorator(table: dict[str, Any], what: str) -> Callable[..., Callable]:
    """A decorator ``@name("Op1", "Op2")`` that files a function under each op type in
    ``table`` — a per-op handler table read top to bottom — and rejects a duplicate."""

    def decorator(*ops: str) -> Callable:
        def register(function: Callable) -> Callable:
            for op in ops:
                if op in table:
                    raise ValueError(f"duplicate {what} for {op}")
                table[op] = function
            return function

        return register

    return decorator


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
