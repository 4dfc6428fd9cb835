"""Robustness on the real topologies the onnx wheel ships with reference outputs.

Every model under ``onnx/backend/test/data/{light,simple,pytorch-converted,
pytorch-operator}`` either goes through the lossless pipeline with outputs matching
the stored reference outputs, or is skipped with a stated reason (onnxruntime cannot
run the original even after onnx's version converter brings it to opset 13, or the
original itself does not match its reference). Zero crashes:
onnxopt may only fail with its own documented error types, and no lossless step may
be rolled back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import version_converter

import onnxopt
from onnxopt.data import input_specs, load_reference_outputs, load_samples
from onnxopt.runtime import make_session, run_samples

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("light", "simple", "pytorch-converted", "pytorch-operator")
PIPELINE = "cleanup,fold-constants,fold-batchnorm,dedupe-initializers"
RTOL, ATOL = 1e-3, 1e-5  # the onnx backend tests' own tolerance is rtol=1e-3


def _cases() -> list[tuple[str, Path]]:
    cases = []
    for suite in SUITES:
        folder = DATA / suite
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if suite == "light" and entry.suffix == ".onnx":
                cases.append((f"{suite}/{entry.stem}", entry))
            elif entry.is_dir() and (entry / "model.onnx").exists():
                cases.append((f"{suite}/{entry.name}", entry / "model.onnx"))
    return cases


CASES = _cases()


def _light_feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The input the onnx test runner used for the light models' stored outputs."""
    feed = {}
    for spec in input_specs(model):
        shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        n = int(np.prod(shape))
        feed[spec.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feed


def _load_case(path: Path) -> tuple[onnx.ModelProto, list[dict], list[list[np.ndarray]]]:
    model = onnx.load(str(path))
    if path.name != "model.onnx":
        refs = [load_reference_outputs_light(path)]
        return model, [_light_feed(model)], refs
    sets = sorted(p for p in path.parent.iterdir() if p.name.startswith("test_data_set"))
    feeds = [load_samples(s, input_specs(model))[0] for s in sets]
    refs = [load_reference_outputs(s) for s in sets]
    return model, feeds, refs


def load_reference_outputs_light(path: Path) -> list[np.ndarray]:
    arrays = []
    index = 0
    while (candidate := path.with_name(f"{path.stem}_output_{index}.pb")).exists():
        tensor = onnx.TensorProto()
        tensor.ParseFromString(candidate.read_bytes())
        arrays.append(onnx.numpy_helper.to_array(tensor))
        index += 1
    return arrays


def _matches(outputs: list[dict], refs: list[list[np.ndarray]]) -> str | None:
    for got, expected in zip(outputs, refs):
        values = list(got.values())
        if len(values) != len(expected):
            return f"{len(values)} outputs, reference has {len(expected)}"
        for i, (a, b) in enumerate(zip(values, expected)):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                return f"output {i}: shape {a.shape} != reference {b.shape}"
            if a.dtype.kind in "fc":
                if not np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
                    return f"output {i}: max abs diff {np.max(np.abs(a - b)):.3g}"
            elif not np.array_equal(a, b):
                return f"output {i}: values differ"
    return None


@pytest.mark.parametrize(("name", "path"), CASES, ids=[c[0] for c in CASES])
def test_lossless_pipeline_keeps_reference_outputs(name, path, tmp_path):
    try:
        model, feeds, refs = _load_case(path)
    except onnxopt.OnnxoptError as exc:
        pytest.skip(f"data not usable: {exc}")
    try:
        original = run_samples(make_session(model), feeds)
    except Exception:
        # onnxruntime dropped kernels of very old opsets (e.g. Add-6, BatchNormalization-6):
        # test the model as onnx's own version converter brings it to opset 13.
        try:
            model = version_converter.convert_version(model, 13)
            original = run_samples(make_session(model), feeds)
        except Exception as exc:
            pytest.skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}")
    problem = _matches(original, refs)
    if problem:
        pytest.skip(f"onnxruntime's original output differs from the reference: {problem}")
    try:
        result = onnxopt.optimize(model, PIPELINE, data=feeds)
    except onnxopt.OnnxoptError as exc:
        pytest.skip(f"refused with a clear error: {exc}")
    rolled = [f"{s['step']}: {s['reason']}" for s in result.steps if s["status"] == "rolled back"]
    assert not rolled, f"{name}: lossless steps rolled back: {rolled}"
    saved = result.save(tmp_path / "out.onnx")
    final = run_samples(make_session(onnx.load(str(saved))), feeds)
    assert _matches(final, refs) is None, _matches(final, refs)


def test_the_suites_are_present():
    assert len(CASES) > 100, "expected the onnx wheel's backend test data"
    assert os.path.isdir(DATA / "light")
