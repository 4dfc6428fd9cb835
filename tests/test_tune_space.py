"""onnxopt tune without running trials: the space, the front, the search loop's
determinism (with a stand-in engine), the CLI's input errors."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import onnx
import pytest
from conftest import model_path

from onnxopt.cli import main
from onnxopt.errors import UsageError
from onnxopt.tune import api
from onnxopt.tune.front import dominates, fidelity, pareto_front
from onnxopt.tune.space import (
    Alternative,
    Choice,
    Range,
    SearchSpace,
    Slot,
    default_space,
    load_space,
    pipelines_of,
    space_from_dict,
)

SMALL_SPACE = """
[search]
round = 4
tail = ["cleanup"]

[[slot]]
name = "weights"
choices = ["none", {pass = "share-weights", bits = {choices = [2, 4, 8], anchor = 4}}]
"""


def test_default_space_comes_from_the_model():
    space = default_space(onnx.load(model_path("digits_cnn")), distill=False)
    assert space.head == ["fold-batchnorm"] and space.tail == ["cleanup", "compact"]
    assert [s.name for s in space.slots] == ["structure", "sparsity", "weights"]
    weights = [a.label for a in space.slots[-1].alternatives]
    assert weights == ["none", "quantize-int8", "share-weights", "quantize-int4"]
    assert "quantize-int4: Conv, Gemm weights" in space.notes
    space.validate()
    mlp = default_space(onnx.load(model_path("digits_mlp")), distill=True)
    assert mlp.head == []  # no BatchNormalization
    assert [a.label for a in mlp.slots[-1].alternatives][-1] == "quantize-int4"  # Gemm model
    assert [s.name for s in mlp.slots] == ["structure", "distill", "sparsity", "weights"]


def test_weights_in_constant_nodes_count():
    from onnxopt.tune.space import model_facts

    lifted = model_facts(onnx.load(model_path("digits_mlp")))
    constants = model_facts(onnx.load(model_path("digits_mlp_op11_constants")))
    assert constants["weights_by_op"] == lifted["weights_by_op"] == {"Gemm": 17024}


def test_anchors_try_each_family_alone_and_distill_after_structure():
    from onnxopt import Pipeline

    space = default_space(onnx.load(model_path("digits_cnn")), distill=True)
    pipelines = [str(Pipeline.parse(p)) for p in pipelines_of(space.anchor_params(), space)]
    assert pipelines == [
        "fold-batchnorm,remove-neurons(ratio=0.1),cleanup,compact",
        'fold-batchnorm,remove-neurons(ratio=0.1,budget="none"),distill(epochs=5),cleanup,compact',
        "fold-batchnorm,prune-initializers(sparsity=0.5),cleanup,compact",
        "fold-batchnorm,quantize-int8(latency=false),cleanup,compact",
        "fold-batchnorm,share-weights(bits=4),cleanup,compact",
        "fold-batchnorm,quantize-int4,cleanup,compact",
    ]


def test_a_slot_that_requires_another_is_closed_when_that_one_picks_none():
    space = default_space(onnx.load(model_path("digits_cnn")), distill=True)
    (text,) = pipelines_of([{"structure": "none", "distill": "distill"}], space)
    assert "distill" not in text


def test_space_from_toml(tmp_path: Path):
    path = tmp_path / "space.toml"
    path.write_text(SMALL_SPACE)
    space = load_space(path)
    assert space.round_size == 4 and space.tail == ["cleanup"]
    assert space.size() == 4
    assert pipelines_of(space.anchor_params(), space) == ["share-weights(bits=4),cleanup"]
    assert space.as_dict()["slots"][0]["choices"][1] == {
        "pass": "share-weights",
        "bits": {"choices": [2, 4, 8]},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[searhc]\n", "unknown table"),
        ("[search]\nsampler = 'grid'\n", "sampler 'grid'; valid: tpe, nsga2"),
        ("[search]\nfidelity = 'psnr'\n", "fidelity 'psnr'"),
        ("[[slot]]\nname = 'w'\n", "needs name = ... and choices"),
        ("[[slot]]\nname='w'\nchoices=[{pass='share-weights', bits={low=2, high=9}}]", "bits"),
        ("[[slot]]\nname='w'\nchoices=[{pass='no-such-pass'}]", "slot 'w'"),
        ("[[slot]]\nname='w'\nrequires='x'\nchoices=['none']", "requires 'x'"),
        (
            "[[slot]]\nname='w'\nchoices=[{pass='prune-initializers', sparsity={low=1, high=0}}]",
            "low must be below high",
        ),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_space_files_name_what_is_wrong(tmp_path: Path, text: str, message: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_ranges_and_choices():
    assert Range(2, 8, 1).is_int and Range(2, 8, 1).anchor_value() == 5
    assert Range(0.3, 0.9, 0.05).anchor_value() == pytest.approx(0.6)
    assert Range(1e-4, 1e-2, log=True).anchor_value() == pytest.approx(1e-3)
    assert Choice(("a", "b")).anchor_value() == "a"
    space = SearchSpace([Slot("s", (Alternative("share-weights", {"bits": Range(2, 8, 1)}),))])
    assert space.size() == 7
    with pytest.raises(UsageError, match="used twice"):
        SearchSpace([Slot("s", (Alternative(None),)), Slot("s", (Alternative(None),))])
    with pytest.raises(UsageError, match="round must be"):
        space_from_dict({"search": {"round": 0}})


# ---------------------------------------------------------------------- the front


def _rec(trial, size, sqnr, status="ok", pipeline=None, latency=1.0):
    return {
        "trial": trial,
        "pipeline": pipeline or f"p{trial}",
        "status": status,
        "size_bytes": size,
        "latency_ratio": latency,
        "metrics": {"sqnr": sqnr} if sqnr is not None else {},
    }


def test_pareto_front_keeps_only_undominated_budget_meeting_trials():
    records = [
        _rec(0, 100, 30.0),
        _rec(1, 50, 20.0),
        _rec(2, 60, 15.0),  # dominated by 1
        _rec(3, 10, 50.0, status="over budget"),  # would dominate all, but failed
        _rec(4, 50, 20.0, pipeline="p1"),  # the same pipeline again
        _rec(5, 50, 20.0),  # the same objective vector as 1
        _rec(6, 200, None),  # unchanged model: fidelity inf
    ]
    front = pareto_front(records, "size", "sqnr")
    assert [r["trial"] for r in front] == [1, 0, 6]
    assert fidelity(records[6], "sqnr") == float("inf")
    assert fidelity(records[3], "sqnr") == 50.0
    both = pareto_front([*records[:3], _rec(7, 70, 10.0, latency=0.5)], "both", "sqnr")
    assert [r["trial"] for r in both] == [1, 7, 0]
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (2, 1))


# ------------------------------------------------- the search loop, with a stand-in


class FakeEngine:
    """Answers trials instantly from the pipeline text, in reverse order of submission
    (as if the last trial finished first)."""

    name, workers, shared_filesystem = "fake", 2, True

    def __init__(self):
        self.ran: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def ship(self, *args):
        return None

    def run(self, jobs, shipped, settings, output_dir):
        for job in reversed(list(jobs)):
            self.ran.append(job.pipeline)
            digest = zlib.crc32(job.pipeline.encode())
            ok = digest % 5 != 0
            if ok:
                model = onnx.load(model_path("digits_mlp"))
                onnx.save(model, Path(output_dir) / f"{job.key}.onnx")
            yield {
                "trial": job.number,
                "pipeline": job.pipeline,
                "key": job.key,
                "status": "ok" if ok else "over budget",
                "reason": "" if ok else "step 1 x failed: top1 0.5 (needs >=0.99)",
                "size_bytes": 69739 if ok else 1000,
                "metrics": {"sqnr": float(digest % 40)},
                "latency_ms": 0.01,
                "latency_ratio": 0.5 + (digest % 40) / 40,  # fidelity costs latency
                "worker": "fake",
            }

    def close(self, cancel=False):
        return None


def _fake_tune(tmp_path, monkeypatch, name, trials=10, seed=3, objective="size"):
    engine = FakeEngine()
    monkeypatch.setattr(api, "make_engine", lambda *a, **k: engine)
    space = default_space(onnx.load(model_path("digits_cnn")), distill=False)
    result = api.tune(
        model_path("digits_cnn"),
        tmp_path / name,
        trials=trials,
        seed=seed,
        space=space,
        objective=objective,
    )
    return result.outcomes[0].pareto, engine


@pytest.mark.parametrize("objective", ["latency", "both"])
def test_latency_objectives_reach_the_front_and_the_page(tmp_path, monkeypatch, objective):
    pareto, _ = _fake_tune(tmp_path, monkeypatch, "a", trials=6, objective=objective)
    assert pareto["objective"] == objective and len(pareto["points"]) > 1
    page = (tmp_path / "a" / "pareto.html").read_text()
    assert f"objective {objective}" in page
    assert page.count("<polyline") == (1 if objective == "latency" else 0)


def test_same_seed_same_trials_whatever_the_completion_order(tmp_path, monkeypatch):
    first, _engine = _fake_tune(tmp_path, monkeypatch, "a")
    second, _ = _fake_tune(tmp_path, monkeypatch, "b")
    pipelines = [t["pipeline"] for t in first["trials"]]
    assert pipelines == [t["pipeline"] for t in second["trials"]]
    assert len(set(pipelines)) == len(pipelines)  # a repeat is asked again, not run
    assert [t["trial"] for t in first["trials"]] == list(range(10))
    assert first["points"] == second["points"]
    other, _ = _fake_tune(tmp_path, monkeypatch, "c", seed=4)
    assert [t["pipeline"] for t in other["trials"]] != pipelines


def test_a_rerun_is_answered_by_the_cache(tmp_path, monkeypatch):
    first, engine = _fake_tune(tmp_path, monkeypatch, "a", trials=6)
    again, engine = _fake_tune(tmp_path, monkeypatch, "a", trials=8)
    assert [t["pipeline"] for t in again["trials"][:6]] == [t["pipeline"] for t in first["trials"]]
    assert all(t["cached"] for t in again["trials"][:6])
    assert len(engine.ran) <= 2  # only the two new trials ran
    assert again["trials_run"] == len(engine.ran)


# ------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.onnx"], "model missing.onnx does not exist"),
        (["MODEL", "--workers", "0"], "--workers must be >= 1"),
        (["MODEL", "--ray-address", "x:1"], "--ray-address needs --engine ray"),
        (["MODEL", "--trials", "0"], "trials must be a positive integer"),
        (["MODEL", "--budget", "top1>>1"], "budget"),
        (["MODEL", "--data", "nope.npz"], "data nope.npz does not exist"),
        (["MODEL", "--space", "nope.toml"], "--space nope.toml"),
        (["MODEL", "--data", "a=b", "--data", "c"], "NAME=DATA per model"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    args = [str(model_path("digits_mlp")) if a == "MODEL" else a for a in args]
    code = main(["tune", *args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_ray_engine_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(
        ["tune", str(model_path("digits_mlp")), "--engine", "ray", "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "onnxopt[ray]" in err


def test_pareto_json_written_by_the_fake_search_is_complete(tmp_path, monkeypatch):
    pareto, _ = _fake_tune(tmp_path, monkeypatch, "a", trials=6)
    on_disk = json.loads((tmp_path / "a" / "pareto.json").read_text())
    assert on_disk["points"] == pareto["points"]
    for key in ("engine", "budget", "points", "trials", "objective", "original"):
        assert key in on_disk
    for point in on_disk["points"]:
        assert (tmp_path / "a" / point["model"]).stat().st_size == point["size_bytes"]
        assert set(point) >= {"pipeline", "model", "size_bytes", "latency_ms", "metrics"}
        assert set(point) >= {"worker", "trial"}
    assert {t["status"] for t in on_disk["trials"]} <= {"ok", "over budget", "error"}
