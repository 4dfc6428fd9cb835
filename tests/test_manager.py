"""PassManager: budgets, rollback, abort, fixed points, isolation of snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import model_path, run, seeded_feeds

import onnxopt
from onnxopt.check import assert_equivalent
from onnxopt.errors import CheckFailed
from onnxopt.pipeline import Pass, PassResult, option, register_pass, unregister_pass
from onnxopt.report import format_table
from onnxopt.report_html import render_report


def _gemm_weights(graph: gs.Graph) -> list[gs.Constant]:
    return [
        n.inputs[1] for n in graph.nodes if n.op == "Gemm" and isinstance(n.inputs[1], gs.Constant)
    ]


class NoisePass(Pass):
    """Test-only lossy pass: adds seeded relative noise to every Gemm weight."""

    name = "test-noise"
    summary = "add noise"

    @dataclass
    class Options:
        scale: float = option(0.01, "relative noise")

    def run(self, graph, ctx):
        for weight in _gemm_weights(graph):
            noise = ctx.rng.standard_normal(weight.values.shape).astype(np.float32)
            weight.values = (
                weight.values + self.options.scale * np.abs(weight.values).mean() * noise
            )
        return PassResult(changed=True, counts={"touched": len(_gemm_weights(graph))})


class WarningNoisePass(NoisePass):
    """NoisePass that also trips a NumPy floating-point warning, twice."""

    name = "test-warning-noise"

    def run(self, graph, ctx):
        for _ in range(2):
            np.array([1e30]).astype(np.float16)  # RuntimeWarning: overflow in cast
        return super().run(graph, ctx)


class InPlaceThenRaisePass(Pass):
    """Writes into weight arrays in place, then crashes: the rollback must undo it."""

    name = "test-inplace-raise"
    summary = "corrupt then raise"

    def run(self, graph, ctx):
        for weight in _gemm_weights(graph):
            weight.values[...] = 0.0
        raise RuntimeError("boom")


class InvalidGraphPass(Pass):
    name = "test-invalid"
    summary = "produce an op onnx does not know"

    def run(self, graph, ctx):
        graph.nodes[0].op = "NoSuchOp"
        return PassResult(changed=True)


class TinyLosslessDrift(Pass):
    """Claims to be lossless but perturbs weights by 1e-2: strict budget must catch it."""

    name = "test-drift"
    summary = "fake lossless"
    lossless = True

    def run(self, graph, ctx):
        for weight in _gemm_weights(graph):
            weight.values = weight.values + np.float32(1e-2)
        return PassResult(changed=True)


class CountdownPass(Pass):
    """Changes something on its first two runs only (a cleanup-like pass)."""

    name = "test-countdown"
    summary = "fixed point"
    lossless = True
    fixed_point = True

    def run(self, graph, ctx):
        budget = graph.__dict__.setdefault("_countdown", [2])
        if budget[0] == 0:
            return PassResult(changed=False)
        budget[0] -= 1
        return PassResult(changed=True, counts={"rounds": 1})


class NeedsDataPass(Pass):
    name = "test-needs-data"
    summary = "raises a usage error like a pass missing calibration data"

    def run(self, graph, ctx):
        raise onnxopt.UsageError("needs calibration samples; pass --data")


class NeedsOpset13Pass(Pass):
    name = "test-needs-opset13"
    summary = "declares opset 13, records the opset and the RNG draw it saw"
    lossless = True
    requires_opset = 13
    seen: ClassVar[list] = []

    def run(self, graph, ctx):
        self.seen.append((int(graph.opset), int(ctx.rng.integers(1 << 30))))
        return PassResult(changed=False)


TEST_PASSES = (
    NeedsOpset13Pass,
    NoisePass,
    InPlaceThenRaisePass,
    InvalidGraphPass,
    TinyLosslessDrift,
    CountdownPass,
    NeedsDataPass,
    WarningNoisePass,
)


@pytest.fixture(autouse=True)
def test_passes():
    for cls in TEST_PASSES:
        register_pass(cls)
    yield
    for cls in TEST_PASSES:
        unregister_pass(cls.name)


MLP = model_path("digits_mlp")


def test_small_noise_is_accepted_and_measured():
    result = onnxopt.optimize(MLP, "test-noise(scale=0.001)")
    step = result.steps[0]
    assert step["status"] == "accepted"
    assert step["compared_with"] == "original model"
    cosine = step["metrics_vs_original"]["logits"]["cosine"]
    assert 0.999 < cosine < 1.0
    assert step["counts"] == {"touched": 3}


def test_over_budget_step_is_rolled_back_and_run_continues():
    result = onnxopt.optimize(MLP, "test-noise(scale=3.0),test-noise(scale=0.001)")
    first, second = result.steps
    assert first["status"] == "rolled back"
    assert "cosine" in first["reason"] and "needs >=0.99" in first["reason"]
    assert second["status"] == "accepted"
    # the final model carries only the second (small) perturbation
    feeds = seeded_feeds(result.model, 8)
    assert_equivalent(run(MLP, feeds), run(result.model, feeds), "cosine>=0.999")


def test_global_budget_override_and_none():
    loose = onnxopt.optimize(MLP, "test-noise(scale=3.0)", budget="cosine>=0.1")
    assert loose.steps[0]["status"] == "accepted"
    ungated = onnxopt.optimize(MLP, "test-noise(scale=3.0)", budget="none")
    assert ungated.steps[0]["status"] == "accepted"
    assert ungated.steps[0]["metrics_vs_original"]["logits"]["cosine"] < 0.99


def test_per_step_budget_beats_global():
    result = onnxopt.optimize(MLP, 'test-noise(scale=3.0,budget="cosine>=0.9999")', budget="none")
    assert result.steps[0]["status"] == "rolled back"


def test_raising_pass_is_rolled_back_without_leaking_in_place_writes():
    result = onnxopt.optimize(MLP, "test-inplace-raise,test-noise(scale=0.0)")
    assert result.steps[0]["status"] == "rolled back"
    assert "pass raised RuntimeError: boom" in result.steps[0]["reason"]
    original = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(MLP)).graph.initializer
    }
    final = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, values in original.items():
        np.testing.assert_array_equal(final[name], values)


def test_structurally_invalid_result_is_rolled_back():
    result = onnxopt.optimize(MLP, "test-invalid")
    step = result.steps[0]
    assert step["status"] == "rolled back"
    assert "NoSuchOp" in step["reason"]


def test_lossless_pass_gets_the_strict_budget_even_with_global_none():
    result = onnxopt.optimize(MLP, "test-drift", budget="none")
    step = result.steps[0]
    assert step["status"] == "rolled back"
    assert "atol=1e-05" in step["reason"]
    assert step["compared_with"] == "previous step"


def test_lossless_step_after_lossy_step_compares_with_previous():
    result = onnxopt.optimize(MLP, "test-noise(scale=0.01),test-countdown", budget="none")
    noise, countdown = result.steps
    assert noise["status"] == "accepted"
    assert countdown["status"] == "accepted"
    assert countdown["metrics_vs_previous"]["logits"]["max_abs"] == 0
    assert countdown["metrics_vs_original"]["logits"]["max_abs"] > 0


def test_fixed_point_pass_reruns_until_no_change():
    result = onnxopt.optimize(MLP, "test-countdown")
    step = result.steps[0]
    assert step["iterations"] == 3  # changed, changed, unchanged
    assert step["counts"] == {"rounds": 2}


def test_abort_raises_with_outcome():
    with pytest.raises(CheckFailed) as info:
        onnxopt.optimize(MLP, "test-noise(scale=3.0),test-noise(scale=0.001)", on_fail="abort")
    outcome = info.value.outcome
    assert [s.status for s in outcome.steps] == ["rolled back"]
    assert outcome.aborted


def test_input_model_is_never_modified(tmp_path):
    before = MLP.read_bytes()
    result = onnxopt.optimize(MLP, "test-noise(scale=0.001)")
    result.save(tmp_path / "out.onnx")
    assert MLP.read_bytes() == before
    with pytest.raises(onnxopt.ModelError, match="refusing to overwrite"):
        result.save(MLP)


def test_same_seed_same_bytes():
    a = onnxopt.optimize(MLP, "test-noise(scale=0.01)", seed=3).model.SerializeToString()
    b = onnxopt.optimize(MLP, "test-noise(scale=0.01)", seed=3).model.SerializeToString()
    c = onnxopt.optimize(MLP, "test-noise(scale=0.01)", seed=4).model.SerializeToString()
    assert a == b
    assert a != c


def test_user_error_inside_a_pass_stops_the_run():
    with pytest.raises(onnxopt.UsageError, match="test-needs-data: needs calibration samples"):
        onnxopt.optimize(MLP, "test-noise(scale=0.001),test-needs-data")


class RenameThenBreak(Pass):
    """Renames the weights (graphsurgeon would rename the snapshot's protos in place on
    export) and produces an invalid graph, so the step is rolled back."""

    name = "test-rename-break"
    summary = "rename weights, then break the graph"

    def run(self, graph, ctx):
        for weight in _gemm_weights(graph):
            weight.name = weight.name + "_renamed"
        graph.nodes[0].op = "NoSuchOp"
        return PassResult(changed=True)


def test_rolled_back_rename_does_not_rename_the_snapshot():
    register_pass(RenameThenBreak)
    try:
        result = onnxopt.optimize(
            model_path("digits_mlp"),
            "test-rename-break,cleanup,prune-initializers(sparsity=0.5)",
            budget="none",
        )
    finally:
        unregister_pass("test-rename-break")
    assert [s["status"] for s in result.steps] == ["rolled back", "no-op", "accepted"]
    names = {t.name for t in result.model.graph.initializer}
    assert not any(n.endswith("_renamed") for n in names)
    assert {"fc1.weight", "fc2.weight"} <= names


SEEN: list = []


class EvaluatesBrokenGraph(Pass):
    """Measures a candidate onnxruntime cannot load, then keeps the graph unchanged."""

    name = "test-evaluate-broken"
    summary = "evaluate a broken candidate"

    def run(self, graph, ctx):
        broken = graph.copy()
        broken.nodes[0].op = "NoSuchOp"
        SEEN.append(ctx.evaluate(broken))
        return PassResult(changed=False)


def test_evaluating_a_candidate_onnxruntime_cannot_run_is_a_failed_evaluation():
    register_pass(EvaluatesBrokenGraph)
    try:
        result = onnxopt.optimize(model_path("digits_mlp"), "test-evaluate-broken")
    finally:
        unregister_pass("test-evaluate-broken")
    assert result.steps[0]["status"] == "no-op"
    (evaluation,) = SEEN
    assert not evaluation.ok and evaluation.metrics == {}
    assert evaluation.violations[0].startswith("onnxruntime cannot run the candidate")


def test_numpy_warnings_in_a_pass_become_notes_not_terminal_noise(recwarn):
    from onnxopt.report import format_table

    result = onnxopt.optimize(MLP, "test-warning-noise(scale=0.001)")
    step = result.steps[0]
    assert step["status"] == "accepted"
    [note] = [n for n in step["notes"] if n.startswith("numpy warning")]
    assert "overflow" in note and "2 times" in note and "test_manager.py" in note
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "note: numpy warning during the pass: overflow" in format_table(result.report)


def _deep_bn_model(layers: int = 16, ch: int = 16, seed: int = 0) -> onnx.ModelProto:
    """16 x (Conv 3x3 -> BatchNormalization -> Relu) -> Flatten -> MatMul -> x1.7 ->
    Softmax: deep enough that fp32 re-rounding (Conv+BN fusion) moves the softmax by
    ~3e-5, over the strict lossless budget (atol 1e-5 + rtol 1e-4)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((ch, ch, 3, 3)) * (1.5 / np.sqrt(ch * 9))
        stats = {
            "g": rng.uniform(0.5, 2, ch),
            "b": rng.standard_normal(ch) * 0.1,
            "m": rng.standard_normal(ch) * 0.1,
            "v": rng.uniform(0.5, 2.0, ch),
        }
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits += [
            numpy_helper.from_array(v.astype(np.float32), f"{k}{i}") for k, v in stats.items()
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization", [f"c{i}", *(f"{k}{i}" for k in "gbmv")], [f"n{i}"]
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    fc = rng.standard_normal((ch * 144, 10)) / 12
    inits += [
        numpy_helper.from_array(fc.astype(np.float32), "fc"),
        numpy_helper.from_array(np.array(1.7, np.float32), "s"),
    ]
    nodes += [
        helper.make_node("Flatten", [x], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["l"]),
        helper.make_node("Mul", ["l", "s"], ["ls"]),
        helper.make_node("Softmax", ["ls"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "deep-bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ch, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_lossless_step_within_onnxruntimes_own_rounding_is_accepted_with_a_note():
    from onnxopt.report import format_table

    model = _deep_bn_model()
    result = onnxopt.optimize(model, "fold-batchnorm")
    step = result.steps[0]
    assert step["status"] == "accepted", step["reason"]
    err = step["metrics_vs_previous"]["y"]["max_abs"]
    assert err > 1e-5  # over the strict budget (the strict run below is rolled back)
    [note] = [n for n in step["notes"] if n.startswith("lossless within float rounding")]
    assert "onnxruntime's own optimizations move the original's output by" in note
    assert "lossless within float rounding" in format_table(result.report)
    assert step["metrics_vs_previous"]["y"]["sqnr"] > 90
    # A budget the user sets is applied as given; a real error is not rounding.
    strict = onnxopt.optimize(model, 'fold-batchnorm(budget="atol=1e-5,rtol=1e-4")')
    assert strict.steps[0]["status"] == "rolled back"
    register_pass(MatMulDrift)
    try:
        drift = onnxopt.optimize(model, "test-matmul-drift")
    finally:
        unregister_pass(MatMulDrift.name)
    assert drift.steps[0]["status"] == "rolled back"
    assert "atol=1e-05" in drift.steps[0]["reason"]


class MatMulDrift(Pass):
    """Claims to be lossless, moves the MatMul weights by 1e-2 relative: far over the
    rounding of the deep model above."""

    name = "test-matmul-drift"
    summary = "fake lossless"
    lossless = True

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant):
                node.inputs[1].values = node.inputs[1].values * np.float32(1 + 1e-2)
        return PassResult(changed=True)


def test_declared_opset_runs_upgrade_as_a_checked_step_of_its_own():
    op11 = model_path("digits_mlp_op11_constants")
    NeedsOpset13Pass.seen.clear()
    result = onnxopt.optimize(op11, "test-needs-opset13", budget="none")
    (step,) = result.steps  # one row per pipeline step; the upgrade is recorded in it
    (upgrade,) = step["prerequisites"]
    assert (upgrade["step"], upgrade["status"]) == ("upgrade-opset", "accepted")
    assert upgrade["required_by"] == "test-needs-opset13" and upgrade["lossless"]
    assert upgrade["metrics_vs_previous"]  # checked like any lossless step
    assert (step["index"], step["status"], step["required_by"]) == (1, "no-op", "")
    assert {o.domain: o.version for o in result.model.opset_import}[""] == 13
    # the terminal and the HTML page read the same rows
    assert "upgrade-opset (for test-needs-opset13)" in format_table(result.report)
    assert "upgrade-opset (for test-needs-opset13)" in render_report(result.report)
    # the pass saw opset 13 and the RNG of its own step, as if nothing came before
    again = onnxopt.optimize(result.model, "test-needs-opset13", budget="none")
    assert again.steps[0]["prerequisites"] == []  # satisfied: nothing to run
    first, second = NeedsOpset13Pass.seen
    assert first == second and first[0] == 13


class EvaluatesThenMaybeEdits(NoisePass):
    """Adds noise, measures the result with ctx.evaluate, then (``edit``) adds more."""

    name = "test-evaluate-final"

    @dataclass
    class Options:
        scale: float = option(0.001, "relative noise")
        edit: bool = option(False, "change the graph after the evaluation")

    def run(self, graph, ctx):
        result = super().run(graph, ctx)
        SEEN.append(ctx.evaluate(graph))
        if self.options.edit:
            super().run(graph, ctx)
        return result


def test_the_check_reuses_the_pass_evaluation_of_the_same_model(monkeypatch):
    """A pass that returns the model it last evaluated is not run again in onnxruntime
    (same bytes, same samples, same session options): the metrics are the same."""
    from onnxopt import runtime

    builds = []
    real = runtime.make_session

    def counting(model, **kw):
        builds.append(kw.get("optimize", False))
        return real(model, **kw)

    monkeypatch.setattr(runtime, "make_session", counting)
    register_pass(EvaluatesThenMaybeEdits)
    try:
        same = onnxopt.optimize(MLP, "test-evaluate-final")
        plain_builds = len(builds)
        builds.clear()
        edited = onnxopt.optimize(MLP, "test-evaluate-final(edit=true)")
    finally:
        unregister_pass(EvaluatesThenMaybeEdits.name)
    # reference + the pass's evaluation; the check reused it (float result: no deployed run)
    assert plain_builds == 2
    assert len(builds) == 3  # the edited graph is a new model: checked in its own session
    step = same.steps[0]
    assert step["status"] == "accepted"
    assert SEEN[-2].metrics["logits"].cosine == step["metrics_vs_original"]["logits"]["cosine"]
    # the check measured the edited model (more noise), not the evaluated one
    edited_cosine = edited.steps[0]["metrics_vs_original"]["logits"]["cosine"]
    assert edited_cosine < SEEN[-1].metrics["logits"].cosine


def test_kept_outputs_own_their_memory_not_onnxruntimes_arena():
    # an output that points into onnxruntime's arena keeps the whole arena of its
    # session alive after the session is gone (PP-OCRv4 det at 640x640: 52 MB of
    # outputs held 134 MB); the outputs the manager keeps are copies
    from onnxopt import runtime

    model = onnx.load(model_path("digits_cnn"))
    session = runtime.make_session(model)
    feeds = seeded_feeds(model, 3)
    raw = session.run(None, feeds[0])
    assert raw[0].base is not None  # what onnxruntime returns: a view of its buffer
    kept = runtime.run_samples(session, feeds)
    for outputs in kept:
        for value in outputs.values():
            assert value.base is None and value.flags.owndata
    np.testing.assert_array_equal(next(iter(kept[0].values())), raw[0])


def test_a_step_that_reproduces_the_reference_bit_for_bit_holds_no_second_copy():
    from onnxopt.manager import _reuse_equal

    reference = [{"y": np.array([1.0, np.nan, 0.0], np.float32), "k": np.array([3])}]
    same = [{"y": reference[0]["y"].copy(), "k": np.array([3])}]
    signed_zero = [{"y": np.array([1.0, np.nan, -0.0], np.float32), "k": np.array([4])}]
    shared = _reuse_equal(reference, same)
    assert shared[0]["y"] is reference[0]["y"] and shared[0]["k"] is reference[0]["k"]
    kept = _reuse_equal(reference, signed_zero)  # equal as numbers, not as bits
    assert kept[0]["y"] is signed_zero[0]["y"] and kept[0]["k"] is signed_zero[0]["k"]
