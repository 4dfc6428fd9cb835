"""Shared test helpers: sample models, digits data, running models in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.runtime import make_session, run_samples

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def model_path(name: str) -> Path:
    return MODELS / f"{name}.onnx"


def digits(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / f"digits_{split}.npz") as data:
        return data["input"], data["label"]


def run(model: onnx.ModelProto | str | Path, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Outputs of ``model`` in onnxruntime (optimizations off), one dict per feed."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return run_samples(make_session(model), feeds)


def accuracy(model: onnx.ModelProto | str | Path, split: str = "test") -> float:
    images, labels = digits(split)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    session = make_session(model)
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def seeded_feeds(model: onnx.ModelProto, count: int = 4, seed: int = 0) -> list[dict]:
    from onnxopt.data import prepare_samples

    return prepare_samples(
        model, seed=seed, calibration_samples=0, validation_samples=count
    ).validation


@pytest.fixture
def cnn_path() -> Path:
    return model_path("digits_cnn")


def apply_pass(name: str, model: onnx.ModelProto, **options):
    """Run one pass directly on ``model``, as the PassManager would, minus the checks:
    what the pass ``requires`` (an opset) is applied first. Returns ``(model,
    PassResult)``."""
    from onnxopt.errors import PassCannotRun
    from onnxopt.graph import to_graph, to_model
    from onnxopt.pipeline import Pipeline, get_pass, make_options
    from onnxopt.registry import Requirement

    cls = get_pass(name)
    needs = cls(make_options(cls, options)).requires(model)
    for need in [needs] if isinstance(needs, Requirement) else needs or ():
        (step,) = Pipeline.parse(need.step).steps
        graph = to_graph(model)
        try:
            step.pass_cls(step.options).run(graph, _context(step.pass_cls, model))
            model = to_model(graph, model)
        except PassCannotRun:
            if not need.optional:
                raise
    graph = to_graph(model)
    result = run_pass_on_graph(name, graph, model, **options)
    return to_model(graph, model), result


def run_pass_on_graph(name: str, graph, model: onnx.ModelProto, **options):
    """Run one pass on an imported ``graph`` of ``model`` (no calibration data);
    returns its PassResult."""
    from onnxopt.pipeline import get_pass, make_options

    cls = get_pass(name)
    return cls(make_options(cls, options)).run(graph, _context(cls, model))


def _context(cls, model: onnx.ModelProto):
    from onnxopt.pipeline import PassContext

    return PassContext(
        calibration=[],
        rng=np.random.default_rng(0),
        seed=0,
        template=model,
        original=model,
        budget=cls.budget(),
    )
