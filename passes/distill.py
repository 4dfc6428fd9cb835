"""``distill`` — train the current model to match the pipeline's original (lossy).

Knowledge distillation as a pipeline step: the *teacher* is the model the pipeline
started from, the *student* the model as the previous steps left it, so
``remove-neurons(ratio=0.5,budget=none),distill(epochs=150,lr=0.01,data=train.npz,
labels=label),quantize-int8`` prunes, recovers the accuracy the pruning cost, then
quantizes. Training runs in the
onnxruntime-training adjunct (``onnxopt train-env``, see ``docs/distill.md``): the
student's float32 parameters — weights, biases, normalization scales, share-weights
codebooks — train; integer tensors (codebook indices, shapes) stay frozen, so the
graph, opset and every op stay exactly as they were: only float values change.

Data: the step's calibration samples (``--calib-samples``, default 64 — usually too
few to train on), or ``data=PATH`` (an ``.npz`` with one key per model input, like
``--data``); ``labels=KEY`` names integer class labels in that ``.npz`` and mixes a
hard-label cross-entropy into the loss (weight ``alpha``). The validation samples the
PassManager checks the step with are never trained on when they come from ``--data``
and ``data=`` is a different file.

Like any lossy step it is checked against its budget versus the original model. Its
default budget is ``top1>=0.97, nonfinite<=0`` rather than the usual
``cosine>=0.99, top1>=0.99``: with ``loss=kl`` only softmaxes are matched, which leaves
each row of logits free up to a constant shift, so a student that agrees with the
teacher on every sample can still have a logit cosine of 0.95. ``--budget`` or
``budget=`` replace it as for any pass. A pruning step before it usually breaks its
own budget and would be rolled back before distill can repair it: give that step a
looser budget, e.g. ``remove-neurons(ratio=0.5,budget="none"),distill(...)``.

Does nothing (no-op), before any training starts, when the student has no float32
parameters to train (weights inside ``If``/``Loop`` branches are not trained), or when,
without ``labels``, the student already computes exactly what the original does on the
validation samples (nothing was lost before it: a pipeline of ``distill`` alone). Also a
no-op when no epoch beats the student on the held-out split (the best epoch is epoch 0,
the untrained student). Fails the step with a clear reason when
no training environment exists, the student is quantized (distill before
quantizing), or training fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.check import Budget
from onnxopt.data import input_specs, load_samples
from onnxopt.errors import UsageError
from onnxopt.pipeline import Pass, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)


@register_pass
class DistillPass(Pass):
    name = "distill"
    summary = "Train the model to match the pipeline's original model (knowledge distillation)."
    lossless = False
    # Not the usual cosine>=0.99: KL on softmaxes leaves each row's logits free up to a
    # shift, so a well-distilled student can have low logit cosine and full agreement.
    default_budget = Budget.parse("top1>=0.97,nonfinite<=0")

    @dataclass
    class Options:
        epochs: int = option(10, "training epochs", range=(1, 100000))
        batch_size: int = option(32, "rows per training step", range=(1, 1 << 20))
        lr: float = option(1e-3, "peak AdamW learning rate", range=(1e-9, 10.0))
        loss: Literal["auto", "kl", "bce", "mse", "cosine"] = option(
            "auto",
            "kl (softened softmax), bce (Sigmoid logits), mse (relative) or cosine; auto: kl "
            "for class scores",
        )
        temperature: float = option(2.0, "softmax temperature of loss=kl", range=(1e-3, 100.0))
        alpha: float | None = option(
            None, "weight of the hard-label loss; none: 0.5 with labels, else 0", range=(0, 1)
        )
        weight_decay: float = option(0.0, "AdamW weight decay", range=(0.0, 10.0))
        holdout: float = option(0.1, "held-out fraction that picks the best epoch", range=(0, 0.5))
        data: str = option("", "training .npz (default: the calibration samples)")
        labels: str = option("", "key of integer class labels in the data .npz")
        timeout: float = option(
            3600.0, "seconds before training is stopped (0: none)", range=(0, 1e7)
        )
        python: str = option("", "adjunct interpreter (default: the train-env venv)")
        freeze: tuple[str, ...] = option(
            (), "tensor names (globs) kept frozen, e.g. those before an op without gradient"
        )
        outputs: tuple[str, ...] = option(
            (), "per-output settings NAME:loss=cosine;weight=0.5;temperature=1"
        )

        def validate(self) -> None:
            if self.labels and not self.data:
                raise ValueError("labels= needs data= (a .npz holding the labels)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxopt.train.api import DistillOptions, distill

        o = self.options
        reason = self._nothing_to_train(graph, ctx)
        if reason:
            return PassResult(False, {}, {}, [reason])
        student = ctx.to_model(graph)
        samples = self._samples(student, ctx)
        options = DistillOptions.pick(o, seed=ctx.seed, outputs=o.outputs)
        result = distill(
            ctx.original,
            student,
            samples,
            labels=self._labels() if o.labels else None,
            options=options,
            python=o.python or None,
            timeout=o.timeout or None,
            progress=ctx.progress.enabled,
        )
        counts = {
            "epochs": o.epochs,
            "best_epoch": result.best_epoch,
            "trained_tensors": len(result.params),
            "train_rows": result.train_samples,
            "heldout_rows": result.heldout_samples,
        }
        details = result.summary()
        if result.best_epoch == 0:
            note = "no epoch beat the untrained student on the held-out split; unchanged"
            return PassResult(False, counts, details, [note])
        self._write_back(graph, result.params)
        return PassResult(True, counts, details, result.notes)

    def _nothing_to_train(self, graph: gs.Graph, ctx: PassContext) -> str:
        """Why training cannot change anything here ("" when it can), found before the
        adjunct builds its artifacts (50 s on PP-OCRv4 det)."""
        from onnxopt.train.student import trainable_parameters

        if not self.options.freeze and not trainable_parameters(graph)[0]:
            subgraphs = any(True for _ in graph.subgraphs())
            return "the student has no float32 parameters to train" + (
                " in its main graph (weights inside If/Loop branches are not trained)"
                if subgraphs
                else ""
            )
        if self.options.labels or ctx.evaluator is None:
            return ""  # with labels, training fits the labels as well as the teacher
        worst = ctx.evaluate(graph).worst()
        if worst.get("max_abs", 1.0) == 0.0 or worst.get("mismatch", 1) == 0:
            return (
                "the student already computes exactly what the original does on the "
                "validation samples (no lossy step before distill): nothing to recover"
            )
        return ""

    def _samples(self, student, ctx: PassContext) -> Sequence[dict[str, np.ndarray]]:
        if self.options.data:
            return load_samples(self.options.data, input_specs(student))
        if not ctx.calibration:
            raise UsageError(
                "distill needs training samples: pass data=PATH or raise --calib-samples"
            )
        return list(ctx.calibration)

    def _labels(self) -> np.ndarray:
        with np.load(self.options.data, allow_pickle=False) as archive:
            if self.options.labels not in archive.files:
                raise UsageError(
                    f"distill: labels={self.options.labels!r} is not a key of "
                    f"{self.options.data} (keys: {', '.join(archive.files)})"
                )
            return archive[self.options.labels]

    @staticmethod
    def _write_back(graph: gs.Graph, params: dict[str, np.ndarray]) -> None:
        tensors = graph.tensors()
        for name, value in params.items():
            tensor = tensors.get(name)
            if not isinstance(tensor, gs.Constant) or tuple(tensor.shape) != value.shape:
                raise RuntimeError(f"distill: trained tensor {name!r} has no match in the graph")
            tensor.values = np.array(value, dtype=tensor.values.dtype)  # a new array
