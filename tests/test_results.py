"""One typed form for what a pass leaves alone: Skipped, PassResult.skip, skip_label."""

from __future__ import annotations

from conftest import model_path

import onnxopt
from onnxopt.report import format_table
from onnxopt.results import PassResult, Skipped, skip_label


def test_skip_records_and_counts_under_one_key():
    result = PassResult(False)
    entry = result.skip("fc1.bias", "tensor", "would not be smaller", "Gemm")
    assert entry == Skipped("fc1.bias", "tensor", "would not be smaller", "Gemm")
    assert result.counts == {"skipped": 1}
    assert skip_label(entry) == "tensor 'fc1.bias' (Gemm): would not be smaller"
    assert skip_label(entry.as_dict()) == skip_label(entry)
    assert skip_label(Skipped("group 3 (a, b)", "group", "graph output")) == (
        "group 'group 3 (a, b)': graph output"
    )
    built = PassResult(True, {"n": 2}, skipped=[Skipped("x", "node", "random", "RandomNormal")])
    merged = result.merge(built)
    assert [s.subject for s in merged.skipped] == ["fc1.bias", "x"]
    assert merged.counts == {"skipped": 2, "n": 2}


def test_every_pass_skips_in_the_same_shape_in_report_and_console():
    # three passes, three kinds of subject: the report's records and the console's
    # "why:" line read them the same way
    pipeline = "fold-constants,prune-initializers(sparsity=0.5),quantize-int8(latency=false)"
    result = onnxopt.optimize(
        str(model_path("digits_cnn")), pipeline, budget="none", seed=0, validation_samples=4,
        calibration_samples=8,
    )  # fmt: skip
    steps = {s["step"].split("(")[0]: s for s in result.report["steps"]}
    pruned = steps["prune-initializers"]["skipped"]
    assert {s["subject"] for s in pruned} == {"stem.0.weight", "depthwise.0.weight"}
    for step in steps.values():
        for record in step["skipped"]:
            assert set(record) == {"subject", "kind", "op", "reason"}
        assert step["counts"].get("skipped", 0) == len(step["skipped"])
    assert all(s["kind"] == "tensor" and s["op"] == "Conv" for s in pruned)


def test_a_no_op_step_shows_what_it_skipped():
    result = onnxopt.optimize(
        str(model_path("digits_mlp")), "prune-initializers(sparsity=0.5,min_size=100000)",
        budget="none", seed=0, validation_samples=4, calibration_samples=8,
    )  # fmt: skip
    (step,) = result.report["steps"]
    assert step["status"] == "no-op" and step["counts"]["skipped"] == 3
    text = format_table(result.report, wide=True)
    why = "why: tensor 'fc1.weight' (Gemm): 8192 elements < min_size=100000 (+2 more skipped)"
    assert why in text
