"""onnxopt: make exported ONNX models smaller and faster, and prove with onnxruntime
that they still compute what the original did."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxopt import errors
from onnxopt.api import Result, optimize
from onnxopt.check import Budget, assert_equivalent
from onnxopt.checkout import map_checkout_passes
from onnxopt.errors import *  # noqa: F403  (the exception types, errors.__all__)
from onnxopt.model import load_model, save_model
from onnxopt.pipeline import Pass, PassContext, PassResult, Pipeline, register_pass

map_checkout_passes()  # onnxopt.passes = ../passes in a source checkout (see checkout.py)

__all__ = [
    "Budget",
    "Pass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "Result",
    "assert_equivalent",
    "load_model",
    "optimize",
    "register_pass",
    "save_model",
]
__all__ += errors.__all__
