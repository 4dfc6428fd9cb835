"""``bits=auto``: one bit width per weight from measured sensitivity, the smallest file
that meets the step's budget.

1. **Sensitivity.** Every weight is encoded at ``REFERENCE_BITS`` and put, alone, into
   the float model (one onnxruntime session where the weights are overridable inputs,
   with its bias correction), on a few calibration samples: ``measured_t`` is the worst
   output's noise-to-signal ratio against the float model (the logits before a final
   Softmax/Sigmoid count as outputs too). Its *gain* is that over the
   weight's own relative error (importance-weighted), so a weight's output error at any
   width is predicted as ``gain_t * error_t(bits)``, with ``error_t(bits)`` the
   encoding's own error (computed for 4 and 8 bits, 6 dB a bit in between and below).
   Measured, not guessed: the layer-local error alone ranks PP-OCR rec's layers
   poorly (Spearman 0.44 against their measured effect).
2. **Allocation.** Errors of different weights add up (to first order), so the widths
   minimise ``sum bytes_t(bits_t)`` subject to ``sum gain_t * error_t(bits_t) <= D``:
   a Lagrangian sweep (each weight takes the width that minimises ``bytes + lambda x
   predicted error``; ``lambda`` is bisected until the sum meets ``D``). Widths: 2, 3,
   4 (UINT4 indices where the opset allows), 5 to 8 (UINT8), and float16 (16) for a
   weight no codebook serves. Bytes are the stored ones, plus a small term for the
   index bits themselves (equal-size widths: the fewer bits, which also deflate better).
3. **Check.** The allocation is applied to a copy of the graph and measured exactly as
   the PassManager will (``ctx.evaluate``). Within budget with room to spare, ``D``
   grows toward the measured margin; over budget, it shrinks by the measured excess
   (by ``OTHER_MISS`` when the cosine was within its allowance and another criterion,
   such as top-1 agreement, failed). Once a passing and a failing ``D`` are known, the
   next is their geometric mean, until they are ``BRACKET`` apart (at most
   ``MAX_TRIALS`` checks). The smallest passing trial is kept: the step is never above
   its budget when a trial passed; when none did, the most accurate allocation tried
   is returned and the manager rolls it back as usual.

``D`` starts at the budget's ``1 - cosine`` in noise-to-signal terms (``~2 (1 - cos)``),
halved (0.01 for the default ``cosine>=0.99``; a budget without a cosine term is taken
as ``cosine>=0.99``: trials must meet both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxopt import runtime

REFERENCE_BITS = 4
WIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16: the weight stays, as float16
HALF_ERROR = 2.0**-24  # relative squared error of float16 rounding (~72 dB)
SENSITIVITY_SAMPLES = 8
MAX_TRIALS = 6
START_SHARE = 0.5  # of the budget's 1 - cosine, before any check
INDEX_BIT_WEIGHT = 0.05  # bytes per index byte in the objective: ties go to fewer bits
SQUASHING = ("Softmax", "Sigmoid", "HardSigmoid", "LogSoftmax")
PASSING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
OTHER_MISS = 0.25  # target factor after a trial missed a criterion other than cosine
BRACKET = 1.5  # stop when the failing / passing targets are this close
GAIN_FLOOR = 0.01  # x the median gain: a weight whose single effect is lost in round-off


@dataclass
class Weight:
    """One weight's options: bytes and predicted output error per width."""

    name: str
    size: int
    gain: float
    bytes: dict[int, int] = field(default_factory=dict)
    error: dict[int, float] = field(default_factory=dict)  # relative, weighted

    def predicted(self, bits: int) -> float:
        return self.gain * self.error[bits]

    def cost(self, bits: int, lam: float) -> float:
        index = self.size * min(bits, 8) / 8 if bits <= 8 else 0.0
        return self.bytes[bits] + INDEX_BIT_WEIGHT * index + lam * self.predicted(bits)


def allocate(weights: list[Weight], target: float) -> dict[str, int]:
    """Widths minimising the stored bytes with ``sum predicted error <= target``."""

    def choose(lam: float) -> dict[str, int]:
        return {w.name: min(w.bytes, key=lambda b: (w.cost(b, lam), -b)) for w in weights}

    def total(choice: dict[str, int]) -> float:
        return sum(w.predicted(choice[w.name]) for w in weights)

    low, high = 0.0, 1.0
    while total(choose(high)) > target and high < 1e30:
        high *= 16
    for _ in range(60):  # bisection on log(lambda)
        middle = np.sqrt(max(low, 1e-30) * high) if low else high / 16
        if total(choose(middle)) > target:
            low = middle
        else:
            high = middle
        if low and high / low < 1.01:
            break
    return choose(high)


def target_error(budget) -> float:
    """The budget's allowance in worst-output ``1 - cosine``."""
    for criterion in getattr(budget, "criteria", ()):
        if criterion.metric == "cosine":
            return max(1.0 - criterion.value, 1e-6)
    return 0.01


# ---------------------------------------------------------------------------- sensitivity


def measure_gains(
    model: onnx.ModelProto,
    trials: dict[str, dict[str, np.ndarray]],
    samples: list,
) -> dict[str, float]:
    """Worst-output ``1 - cosine`` of the float model with each trial's overrides
    (a weight and its corrected bias) applied alone, on ``samples``."""
    names = sorted({name for overrides in trials.values() for name in overrides})
    overridable = _with_logits(_with_inputs(model, names))
    session = runtime.make_session(overridable)
    wanted = runtime.feedable(session)
    feeds = [{k: v for k, v in s.items() if k in wanted} for s in samples]
    reference = [session.run(None, feed) for feed in feeds]
    measured = {}
    for name, overrides in trials.items():
        outputs = [session.run(None, {**feed, **overrides}) for feed in feeds]
        measured[name] = _worst_error(reference, outputs)
    return measured


def _with_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are also graph inputs (their
    stored values are the defaults; a run may feed others)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {value.name for value in copy.graph.input}
    by_name = {t.name: t for t in copy.graph.initializer}
    for name in names:
        if name in by_name and name not in present:
            tensor = by_name[name]
            copy.graph.input.append(
                helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )
    copy.ir_version = max(copy.ir_version, 4)
    return copy


def _with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Also output the input of a final Softmax/Sigmoid: one weight's effect on
    saturated probabilities is a 1e-8 cosine that tells nothing, while the errors of
    many weights add up to a visible one (PP-OCR cls)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    present = {value.name for value in model.graph.output}
    for value in list(model.graph.output):
        node = producers.get(value.name)
        while node is not None and node.op_type in PASSING:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in SQUASHING and node.input[0] not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
            present.add(node.input[0])
    return model


def _worst_error(reference: list, outputs: list) -> float:
    """Worst output's noise-to-signal ratio ``|b - a|^2 / |a|^2`` over the samples
    (``~ 2 (1 - cosine)`` for small errors; unlike the cosine it also sees errors
    along the output, such as scaled logits)."""
    worst = 0.0
    for k in range(len(reference[0])):
        first = np.asarray(reference[0][k])
        if not np.issubdtype(first.dtype, np.floating):
            continue
        a = np.concatenate([np.asarray(r[k], np.float64).ravel() for r in reference])
        b = np.concatenate([np.asarray(o[k], np.float64).ravel() for o in outputs])
        power = float(a @ a)
        noise = float((b - a) @ (b - a))
        ratio = noise / power if power else float(noise > 0)
        worst = max(worst, ratio if np.isfinite(ratio) else 1.0)
    return worst


# ---------------------------------------------------------------------------- search


@dataclass
class Trial:
    widths: dict[str, int]
    worst: float  # measured worst-output 1 - cosine (inf: could not run)
    ok: bool
    size: int


def search(
    weights: list[Weight],
    allowance: float,
    check: Callable[[dict[str, int]], tuple[bool, float, int]],
) -> tuple[Trial | None, list[Trial]]:
    """Allocate, check, adjust ``D``; returns the smallest passing trial (or None) and
    every trial made."""
    target = START_SHARE * 2 * allowance  # noise-to-signal ~ 2 (1 - cosine)
    trials: list[Trial] = []
    tried: set[tuple] = set()
    passed, failed = 0.0, float("inf")  # largest passing / smallest failing target
    for _ in range(4 * MAX_TRIALS):
        if len(trials) == MAX_TRIALS or failed / max(passed, 1e-300) < BRACKET:
            break
        widths = allocate(weights, target)
        key = tuple(sorted(widths.items()))
        if key in tried:  # the same widths again: nothing new to learn at this target
            if passed and failed < float("inf"):
                break
            target = target * 4.0 if passed else target * 0.5
            continue
        tried.add(key)
        ok, worst, size = check(widths)
        trials.append(Trial(widths, worst, ok, size))
        if ok:
            passed = max(passed, target)
            if failed == float("inf") and np.isfinite(worst) and worst > 0.6 * allowance:
                break  # little margin left and nothing above tried: done
        else:
            failed = min(failed, target)
        target = _next_target(target, ok, worst, allowance, passed, failed)
    passing = [t for t in trials if t.ok]
    best = min(passing, key=lambda t: t.size) if passing else None
    return best, trials


def _next_target(target, ok, worst, allowance, passed, failed) -> float:
    """Between a passing and a failing target: their geometric mean; otherwise scaled
    by the measured margin or excess (by ``OTHER_MISS`` after a miss on a criterion
    other than cosine, which says nothing of how far it was)."""
    if passed and failed < float("inf"):
        return float(np.sqrt(passed * failed))
    if ok:
        return target * min(4.0, 0.85 * allowance / max(worst, 1e-12))
    if np.isfinite(worst) and worst > allowance:
        return target * min(0.7, 0.85 * allowance / worst)
    return target * OTHER_MISS
