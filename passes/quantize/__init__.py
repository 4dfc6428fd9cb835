"""Quantization passes: ``quantize-int8``, ``quantize-int4`` and ``upgrade-opset``.

Modules: ``int8`` (the int8 pass), ``int4`` (blocked 4-bit weights), ``upgrade``
(opset conversion), ``qdq`` (the per-op placement table and the graph rewrite),
``calibrate`` (streaming statistics and range methods), ``gptq`` (data-aware weight
rounding), ``numerics`` (scales, zero points, packing), ``fallback`` (budget-driven
float fallback) and ``speed`` (latency report, onnxruntime's optimized graph,
profiler-driven ``speed=auto``). Importing this package registers the passes.
"""

from __future__ import annotations

from onnxopt.passes.quantize import (
    int4,  # noqa: F401
    int8,  # noqa: F401
    upgrade,  # noqa: F401
)
