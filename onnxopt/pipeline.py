"""Passes, the pass registry, pipelines and the PassManager: the public names in one place.

Each job has a module of its own; this one re-exports their public names, so that a
pass or a caller writes ``from onnxopt.pipeline import Pass, PassContext, ...``:

- ``options.py``: ``option()``, ``make_options`` / ``coerce`` (text or TOML values to a
  pass's typed ``Options``), ``format_value`` (and back);
- ``registry.py``: the ``Pass`` base class (``requires``: declared prerequisites),
  ``register_pass``, ``registry``, ``get_pass``;
- ``results.py``: ``PassResult``, ``Skipped`` (what a pass returns);
- ``pipeline_text.py``: ``Pipeline`` / ``Step`` (pipeline text, printed back
  canonically) and ``load_pipeline_file`` (the TOML form);
- ``context.py``: ``PassContext`` (what a pass may use), ``matches_any``, ``node_filter``
  and ``check_op_types`` (the ``op_types=`` / ``exclude=`` options);
- ``manager.py``: ``PassManager`` (run, check, accept or roll back every step),
  ``RunOutcome``, ``StepRecord``, ``ModelStats``.
"""

from __future__ import annotations

from onnxopt.context import Evaluation, PassContext, check_op_types, matches_any, node_filter
from onnxopt.manager import (
    ModelStats,
    PassManager,
    RunOutcome,
    StepRecord,
    has_quantized_ops,
    needs_store,
    original_outputs,
)
from onnxopt.options import NoOptions, coerce, format_value, make_options, option, option_fields
from onnxopt.pipeline_text import Pipeline, Step, load_pipeline_file
from onnxopt.registry import (
    Pass,
    Requirement,
    default_opset,
    get_pass,
    register_pass,
    registry,
    unregister_pass,
)
from onnxopt.results import PassResult, Skipped

__all__ = [
    "Evaluation",
    "ModelStats",
    "NoOptions",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "Pipeline",
    "Requirement",
    "RunOutcome",
    "Skipped",
    "Step",
    "StepRecord",
    "check_op_types",
    "coerce",
    "default_opset",
    "format_value",
    "get_pass",
    "has_quantized_ops",
    "load_pipeline_file",
    "make_options",
    "matches_any",
    "needs_store",
    "node_filter",
    "option",
    "option_fields",
    "original_outputs",
    "register_pass",
    "registry",
    "unregister_pass",
]
