"""Packaging: every sub-package ships, and passes/ installs only as onnxopt.passes."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_checkout_maps_passes_without_an_editable_install():
    """A regular install used from the repository root: the checkout's ``onnxopt/``
    shadows the installed package, and no editable finder maps ``passes/`` in
    (``-S``: site-packages on the path, but none of its .pth hooks run)."""
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site_packages)}
    done = subprocess.run(
        [sys.executable, "-S", "-m", "onnxopt", "passes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "prune-initializers" in done.stdout and "quantize-int8" in done.stdout
    check = "import onnxopt.passes as p; print(p.__file__)"
    done = subprocess.run(
        [sys.executable, "-S", "-c", check], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert Path(done.stdout.strip()) == ROOT / "passes" / "__init__.py", done.stderr
