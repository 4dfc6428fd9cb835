"""Numeric equivalence between two models, measured with onnxruntime.

``compare_outputs`` turns reference and candidate outputs (one dict per sample) into
per-output metrics; a :class:`Budget` decides whether those metrics are acceptable.
``structural_checks`` runs onnx's checker and strict shape inference with type
checking and data propagation (together what ``check_model(full_check=True)`` does);
the PassManager then builds the onnxruntime session itself (``manager.py``).
``assert_equivalent`` is the helper tests use.

Metrics, per output, over all validation samples together:

- ``max_abs``   max |cand - ref|
- ``max_rel``   max |cand - ref| / (|ref| + 1e-6 * max|ref|)  (bounded near zeros)
- ``mean_abs``  mean |cand - ref|
- ``cosine``    cosine similarity of the flattened outputs (1.0 when both are zero)
- ``sqnr``      10 log10(sum ref^2 / sum (cand-ref)^2) in dB (inf when identical)
- ``nonfinite`` NaN/Inf in the candidate where the reference is finite
- ``top1``      argmax agreement over the last axis, for class-score outputs: shaped
                [N, C] (float, C > 1) and, when the model is known, produced by a
                classifier head (``class_score_outputs``), so that an embedding or a
                regression vector is never judged by its argmax
- ``mismatch``  differing elements, for integer/bool outputs
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxopt.errors import UsageError, first_line

Outputs = Mapping[str, np.ndarray]

METRICS: dict[str, tuple[str, str]] = {
    # name: (description, direction that is good: "high" or "low")
    "max_abs": ("max absolute error", "low"),
    "max_rel": ("max relative error", "low"),
    "mean_abs": ("mean absolute error", "low"),
    "cosine": ("cosine similarity", "high"),
    "sqnr": ("signal-to-quantization-noise ratio, dB", "high"),
    "top1": ("top-1 agreement (class-score outputs only)", "high"),
    "nonfinite": ("new NaN/Inf values", "low"),
    "mismatch": ("differing elements (integer/bool outputs)", "low"),
}


@dataclass
class OutputMetrics:
    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    cosine: float = 1.0
    sqnr: float = math.inf
    nonfinite: int = 0
    top1: float | None = None
    mismatch: int = 0
    allclose_excess: float = -math.inf  # max(|d| - (atol + rtol|ref|)), set by budgets
    is_float: bool = True

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def as_dict(self) -> dict[str, float | int | None]:
        keys = ("max_abs", "max_rel", "mean_abs", "cosine", "sqnr", "nonfinite", "top1")
        data = {k: _json_float(getattr(self, k)) for k in keys}
        if not self.is_float:
            data = {"mismatch": self.mismatch}
        return data


def _json_float(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def compare_outputs(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    tolerance: tuple[float, float] | None = None,
    class_scores: Set[str] | None = None,
) -> dict[str, OutputMetrics]:
    """Metrics per output name; ``tolerance=(atol, rtol)`` also fills ``allclose_excess``.

    ``class_scores`` names the outputs that carry class scores (see
    ``class_score_outputs``); ``top1`` is measured on those only. ``None`` (no model
    at hand) falls back to the shape: every 2-D float output with C > 1.
    """
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate have different sample counts")
    if not reference:
        return {}
    result = {}
    for name in reference[0]:
        ref = [np.asarray(sample[name]) for sample in reference]
        got = [np.asarray(sample[name]) for sample in candidate]
        scores = class_scores is None or name in class_scores
        result[name] = _metrics_for(name, ref, got, tolerance, scores)
    return result


def _metrics_for(name, ref_list, got_list, tolerance, class_scores=True) -> OutputMetrics:
    for ref, got in zip(ref_list, got_list):
        if ref.shape != got.shape:
            raise ValueError(f"output {name!r}: shape {got.shape} != reference {ref.shape}")
    if not np.issubdtype(ref_list[0].dtype, np.floating):
        mismatch = sum(int(np.sum(r != g)) for r, g in zip(ref_list, got_list))
        return OutputMetrics(name, mismatch=mismatch, is_float=False)
    # One sample at a time, in float64: a whole-set float64 copy of both sides (and its
    # temporaries) cost 200 MB on a detector's 32 x 320 x 320 maps, for the same sums.
    scale = max((_finite_abs_max(r, g) for r, g in zip(ref_list, got_list)), default=0.0)
    acc = _Sums()
    for ref, got in zip(ref_list, got_list):
        acc.add(ref, got, scale, tolerance)
    m = OutputMetrics(name, nonfinite=acc.nonfinite)
    if acc.count:
        m.max_abs = acc.max_abs
        m.mean_abs = acc.sum_abs / acc.count
        m.max_rel = acc.max_rel
        m.cosine = _cosine_of(acc.dot, acc.ref_sq, acc.got_sq)
        m.sqnr = (
            math.inf
            if acc.noise == 0
            else (10 * math.log10(acc.ref_sq / acc.noise) if acc.ref_sq else -math.inf)
        )
        if tolerance is not None:
            m.allclose_excess = acc.excess
    if class_scores and _looks_like_class_scores(ref_list[0]):
        agree = [np.argmax(a, -1) == np.argmax(b, -1) for a, b in zip(ref_list, got_list)]
        m.top1 = float(np.mean(np.concatenate([x.ravel() for x in agree])))
    return m


def _finite_pair(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Both sides as float64 where both are finite, and the candidate's new NaN/Inf."""
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    r_ok, g_ok = np.isfinite(r), np.isfinite(g)
    nonfinite = int(np.count_nonzero(r_ok & ~g_ok))
    both = r_ok & g_ok
    if both.all():
        return r, g, nonfinite
    return r[both], g[both], nonfinite


def _finite_abs_max(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref| where both sides are finite (in the outputs' own dtype: exact)."""
    # a candidate output of another dtype (e.g. strings where the reference has floats)
    # fails to convert here with the same ValueError as the metrics below
    ref, got = (a if a.dtype.kind == "f" else a.astype(np.float64) for a in (ref, got))
    both = np.isfinite(ref) & np.isfinite(got)
    values = np.abs(ref) if both.all() else np.abs(ref[both])
    return float(values.max()) if values.size else 0.0


@dataclass
class _Sums:
    """Running sums of one output's error statistics over the samples."""

    count: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    got_sq: float = 0.0
    noise: float = 0.0
    excess: float = -math.inf

    def add(self, ref, got, scale: float, tolerance) -> None:
        r, g, nonfinite = _finite_pair(ref, got)
        self.nonfinite += nonfinite
        if not r.size:
            return
        delta = g - r
        diff = np.abs(delta)
        abs_r = np.abs(r)
        self.count += r.size
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.max_rel = max(self.max_rel, float(np.max(diff / (abs_r + 1e-6 * scale + 1e-30))))
        self.dot += float(np.sum(r * g))
        self.ref_sq += float(np.sum(r * r))
        self.got_sq += float(np.sum(g * g))
        self.noise += float(np.sum(delta * delta))
        if tolerance is not None:
            atol, rtol = tolerance
            self.excess = max(self.excess, float(np.max(diff - (atol + rtol * abs_r))))


def _cosine_of(dot: float, a_sq: float, b_sq: float) -> float:
    if a_sq == 0 and b_sq == 0:
        return 1.0
    if a_sq == 0 or b_sq == 0:
        return 0.0
    return float(dot / (math.sqrt(a_sq) * math.sqrt(b_sq)))


def _looks_like_class_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[-1] > 1 and np.issubdtype(array.dtype, np.floating)


# Ops that only move or relabel values: walked through back to the op that computed them.
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout"}
# A classifier head: a normalisation over classes, or a dense layer that makes the logits.
_HEADS = {"Softmax", "LogSoftmax", "Sigmoid", "Gemm", "MatMul"}


def class_score_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """The graph outputs that a classifier head computes.

    An output is class scores when, walking back through ops that only move values
    (Reshape, Flatten, Squeeze, ...), it comes from Softmax/LogSoftmax/Sigmoid, Gemm,
    MatMul, or an Add of a MatMul/Gemm result (a bias). A mean-pooled embedding
    (ReduceMean/ReduceSum/Div), a feature map or a graph input is not: its argmax means
    nothing, and judging it by top-1 agreement rolls back steps that keep it at a
    cosine of 0.9998 (MiniLM's sentence embedding).
    """
    producers = {out: node for node in model.graph.node for out in node.output}

    def head(name: str) -> bool:
        for _ in range(64):  # a chain of reshapes is short; a cycle is not a model
            node = producers.get(name)
            if node is None:
                return False
            if node.op_type in _HEADS:
                return True
            if node.op_type == "Add":
                return any(
                    producers.get(i) is not None and producers[i].op_type in {"MatMul", "Gemm"}
                    for i in node.input
                )
            if node.op_type not in _PASS_THROUGH or not node.input:
                return False
            name = node.input[0]
        return False

    return frozenset(o.name for o in model.graph.output if head(o.name))


# ---------------------------------------------------------------------------- budgets

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CRITERION = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<|=)\s*([-+0-9.eE]+|inf)\s*$")


@dataclass(frozen=True)
class Criterion:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Budget:
    """What a step must satisfy. ``tolerance`` (atol, rtol) is an elementwise allclose."""

    criteria: tuple[Criterion, ...] = ()
    tolerance: tuple[float, float] | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"cosine>=0.99,top1>=0.99"``, ``"atol=1e-5,rtol=1e-4"`` or ``"none"``."""
        text = text.strip()
        if text.lower() in ("none", ""):
            return cls()
        criteria: list[Criterion] = []
        atol = rtol = None
        for part in text.split(","):
            match = _CRITERION.match(part)
            if not match:
                raise UsageError(
                    f"budget term {part.strip()!r} is not 'metric>=value'; "
                    f"metrics: {', '.join(METRICS)}, atol=, rtol="
                )
            metric, op, raw = match.groups()
            value = float(raw)
            if op == "=":
                if metric == "atol":
                    atol = value
                elif metric == "rtol":
                    rtol = value
                else:
                    raise UsageError(f"budget term {part.strip()!r}: only atol= and rtol= use '='")
                continue
            if metric not in METRICS:
                raise UsageError(
                    f"unknown budget metric {metric!r}; valid: {', '.join(METRICS)}, atol, rtol"
                )
            good = METRICS[metric][1]
            if (good == "high") != (op in (">=", ">")):
                want = ">=" if good == "high" else "<="
                raise UsageError(f"budget term {part.strip()!r}: {metric} needs '{want}'")
            criteria.append(Criterion(metric, op, value))
        tolerance = None
        if atol is not None or rtol is not None:
            tolerance = (atol or 0.0, rtol or 0.0)
        return cls(tuple(criteria), tolerance)

    def __str__(self) -> str:
        parts = [str(c) for c in self.criteria]
        if self.tolerance is not None:
            parts += [f"atol={self.tolerance[0]:g}", f"rtol={self.tolerance[1]:g}"]
        return ",".join(parts) or "none"

    @property
    def gates(self) -> bool:
        return bool(self.criteria) or self.tolerance is not None

    def violations(self, metrics: Mapping[str, OutputMetrics]) -> list[str]:
        """Human-readable reasons the metrics break this budget (empty list: within)."""
        problems = []
        for name, m in metrics.items():
            if self.tolerance is not None and m.is_float and m.allclose_excess > 0:
                atol, rtol = self.tolerance
                problems.append(
                    f"{name}: max_abs {m.max_abs:.3g} exceeds atol={atol:g}+rtol={rtol:g}*|ref| "
                    f"by {m.allclose_excess:.3g}"
                )
            if self.gates and not m.is_float and m.mismatch:
                problems.append(f"{name}: {m.mismatch} integer elements differ")
            for c in self.criteria:
                value = m.value(c.metric) if m.is_float else None
                if value is None:
                    continue  # metric not applicable to this output (e.g. top1)
                if not _OPS[c.op](value, c.value):
                    problems.append(f"{name}: {c.metric} {value:.6g} (needs {c.op}{c.value:g})")
        return problems


LOSSLESS_BUDGET = Budget.parse("atol=1e-5,rtol=1e-4,nonfinite<=0")
LOSSY_BUDGET = Budget.parse("cosine>=0.99,top1>=0.99,nonfinite<=0")


def worst(metrics: Mapping[str, OutputMetrics]) -> dict[str, float | None]:
    """The worst value of each metric over all outputs (for one-line summaries)."""
    floats = [m for m in metrics.values() if m.is_float]
    if not floats:
        return {"mismatch": sum(m.mismatch for m in metrics.values())}
    top1 = [m.top1 for m in floats if m.top1 is not None]
    return {
        "max_abs": max(m.max_abs for m in floats),
        "cosine": min(m.cosine for m in floats),
        "sqnr": min(m.sqnr for m in floats),
        "top1": min(top1) if top1 else None,
        "nonfinite": sum(m.nonfinite for m in floats),
    }


def suspect_reference(reference: Sequence[Outputs]) -> tuple[list[str], list[str]]:
    """What makes the original's outputs on the validation data a weak reference:
    ``(problems, notes)``. Problems: an output with NaN (those elements could never be
    compared), an output that is Inf everywhere, or every output identical for every
    sample (the data does not exercise the model). Notes: some Inf values (compared
    only where both sides are finite)."""
    problems: list[str] = []
    notes: list[str] = []
    if not reference:
        return problems, notes
    for name in reference[0]:
        arrays = [np.asarray(sample[name]) for sample in reference]
        if not np.issubdtype(arrays[0].dtype, np.floating):
            continue
        size = sum(a.size for a in arrays)
        nan = sum(int(np.count_nonzero(np.isnan(a))) for a in arrays)
        inf = sum(int(np.count_nonzero(np.isinf(a))) for a in arrays)
        if nan:
            problems.append(f"output {name!r}: {nan:,} of {size:,} values are NaN")
        elif size and inf == size:
            problems.append(f"output {name!r}: every value is Inf")
        elif inf:
            notes.append(
                f"output {name!r}: {inf:,} of {size:,} values are Inf (compared only where "
                "both models are finite)"
            )
    if len(reference) > 1 and all(
        _same(reference[0][name], sample[name]) for sample in reference[1:] for name in reference[0]
    ):
        problems.append(
            f"every output is the same for all {len(reference)} validation samples: "
            "the data does not exercise the model"
        )
    return problems, notes


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------- structure


@dataclass
class StructuralReport:
    failures: dict[str, str] = field(default_factory=dict)  # check name -> first error line

    @property
    def ok(self) -> bool:
        return not self.failures


def structural_checks(model: onnx.ModelProto) -> tuple[StructuralReport, onnx.ModelProto | None]:
    """onnx's checker (without its own shape inference) + strict shape inference with
    type checking and data propagation: what ``full_check=True`` does, in two steps
    that report separately. Returns the report and the inferred model (None when
    inference failed). No onnxruntime session here: the PassManager builds it."""
    from onnxopt.model import EXTERNAL_DATA_THRESHOLD, densify_sparse_initializers, materialized
    from onnxopt.stored import has_stored
    from onnxopt.wire import proto_nbytes

    report = StructuralReport()
    inferred = None
    stored = has_stored(model)
    if not stored and proto_nbytes(model) > EXTERNAL_DATA_THRESHOLD:
        report.failures["checker"] = "skipped: model over 2 GB (checked by onnxruntime only)"
        return report, None
    try:
        if stored:  # weights on disk (onnxopt.store): the checker reads the light model
            with materialized(model) as path:
                onnx.checker.check_model(path, full_check=False)
        else:
            onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        report.failures["checker"] = first_line(exc)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            densify_sparse_initializers(model), check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:
        report.failures["shape_inference"] = first_line(exc)
    return report, inferred


def assert_equivalent(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    budget: Budget | str = LOSSLESS_BUDGET,
) -> dict[str, OutputMetrics]:
    """Raise AssertionError listing every violation; return the metrics otherwise."""
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    metrics = compare_outputs(reference, candidate, budget.tolerance)
    problems = budget.violations(metrics)
    if problems:
        raise AssertionError(
            "outputs differ beyond budget " + str(budget) + ":\n  " + "\n  ".join(problems)
        )
    return metrics
