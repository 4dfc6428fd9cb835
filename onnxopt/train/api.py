"""``onnxopt.train.distill``: train a student ONNX model to match a teacher.

Steps: load both models; read the data (``.npz`` keys = input names, a folder, arrays
or a list of feeds — as ``onnxopt.data.load_samples`` reads them); compute the
teacher's outputs here, with current onnxruntime; build and validate the student's
training copy (:mod:`onnxopt.train.convert`); run the worker in the adjunct
(:mod:`onnxopt.train.client`); write the best epoch's weights back into the student
(same graph, opset and IR version) and prove that the restored model reproduces the
worker's outputs on a few samples.

Data layout: when every student input has a dynamic first dimension the samples are
concatenated into rows and ``batch_size`` rows make a batch; otherwise each sample is
a complete feed and the gradients of ``batch_size`` samples are accumulated per step.

Targets: student outputs paired with teacher outputs of the same name (or the single
output of each when both have one); only float outputs. Labels (``labels=``: an array,
or the name of a key in the ``.npz``) are hard class indices for the first target, one
per row.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.check import class_score_outputs
from onnxopt.data import Feed, input_specs, load_samples
from onnxopt.errors import DataError, ModelError, UsageError
from onnxopt.model import LoadedModel, load_model, save_model
from onnxopt.store import in_memory
from onnxopt.stored import inline_stored
from onnxopt.train import client, convert, env

log = logging.getLogger(__name__)

LOSSES = ("auto", "kl", "bce", "mse", "cosine")
OUTPUT_KEYS = ("loss", "weight", "temperature")
SCHEDULES = ("cosine", "constant")
CHECK_TOLERANCE = (1e-4, 1e-3)  # training-graph kernels vs inference kernels


@dataclass
class DistillOptions:
    """Training settings; ``alpha=None`` means 0.5 with labels, 0 without."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    # per output; auto: kl for class scores of a classifier head ([N, C]) and for
    # per-timestep probabilities ([N, T, C], CTC), bce on the logits of a Sigmoid output
    # (probability maps), else mse relative to the teacher's power
    loss: Literal["auto", "kl", "bce", "mse", "cosine"] = "auto"
    temperature: float = 2.0
    alpha: float | None = None
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.05  # fraction of the steps with a linear learning-rate warm-up
    holdout: float = 0.1
    seed: int = 0
    threads: int = 0
    freeze: tuple[str, ...] = ()  # glob patterns of tensor names kept frozen
    # per-output settings: {"name": {"loss": "cosine", "weight": 0.5, "temperature": 1}}
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, has_labels: bool) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, not {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, not {self.lr}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}"),
            (self.temperature > 0, f"temperature must be > 0, not {self.temperature}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), not {self.warmup}"),
            (0 <= self.holdout <= 0.5, f"holdout must be in [0, 0.5], not {self.holdout}"),
            (self.seed >= 0, f"seed must be >= 0, not {self.seed}"),
            (self.threads >= 0, f"threads must be >= 0, not {self.threads}"),
        ]
        for name, settings in self.outputs.items():
            checks.extend(_output_checks(name, settings))
        if self.alpha is not None:
            checks.append((0 <= self.alpha <= 1, f"alpha must be in [0, 1], not {self.alpha}"))
            checks.append(
                (
                    has_labels or self.alpha == 0,
                    f"alpha={self.alpha} weighs a hard-label loss, but no labels were given",
                )
            )
        for ok, message in checks:
            if not ok:
                raise UsageError(f"distill: {message}")

    @classmethod
    def pick(cls, source: Any, *, outputs: Sequence[str] = (), **overrides: Any) -> DistillOptions:
        """The settings ``source`` (parsed command-line arguments, a pipeline step's
        options) has under the same names, ``overrides`` on top; ``outputs``: specs
        ``NAME:key=value[;...]`` (:func:`parse_output_spec`)."""
        names = [f.name for f in fields(cls) if f.name != "outputs" and hasattr(source, f.name)]
        found = {**{name: getattr(source, name) for name in names}, **overrides}
        found["freeze"] = tuple(found.get("freeze", ()))
        return cls(**found, outputs=dict(parse_output_spec(spec) for spec in outputs))

    def resolved_alpha(self, has_labels: bool) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return 0.5 if has_labels else 0.0


def _output_checks(name: str, settings: Mapping[str, Any]) -> list[tuple[bool, str]]:
    unknown = sorted(set(settings) - set(OUTPUT_KEYS))
    loss = settings.get("loss", "auto")
    weight, temperature = settings.get("weight", 1.0), settings.get("temperature", 1.0)
    return [
        (not unknown, f"output {name!r}: unknown setting(s) {unknown}; valid: {OUTPUT_KEYS}"),
        (loss in LOSSES, f"output {name!r}: loss must be one of {', '.join(LOSSES)}"),
        (isinstance(weight, (int, float)) and weight >= 0, f"output {name!r}: weight must be >= 0"),
        (isinstance(temperature, (int, float)) and temperature > 0, f"output {name!r}: "
         "temperature must be > 0"),
    ]  # fmt: skip


def parse_output_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:loss=cosine;weight=0.5;temperature=1"`` (``,`` works too) -> (name, settings)."""
    name, sep, rest = text.rpartition(":") if "=" in text else (text, "", "")
    if not sep or not name:
        raise UsageError(
            f"distill: output setting {text!r} is not NAME:key=value[;key=value] "
            f"(keys: {', '.join(OUTPUT_KEYS)})"
        )
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.replace(",", ";").split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise UsageError(f"distill: output setting {part!r} of {name!r} is not key=value")
        try:
            settings[key.strip()] = value.strip() if key.strip() == "loss" else float(value)
        except ValueError:
            message = f"distill: {key}={value!r} of output {name!r} is not a number"
            raise UsageError(message) from None
    return name, settings


@dataclass
class DistillResult:
    """The trained student and how training went."""

    model: onnx.ModelProto
    params: dict[str, np.ndarray]  # trained tensors (best epoch), by initializer name
    history: list[dict[str, Any]]  # per epoch; epoch 0 is the student before training
    best_epoch: int
    train_samples: int
    heldout_samples: int
    seconds: float
    check_max_abs: float  # restored model vs the worker's outputs
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)  # the trainable path's ops

    @property
    def before(self) -> dict[str, Any]:
        return self.history[0]

    @property
    def best(self) -> dict[str, Any]:
        return next(h for h in self.history if h["epoch"] == self.best_epoch)

    def save(self, path: str | os.PathLike) -> Path:
        return save_model(self.model, path)

    def summary(self) -> dict[str, Any]:
        """JSON-serializable figures for reports."""
        return {
            "best_epoch": self.best_epoch,
            "train_samples": self.train_samples,
            "heldout_samples": self.heldout_samples,
            "seconds": round(self.seconds, 3),
            "trained_tensors": len(self.params),
            "trained_values": int(sum(v.size for v in self.params.values())),
            "check_max_abs": self.check_max_abs,
            "history": self.history,
            "notes": self.notes,
            "settings": self.settings,
            "op_coverage": self.coverage,
        }


def _models_in_memory(function):
    """Training needs every weight byte (opset conversion, checker, the adjunct): run
    with the large-run weight store suspended (onnxopt.store.in_memory)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with in_memory():
            return function(*args, **kwargs)

    return wrapper


@_models_in_memory
def distill(
    teacher: str | os.PathLike | onnx.ModelProto,
    student: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | Mapping[str, np.ndarray] | Sequence[Feed],
    *,
    labels: str | np.ndarray | Sequence[int] | None = None,
    options: DistillOptions | None = None,
    python: str | os.PathLike | None = None,
    timeout: float | None = 3600.0,
    progress: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    workdir: str | os.PathLike | None = None,
    **overrides: Any,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher`` on ``data``; see the module docstring.

    ``options`` (or keyword ``overrides`` such as ``epochs=20, lr=3e-3``) set the
    training; ``python`` picks the adjunct interpreter (:func:`onnxopt.train.env.find_python`).
    Raises UsageError / DataError / ModelError for bad input, TrainEnvError when no
    adjunct is available, TrainingError when the worker fails or times out.
    """
    started = time.perf_counter()
    options = _merge_options(options, overrides)
    teacher_model = _load(teacher, "teacher")
    student_model = _load(student, "student")
    samples, label_array = _read_data(student_model.proto, data, labels)
    options.validate(label_array is not None)
    adjunct = env.find_python(python)
    targets = _weighted(_pair_targets(teacher_model.proto, student_model.proto), options)
    heads = class_score_outputs(teacher_model.proto)
    layout = _layout(student_model.proto)
    copy = convert.prepare(
        student_model.proto,
        samples[:4],
        targets=[student for student, _ in targets],
        freeze=tuple(options.freeze),
        input_shapes=_data_shapes(samples, layout),
    )
    input_names = [s.name for s in input_specs(student_model.proto)]
    inputs = _combine(samples, input_names, layout)
    teachers = _teacher_outputs(teacher_model.proto, samples, targets, layout)
    rows = len(inputs[0])
    labels_out = _check_labels(label_array, rows, teachers[0]) if label_array is not None else None
    job = client.Job(
        student=copy.model,
        options=_job_options(
            options, copy, targets, teachers, layout, labels_out is not None, heads
        ),
        inputs=inputs,
        teachers=teachers,
        labels=labels_out,
    )
    result = client.run_job(
        adjunct, job, timeout=timeout, on_event=on_event, progress=progress, workdir=workdir
    )
    model = convert.restore(copy.base, result.params)
    check = _check_restored(model, result, dict(zip(input_names, inputs)), layout, targets)
    notes = [*copy.notes, *(f"training edit: {k} x{v}" for k, v in copy.edits.items())]
    settings = {**asdict(options), "alpha": options.resolved_alpha(labels_out is not None)}
    settings["worker"] = result.worker
    settings["targets"] = job.options["targets"]  # loss, weight, temperature per output
    return DistillResult(
        model=model,
        params=result.params,
        history=result.history,
        best_epoch=result.best_epoch,
        train_samples=result.train_samples,
        heldout_samples=result.heldout_samples,
        seconds=time.perf_counter() - started,
        check_max_abs=check,
        notes=notes,
        settings=settings,
        coverage=copy.coverage.summary() if copy.coverage is not None else {},
    )


def _merge_options(options: DistillOptions | None, overrides: Mapping[str, Any]) -> DistillOptions:
    base = asdict(options) if options is not None else asdict(DistillOptions())
    unknown = set(overrides) - set(base)
    if unknown:
        raise UsageError(
            f"distill: unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(base)}"
        )
    return DistillOptions(**{**base, **overrides})


def _load(source, what: str) -> LoadedModel:
    if isinstance(source, onnx.ModelProto):  # weights on disk in a large run: training
        source = inline_stored(source)  # and its opset conversion need them in memory
    try:
        return load_model(source)
    except ModelError as exc:
        raise ModelError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------- data


def _read_data(student: onnx.ModelProto, data, labels) -> tuple[Sequence[Feed], np.ndarray | None]:
    specs = input_specs(student)
    samples = load_samples(data, specs)
    if labels is None or (isinstance(labels, str) and not labels):
        return samples, None
    if isinstance(labels, str):
        if not (isinstance(data, (str, os.PathLike)) and str(data).endswith(".npz")):
            raise UsageError(f"labels={labels!r} names a key, but the data is not an .npz file")
        with np.load(data, allow_pickle=False) as archive:
            if labels not in archive.files:
                raise DataError(
                    f"{data}: no key {labels!r} for the labels; keys: {', '.join(archive.files)}"
                )
            return samples, archive[labels]
    return samples, np.asarray(labels)


def _layout(student: onnx.ModelProto) -> str:
    """'rows' when every input has a dynamic first dimension, else 'samples'."""
    specs = input_specs(student)
    dynamic = all(s.shape and not isinstance(s.shape[0], int) for s in specs)
    return "rows" if dynamic else "samples"


def _data_shapes(samples: Sequence[Feed], layout: str) -> dict[str, list[int | str]]:
    """Per input, the dimensions every sample shares (rows: the first stays dynamic)."""
    shapes: dict[str, list[int | str]] = {}
    for name in samples[0] if samples else {}:
        found = {tuple(np.shape(s[name])) for s in samples}
        if len(found) != 1:
            continue
        shape: list[int | str] = list(found.pop())
        if layout == "rows" and shape:
            shape[0] = "rows"
        shapes[name] = shape
    return shapes


def _combine(samples: Sequence[Feed], names: Sequence[str], layout: str) -> list[np.ndarray]:
    join = np.concatenate if layout == "rows" else np.stack
    return [np.ascontiguousarray(join([s[name] for s in samples])) for name in names]


def _pair_targets(teacher: onnx.ModelProto, student: onnx.ModelProto) -> list[tuple[str, str]]:
    def float_outputs(model):
        names = []
        for value in model.graph.output:
            elem = value.type.tensor_type.elem_type
            if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
                names.append(value.name)
        return names

    t_names, s_names = float_outputs(teacher), float_outputs(student)
    paired = [(name, name) for name in s_names if name in t_names]
    if paired:
        return paired
    if len(t_names) == 1 and len(s_names) == 1:
        return [(s_names[0], t_names[0])]
    raise UsageError(
        f"cannot pair student outputs {s_names} with teacher outputs {t_names}: give them "
        "the same names (or use models with a single float output each)"
    )


def _weighted(targets: list[tuple[str, str]], options: DistillOptions) -> list[tuple[str, str]]:
    """The paired outputs whose weight is not 0 (``outputs={name: {"weight": 0}}``)."""
    unknown = set(options.outputs) - {student for student, _ in targets}
    if unknown:
        raise UsageError(
            f"distill: settings for output(s) {', '.join(sorted(unknown))}, which are not "
            f"distilled; the distilled outputs: {', '.join(s for s, _ in targets)}"
        )
    kept = [t for t in targets if options.outputs.get(t[0], {}).get("weight", 1.0) != 0]
    if not kept:
        raise UsageError("distill: every distilled output has weight 0")
    return kept


def _teacher_outputs(teacher, samples, targets, layout) -> list[np.ndarray]:
    session = runtime.make_session(teacher)
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(samples[0])
    if missing:
        raise DataError(
            f"the teacher needs input(s) {', '.join(sorted(missing))} that the student "
            "does not take; distillation feeds both models the same inputs"
        )
    names = [t for _, t in targets]
    outputs = runtime.run_samples(session, samples, names)
    join = np.concatenate if layout == "rows" else np.stack
    arrays = []
    for name in names:
        parts = [o[name] for o in outputs]
        if layout == "rows" and any(
            p.ndim == 0 or p.shape[0] != len(next(iter(s.values()))) for p, s in zip(parts, samples)
        ):
            raise DataError(
                f"teacher output {name!r} does not have one row per input row; "
                "cannot batch rows for training"
            )
        arrays.append(np.ascontiguousarray(join(parts).astype(np.float32)))
    return arrays


def _check_labels(labels: np.ndarray, rows: int, first_teacher: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integer class indices, not {labels.dtype}")
    if len(labels) != rows:
        raise DataError(f"{len(labels)} labels for {rows} training rows; give one label per row")
    classes = first_teacher.shape[-1] if first_teacher.ndim >= 2 else 0
    if first_teacher.ndim != 2 and first_teacher.ndim != 3:
        raise DataError(
            f"hard labels need a class-score output shaped [N, C]; the first target has shape "
            f"{list(first_teacher.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels must be in [0, {classes}); got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def is_probabilities(teacher: np.ndarray) -> bool:
    """Non-negative rows summing to 1 over the last axis (a softmax already applied)."""
    if teacher.ndim < 1 or teacher.shape[-1] < 2 or teacher.size == 0 or teacher.min() < 0:
        return False
    return bool(np.all(np.abs(teacher.sum(axis=-1, dtype=np.float64) - 1) < 1e-3))


def resolve_loss(
    loss: str, teacher: np.ndarray, rank: int, class_head: bool, logits: str | None = None
) -> str:
    """The loss of one output (``rank``: the output's own rank, without a sample axis).

    ``auto`` -> ``kl`` for class scores of a classifier head ([N, C], C > 1) and for
    per-timestep probabilities ([N, T, C], a CTC head); ``bce`` for an output a Sigmoid
    produces (``logits``: its input) of rank >= 2 (a probability map: PP-OCR det);
    else ``mse`` (relative to the teacher's power, so outputs of any scale weigh alike:
    a VAD's probability and its recurrent state, an embedding).
    """
    if loss != "auto":
        return loss
    classes = teacher.shape[-1] if teacher.ndim else 1
    if classes > 1 and class_head and rank == 2:
        return "kl"
    if classes > 1 and rank == 3 and is_probabilities(teacher):
        return "kl"
    if logits is not None and rank >= 2:
        return "bce"
    return "mse"


def sigmoid_logits(model: onnx.ModelProto, output: str) -> str | None:
    """The input of the Sigmoid that produces ``output``, if one does."""
    for item in model.graph.node:
        if output in item.output:
            return (
                item.input[0]
                if item.op_type == "Sigmoid" and item.domain in ("", "ai.onnx")
                else None
            )
    return None


def _target_specs(options, targets, teachers, layout, class_heads, model) -> list[dict[str, Any]]:
    specs = []
    for (student, teacher_name), teacher in zip(targets, teachers):
        settings = options.outputs.get(student, {})
        rank = teacher.ndim - (1 if layout == "samples" else 0)
        logits = sigmoid_logits(model, student)
        if logits is not None and teacher.size and (teacher.min() < 0 or teacher.max() > 1):
            logits = None  # the teacher's output is no probability: not a pair for bce
        loss = resolve_loss(
            settings.get("loss", options.loss), teacher, rank, teacher_name in class_heads, logits
        )
        if loss == "bce" and logits is None:
            raise UsageError(
                f"distill: loss=bce on output {student!r} needs a student output made by a "
                "Sigmoid and teacher values in [0, 1]; use loss=mse"
            )
        classes = int(teacher.shape[-1]) if teacher.ndim else 1
        if loss in ("kl", "cosine") and classes < 2:
            raise UsageError(
                f"distill: loss={loss} on output {student!r} needs a last axis >= 2 "
                f"(it has shape {list(teacher.shape[1:])}); use loss=mse"
            )
        power = float(np.mean(np.square(teacher, dtype=np.float64))) if teacher.size else 0.0
        specs.append(
            {
                "name": student,
                "classes": classes,
                "loss": loss,
                "weight": float(settings.get("weight", 1.0)),
                "temperature": float(settings.get("temperature", options.temperature)),
                "probabilities": loss == "kl" and is_probabilities(teacher),
                "scale": 1.0 / power if power > 0 else 1.0,  # mse relative to the teacher
            }
        )
        if loss == "bce":  # binary KL on the Sigmoid's input
            specs[-1]["logits"] = logits
    return specs


def _job_options(options, copy, targets, teachers, layout, has_labels, heads) -> dict[str, Any]:
    specs = _target_specs(options, targets, teachers, layout, heads, copy.model)
    losses = sorted({spec["loss"] for spec in specs})
    return {
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "weight_decay": options.weight_decay,
        "loss": losses[0] if len(losses) == 1 else "mixed",
        "temperature": options.temperature,
        "alpha": options.resolved_alpha(has_labels),
        "schedule": options.schedule,
        "warmup": options.warmup,
        "holdout": options.holdout,
        "seed": options.seed,
        "threads": options.threads,
        "batch_mode": layout,
        "inputs": [s.name for s in input_specs(copy.base)],
        "targets": specs,
        "trainable": copy.trainable,
    }


def _check_restored(model, result: client.JobResult, inputs, layout, targets) -> float:
    """Max abs difference between the restored model and the worker on check samples."""
    index = result.check_indices
    names = [student for student, _ in targets]
    session = runtime.make_session(model)
    if layout == "rows":
        got = session.run(names, {name: array[index] for name, array in inputs.items()})
    else:
        runs = [session.run(names, {n: a[i] for n, a in inputs.items()}) for i in index]
        got = [np.stack([r[k] for r in runs]) for k in range(len(names))]
    worst = 0.0
    atol, rtol = CHECK_TOLERANCE
    for name, mine, theirs in zip(names, got, result.check_outputs):
        diff = np.abs(mine.astype(np.float64) - theirs)
        if diff.size and np.any(diff > atol + rtol * np.abs(theirs)):
            raise ModelError(
                f"the restored student does not reproduce the trained model on output {name!r} "
                f"(max abs difference {diff.max():.3g}); this is a bug in onnxopt's training "
                "adjunct, please report it"
            )
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst
