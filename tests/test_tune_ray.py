"""The Ray engine for real: a local cluster with 2 CPUs runs the same small search as
the local pool; the points must be the same, and the trials must have run in at least
two Ray worker processes. Ray comes with the test extra (``onnxopt[ray]``)."""

from __future__ import annotations

import pytest
from conftest import model_path
from test_tune import KW, SPACE

from onnxopt.tune import tune

ray = pytest.importorskip("ray", reason="Ray is the optional extra onnxopt[ray]")


def _points(pareto):
    return [
        (p["pipeline"], p["size_bytes"], round(float(p["fidelity"]), 4)) for p in pareto["points"]
    ]


def test_ray_engine_matches_the_local_pool(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    local = tune(model_path("digits_mlp"), tmp_path / "local", space=space, workers=2, **KW)
    remote = tune(
        model_path("digits_mlp"), tmp_path / "ray", space=space, engine="ray", workers=2, **KW
    )
    lp, rp = local.outcomes[0].pareto, remote.outcomes[0].pareto
    assert rp["engine"] == "ray" and rp["workers"] == 2
    distinct = {t["pipeline"] for t in rp["trials"]}  # a pipeline asked twice runs once
    assert rp["trials_run"] == len(distinct)  # nothing came from the local engine's cache
    assert _points(rp) == _points(lp) and rp["points"]
    assert [t["pipeline"] for t in rp["trials"]] == [t["pipeline"] for t in lp["trials"]]
    workers = {t["worker"] for t in rp["trials"]}
    assert len(workers) >= 2, workers
    assert all(w.startswith("node ") for w in workers)
    for point in rp["points"]:  # the driver wrote the models the workers sent back
        assert (tmp_path / "ray" / point["model"]).stat().st_size == point["size_bytes"]
    assert not ray.is_initialized()  # the cluster it started is shut down
