"""Sparse storage (``store=sparse``): pruned weights as ONNX ``sparse_initializer``.

Each eligible tensor that has zeros is written in COO form (values + linear int64
indices, in typed fields so that varint indices are small) when that is smaller than
the dense tensor. onnxruntime densifies sparse initializers when it loads a model, so
outputs are bit-identical to dense storage; it saves disk and download size only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from onnxopt.passes.prune.weights import read_values


def sparse_proto(name: str, values: np.ndarray) -> onnx.SparseTensorProto:
    """COO form with linear int64 indices, in typed fields (graphsurgeon's loader and
    onnxruntime read those; varint indices are also smaller than raw int64)."""
    flat = values.ravel()
    nonzero = np.flatnonzero(flat)
    data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    sparse_values = onnx.helper.make_tensor(name, data_type, [nonzero.size], flat[nonzero])
    indices = onnx.helper.make_tensor("", onnx.TensorProto.INT64, [nonzero.size], nonzero)
    return onnx.helper.make_sparse_tensor(sparse_values, indices, list(values.shape))


def dense_proto_bytes(name: str, values: np.ndarray) -> int:
    """``numpy_helper.from_array(values, name).ByteSize()`` without building it (the
    data is one ``raw_data`` field: tag, varint length, bytes)."""
    header = onnx.TensorProto(
        dims=values.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    )
    if name:
        header.name = name
    return header.ByteSize() + 1 + _varint_bytes(values.nbytes) + values.nbytes


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def try_store_sparse(tensor: gs.Constant) -> int:
    """Store ``tensor`` as a sparse initializer when smaller; return bytes saved."""
    if isinstance(tensor._values, SparseValues):
        return 0
    values = read_values(tensor)
    if np.count_nonzero(values) == values.size:
        return 0
    sparse = sparse_proto(tensor.name, values)
    saved = dense_proto_bytes(tensor.name, values) - sparse.ByteSize()
    if saved <= 0:
        return 0
    tensor.values = SparseValues(sparse)
    return saved
