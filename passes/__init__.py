"""Built-in passes, installed as ``onnxopt.passes``.

The registry is explicit: importing this package imports each pass module below, in
this order, and each module registers its passes with ``@register_pass``.
"""

from __future__ import annotations

from onnxopt.passes import cleanup  # noqa: F401
