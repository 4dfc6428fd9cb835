"""The onnxopt command: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MODELS, model_path
from test_manager import NoisePass

from onnxopt.cli import main
from onnxopt.pipeline import register_pass, unregister_pass

CNN = str(model_path("digits_cnn"))
DATA = str(MODELS / "digits_test.npz")


@pytest.fixture
def noise_pass():
    register_pass(NoisePass)
    yield
    unregister_pass(NoisePass.name)


def test_optimize_writes_model_and_report(tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            CNN,
            "-o",
            str(out),
            "--passes",
            "cleanup",
            "--data",
            DATA,
            "--report",
            str(report),
        ]
    )
    assert code == 0
    assert out.exists()
    data = json.loads(report.read_text())
    assert data["pipeline"] == "cleanup"
    assert data["steps"][0]["status"] in ("accepted", "no-op")
    assert data["output"] == str(out.resolve())
    text = capsys.readouterr().out
    assert "original -> final" in text and "wrote" in text


def test_abort_exits_1_and_writes_no_model(tmp_path, capsys, noise_pass):
    out = tmp_path / "o.onnx"
    mlp = str(model_path("digits_mlp"))
    code = main(
        ["optimize", mlp, "-o", str(out), "--passes", "test-noise(scale=3)", "--on-fail", "abort"]
    )
    assert code == 1
    assert not out.exists()
    captured = capsys.readouterr()
    assert "check failed: step 1 test-noise(scale=3) failed" in captured.err
    assert "rolled back" in captured.out
    assert list(tmp_path.iterdir()) == []


def test_rollback_is_reported_and_exit_0(tmp_path, capsys, noise_pass):
    out = tmp_path / "o.onnx"
    mlp = str(model_path("digits_mlp"))
    assert main(["optimize", mlp, "-o", str(out), "--passes", "test-noise(scale=3)"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("1 "))
    assert "rolled back" in row
    assert "why: logits: cosine" in text.split(row, 1)[1].splitlines()[1]


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optimize", "missing.onnx", "--passes", "cleanup"], "model file not found"),
        (["optimize", "{bad}", "--passes", "cleanup"], "not"),
        (["optimize", "{trunc}", "--passes", "cleanup"], "not"),
        (["optimize", CNN, "--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["optimize", CNN, "--passes", "cleanup(level=3)"], "unknown option 'level'"),
        (["optimize", CNN, "--passes", "cleanup", "--budget", "cosine>>1"], "budget term"),
        (["optimize", CNN, "--passes", "cleanup", "--data", "nope.npz"], "data not found"),
        (["optimize", CNN, "--passes", "cleanup", "--pipeline", "p.toml"], "not allowed with"),
        (["optimize", "{escape}", "--passes", "cleanup"], "contains '..'"),
        (["compare", CNN, "missing.onnx"], "model file not found"),
        (["bench", CNN, "--threads", "x"], "--threads"),
        (["passes", "nope"], "unknown pass"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weights = tmp_path / "w.bin"
    weights.write_bytes(np.ones(16, np.float32).tobytes())
    escaping = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["w"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16])],
            [numpy_helper.from_array(np.ones(16, np.float32), "w")],
        )
    )
    tensor = escaping.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../w.bin")
    (tmp_path / "sub").mkdir()
    paths = {
        "{bad}": _write(tmp_path, "bad.onnx", b"not a model at all"),
        "{trunc}": _write(tmp_path, "t.onnx", model_path("digits_cnn").read_bytes()[:5000]),
        "{escape}": _write(tmp_path / "sub", "e.onnx", escaping.SerializeToString()),
    }
    out = tmp_path / "out.onnx"
    args = [paths.get(a, a) for a in args]
    if args[0] == "optimize":
        args += ["-o", str(out)]
    with pytest.raises(SystemExit) if "not allowed with" in message else _nullcontext() as ctx:
        code = main(args)
    if ctx is not None and hasattr(ctx, "value"):
        code = ctx.value.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_subprocess_entry_points(tmp_path):
    for command in (["onnxopt"], [sys.executable, "-m", "onnxopt"]):
        done = subprocess.run([*command, "passes"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "cleanup" in done.stdout
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    done = subprocess.run(
        ["onnxopt", "inspect", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_inspect_compare_bench(tmp_path, capsys):
    assert main(["inspect", CNN, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["BatchNormalization"] == 5
    assert info["params"] == 12778 and info["opsets"] == {"ai.onnx": 17}
    assert main(["compare", CNN, CNN, "--data", DATA, "--budget", "atol=0,rtol=0"]) == 0
    assert "within budget" in capsys.readouterr().out
    mlp = str(model_path("digits_mlp"))
    assert main(["compare", CNN, mlp, "--data", DATA, "--budget", "cosine>=0.9999"]) == 1
    assert "FAILED budget" in capsys.readouterr().out
    assert main(["bench", CNN, mlp, "--rounds", "3", "--runs", "2", "--json"]) == 0
    timings = json.loads(capsys.readouterr().out)
    assert [t["label"] for t in timings] == ["digits_cnn.onnx", "digits_mlp.onnx"]
    assert timings[0]["ratio"] == 1.0 and timings[1]["median_ms"] > 0


def test_killed_optimize_run_leaves_no_partial_output(tmp_path):
    """SIGKILL at several points of a whole run: the output is absent or complete."""
    import signal
    import time

    import onnx

    out = tmp_path / "o.onnx"
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        out.unlink(missing_ok=True)
        process = subprocess.Popen(
            [
                "onnxopt",
                "optimize",
                CNN,
                "-o",
                str(out),
                "--passes",
                "fold-batchnorm,cleanup,dedupe-initializers",
                "--data",
                DATA,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():
            onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "o.onnx"]
    assert all(name.startswith(".onnxopt-") for name in leftovers)
