"""Pruning and clipping weights: ``prune-initializers`` and ``clip-weights``.

- :mod:`.initializers` — the ``prune-initializers`` pass (its docstring is the spec);
- :mod:`.clip` — the ``clip-weights`` pass;
- :mod:`.weights` — which tensors are eligible, their ``[rows, fan_in]`` views;
- :mod:`.selection` — pure numpy: radix select, N:M, Wanda and block masks;
- :mod:`.hessian` — layer input rows (im2col...) and chunked ``XᵀX`` accumulation;
- :mod:`.sparsegpt` — the OBS sweep and the least-squares polish (pure numpy);
- :mod:`.refit` — plans, stages, one calibration run per stage, the refit of a layer;
- :mod:`.pruner` — applies a rule with a method (magnitude, Wanda, SparseGPT);
- :mod:`.auto` — ``sparsity=auto``;
- :mod:`.storage` — ``store=sparse``.
"""

from __future__ import annotations

from onnxopt.model import sparse_to_dense
from onnxopt.passes.prune.clip import ClipWeightsPass
from onnxopt.passes.prune.initializers import PruneInitializersPass

__all__ = ["ClipWeightsPass", "PruneInitializersPass", "sparse_to_dense"]
