"""``onnxopt tune``: search pipelines for the Pareto front of size, latency and
fidelity within a budget.

Search sits above the pass manager, never inside it: every trial is one ordinary
checked ``onnxopt.optimize`` run of a pipeline text, so every Pareto point carries the
same proof as a hand-written pipeline. Optuna proposes the pipelines (seeded,
multi-objective); an engine decides only *where* trials run (a local process pool, or
Ray tasks); a cache in the output folder makes a rerun resume.

Modules: ``space`` (what may be tried; the default derived from the model, or TOML),
``trial`` (one run, worker side), ``engines`` (local pool, Ray), ``cache``,
``search`` (Optuna rounds), ``front`` (objectives, Pareto front), ``api`` (``tune``:
inputs, outputs), ``page`` (pareto.html), ``cli`` (the subcommand). docs/tune.md
tells the whole story.
"""

from __future__ import annotations

from onnxopt.tune.api import ModelOutcome, TuneResult, tune
from onnxopt.tune.space import SearchSpace, default_space, load_space

__all__ = ["ModelOutcome", "SearchSpace", "TuneResult", "default_space", "load_space", "tune"]
