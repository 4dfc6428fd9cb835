"""Pipeline text, options, registry, TOML files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from onnxopt.errors import UsageError
from onnxopt.pipeline import (
    Pass,
    PassResult,
    Pipeline,
    load_pipeline_file,
    option,
    register_pass,
    registry,
    unregister_pass,
)


class DemoPass(Pass):
    name = "demo-options"
    summary = "test-only pass with every option type"

    @dataclass
    class Options:
        ratio: float = option(0.5, "a fraction", range=(0.0, 0.99))
        mode: Literal["l1", "l2"] = option("l1", "norm")
        sparsity: float | Literal["auto"] = option(0.5, "number or auto", range=(0.0, 0.99))
        count: int = option(3, "an int")
        flag: bool = option(False, "a bool")
        exclude: list[str] = option((), "globs")
        label: str = option("", "free text")
        limit: float | None = option(None, "optional number")

        def validate(self) -> None:
            if self.count < 0:
                raise ValueError("count must be >= 0")

    def run(self, graph, ctx):
        return PassResult(changed=False)


@pytest.fixture(autouse=True)
def demo_pass():
    register_pass(DemoPass)
    yield
    unregister_pass(DemoPass.name)


def test_parse_and_print_canonical():
    text = "demo-options(ratio=0.25,mode=l2,exclude=[conv*,fc],flag=true),cleanup"
    pipeline = Pipeline.parse(text)
    assert [s.name for s in pipeline.steps] == ["demo-options", "cleanup"]
    options = pipeline.steps[0].options
    assert options.ratio == 0.25 and options.mode == "l2" and options.flag is True
    assert options.exclude == ["conv*", "fc"]
    canonical = str(pipeline)
    assert canonical == "demo-options(ratio=0.25,mode=l2,flag=true,exclude=[conv*,fc]),cleanup"
    assert str(Pipeline.parse(canonical)) == canonical  # round trip


def test_defaults_are_omitted_and_spaces_tolerated():
    pipeline = Pipeline.parse(" demo-options( ratio = 0.5 , count=3 ) , cleanup ")
    assert str(pipeline) == "demo-options,cleanup"


def test_union_with_literal_and_quoted_strings():
    step = Pipeline.parse('demo-options(sparsity=auto,label="a, b (c)")').steps[0]
    assert step.options.sparsity == "auto"
    assert step.options.label == "a, b (c)"
    assert str(step) == 'demo-options(sparsity=auto,label="a, b (c)")'
    assert Pipeline.parse(str(step)).steps[0].options.label == "a, b (c)"


def test_optional_number():
    assert Pipeline.parse("demo-options(limit=0.5)").steps[0].options.limit == 0.5
    assert Pipeline.parse("demo-options(limit=none)").steps[0].options.limit is None
    assert str(Pipeline.parse("demo-options(limit=none)")) == "demo-options"
    with pytest.raises(UsageError, match="expected a number; or expected none"):
        Pipeline.parse("demo-options(limit=x)")


def test_per_step_budget_in_text():
    step = Pipeline.parse('demo-options(budget="cosine>=0.98,top1>=0.9")').steps[0]
    assert str(step.budget) == "cosine>=0.98,top1>=0.9"
    assert str(step) == 'demo-options(budget="cosine>=0.98,top1>=0.9")'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "unknown pass 'nope'"),
        ("demo-options(bogus=1)", "unknown option 'bogus'; valid options: ratio, mode"),
        ("demo-options(ratio=2)", "out of range [0.0, 0.99]"),
        ("demo-options(ratio=abc)", "expected a number"),
        ("demo-options(mode=l3)", "expected one of l1, l2"),
        ("demo-options(sparsity=most)", "expected a number; or expected one of auto"),
        ("demo-options(flag=maybe)", "expected true or false"),
        ("demo-options(count=-1)", "count must be >= 0"),
        ("demo-options(count=1.5)", "expected an integer"),
        ("demo-options(ratio=0.1,ratio=0.2)", "given twice"),
        ("demo-options(ratio=)", "missing value"),
        ("demo-options(ratio=0.1", "unexpected end"),
        ("", "empty pipeline"),
        ('demo-options(budget="cosine<=0.9")', "cosine needs '>='"),
    ],
)
def test_errors_name_the_problem(text, message):
    with pytest.raises(UsageError, match=None) as info:
        Pipeline.parse(text)
    assert message in str(info.value)


def test_registry_rejects_duplicates_and_bad_names():
    class Other(Pass):
        name = "demo-options"

    with pytest.raises(ValueError, match="duplicate pass name"):
        register_pass(Other)

    class BadName(Pass):
        name = "Bad_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(BadName)
    assert "cleanup" in registry()


def test_toml_pipeline_file(tmp_path):
    (tmp_path / "data.npz").write_bytes(b"")
    file = tmp_path / "p.toml"
    file.write_text(
        """
seed = 7
budget = "cosine>=0.95"
on_fail = "abort"

[data]
path = "data.npz"
validation_samples = 8
shapes = { input = "1x1x8x8" }

[[step]]
pass = "cleanup"

[[step]]
pass = "demo-options"
ratio = 0.3
exclude = ["a*", "b"]
budget = "cosine>=0.9"
"""
    )
    pipeline, settings = load_pipeline_file(str(file))
    assert str(pipeline) == 'cleanup,demo-options(ratio=0.3,exclude=[a*,b],budget="cosine>=0.9")'
    assert settings["seed"] == 7 and settings["on_fail"] == "abort"
    assert settings["budget"] == "cosine>=0.95"
    assert settings["data"] == str(tmp_path / "data.npz")
    assert settings["validation_samples"] == 8
    assert settings["shapes"] == {"input": "1x1x8x8"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[step]]\npass = 'nope'", "step 1: unknown pass 'nope'"),
        ("[[step]]\nratio = 1", "step 1 has no pass"),
        ("seed = 1", "no [[step]] tables"),
        ("sed = 1\n[[step]]\npass='cleanup'", "unknown key(s) sed"),
        ("[[step]\npass='cleanup'", "not valid TOML"),
        ("[[step]]\npass = 'demo-options'\nratio = 5.0", "out of range"),
    ],
)
def test_toml_errors(tmp_path, body, message):
    file = tmp_path / "p.toml"
    file.write_text(body)
    with pytest.raises(UsageError) as info:
        load_pipeline_file(str(file))
    assert message in str(info.value)
