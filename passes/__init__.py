"""Built-in passes, installed as ``onnxopt.passes``.

The registry is explicit: importing this package imports each pass module below, in
this order, and each module registers its passes with ``@register_pass``.
"""

from __future__ import annotations

# Import (= registration) order is explicit, not alphabetical.
# isort: off
from onnxopt.passes import cleanup  # noqa: F401
from onnxopt.passes import fold_constants  # noqa: F401
from onnxopt.passes import fold_batchnorm  # noqa: F401
from onnxopt.passes import dedupe_initializers  # noqa: F401
from onnxopt.passes import prune  # noqa: F401
from onnxopt.passes import codebook  # noqa: F401
from onnxopt.passes import compact  # noqa: F401
from onnxopt.passes import neurons  # noqa: F401
from onnxopt.passes import quantize  # noqa: F401
from onnxopt.passes import distill  # noqa: F401
# isort: on
