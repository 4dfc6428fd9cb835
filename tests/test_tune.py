"""onnxopt tune with real trials on the local engine: outputs, proof, resume, Ctrl-C,
several models, the page in a browser. Small: the digits MLP, a 3-choice space."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, model_path
from headless_browser import ink, render

from onnxopt.check import Budget, compare_outputs
from onnxopt.cli import main
from onnxopt.data import prepare_samples
from onnxopt.runtime import make_session, run_samples
from onnxopt.tune import tune

SPACE = """
[search]
round = 4
tail = ["cleanup"]

[[slot]]
name = "weights"
choices = [
    "none",
    {pass = "share-weights", bits = {choices = [2, 4, 8], anchor = 4}},
    {pass = "quantize-int8", latency = false},
]
"""
DATA = MODELS / "digits_test.npz"
BUDGET = "top1>=0.99"
KW = dict(data=DATA, budget=BUDGET, trials=4, calibration_samples=32, validation_samples=32)


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.toml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, space_file):
    outdir = tmp_path_factory.mktemp("tune") / "out"
    result = tune(model_path("digits_mlp"), outdir, space=space_file, workers=2, **KW)
    return outdir, result.outcomes[0].pareto


def test_every_point_is_a_checked_model_within_budget(searched):
    outdir, pareto = searched
    assert pareto["engine"] == "local" and pareto["budget"] == BUDGET
    assert len(pareto["trials"]) == 4 and pareto["points"]
    original = onnx.load(model_path("digits_mlp"))
    validation = prepare_samples(original, DATA, seed=0, validation_samples=32).validation
    reference = run_samples(make_session(original), validation)
    for point in pareto["points"]:
        path = outdir / point["model"]
        assert path.stat().st_size == point["size_bytes"]
        candidate = run_samples(make_session(onnx.load(path)), validation)
        metrics = compare_outputs(reference, candidate)
        assert Budget.parse(BUDGET).violations(metrics) == []
        # no metrics: no step changed the numbers (e.g. only cleanup ran): exact outputs
        expected = float(point["metrics"].get("sqnr", "inf"))
        assert metrics["logits"].sqnr == pytest.approx(expected, rel=1e-6)
    sizes = [p["size_bytes"] for p in pareto["points"]]
    fids = [float(p["fidelity"]) for p in pareto["points"]]
    assert sizes == sorted(sizes) and fids == sorted(fids)  # a front: bigger = better
    assert min(sizes) < 0.5 * pareto["original"]["size_bytes"]


def test_trials_list_everything_and_flag_the_front(searched):
    outdir, pareto = searched
    pipelines = [t["pipeline"] for t in pareto["trials"]]
    assert pipelines[:2] == [
        "share-weights(bits=4),cleanup",
        "quantize-int8(latency=false),cleanup",
    ]
    on_front = {p["trial"] for p in pareto["points"]}
    assert {t["trial"] for t in pareto["trials"] if t["pareto"]} == on_front
    for trial in pareto["trials"]:
        assert trial["status"] in ("ok", "over budget", "error")
        if trial["status"] == "ok":
            assert trial["size_bytes"] > 0 and trial["latency_ms"] > 0
            assert trial["worker"].split(" pid ")[1].isdigit()
        else:
            assert trial["reason"]
    assert sorted(p.name for p in (outdir / "models").iterdir()) == sorted(
        Path(p["model"]).name for p in pareto["points"]
    )


def test_rerun_resumes_from_the_cache_and_changes_nothing(searched, space_file):
    outdir, pareto = searched
    again = tune(model_path("digits_mlp"), outdir, space=space_file, workers=1, **KW)
    second = again.outcomes[0].pareto
    assert second["trials_run"] == 0
    assert all(t["cached"] for t in second["trials"])
    assert [(p["pipeline"], p["size_bytes"]) for p in second["points"]] == [
        (p["pipeline"], p["size_bytes"]) for p in pareto["points"]
    ]


def test_page_shows_the_front_in_a_browser(searched, tmp_path):
    outdir, pareto = searched
    page = (outdir / "pareto.html").read_text()
    assert page.count('class="series primary"') == 3  # one per chart
    assert "<script" not in page
    for point in pareto["points"]:
        assert point["pipeline"] in page
    shot = render(outdir / "pareto.html", tmp_path / "pareto.png", height=1400)
    assert shot.console == []
    colours, covered = ink(shot.png)
    assert colours > 20 and covered > 0.02


def test_ctrl_c_keeps_finished_trials_and_no_partial_file(tmp_path, space_file):
    outdir = tmp_path / "out"
    seen = []

    def interrupt_after_two(event):
        seen.append(event.record["trial"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(
            model_path("digits_mlp"),
            outdir,
            space=space_file,
            workers=2,
            on_progress=interrupt_after_two,
            **KW,
        )
    records = list((outdir / "cache").glob("*.json"))
    assert len(records) >= 1
    leftovers = [p for p in outdir.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
    assert not (outdir / "pareto.json").exists()
    for record in records:  # each finished trial is whole
        assert json.loads(record.read_text())["status"] in ("ok", "over budget", "error")
    result = tune(model_path("digits_mlp"), outdir, space=space_file, workers=2, **KW)
    pareto = result.outcomes[0].pareto
    assert sum(t["cached"] for t in pareto["trials"]) >= len(records) - 1


def test_a_folder_of_models_gives_one_front_each_and_a_summary(tmp_path, space_file, capsys):
    folder = tmp_path / "fleet"
    folder.mkdir()
    shutil.copy(model_path("digits_mlp"), folder / "a.onnx")
    shutil.copy(model_path("digits_cnn"), folder / "b.onnx")
    outdir = tmp_path / "out"
    code = main(
        [
            "tune", str(folder), "--data", str(DATA), "--space", str(space_file),
            "--trials", "2", "--budget", BUDGET, "--workers", "2", "-o", str(outdir),
            "--calib-samples", "16",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr()
    summary = json.loads((outdir / "summary.json").read_text())
    assert [row["model"] for row in summary] == ["a", "b"]
    for row in summary:
        pareto = json.loads((outdir / row["folder"] / "pareto.json").read_text())
        assert len(pareto["trials"]) == 2 and row["points"] == len(pareto["points"])
        assert (outdir / row["folder"] / "pareto.html").is_file()
    assert "smallest" in out.out and "[  2/2]" in out.err
    assert np.isfinite(summary[0]["smallest_ratio"])
