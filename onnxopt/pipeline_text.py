"""A pipeline as text and as a TOML file.

``fold-batchnorm,prune-initializers(sparsity=0.5,scope=global)`` parses through the
registry (``Pipeline.parse``) and prints back canonically, default options omitted
(``str(pipeline)``); a per-step ``budget="..."`` is an option of every step.
``load_pipeline_file`` reads the same steps from ``[[step]]`` tables of a TOML file,
with the run's settings (seed, budget, on_fail, data). Both are described for users
in README.md ("Pipelines")."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxopt.check import Budget
from onnxopt.errors import UsageError
from onnxopt.options import format_value, make_options, option_fields
from onnxopt.registry import Pass, get_pass


@dataclass
class Step:
    pass_cls: type[Pass]
    options: Any
    budget: Budget | None = None  # per-step override

    @property
    def name(self) -> str:
        return self.pass_cls.name

    def __str__(self) -> str:
        defaults = self.pass_cls.Options()
        args = [
            f"{f.name}={format_value(getattr(self.options, f.name))}"
            for f in option_fields(self.pass_cls)
            if format_value(getattr(self.options, f.name))
            != format_value(getattr(defaults, f.name))
        ]
        if self.budget is not None:
            args.append(f'budget="{self.budget}"')
        return self.name + (f"({','.join(args)})" if args else "")

    @classmethod
    def build(cls, name: str, raw: Mapping[str, Any]) -> Step:
        pass_cls = get_pass(name)
        raw = dict(raw)
        budget_text = raw.pop("budget", None)
        budget = None
        if budget_text is not None:
            try:
                budget = Budget.parse(str(budget_text))
            except UsageError as exc:
                raise UsageError(f"{name}: {exc}") from None
        return cls(pass_cls, make_options(pass_cls, raw), budget)


@dataclass
class Pipeline:
    steps: list[Step]

    def __str__(self) -> str:
        return ",".join(str(step) for step in self.steps)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        steps = [Step.build(name, args) for name, args in _parse_pipeline_text(text)]
        if not steps:
            raise UsageError("empty pipeline: name at least one pass (see `onnxopt passes`)")
        return cls(steps)


_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|'[^']*')|(?P<list>\[[^\]]*\])|(?P<punct>[(),=])|(?P<word>[^\s(),="'\[\]]+))"""
)


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise UsageError(
                f"pipeline text: cannot parse at column {pos + 1}: {text[pos : pos + 20]!r}"
            )
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "str":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        yield kind, value, match.start(kind)
        pos = match.end()


def _parse_pipeline_text(text: str) -> list[tuple[str, dict[str, str]]]:
    """``a,b(k=v,k2="x,y"),c`` -> ``[("a", {}), ("b", {"k": "v", "k2": "x,y"}), ("c", {})]``."""
    tokens = list(_tokens(text))
    steps: list[tuple[str, dict[str, str]]] = []
    i = 0

    def expect(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens):
            raise UsageError(f"pipeline text {text!r}: unexpected end, expected {value or kind}")
        k, v, col = tokens[i]
        if k != kind or (value is not None and v != value):
            raise UsageError(
                f"pipeline text {text!r}: expected {value or kind} at column {col + 1}, got {v!r}"
            )
        i += 1
        return v

    while i < len(tokens):
        name = expect("word")
        args: dict[str, str] = {}
        if i < len(tokens) and tokens[i][1] == "(" and tokens[i][0] == "punct":
            i += 1
            while True:
                key = expect("word")
                expect("punct", "=")
                if i >= len(tokens):
                    raise UsageError(f"pipeline text {text!r}: missing value for {key!r}")
                kind, value, _ = tokens[i]
                if kind == "punct":
                    raise UsageError(f"pipeline text {text!r}: missing value for {key!r}")
                i += 1
                if key in args:
                    raise UsageError(f"pipeline text: option {key!r} given twice for {name}")
                args[key] = value
                if i < len(tokens) and tokens[i][:2] == ("punct", ")"):
                    i += 1
                    break
                expect("punct", ",")
        steps.append((name, args))
        if i < len(tokens):
            expect("punct", ",")
    return steps


PIPELINE_FILE_KEYS = {"seed", "budget", "on_fail", "data", "step"}
DATA_KEYS = {"path", "calibration_samples", "validation_samples", "shapes"}


def load_pipeline_file(path: str) -> tuple[Pipeline, dict[str, Any]]:
    """Read a TOML pipeline file; return the pipeline and its run settings.

    Settings keys: ``seed``, ``budget`` (global, for lossy steps), ``on_fail`` and a
    ``[data]`` table (``path`` relative to the file, ``calibration_samples``,
    ``validation_samples``, ``shapes = {input = "1x3x224x224"}``).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    file = Path(path)
    try:
        config = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"pipeline file not found: {file}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: not valid TOML ({exc})") from None
    unknown = set(config) - PIPELINE_FILE_KEYS
    if unknown:
        raise UsageError(
            f"{file}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(PIPELINE_FILE_KEYS))}"
        )
    raw_steps = config.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f'{file}: no [[step]] tables; each needs pass = "name"')
    steps = []
    for number, table in enumerate(raw_steps, 1):
        table = dict(table)
        name = table.pop("pass", None)
        if not isinstance(name, str):
            raise UsageError(f'{file}: step {number} has no pass = "name"')
        try:
            steps.append(Step.build(name, table))
        except UsageError as exc:
            raise UsageError(f"{file}: step {number}: {exc}") from None
    settings: dict[str, Any] = {k: config[k] for k in ("seed", "budget", "on_fail") if k in config}
    data = config.get("data", {})
    if not isinstance(data, dict) or set(data) - DATA_KEYS:
        raise UsageError(f"{file}: [data] accepts {', '.join(sorted(DATA_KEYS))}")
    if "path" in data:
        settings["data"] = str(file.parent / data["path"])
    for key in ("calibration_samples", "validation_samples", "shapes"):
        if key in data:
            settings[key] = data[key]
    return Pipeline(steps), settings
