"""Distillation worker: runs INSIDE the adjunct environment (onnxruntime-training).

Run by path, never imported by onnxopt: ``ADJUNCT_PYTHON worker.py JOB_DIR``. It may
import only the standard library, numpy, onnx and onnxruntime(.training) — the
adjunct has none of onnxopt's dependencies — and must run on Python 3.8-3.12.

Job folder (written by :mod:`onnxopt.train.client`)::

    student.onnx          training copy of the student (IR <= 10, opset <= 21)
    options.json          see DEFAULTS below, plus inputs / targets / trainable
    data/input_K.npy      model input K, one row (or one sample) per index
    data/teacher_K.npy    teacher output for target K, same indexing
    data/labels.npy       optional int64 hard labels for the first target

Protocol: one JSON object per line on stdout — ``{"event": "start"}``,
``{"event": "epoch", ...}`` after every epoch (epoch 0 = the student before
training), ``{"event": "done", ...}`` or ``{"event": "error", "message": ...}``.
Anything else the libraries print goes to stderr. Results go to ``out/``:
``params.npz`` (the trainable tensors of the best epoch), ``result.json`` (history,
best epoch) and ``check.npz`` (outputs of the best weights on a few samples, for the
client to prove the restored model computes the same).

Training: ``generate_artifacts`` with a custom onnxblock loss — per target, weighted:
``mse`` relative to the teacher's power, ``cosine`` (1 - cosine along the last axis) or
``kl`` (KL divergence of temperature-softened softmaxes, times T^2, per row and per
timestep; on probability outputs on log(p)) — plus, when
labels are given, ``alpha`` x cross-entropy on the first target (the distillation
term gets ``1 - alpha``); AdamW, cosine or constant learning rate; seeded shuffling;
the held-out split picks the best epoch (held-out accuracy when labels are given,
else held-out loss), epoch 0 included, so training never returns a student worse on
the held-out split than the one it was given.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import traceback

PROTOCOL = 1
DEFAULTS = {
    "epochs": 10,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "loss": "kl",
    "temperature": 2.0,
    "alpha": 0.0,
    "schedule": "cosine",
    "warmup": 0.05,
    "holdout": 0.1,
    "seed": 0,
    "threads": 0,
    "check_samples": 8,
}
FAULT_VAR = "ONNXOPT_TRAIN_WORKER_FAULT"  # test hook: "kill-after-epoch"

_events = sys.stdout


def emit(event: str, **fields) -> None:
    fields["event"] = event
    _events.write(json.dumps(fields) + "\n")
    _events.flush()


def main(argv) -> int:
    global _events
    if len(argv) != 2:
        sys.stderr.write("usage: worker.py JOB_DIR\n")
        return 2
    # Keep stdout for protocol lines only: whatever libraries print goes to stderr.
    _events = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = os.path.abspath(argv[1])
    os.chdir(job)  # onnxblock writes temporary files into the working directory
    try:
        run(job)
    except Exception as exc:
        message = f"{type(exc).__name__}: {clean_message(str(exc))}"
        emit("error", message=message, traceback=traceback.format_exc())
        return 1
    return 0


def clean_message(text: str) -> str:
    """onnxruntime's C++ errors: drop the source path and the failed-check signature."""
    text = text.strip() or "(no message)"
    if " was false. " in text:
        text = text.split(" was false. ", 1)[1]
    text = re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text).strip()
    if "gradient builder has not been registered" in text:
        text += " (onnxruntime-training has no gradient for this op: it cannot train through it)"
    return text


def run(job: str) -> None:
    started = time.time()
    try:
        import numpy as np
        import onnx
        import onnxruntime
        from onnxruntime.training import artifacts
    except Exception as exc:
        raise RuntimeError(
            f"this interpreter cannot import onnxruntime.training ({exc}); run "
            "`onnxopt train-env` or point ONNXOPT_TRAIN_PYTHON at one that can"
        ) from None
    onnxruntime.set_default_logger_severity(3)
    with open(os.path.join(job, "options.json")) as handle:
        options = dict(DEFAULTS, **json.load(handle))
    if options.get("protocol") != PROTOCOL:
        raise RuntimeError(
            "job protocol {} != worker protocol {}".format(options.get("protocol"), PROTOCOL)
        )
    emit("start", python=sys.version.split()[0], onnxruntime=onnxruntime.__version__)
    data = load_data(job, options, np)
    split = split_indices(data["count"], options, np)
    art = os.path.join(job, "artifacts")
    os.makedirs(art, exist_ok=True)
    student = onnx.load(os.path.join(job, "student.onnx"))
    loss = build_loss_block(options, student)
    artifacts.generate_artifacts(
        student,
        requires_grad=list(options["trainable"]),
        frozen_params=[],
        loss=loss,
        optimizer=make_optimizer(options),
        artifact_directory=art,
        additional_output_names=[t["name"] for t in options["targets"]],
    )
    trainer = Trainer(art, options, data, split, np)
    history = trainer.fit()
    best = trainer.best
    trainer.load(best["params"])
    write_results(job, trainer, history, best, started, np)
    emit(
        "done",
        best_epoch=best["epoch"],
        seconds=round(time.time() - started, 3),
    )


# ---------------------------------------------------------------------------- data


def load_data(job, options, np):
    folder = os.path.join(job, "data")
    count_in, count_out = len(options["inputs"]), len(options["targets"])
    inputs = [np.load(os.path.join(folder, f"input_{k}.npy")) for k in range(count_in)]
    teachers = [np.load(os.path.join(folder, f"teacher_{k}.npy")) for k in range(count_out)]
    labels_path = os.path.join(folder, "labels.npy")
    labels = np.load(labels_path) if os.path.exists(labels_path) else None
    counts = {len(a) for a in inputs + teachers + ([labels] if labels is not None else [])}
    if len(counts) != 1:
        raise ValueError("inputs, teacher outputs and labels have different lengths")
    return {"inputs": inputs, "teachers": teachers, "labels": labels, "count": counts.pop()}


def split_indices(count, options, np):
    rng = np.random.default_rng(options["seed"])
    order = rng.permutation(count)
    held = 0
    if options["holdout"] > 0 and count >= 10:
        held = max(1, round(options["holdout"] * count))
    return {"heldout": np.sort(order[:held]), "train": order[held:], "rng": rng}


# ---------------------------------------------------------------------------- loss


def build_loss_block(options, student):
    from onnxruntime.training import onnxblock

    class DistillLoss(onnxblock.Block):
        """(1 - alpha) * sum over targets of weight x term + alpha * cross-entropy."""

        def build(self, *graph_outputs):
            graph = self.base.graph
            terms = []
            for k, target in enumerate(options["targets"]):
                teacher = add_input_like(graph, target["name"], f"onnxopt_teacher_{k}")
                kind = target.get("loss", options["loss"])
                if kind == "mse":
                    term = mse_term(graph, target["name"], teacher, target.get("scale", 1.0))
                elif kind == "cosine":
                    term = cosine_term(graph, target["name"], teacher)
                elif kind == "bce":
                    term = bce_term(graph, target, teacher)
                else:
                    temperature = target.get("temperature", options["temperature"])
                    term = kl_term(graph, target, teacher, temperature)
                weight = float(target.get("weight", 1.0))
                if weight != 1.0:
                    term = node(graph, "Mul", [term, scalar(graph, weight)])
                terms.append(term)
            total = terms[0]
            for term in terms[1:]:
                total = node(graph, "Add", [total, term])
            alpha = options["alpha"]
            if options.get("labels"):
                labels = add_labels_input(graph, options["targets"][0]["name"])
                ce = node(
                    graph,
                    "SoftmaxCrossEntropyLoss",
                    [options["targets"][0]["name"], labels],
                    outputs=2,
                    reduction="mean",
                )[0]
                total = node(
                    graph,
                    "Add",
                    [
                        node(graph, "Mul", [total, scalar(graph, 1.0 - alpha)]),
                        node(graph, "Mul", [ce, scalar(graph, alpha)]),
                    ],
                )
            return total

    return DistillLoss()


def mse_term(graph, output, teacher, scale=1.0):
    """mean((s - t)^2) x scale; the client sets scale = 1 / mean(t^2) (relative error)."""
    diff = node(graph, "Sub", [output, teacher])
    mean = node(graph, "ReduceMean", [node(graph, "Mul", [diff, diff])], keepdims=0)
    return mean if scale == 1.0 else node(graph, "Mul", [mean, scalar(graph, scale)])


def cosine_term(graph, output, teacher):
    """1 - mean cosine similarity of s and t along the last axis (embeddings)."""
    import onnx

    axes = fresh("axes")
    graph.initializer.append(onnx.helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [-1]))

    def total(a, b):
        return node(graph, "ReduceSum", [node(graph, "Mul", [a, b]), axes], keepdims=0)

    eps = scalar(graph, 1e-12)
    norms = node(
        graph,
        "Mul",
        [
            node(graph, "Sqrt", [node(graph, "Add", [total(output, output), eps])]),
            node(graph, "Sqrt", [node(graph, "Add", [total(teacher, teacher), eps])]),
        ],
    )
    cosine = node(graph, "Div", [total(output, teacher), norms])
    return node(graph, "Sub", [scalar(graph, 1.0), node(graph, "ReduceMean", [cosine], keepdims=0)])


def bce_term(graph, target, teacher):
    """Binary KL per element of a Sigmoid output, on its logits z (the Sigmoid's input).

    mean(softplus(z) - t z - H(t)), softplus(z) = Relu(z) + log(1 + exp(-|z|)), H the
    teacher's binary entropy (so the loss is 0 at the teacher): its gradient on z is
    sigmoid(z) - t, which does not vanish where a pruned student's sigmoid saturates
    (mse on the probabilities does: PP-OCR det's map).
    """
    z = target["logits"]
    one = scalar(graph, 1.0)
    tail = node(graph, "Exp", [node(graph, "Neg", [node(graph, "Abs", [z])])])
    softplus = node(
        graph,
        "Add",
        [node(graph, "Relu", [z]), node(graph, "Log", [node(graph, "Add", [tail, one])])],
    )
    t = node(graph, "Clip", [teacher, scalar(graph, 1e-7), scalar(graph, 1.0 - 1e-7)])
    u = node(graph, "Sub", [one, t])
    negative_entropy = node(
        graph,
        "Add",
        [
            node(graph, "Mul", [t, node(graph, "Log", [t])]),
            node(graph, "Mul", [u, node(graph, "Log", [u])]),
        ],
    )
    pointwise = node(graph, "Sub", [softplus, node(graph, "Mul", [teacher, z])])
    pointwise = node(graph, "Add", [pointwise, negative_entropy])
    return node(graph, "ReduceMean", [pointwise], keepdims=0)


def log_probabilities(graph, probabilities):
    """log(p) of outputs that are probabilities already (a softmax inside the model)."""
    clipped = node(graph, "Clip", [probabilities, scalar(graph, 1e-8), scalar(graph, 1.0)])
    return node(graph, "Log", [clipped])


def kl_term(graph, target, teacher, temperature):
    """KL(teacher_T || student_T) summed over the last axis, averaged elsewhere, x T^2.

    On probability outputs (a softmax inside the model: PP-OCR cls, rec's per-timestep
    CTC probabilities) the logits are log(p), so softening by T stays meaningful.
    """
    t = scalar(graph, temperature)
    student, teacher_logits = target["name"], teacher
    if target.get("probabilities"):
        student = log_probabilities(graph, student)
        teacher_logits = log_probabilities(graph, teacher)
    log_student = node(graph, "LogSoftmax", [node(graph, "Div", [student, t])], axis=-1)
    soft_teacher = node(graph, "Div", [teacher_logits, t])
    log_teacher = node(graph, "LogSoftmax", [soft_teacher], axis=-1)
    prob_teacher = node(graph, "Softmax", [soft_teacher], axis=-1)
    pointwise = node(graph, "Mul", [prob_teacher, node(graph, "Sub", [log_teacher, log_student])])
    mean = node(graph, "ReduceMean", [pointwise], keepdims=0)
    # mean over all elements x classes = per-row sum averaged over rows
    return node(graph, "Mul", [mean, scalar(graph, target["classes"] * temperature**2)])


_counter = [0]


def fresh(prefix):
    _counter[0] += 1
    return f"onnxopt_loss/{prefix}_{_counter[0]}"


def node(graph, op, inputs, outputs=1, **attrs):
    import onnx

    names = [fresh(op.lower()) for _ in range(outputs)]
    graph.node.append(onnx.helper.make_node(op, inputs, names, name=fresh(op), **attrs))
    return names[0] if outputs == 1 else names


def scalar(graph, value):
    import onnx

    name = fresh("const")
    graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
    return name


def _value_info(graph, name):
    for value in list(graph.output) + list(graph.input) + list(graph.value_info):
        if value.name == name:
            return value
    raise LookupError(f"no type information for output {name!r}")


def add_input_like(graph, like, name):
    import copy

    value = copy.deepcopy(_value_info(graph, like))
    value.name = name
    graph.input.append(value)
    return name


def add_labels_input(graph, like):
    import copy

    import onnx

    value = copy.deepcopy(_value_info(graph, like))
    value.name = "onnxopt_labels"
    value.type.tensor_type.elem_type = onnx.TensorProto.INT64
    dims = value.type.tensor_type.shape.dim
    if len(dims):
        del dims[-1]
    graph.input.append(value)
    return value.name


def make_optimizer(options):
    from onnxruntime.training import onnxblock

    return onnxblock.optim.AdamW(weight_decay=options["weight_decay"])


# ---------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, art, options, data, split, np):
        import onnxruntime
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.np = np
        self.options = options
        self.data = data
        self.split = split
        session = onnxruntime.SessionOptions()
        if options["threads"]:
            session.intra_op_num_threads = int(options["threads"])
        self.state = CheckpointState.load_checkpoint(os.path.join(art, "checkpoint"))
        self.module = Module(
            os.path.join(art, "training_model.onnx"),
            self.state,
            os.path.join(art, "eval_model.onnx"),
            session_options=session,
        )
        self.optimizer = Optimizer(os.path.join(art, "optimizer_model.onnx"), self.module)
        self.user_inputs = list(self.module.input_names())
        self.per_sample = options["batch_mode"] == "samples"
        self.parent = os.getppid()
        self.best = None

    # -- feeds

    def feeds(self, index):
        """Module inputs for row indices ``index`` (a batch) or one sample index."""
        np = self.np
        values = {}
        pick = (lambda a: a[index]) if not self.per_sample else (lambda a: a[int(index)])
        for name, array in zip(self.options["inputs"], self.data["inputs"]):
            values[name] = np.ascontiguousarray(pick(array))
        for k, array in enumerate(self.data["teachers"]):
            values[f"onnxopt_teacher_{k}"] = np.ascontiguousarray(pick(array))
        if self.data["labels"] is not None:
            values["onnxopt_labels"] = np.ascontiguousarray(pick(self.data["labels"]))
        missing = [n for n in self.user_inputs if n not in values]
        if missing:
            raise RuntimeError(f"no data for training-model inputs {missing}")
        return [values[n] for n in self.user_inputs]

    def batches(self, order):
        size = max(1, int(self.options["batch_size"]))
        for start in range(0, len(order), size):
            yield order[start : start + size]

    # -- loop

    def fit(self):
        history = []
        first = self.evaluate(0)
        first["train_loss"] = None
        self.consider(first)
        history.append(public(first))
        emit("epoch", epochs=self.options["epochs"], **public(first))
        steps = self.options["epochs"] * math.ceil(
            len(self.split["train"]) / max(1, int(self.options["batch_size"]))
        )
        step = 0
        for epoch in range(1, self.options["epochs"] + 1):
            order = self.split["rng"].permutation(self.split["train"])
            losses = []
            for batch in self.batches(order):
                self.optimizer.set_learning_rate(self.learning_rate(step, steps))
                losses.append(self.train_step(batch))
                step += 1
                if os.getppid() != self.parent:
                    raise SystemExit("the onnxopt process that started this worker is gone")
            record = self.evaluate(epoch)
            record["train_loss"] = float(self.np.mean(losses)) if losses else None
            self.consider(record)
            history.append(public(record))
            emit("epoch", epochs=self.options["epochs"], **public(record))
            if epoch == 1 and os.environ.get(FAULT_VAR) == "kill-after-epoch":
                sys.stderr.write("fault injection: killing the worker\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return history

    def learning_rate(self, step, steps):
        """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay."""
        lr = float(self.options["lr"])
        warmup = int(float(self.options["warmup"]) * steps)
        if step < warmup:
            return lr * (step + 1) / warmup
        if self.options["schedule"] == "cosine" and steps > 1:
            progress = (step - warmup) / max(1, steps - warmup)
            return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr

    def train_step(self, batch):
        self.module.train()
        if self.per_sample:
            total = 0.0
            for index in batch:
                total += float(self.module(*self.feeds(index))[0])
            loss = total / len(batch)
        else:
            loss = float(self.module(*self.feeds(batch))[0])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss}; lower the learning rate")
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return loss

    def predict(self, indices):
        """(mean loss, outputs of the first target) in eval mode over ``indices``."""
        np = self.np
        self.module.eval()
        losses, outputs, weights = [], [], []
        groups = [[int(i)] for i in indices] if self.per_sample else self.batches(indices)
        for group in groups:
            feed = group[0] if self.per_sample else np.asarray(group)
            result = self.module(*self.feeds(feed))
            losses.append(float(result[0]))
            weights.append(len(group))
            outputs.append([np.asarray(r) for r in result[1:]])
        loss = float(np.average(losses, weights=weights)) if losses else None
        return loss, outputs

    def evaluate(self, epoch):
        np = self.np
        record = {"epoch": epoch, "params": self.snapshot()}
        held = self.split["heldout"]
        record.update(heldout_loss=None, agreement=None, accuracy=None)
        record.update(sqnr_db=None, worst_sqnr_db=None)
        if not len(held):
            return record
        loss, outputs = self.predict(held)
        record["heldout_loss"] = loss
        join = np.stack if self.per_sample else np.concatenate
        sqnr = {}
        for k, target in enumerate(self.options["targets"]):
            student = join([o[k] for o in outputs])
            teacher = self.data["teachers"][k][held]
            sqnr[target["name"]] = sqnr_db(np, student, teacher)
            scores = target.get("loss", self.options["loss"]) == "kl"
            scores = scores or (k == 0 and teacher.ndim == (3 if self.per_sample else 2))
            if record["agreement"] is None and scores and student.shape[-1] > 1:
                guess = np.argmax(student, -1)
                record["agreement"] = float(np.mean(guess == np.argmax(teacher, -1)))
                labels = self.data["labels"]
                if k == 0 and labels is not None and guess.ndim == labels[held].ndim:
                    record["accuracy"] = float(np.mean(guess == labels[held]))
        record["sqnr_db"] = sqnr
        record["worst_sqnr_db"] = min(sqnr.values())
        return record

    def score(self, record):
        if record["heldout_loss"] is None:
            return (record["epoch"],)  # no held-out split: the last epoch wins
        return (-record["heldout_loss"],)

    def consider(self, record):
        if self.best is None or self.score(record) > self.score(self.best):
            self.best = record
        else:
            record.pop("params")

    def snapshot(self):
        return {
            name: self.np.array(self.state.parameters[name].data, copy=True)
            for name in self.options["trainable"]
        }

    def load(self, params):
        for name, value in params.items():
            self.state.parameters[name] = value


def sqnr_db(np, student, teacher):
    """10 log10(power of the teacher / power of the difference), capped at 200 dB."""
    signal = float(np.sum(np.square(teacher, dtype=np.float64)))
    noise = float(np.sum(np.square(student.astype(np.float64) - teacher)))
    if noise <= signal * 1e-20:
        return 200.0
    return round(10.0 * math.log10(max(signal, 1e-30) / noise), 3)


def public(record):
    return {k: v for k, v in record.items() if k != "params"}


def write_results(job, trainer, history, best, started, np):
    out = os.path.join(job, "out")
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "params.npz"), **best["params"])
    sample_ids = trainer.split["heldout"]
    if not len(sample_ids):
        sample_ids = np.sort(trainer.split["train"])
    sample_ids = sample_ids[: int(trainer.options["check_samples"])]
    _, outputs = trainer.predict(sample_ids)
    check = {"indices": np.asarray(sample_ids, dtype=np.int64)}
    for k in range(len(trainer.options["targets"])):
        parts = [o[k] for o in outputs]
        join = np.stack if trainer.per_sample else np.concatenate
        check[f"target_{k}"] = join(parts)
    np.savez(os.path.join(out, "check.npz"), **check)
    result = {
        "history": history,
        "best_epoch": best["epoch"],
        "train_samples": len(trainer.split["train"]),
        "heldout_samples": len(trainer.split["heldout"]),
        "seconds": round(time.time() - started, 3),
    }
    with open(os.path.join(out, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
