"""What a person reads: data the checks can trust, the console table, `passes NAME`,
the HTML report (issue 18)."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
from conftest import MODELS, model_path
from headless_browser import ink, render

import onnxopt
from onnxopt.cli import main
from onnxopt.report import format_table

CNN = str(model_path("digits_cnn"))
MLP = str(model_path("digits_mlp"))
DATA = str(MODELS / "digits_test.npz")


def _digits(n: int, dtype=np.float32) -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return {"input": data["input"][:n].astype(dtype)}


# ---------------------------------------------------------------------------- data


def test_nonfinite_inputs_are_refused_naming_the_input(tmp_path, capsys):
    arrays = _digits(40)
    arrays["input"][3, 0, 0, :2] = np.nan
    arrays["input"][7, 0, 1, 0] = np.inf
    np.savez(tmp_path / "nan.npz", **arrays)
    out = tmp_path / "o.onnx"
    code = main(
        [
            "optimize",
            CNN,
            "-o",
            str(out),
            "--passes",
            "fold-batchnorm",
            "--data",
            str(tmp_path / "nan.npz"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "input 'input': 3 of 2,560 values are NaN or Inf (in 2 of 40 samples)" in err
    assert "Traceback" not in err
    # compare refuses the same data
    code = main(["compare", CNN, CNN, "--data", str(tmp_path / "nan.npz")])
    assert code == 2 and "NaN or Inf" in capsys.readouterr().err


def test_few_samples_warn_and_casts_are_one_line_notes(tmp_path, capsys, caplog):
    np.savez(tmp_path / "five.npz", **_digits(5, np.float64))
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    args = ["optimize", CNN, "-o", str(out), "--passes", "fold-batchnorm"]
    args += ["--data", str(tmp_path / "five.npz"), "--report", str(report)]
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("only 2 validation samples (the data has 5" in w for w in warnings)
    notes = [line for line in captured.out.splitlines() if line.startswith("note:")]
    assert notes == ["note: input 'input': float64 data cast to the model's float32"]
    data = json.loads(report.read_text())
    assert data["validation_samples"] == 2 and data["calibration_samples"] == 3
    assert [n["level"] for n in data["data_notes"]] == ["note", "warning"]


def test_degenerate_reference_is_refused_unless_allowed(tmp_path, capsys, caplog):
    # the same image 20 times: every output identical for every sample
    one = _digits(1)["input"]
    np.savez(tmp_path / "same.npz", input=np.repeat(one, 20, axis=0))
    out = tmp_path / "o.onnx"
    args = ["optimize", CNN, "-o", str(out), "--passes", "fold-batchnorm"]
    args += ["--data", str(tmp_path / "same.npz")]
    assert main(args) == 2 and not out.exists()
    assert "the same for all 10 validation samples" in capsys.readouterr().err
    assert main([*args, "--allow-suspect-data"]) == 0 and out.exists()
    with pytest.raises(onnxopt.DataError, match="cannot be trusted"):
        onnxopt.optimize(CNN, "fold-batchnorm", data=str(tmp_path / "same.npz"))


def test_reference_notes_about_inf_outputs():
    from onnxopt.check import suspect_reference

    ref = [{"y": np.array([[0.0, -np.inf]], np.float32)}, {"y": np.array([[1.0, 2.0]], np.float32)}]
    problems, notes = suspect_reference(ref)
    assert problems == [] and notes == [
        "output 'y': 1 of 4 values are Inf (compared only where both models are finite)"
    ]
    nan = [{"y": np.array([[np.nan, 1.0]], np.float32)}, {"y": np.array([[1.0, 2.0]], np.float32)}]
    assert suspect_reference(nan)[0] == ["output 'y': 1 of 4 values are NaN"]


# ---------------------------------------------------------------------------- console


def _run_cnn(tmp_path, *extra: str) -> int:
    out = tmp_path / "o.onnx"
    return main(
        ["optimize", CNN, "-o", str(out), "--passes", "fold-batchnorm", "--data", DATA, *extra]
    )


@pytest.mark.parametrize("position", ["before", "after"])
def test_quiet_works_before_or_after_the_subcommand(tmp_path, capsys, position):
    args = ["optimize", CNN, "-o", str(tmp_path / "o.onnx"), "--passes", "fold-batchnorm"]
    args = ["-q", *args] if position == "before" else [*args, "-q"]
    assert main([*args, "--data", DATA]) == 0
    assert capsys.readouterr().out == ""


def test_verbose_before_the_subcommand_shows_the_traceback(tmp_path):
    with pytest.raises(onnxopt.ModelError):
        main(
            [
                "-v",
                "optimize",
                str(tmp_path / "missing.onnx"),
                "-o",
                "x.onnx",
                "--passes",
                "cleanup",
            ]
        )


def test_header_names_samples_inputs_and_budget(tmp_path, capsys):
    assert _run_cnn(tmp_path) == 0
    head = capsys.readouterr().out.split("#  step")[0].replace("\n  ", " ")
    assert "validated on 32 samples (64 for calibration)" in head
    assert "input: float32 [batchx1x8x8]" in head
    assert "lossy budget cosine>=0.99,top1>=0.99,nonfinite<=0" in head


def _long_report(tmp_path) -> dict:
    result = onnxopt.optimize(
        CNN,
        "fold-batchnorm,prune-initializers(sparsity=0.9,scope=global),share-weights(bits=2)",
        data=DATA,
    )
    return result.report


@pytest.mark.parametrize("width", [72, 80, 100, 140])
def test_table_fits_the_terminal_and_wide_shows_everything(tmp_path, width):
    report = _long_report(tmp_path)
    lines = format_table(report, width=width).splitlines()
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    table = "\n".join(lines)
    assert "rolled back" in table and "why:" in table  # the reason sits under its row
    wide = format_table(report, width=width, wide=True)
    header = next(line for line in wide.splitlines() if line.startswith("#"))
    assert re.findall(r"\S+", header) == [
        "#",
        "step",
        "status",
        "time",
        "nodes",
        "size",
        "deflated",
        "params",
        "vs",
        "original",
    ]
    assert "prune-initializers(sparsity=0.9,scope=global)" in wide


def test_sizes_use_one_unit_system(tmp_path, capsys):
    assert _run_cnn(tmp_path) == 0
    table = capsys.readouterr().out
    assert "55.3 kB" in table and "KB" not in table and "KiB" not in table
    assert main(["inspect", CNN]) == 0
    assert "55.3 kB (55,325 bytes; 48.9 kB deflated)" in capsys.readouterr().out


def test_flag_errors_name_the_flag(capsys):
    assert (
        main_exit(["optimize", CNN, "-o", "x.onnx", "--passes", "cleanup", "--val-samples", "0"])
        == 2
    )
    assert "argument --val-samples: must be >= 1, not 0" in capsys.readouterr().err


def main_exit(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def test_compare_names_the_budget_and_sample_count(capsys):
    assert main(["compare", CNN, CNN, "--data", DATA, "--budget", "cosine>=0.999"]) == 0
    out = capsys.readouterr().out
    assert "32 samples" in out and "within budget cosine>=0.999" in out


def test_every_flag_has_help():
    from onnxopt.cli import build_parser

    def actions(parser):
        for action in parser._actions:
            yield parser.prog, action
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    yield from actions(action.choices[sub])

    missing = [
        f"{prog} {a.option_strings}"
        for prog, a in actions(build_parser())
        if a.option_strings and not a.help
    ]
    assert missing == []


# ---------------------------------------------------------------------------- passes NAME


@pytest.mark.parametrize(
    "name", ["quantize-int8", "prune-initializers", "share-weights", "cleanup"]
)
def test_pass_help_is_written_for_users(capsys, name):
    assert main(["passes", name]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and "Literal[" not in text and ".py" not in text
    assert "ctx." not in text and "PassManager" not in text
    assert "example:" in text and f'--passes "{name}' in text
    assert "checked against:" in text


def test_pass_help_writes_types_as_users_type_them(capsys):
    assert main(["passes", "quantize-int8"]) == 0
    text = capsys.readouterr().out
    assert "mse | minmax | percentile | entropy (default mse)" in text
    assert "true | false" in text


# ---------------------------------------------------------------------------- files


def test_reports_get_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        for name in ("r.json", "r.html"):
            assert _run_cnn(tmp_path, "--report", str(tmp_path / name)) == 0
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_api_overwrite_error_does_not_speak_cli():
    result = onnxopt.optimize(CNN, "cleanup", data=DATA)
    with pytest.raises(onnxopt.ModelError, match="choose another output path"):
        result.save(CNN)


def test_html_report_is_self_contained_and_renders(tmp_path):
    page = tmp_path / "r.html"
    pipeline = "fold-batchnorm,prune-initializers,remove-neurons(ratio=0.3),share-weights(bits=2)"
    result = onnxopt.optimize(CNN, pipeline, data=DATA, budget="cosine>=0.95")
    from onnxopt.report import write_report

    write_report(result.report, page)
    text = page.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    assert text.count("<svg") >= 5  # fidelity x2, top-1, sizes, per-layer sparsity...
    for step in result.steps:
        assert step["step"] in text
    assert "sparsity per weight" in text and "channels per group" in text
    shot = render(page, tmp_path / "r.png", width=1200, height=1800)
    assert shot.console == []
    colours, covered = ink(shot.png)
    assert colours > 20 and covered > 0.03
