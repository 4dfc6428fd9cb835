"""Hardening (issue 8): fuzzed models, determinism, nothing written on error.

- A fast seeded fuzz run (``tools/fuzz.py``: mutated sample / tiny / backend models
  through ``inspect``, ``compare``, every pass on the CLI and the API) may only end in
  a valid checked model, a one-line error (exit 2 / ``OnnxoptError``) or a failed check
  (exit 1 / ``CheckFailed``). Crashes of the core bugs it found (``fuzz.KNOWN_BUGS``)
  are tolerated until their fix lands; each has an ``xfail(strict=True)`` regression
  test below that flips to XPASS (and fails) once fixed, so its entry can be removed.
- ``-m slow``: the same over 5,000 cases.
- Determinism: every pass on every sample model, in two processes with different hash
  seeds, writes byte-identical files.
- No output file, report or temporary folder is left behind by a run that fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, model_path
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.cli import main

sys.path.insert(0, str(ROOT / "tools"))
import fuzz
import fuzz_seeds

FAST_CASES = 500
SLOW_CASES = 5000


# ---------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fast_run() -> fuzz.Summary:
    return fuzz.run_fuzz(FAST_CASES, seed=0, workers=2, timeout=60.0)


def test_fast_fuzz_run_tries_every_command_and_pass(fast_run):
    assert len(fast_run.outcomes) == FAST_CASES
    counts = fast_run.counts()
    assert counts[fuzz.OK] > 0 and counts[fuzz.CLEAR_ERROR] > 0
    # every case was built, and the error kinds are real messages, not fuzzer failures
    assert not [o for o in fast_run.outcomes if o.kind == "fuzzer error"]


def test_fast_fuzz_run_has_no_new_crash(fast_run):
    """Every crash is one of the reported core bugs (fuzz.KNOWN_BUGS)."""
    new = fast_run.new_crashes
    assert not new, fast_run.format()


def test_fast_fuzz_run_has_no_crash_at_all(fast_run):
    assert not fast_run.crashes, fast_run.format()


@pytest.mark.slow
def test_slow_fuzz_run_5000_cases_has_no_new_crash():
    summary = fuzz.run_fuzz(SLOW_CASES, seed=1, workers=2, timeout=120.0)
    print(summary.format())
    assert len(summary.outcomes) == SLOW_CASES
    assert not summary.new_crashes, summary.format()


def test_cases_are_reproducible_from_seed_and_index(tmp_path):
    passes = fuzz.load_passes()
    first = fuzz.build_case(3, 17, tmp_path / "a", passes)
    second = fuzz.build_case(3, 17, tmp_path / "b", passes)
    assert first.mutations == second.mutations and first.pipeline == second.pipeline
    assert (tmp_path / "a/m/mutant.onnx").read_bytes() == (
        tmp_path / "b/m/mutant.onnx"
    ).read_bytes()


def test_every_fuzzed_pass_is_registered_and_has_valid_variants():
    from onnxopt.pipeline import Pipeline

    passes = fuzz.load_passes()
    assert {"cleanup", "prune-initializers", "share-weights", "remove-neurons"} <= set(passes)
    for name in passes:
        for text in fuzz.pipelines_for(name):
            assert Pipeline.parse(text).steps[0].name == name


@pytest.mark.parametrize(
    ("rc", "stderr", "expected"),
    [
        (2, "onnxopt: error: m.onnx: not a readable ONNX model (x)\n", fuzz.CLEAR_ERROR),
        (2, "onnxopt: error: one\nonnxopt: error: two\n", fuzz.CRASH),
        (3, "onnxopt: internal error: KeyError: 0 (run with -v for the traceback)\n", fuzz.CRASH),
        (2, "Traceback (most recent call last):\nonnxopt: error: x\n", fuzz.CRASH),
        (1, "onnxopt: check failed: step 1 x failed: y\n", fuzz.CHECK_FAILED),
    ],
)
def test_classifier(tmp_path, rc, stderr, expected):
    (tmp_path / "out").mkdir()
    case = fuzz.Case(0, "seed", [], "inspect")
    assert fuzz.classify_cli(case, tmp_path, rc, stderr)[0] == expected


def test_classifier_flags_an_output_left_after_an_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "out.onnx").write_bytes(b"partial")
    case = fuzz.Case(0, "seed", [], "optimize", "cleanup")
    outcome, _, detail = fuzz.classify_cli(case, tmp_path, 2, "onnxopt: error: bad\n")
    assert outcome == fuzz.CRASH and "out.onnx" in detail


# ---------------------------------------------------------------------------- determinism


def test_every_pass_is_byte_deterministic_across_processes(tmp_path):
    runs = []
    for hash_seed in ("1", "4242"):
        folder = tmp_path / f"hash{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        runs.append(
            (
                folder,
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "tools" / "fuzz.py"),
                        "--determinism-out",
                        str(folder),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    for _, process in runs:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    (first, _), (second, _) = runs
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    models = [n for n in names if n.endswith(".onnx")]
    pipelines = fuzz.determinism_pipelines()
    assert len(models) == len(pipelines) * len(list(MODELS.glob("*.onnx")))
    differ = [n for n in names if (first / n).read_bytes() != (second / n).read_bytes()]
    assert not differ, f"not byte-identical across processes: {differ}"
    # the lossy passes really changed the models (budget none keeps their results)
    statuses = "".join((first / n).read_text() for n in names if n.endswith(".txt"))
    assert statuses.count("accepted") >= 20


# ---------------------------------------------------------------------------- no output on error


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _vi(name, dims, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def _save(model: onnx.ModelProto, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def _matmul_model(weight: TensorProto | None = None, opset: int = 17, **graph_kw):
    inits = [weight] if weight is not None else []
    if weight is None and "sparse_initializer" not in graph_kw:
        inits = [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [_vi("x", [1, 4])],
        [_vi("y", [1, 3])],
        inits,
        **graph_kw,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _error_inputs(tmp_path: Path) -> dict[str, list[str]]:
    """name -> optimize arguments (before -o) that must fail."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    truncated = inputs / "truncated.onnx"
    truncated.write_bytes(model_path("digits_cnn").read_bytes()[:5000])
    escaping = _matmul_model()
    tensor = escaping.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    cnn = str(model_path("digits_cnn"))
    return {
        "missing model": [str(inputs / "nope.onnx"), "--passes", "cleanup"],
        "truncated model": [str(truncated), "--passes", "cleanup"],
        "external data escaping": [_save(escaping, inputs / "esc.onnx"), "--passes", "cleanup"],
        "unknown pass": [cnn, "--passes", "no-such-pass"],
        "option out of range": [cnn, "--passes", "prune-initializers(sparsity=2)"],
        "bad data file": [cnn, "--passes", "cleanup", "--data", str(truncated)],
        "abort over budget": [
            cnn,
            "--passes",
            "prune-initializers(sparsity=0.99,reconstruct=false)",
            "--on-fail",
            "abort",
            "--data",
            str(MODELS / "digits_test.npz"),
        ],
        "onnxruntime cannot load it": [
            _save(_matmul_model(opset=99), inputs / "op99.onnx"),
            "--passes",
            "cleanup",
        ],
    }


def test_no_output_file_report_or_temp_folder_on_error(tmp_path, capsys):
    for name, args in _error_inputs(tmp_path).items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        code = main(
            [
                "optimize",
                args[0],
                "-o",
                str(out / "o.onnx"),
                *args[1:],
                "--report",
                str(out / "r.json"),
                "--val-samples",
                "4",
                "--calib-samples",
                "8",
            ]
        )
        capsys.readouterr()
        assert code != 0, name
        leftovers = [p for p in _listing(out) if p != "r.json"]
        assert leftovers == [], f"{name}: left {leftovers}"


def test_api_error_leaves_nothing_and_raises_documented_types(tmp_path):
    for name, args in _error_inputs(tmp_path).items():
        if name == "onnxruntime cannot load it":
            continue  # core bug B1, see test_b1_model_onnxruntime_cannot_load
        pipeline = args[args.index("--passes") + 1]
        data = args[args.index("--data") + 1] if "--data" in args else None
        on_fail = "abort" if "--on-fail" in args else None
        before = _listing(tmp_path)
        with pytest.raises(onnxopt.OnnxoptError):
            onnxopt.optimize(args[0], pipeline, data=data, on_fail=on_fail).save(
                tmp_path / "o.onnx"
            )
        assert _listing(tmp_path) == before, name


# ---------------------------------------------------------------------------- core bugs found
#
# Each test states the expected behaviour; they fail today (xfail strict) and flip
# when the lead fixes the bug. The fuzz signature of each is fuzz.KNOWN_BUGS[id].


def _expect_clear_error(argv: list[str], capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), err


def _optimize_argv(model: str, tmp_path: Path) -> list[str]:
    return [
        "optimize",
        model,
        "-o",
        str(tmp_path / "out.onnx"),
        "--passes",
        "cleanup",
        "--val-samples",
        "4",
        "--calib-samples",
        "4",
    ]


def test_b1_model_onnxruntime_cannot_load(tmp_path, capsys):
    model = _save(_matmul_model(opset=99), tmp_path / "op99.onnx")
    _expect_clear_error(_optimize_argv(model, tmp_path), capsys)
    with pytest.raises(onnxopt.ModelError, match="onnxruntime"):
        onnxopt.optimize(model, "cleanup", validation_samples=2, calibration_samples=2)


def _expand_model() -> onnx.ModelProto:
    """Loads in onnxruntime; fails at run time on most generated ``shape`` values."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")],
        "g",
        [_vi("x", [3, 4]), _vi("shape", [2], TensorProto.INT64)],
        [_vi("y", None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_b2_original_fails_on_the_samples(tmp_path, capsys):
    model = _save(_expand_model(), tmp_path / "expand.onnx")
    _expect_clear_error(_optimize_argv(model, tmp_path), capsys)


def test_b3_compare_model_fails_on_the_samples(tmp_path, capsys):
    model = _save(_expand_model(), tmp_path / "expand.onnx")
    _expect_clear_error(["compare", model, model, "--samples", "4"], capsys)


def test_b3_compare_candidate_with_an_extra_input(tmp_path, capsys):
    reference = _save(_matmul_model(), tmp_path / "ref.onnx")
    candidate = _matmul_model()
    del candidate.graph.initializer[:]
    candidate.graph.input.append(_vi("W", [4, 3]))
    candidate = _save(candidate, tmp_path / "cand.onnx")
    _expect_clear_error(["compare", reference, candidate, "--samples", "4"], capsys)


def test_b4_initializer_data_shorter_than_dims(tmp_path, capsys):
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    weight.raw_data = weight.raw_data[:20]
    model = _save(_matmul_model(weight), tmp_path / "short.onnx")
    _expect_clear_error(["inspect", model], capsys)


def test_b5_sparse_initializer_index_out_of_range(tmp_path, capsys):
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0], np.float32), "W"),
        numpy_helper.from_array(np.array([1000], np.int64), "W_indices"),
        [4, 3],
    )
    model = _save(_matmul_model(sparse_initializer=[sparse]), tmp_path / "sparse.onnx")
    _expect_clear_error(["inspect", model], capsys)


def test_b4b_declared_size_larger_than_data_gives_no_broken_output(tmp_path, capsys):
    lie = numpy_helper.from_array(np.ones((16, 16), np.float32), "unused")
    del lie.dims[:]
    lie.dims.extend([2**40, 16])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
        [lie],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = _save(model, tmp_path / "lie.onnx")
    argv = _optimize_argv(path, tmp_path)
    argv[argv.index("cleanup")] = "fold-batchnorm"  # a no-op: the input model is saved
    code = main(argv)
    err = capsys.readouterr().err
    if code == 0:
        onnxopt.load_model(tmp_path / "out.onnx")  # the output must be loadable
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_b6_enormous_input_is_refused_before_allocating(tmp_path, capsys):
    # 2**40 elements: numpy refuses at once, so this cannot take the machine down
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [_vi("x", [1, 2**40])],
        [_vi("y", [1, 2**40])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "huge.onnx")
    _expect_clear_error(_optimize_argv(path, tmp_path), capsys)


def test_b7_input_with_undefined_element_type(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [_vi("x", [1, 4], 0)], [_vi("y", [1, 4])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "untyped.onnx")
    _expect_clear_error(_optimize_argv(path, tmp_path), capsys)


def _loop_with_default_input() -> onnx.ModelProto:
    """Valid model: input ``b`` has a default (initializer) and is read only inside the
    Loop body (outer scope)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Add", ["v", "b"], ["v_out"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("c", [], TensorProto.BOOL), _vi("v", [1, 4])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("v_out", [1, 4])],
    )
    inits = [
        numpy_helper.from_array(np.array(2, np.int64), "n"),
        numpy_helper.from_array(np.array(True), "t"),
        numpy_helper.from_array(np.full(4, 0.5, np.float32), "b"),
    ]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body, name="loop")],
        "g",
        [_vi("x", [1, 4]), _vi("b", [4])],
        [_vi("y", [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_b8_input_with_default_used_only_in_a_subgraph(tmp_path, capsys):
    path = _save(_loop_with_default_input(), tmp_path / "loop.onnx")
    assert main(["inspect", path]) == 0
    assert main(_optimize_argv(path, tmp_path)) == 0
    capsys.readouterr()
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)


def test_b9_initializer_with_undefined_data_type(tmp_path, capsys):
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    weight.data_type = 0
    path = _save(_matmul_model(weight), tmp_path / "undefined.onnx")
    _expect_clear_error(["inspect", path], capsys)


def test_b10_closed_stdout_is_not_an_internal_error():
    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE, deterministically
    try:
        process = subprocess.run(
            [sys.executable, "-m", "onnxopt", "passes"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "internal error" not in process.stderr, process.stderr


def test_b11_calibrating_pass_on_unsorted_nodes(tmp_path):
    model = onnx.load(str(model_path("digits_mlp")))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    result = onnxopt.optimize(
        model, "prune-initializers(sparsity=0.5)", data=str(MODELS / "digits_test.npz")
    )
    assert result.steps[0]["status"] == "accepted", result.steps[0]["reason"]


# ---------------------------------------------------------------------------- subgraphs


def _subgraph_bodies(model: onnx.ModelProto) -> list[bytes]:
    return [
        attr.g.SerializeToString()
        for node in model.graph.node
        for attr in node.attribute
        if attr.HasField("g")
    ]


@pytest.mark.parametrize("seed_model", ["if", "loop", "scan"])
def test_no_pass_corrupts_if_loop_scan_bodies(seed_model):
    """Every pass either keeps the bodies byte-identical or its result still computes
    the original on 64 fresh samples (which take both branches of the If)."""
    from conftest import run, seeded_feeds

    from onnxopt.check import LOSSLESS_BUDGET, Budget, compare_outputs

    model = fuzz_seeds.TINY_SEEDS[seed_model]()
    feeds = seeded_feeds(model, count=64, seed=11)
    expected = run(model, feeds)
    for name in fuzz.load_passes():
        pipeline = fuzz.pipelines_for(name)[0]
        result = onnxopt.optimize(model, pipeline, seed=0)
        step = result.steps[0]
        assert not step["reason"].startswith("pass raised"), f"{pipeline}: {step['reason']}"
        if _subgraph_bodies(result.model) == _subgraph_bodies(model):
            continue
        budget = LOSSLESS_BUDGET if step["lossless"] else Budget.parse("cosine>=0.99")
        metrics = compare_outputs(expected, run(result.model, feeds), budget.tolerance)
        violations = budget.violations(metrics)
        assert not violations, f"{pipeline} changed a {seed_model} body: {violations}"


def _if_sharing_an_outer_weight() -> onnx.ModelProto:
    """Both If branches read the main graph's 64x64 weight ``W`` (outer scope)."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W"
    )
    branches = [
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], [f"{b}_out"], name=f"{b}_mm")],
            f"{b}_body",
            [],
            [_vi(f"{b}_out", [1, 64])],
        )
        for b in ("then", "else")
    ]
    head = numpy_helper.from_array(
        np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32), "head"
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node(
            "If", ["cond"], ["h"], then_branch=branches[0], else_branch=branches[1], name="if"
        ),
        helper.make_node("MatMul", ["h", "head"], ["y"], name="head_mm"),
    ]
    inits = [weight, head, numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 64])], [_vi("y", [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _initializer_names(graph: onnx.GraphProto) -> list[str]:
    names = [t.name for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                names += _initializer_names(attr.g)
    return names


def test_b12_outer_scope_weight_stays_in_the_main_graph():
    model = _if_sharing_an_outer_weight()
    result = onnxopt.optimize(
        model, "prune-initializers(sparsity=0.5,reconstruct=false)", budget="none"
    )
    assert result.steps[0]["status"] == "accepted"
    assert _initializer_names(result.model.graph).count("W") == 1
    assert "W" in [t.name for t in result.model.graph.initializer]


def test_p1_prune_refit_with_an_input_that_has_a_default():
    model = fuzz_seeds.TINY_SEEDS["tiny-mlp"]()
    model.graph.input.append(_vi("W1", [4, 16]))
    result = onnxopt.optimize(model, "prune-initializers(sparsity=0.5,min_size=16)", seed=0)
    assert not result.steps[0]["reason"].startswith("pass raised"), result.steps[0]["reason"]
