"""The search space of ``onnxopt tune``: which pipelines a trial may run.

A space is an ordered list of **slots** between fixed ``head`` and ``tail`` steps.
Each slot picks one **alternative**: ``none`` (skip the slot) or one pass with its
options; an option is a fixed value, a range (``{low, high, step, log}``, int when
low/high/step are ints) or a set of choices (``{choices = [...]}``). A trial's
pipeline is ``head + one alternative per slot + tail``, printed as pipeline text, so
every trial is an ordinary pipeline that ``onnxopt optimize --passes`` would run.

TOML (``--space FILE.toml``, replaces the default space)::

    [search]                  # all optional
    sampler = "tpe"           # "tpe" (multi-objective TPE) or "nsga2"
    round = 8                 # trials asked, run and told together (see search.py)
    fidelity = "sqnr"         # worst-output metric to maximize: sqnr, cosine or top1
    anchors = true            # first try each alternative alone at its anchor values
    head = ["fold-batchnorm"]
    tail = ["cleanup", "compact"]

    [[slot]]
    name = "weights"
    choices = [
        "none",
        {pass = "quantize-int8", method = {choices = ["mse", "minmax"]}},
        {pass = "share-weights", bits = {low = 2, high = 8, anchor = 4}},
    ]

A slot with ``requires = "other"`` is only open when the earlier slot ``other`` picked a
pass; with ``recovers = true`` as well, its pass recovers what ``other``'s lost: when
both run, ``other``'s step gets ``budget="none"`` (structural checks only) and the
budget applies from this step on, still against the original, so the final model
meets it (the default space's ``distill`` requires and recovers ``structure``). An option range's
``anchor`` is the value anchor trials use (default: the middle of
the range, the first choice). The **default space** (:func:`default_space`) is
derived from the model: see :func:`default_space` for the rules.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxopt.errors import UsageError

SAMPLERS = ("tpe", "nsga2")
FIDELITY_METRICS = ("sqnr", "cosine", "top1")
NONE = "none"
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    step: float | None = None
    log: bool = False
    anchor: float | None = None

    @property
    def is_int(self) -> bool:
        values = (self.low, self.high) + ((self.step,) if self.step is not None else ())
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

    def anchor_value(self) -> float:
        if self.anchor is not None:
            return self.anchor
        middle = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if self.is_int:
            return round(middle)
        if self.step:
            return self.low + round((middle - self.low) / self.step) * self.step
        return middle


@dataclass(frozen=True)
class Choice:
    choices: tuple[Scalar, ...]
    anchor: Scalar | None = None

    def anchor_value(self) -> Scalar:
        return self.anchor if self.anchor is not None else self.choices[0]


OptionSpec = Scalar | Range | Choice


@dataclass(frozen=True)
class Alternative:
    pass_name: str | None  # None: skip the slot
    options: Mapping[str, OptionSpec] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.pass_name or NONE


@dataclass(frozen=True)
class Slot:
    name: str
    alternatives: tuple[Alternative, ...]
    requires: str | None = None  # an earlier slot that must have picked a pass
    # this slot's pass recovers what the required slot's pass lost (distill after
    # remove-neurons): when both run, the required step is checked structurally only
    # (budget none) and the budget is enforced from this step on, still vs the original
    recovers: bool = False


@dataclass
class SearchSpace:
    slots: list[Slot]
    head: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    sampler: str = "tpe"
    round_size: int = 8
    fidelity: str = "sqnr"
    anchors: bool = True
    notes: list[str] = field(default_factory=list)  # why a family is in or out (default space)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"space: sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.fidelity not in FIDELITY_METRICS:
            raise UsageError(
                f"space: fidelity {self.fidelity!r}; valid: {', '.join(FIDELITY_METRICS)}"
            )
        if not isinstance(self.round_size, int) or not 1 <= self.round_size <= 1024:
            raise UsageError(f"space: round must be an integer in [1, 1024], not {self.round_size}")
        names = [s.name for s in self.slots]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UsageError(f"space: slot name(s) used twice: {', '.join(duplicates)}")
        for index, slot in enumerate(self.slots):
            if slot.recovers and slot.requires is None:
                raise UsageError(f"space: slot {slot.name!r}: recovers needs requires = SLOT")
            if slot.requires is not None and slot.requires not in names[:index]:
                raise UsageError(
                    f"space: slot {slot.name!r} requires {slot.requires!r}, which is not an "
                    f"earlier slot (earlier: {', '.join(names[:index]) or 'none'})"
                )

    # ---------------------------------------------------------------- sampling

    def suggest(self, trial: Any) -> str:
        """Ask ``trial`` (an Optuna trial) for one value per open choice; the pipeline."""
        steps = list(self.head)
        picked: dict[str, tuple[str, int, dict[str, Scalar]]] = {}
        for slot in self.slots:
            if slot.requires is not None and picked.get(slot.requires, (NONE,))[0] == NONE:
                continue  # e.g. distill only after a structural step
            alternative = _pick(trial, slot)
            if alternative.pass_name is None:
                picked[slot.name] = (NONE, -1, {})
                continue
            values = {
                name: _suggest_option(trial, f"{slot.name}.{alternative.label}.{name}", spec)
                for name, spec in alternative.options.items()
            }
            picked[slot.name] = (alternative.pass_name, len(steps), values)
            steps.append(step_text(alternative.pass_name, values))
            if slot.recovers:
                name, index, earlier = picked[slot.requires]
                steps[index] = step_text(name, {**earlier, "budget": "none"})
        steps += self.tail
        return ",".join(steps)

    def anchor_params(self) -> list[dict[str, Scalar]]:
        """One parameter set per pass alternative: that alternative at its anchor values,
        every other slot at ``none`` (or its first alternative when it has no ``none``)."""
        anchors = []
        for slot in self.slots:
            for alternative in slot.alternatives:
                if alternative.pass_name is None:
                    continue
                params: dict[str, Scalar] = {}
                for other in self.slots:
                    if other is slot:
                        chosen = alternative
                    elif other.name == slot.requires:
                        chosen = _first_pass(other)
                    else:
                        chosen = _default_alternative(other)
                    if len(other.alternatives) > 1:
                        params[other.name] = chosen.label
                    params.update(_anchor_options(other.name, chosen))
                anchors.append(params)
        return anchors

    def size(self) -> int | None:
        """Number of distinct pipelines, or None when a float range makes it unbounded."""
        total = 1
        for slot in self.slots:
            count = 0
            for alternative in slot.alternatives:
                combos = 1
                for spec in alternative.options.values():
                    n = _count(spec)
                    if n is None:
                        return None
                    combos *= n
                count += combos
            total *= count
        return total

    def as_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "round": self.round_size,
            "fidelity": self.fidelity,
            "anchors": self.anchors,
            "head": self.head,
            "tail": self.tail,
            "slots": [
                {
                    "name": s.name,
                    "choices": [_alternative_dict(a) for a in s.alternatives],
                    **({"requires": s.requires} if s.requires else {}),
                    **({"recovers": True} if s.recovers else {}),
                }
                for s in self.slots
            ],
            "notes": self.notes,
        }

    def validate(self) -> None:
        """Every pass, option and value the space can produce parses (names the slot)."""
        from onnxopt import Pipeline

        for text in [*self.head, *self.tail]:
            _parse(Pipeline, text, "head/tail step")
        for slot in self.slots:
            if not slot.alternatives:
                raise UsageError(f"space: slot {slot.name!r} has no choices")
            for alternative in slot.alternatives:
                if alternative.pass_name is None:
                    continue
                for values in _corner_values(alternative):
                    where = f"slot {slot.name!r}"
                    _parse(Pipeline, step_text(alternative.pass_name, values), where)


def _parse(pipeline_cls, text: str, where: str) -> None:
    try:
        pipeline_cls.parse(text)
    except UsageError as exc:
        raise UsageError(f"space: {where}: {exc}") from None


def _pick(trial: Any, slot: Slot) -> Alternative:
    if len(slot.alternatives) == 1:
        return slot.alternatives[0]
    labels = [a.label for a in slot.alternatives]
    label = trial.suggest_categorical(slot.name, labels)
    return slot.alternatives[labels.index(label)]


def _default_alternative(slot: Slot) -> Alternative:
    for alternative in slot.alternatives:
        if alternative.pass_name is None:
            return alternative
    return slot.alternatives[0]


def _first_pass(slot: Slot) -> Alternative:
    return next((a for a in slot.alternatives if a.pass_name), slot.alternatives[0])


def _anchor_options(slot_name: str, alternative: Alternative) -> dict[str, Scalar]:
    return {
        f"{slot_name}.{alternative.label}.{name}": spec.anchor_value()
        for name, spec in alternative.options.items()
        if isinstance(spec, (Range, Choice))
    }


def _suggest_option(trial: Any, name: str, spec: OptionSpec) -> Scalar:
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, list(spec.choices))
    if isinstance(spec, Range):
        if spec.is_int:
            return trial.suggest_int(name, spec.low, spec.high, step=spec.step or 1, log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return spec


def _count(spec: OptionSpec) -> int | None:
    if isinstance(spec, Choice):
        return len(spec.choices)
    if isinstance(spec, Range):
        if spec.is_int:
            return (spec.high - spec.low) // (spec.step or 1) + 1
        if spec.step:
            return round((spec.high - spec.low) / spec.step) + 1
        return None
    return 1


def _corner_values(alternative: Alternative) -> list[dict[str, Scalar]]:
    """Option sets that together cover every bound and choice of every option."""
    first = {n: _corner(s, 0) for n, s in alternative.options.items()}
    sets = [first]
    for name, spec in alternative.options.items():
        others = [_corner(spec, i) for i in range(1, _corner_count(spec))]
        sets += [{**first, name: value} for value in others]
    return sets


def _corner(spec: OptionSpec, index: int) -> Scalar:
    if isinstance(spec, Choice):
        return spec.choices[index]
    if isinstance(spec, Range):
        return (spec.low, spec.high, spec.anchor_value())[index]
    return spec


def _corner_count(spec: OptionSpec) -> int:
    if isinstance(spec, Choice):
        return len(spec.choices)
    return 3 if isinstance(spec, Range) else 1


def step_text(pass_name: str, values: Mapping[str, Scalar]) -> str:
    """``name(k=v,...)`` in pipeline syntax (floats short, strings quoted when needed)."""
    if not values:
        return pass_name
    return f"{pass_name}({','.join(f'{k}={_value_text(v)}' for k, v in values.items())})"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "-_.*:/" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _alternative_dict(alternative: Alternative) -> Any:
    if alternative.pass_name is None:
        return NONE
    out: dict[str, Any] = {"pass": alternative.pass_name}
    for name, spec in alternative.options.items():
        if isinstance(spec, Range):
            out[name] = {
                k: v
                for k, v in (
                    ("low", spec.low),
                    ("high", spec.high),
                    ("step", spec.step),
                    ("log", spec.log or None),
                    ("anchor", spec.anchor),
                )
                if v is not None
            }
        elif isinstance(spec, Choice):
            out[name] = {"choices": list(spec.choices)}
        else:
            out[name] = spec
    return out


# ------------------------------------------------------------------------ TOML


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read a space from TOML (see the module docstring); errors name the file and key."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"--space {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--space {path}: not valid TOML: {exc}") from None
    try:
        space = space_from_dict(data)
        space.validate()
    except UsageError as exc:
        raise UsageError(f"--space {path}: {exc}") from None
    return space


def space_from_dict(data: Mapping[str, Any]) -> SearchSpace:
    unknown = sorted(set(data) - {"search", "slot"})
    if unknown:
        raise UsageError(f"unknown table(s) {', '.join(unknown)}; valid: [search], [[slot]]")
    search = dict(data.get("search", {}))
    known = {"sampler", "round", "fidelity", "anchors", "head", "tail"}
    extra = sorted(set(search) - known)
    if extra:
        raise UsageError(f"[search]: unknown key(s) {', '.join(extra)}; valid: {sorted(known)}")
    slots = [_slot(i, raw) for i, raw in enumerate(data.get("slot", []))]
    return SearchSpace(
        slots=slots,
        head=_steps(search.get("head", []), "head"),
        tail=_steps(search.get("tail", []), "tail"),
        sampler=search.get("sampler", "tpe"),
        round_size=search.get("round", 8),
        fidelity=search.get("fidelity", "sqnr"),
        anchors=bool(search.get("anchors", True)),
    )


def _steps(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"[search] {key} must be a list of pipeline steps (strings)")
    return list(value)


def _slot(index: int, raw: Any) -> Slot:
    if not isinstance(raw, Mapping) or "name" not in raw or "choices" not in raw:
        raise UsageError(f"[[slot]] #{index + 1} needs name = ... and choices = [...]")
    name = raw["name"]
    extra = sorted(set(raw) - {"name", "choices", "requires", "recovers"})
    if extra:
        raise UsageError(f"slot {name!r}: unknown key(s) {', '.join(extra)}")
    if not isinstance(raw["choices"], list) or not raw["choices"]:
        raise UsageError(f"slot {name!r}: choices must be a non-empty list")
    requires = raw.get("requires")
    if requires is not None and not isinstance(requires, str):
        raise UsageError(f"slot {name!r}: requires must be a slot name")
    choices = tuple(_alternative(name, c) for c in raw["choices"])
    return Slot(str(name), choices, requires, bool(raw.get("recovers", False)))


def _alternative(slot: str, raw: Any) -> Alternative:
    if raw == NONE:
        return Alternative(None)
    if isinstance(raw, str):
        return Alternative(raw)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("pass"), str):
        raise UsageError(f'slot {slot!r}: a choice is "none", a pass name or {{pass = ...}}')
    options = {k: _option(slot, k, v) for k, v in raw.items() if k != "pass"}
    return Alternative(raw["pass"], options)


def _option(slot: str, name: str, raw: Any) -> OptionSpec:
    where = f"slot {slot!r} option {name!r}"
    if not isinstance(raw, Mapping):
        return raw
    if "choices" in raw:
        extra = sorted(set(raw) - {"choices", "anchor"})
        if extra or not isinstance(raw["choices"], list) or not raw["choices"]:
            raise UsageError(f"{where}: {{choices = [...], anchor = ...}} (non-empty list)")
        anchor = raw.get("anchor")
        if anchor is not None and anchor not in raw["choices"]:
            raise UsageError(f"{where}: anchor {anchor!r} is not one of the choices")
        return Choice(tuple(raw["choices"]), anchor)
    extra = sorted(set(raw) - {"low", "high", "step", "log", "anchor"})
    if extra or "low" not in raw or "high" not in raw:
        raise UsageError(f"{where}: a range is {{low = ..., high = ..., step, log, anchor}}")
    spec = Range(raw["low"], raw["high"], raw.get("step"), bool(raw.get("log", False)))
    spec = Range(spec.low, spec.high, spec.step, spec.log, raw.get("anchor"))
    if not spec.low < spec.high:
        raise UsageError(f"{where}: low must be below high")
    if spec.log and spec.low <= 0:
        raise UsageError(f"{where}: a log range needs low > 0")
    if spec.anchor is not None and not spec.low <= spec.anchor <= spec.high:
        raise UsageError(f"{where}: anchor {spec.anchor} outside [{spec.low}, {spec.high}]")
    return spec


# ------------------------------------------------------------------ default space

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
MIN_WEIGHT = 256  # tensors below this are left alone by prune/share-weights defaults


def model_facts(model: onnx.ModelProto) -> dict[str, Any]:
    """Op types and weight elements per weighted op type (initializers and Constant
    nodes; the manager lifts the latter into initializers before any pass runs)."""
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # weights some exporters (Paddle) keep in Constant nodes
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    sizes[node.output[0]] = math.prod(attribute.t.dims)
    by_op: dict[str, int] = {}
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        elements = sizes.get(node.input[index], 0)
        if elements >= MIN_WEIGHT:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + elements
    return {
        "ops": sorted({n.op_type for n in model.graph.node}),
        "weights_by_op": by_op,
        "weights": sum(by_op.values()),
    }


def default_space(model: onnx.ModelProto, *, distill: bool | None = None) -> SearchSpace:
    """The space derived from the model (the rules are listed in ``notes``):

    - head ``fold-batchnorm`` when the model has BatchNormalization; tail
      ``cleanup,compact`` (lossless; compact shortens names: a smaller file);
    - ``structure``: remove-neurons (ratio 0.05-0.5) when Conv/Gemm/MatMul weights exist;
    - ``distill`` (3-10 epochs), only after remove-neurons, which it recovers: the
      remove-neurons step is then checked structurally only and the budget applies
      from distill on (vs the original); when the training adjunct is installed
      (``onnxopt train-env``);
    - ``sparsity``: prune-initializers (sparsity 0.3-0.9, dense or sparse storage);
    - ``weights``: quantize-int8 (calibration method, weights-only on/off),
      share-weights (2-8 bits, per tensor or channel), quantize-int4 (block size;
      MatMul/Gemm/Gather/Conv/ConvTranspose weights).
    """
    facts = model_facts(model)
    notes: list[str] = []
    by_op = facts["weights_by_op"]
    if not facts["weights"]:
        raise UsageError(
            f"nothing to search: the model has no Conv/Gemm/MatMul/Gather weight of "
            f"{MIN_WEIGHT}+ elements; write a space (--space FILE.toml) for other passes"
        )
    head = ["fold-batchnorm"] if "BatchNormalization" in facts["ops"] else []
    slots: list[Slot] = []
    dense = {"Conv", "ConvTranspose", "Gemm", "MatMul"} & set(by_op)
    if dense:
        ratio = Range(0.05, 0.5, 0.05, anchor=0.1)
        slots.append(Slot("structure", (Alternative(None), _alt("remove-neurons", ratio=ratio))))
        notes.append(f"remove-neurons: {', '.join(sorted(dense))} weights")
    else:
        notes.append("remove-neurons: left out (no Conv/Gemm/MatMul weights)")
    if distill is None:
        distill = _adjunct_installed()
    if distill and dense:
        epochs = Range(3, 10, 1, anchor=5)
        distill_alt = _alt("distill", epochs=epochs)
        slots.append(
            Slot("distill", (Alternative(None), distill_alt), requires="structure", recovers=True)
        )
        notes.append("distill: the training adjunct is installed")
    else:
        notes.append("distill: left out (" + ("no weights" if distill else "no adjunct") + ")")
    sparsity = Range(0.3, 0.9, 0.05, anchor=0.5)
    prune = _alt("prune-initializers", sparsity=sparsity, store=Choice(("dense", "sparse")))
    slots.append(Slot("sparsity", (Alternative(None), prune)))
    weights = [Alternative(None)]
    if dense:
        weights.append(
            _alt(
                "quantize-int8",
                method=Choice(("mse", "minmax", "percentile")),
                weights_only=Choice((False, True)),
                latency=False,
            )
        )
    granularity = Choice(("auto", "tensor", "channel"))  # auto: share-weights' default
    weights.append(_alt("share-weights", bits=Range(2, 8, 1, anchor=4), granularity=granularity))
    weights.append(_alt("quantize-int4", block_size=Choice((32, 16, 64, 128))))
    notes.append(f"quantize-int4: {', '.join(sorted(by_op))} weights")
    slots.append(Slot("weights", tuple(weights)))
    space = SearchSpace(slots, head=head, tail=["cleanup", "compact"], notes=notes)
    return space


def _alt(pass_name: str, **options: OptionSpec) -> Alternative:
    return Alternative(pass_name, options)


def _adjunct_installed() -> bool:
    from onnxopt.errors import OnnxoptError
    from onnxopt.train.env import find_python

    try:
        find_python()
    except OnnxoptError:
        return False
    return True


def describe(space: SearchSpace) -> list[str]:
    """One line per slot, for the terminal and the page."""
    lines = []
    if space.head:
        lines.append(f"head: {','.join(space.head)}")
    for slot in space.slots:
        parts = []
        for alternative in slot.alternatives:
            if alternative.pass_name is None:
                parts.append(NONE)
                continue
            opts = ", ".join(f"{k} {_spec_text(v)}" for k, v in alternative.options.items())
            parts.append(f"{alternative.pass_name}({opts})" if opts else alternative.pass_name)
        lines.append(f"{slot.name}: " + " | ".join(parts))
    if space.tail:
        lines.append(f"tail: {','.join(space.tail)}")
    return lines


def _spec_text(spec: OptionSpec) -> str:
    if isinstance(spec, Range):
        step = f" step {spec.step}" if spec.step else ""
        return f"{spec.low}..{spec.high}{step}" + (" log" if spec.log else "")
    if isinstance(spec, Choice):
        return "{" + ",".join(_value_text(c) for c in spec.choices) + "}"
    return f"={_value_text(spec)}"


def pipelines_of(params: Sequence[Mapping[str, Scalar]], space: SearchSpace) -> list[str]:
    """Pipeline text for fixed parameter sets (used by tests and anchors)."""
    return [space.suggest(_Fixed(p)) for p in params]


class _Fixed:
    """A stand-in for an Optuna trial that answers from a dict."""

    def __init__(self, params: Mapping[str, Scalar]) -> None:
        self.params = params

    def suggest_categorical(self, name, choices):
        return self.params.get(name, choices[0])

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.params.get(name, low)

    def suggest_float(self, name, low, high, step=None, log=False):
        return self.params.get(name, low)
