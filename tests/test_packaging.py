"""Packaging: every sub-package ships, and passes/ installs only as onnxopt.passes."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {"onnxopt", "onnxopt.passes"}
    for init in (ROOT / "onnxopt").rglob("__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        found.add(".".join(parts))
    for init in (ROOT / "passes").rglob("__init__.py"):
        parts = init.parent.relative_to(ROOT / "passes").parts
        found.add(".".join(("onnxopt", "passes", *parts)))
    found = {name.rstrip(".") for name in found}
    assert found <= listed, f"not listed in pyproject packages: {sorted(found - listed)}"
    assert config["tool"]["setuptools"]["package-dir"] == {"onnxopt.passes": "passes"}
    assert "passes" not in listed
