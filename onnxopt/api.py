"""The Python API export pipelines call: ``onnxopt.optimize(model, pipeline, ...)``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxopt.check import LOSSY_BUDGET, Budget
from onnxopt.data import input_specs, prepare_samples
from onnxopt.errors import UsageError
from onnxopt.model import LoadedModel, load_model, save_model
from onnxopt.pipeline import PassManager, Pipeline, RunOutcome, load_pipeline_file
from onnxopt.progress import Progress
from onnxopt.report import build_report
from onnxopt.store import spill_threshold
from onnxopt.stored import inline_stored


@dataclass
class Result:
    """The optimized model, the run's report and where the model came from.

    For a large model (weights kept on disk during the run, see onnxopt.store)
    ``save`` streams the weights from the run's store to the output, while ``model``
    reads them all back into memory on first access; ``close()`` (or dropping the
    Result) deletes the store.
    """

    report: dict[str, Any]
    outcome: RunOutcome
    source: LoadedModel
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = inline_stored(self.outcome.model)
        return self._model

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        protect = list(self.source.external_files)
        if self.source.path is not None:
            protect.append(self.source.path)
        return save_model(self.outcome.model, path, external_data=external_data, protect=protect)

    def close(self) -> None:
        """Delete the run's weight store (large models); ``model`` stays usable if read."""
        if self.outcome.store is not None:
            self.outcome.store.close()

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.report["steps"]


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    pipeline: str | Pipeline | os.PathLike,
    *,
    data: str | os.PathLike | Mapping | Sequence | None = None,
    budget: str | Budget | None = None,
    seed: int | None = None,
    on_fail: str | None = None,
    shapes: Mapping[str, Any] | Sequence[str] | None = None,
    calibration_samples: int | None = None,
    validation_samples: int | None = None,
    progress: bool = False,
    allow_suspect_data: bool = False,
) -> Result:
    """Run ``pipeline`` on ``model`` and return the checked result.

    ``pipeline`` is pipeline text (``"fold-batchnorm,cleanup"``), a :class:`Pipeline`,
    or the path of a ``.toml`` pipeline file whose settings (seed, budget, data...)
    apply unless given here. Raises :class:`~onnxopt.errors.OnnxoptError` subclasses
    for bad input and :class:`~onnxopt.errors.CheckFailed` when ``on_fail="abort"``
    and a step breaks its budget. Data whose reference outputs cannot be trusted (NaN,
    Inf everywhere, the same for every sample) is refused with a ``DataError`` unless
    ``allow_suspect_data``.
    """
    settings: dict[str, Any] = {}
    if isinstance(pipeline, Pipeline):
        parsed = pipeline
    elif isinstance(pipeline, os.PathLike) or str(pipeline).endswith(".toml"):
        parsed, settings = load_pipeline_file(str(pipeline))
    elif isinstance(pipeline, str):
        parsed = Pipeline.parse(pipeline)
    else:
        raise UsageError(
            f"pipeline must be text, a Pipeline or a .toml path, not {type(pipeline).__name__}"
        )

    def pick(value, key, default):
        return value if value is not None else settings.get(key, default)

    seed = pick(seed, "seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed!r}")
    budget = pick(budget, "budget", None)
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    loaded = load_model(model, lazy_over=spill_threshold())
    samples = prepare_samples(
        loaded.proto,
        pick(data, "data", None),
        shapes=pick(shapes, "shapes", None),
        seed=seed,
        calibration_samples=pick(calibration_samples, "calibration_samples", 64),
        validation_samples=pick(validation_samples, "validation_samples", 32),
    )
    manager = PassManager(
        parsed,
        budget=budget,
        on_fail=pick(on_fail, "on_fail", "rollback"),
        seed=seed,
        progress=Progress(enabled=progress),
        allow_suspect_data=allow_suspect_data,
    )
    outcome = manager.run(
        loaded.proto,
        samples.calibration,
        samples.validation,
        samples.source,
        base_dir=loaded.base_dir,
    )
    report = build_report(
        outcome,
        input=str(loaded.path) if loaded.path else None,
        seed=seed,
        validation_samples=len(samples.validation),
        calibration_samples=len(samples.calibration),
        inputs=[spec.describe() for spec in input_specs(loaded.proto)],
        budget=str(budget if budget is not None else LOSSY_BUDGET),
        data_notes=samples.notes,
    )
    return Result(report=report, outcome=outcome, source=loaded)
