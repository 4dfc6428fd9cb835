"""``onnxopt.passes`` in a source checkout.

The built-in passes live in the repository's top-level ``passes/`` folder, installed as
``onnxopt.passes`` (``[tool.setuptools.package-dir]`` in pyproject.toml). An installed
package has them inside it. Run from a checkout — an editable install, or a regular
install used from the repository root, where the checkout's ``onnxopt/`` shadows the
installed package — nothing maps ``passes/`` in: :func:`map_checkout_passes` (called
when ``onnxopt`` is imported) adds a finder for it, so both layouts import the same code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path


class CheckoutPasses(importlib.abc.MetaPathFinder):
    """Finds ``onnxopt.passes`` in a checkout's top-level ``passes/`` folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "onnxopt.passes":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def map_checkout_passes() -> bool:
    """Install the finder when ``onnxopt`` is imported from a checkout; True if it is."""
    package = Path(__file__).resolve().parent
    folder = package.parent / "passes"
    if (package / "passes").is_dir() or not (folder / "__init__.py").is_file():
        return False  # an installed package (passes/ inside it), or not a checkout
    if not any(isinstance(finder, CheckoutPasses) for finder in sys.meta_path):
        sys.meta_path.append(CheckoutPasses(folder))
    return True
