"""Sparse index streams: the indices of mostly-zero tensors as one byte per non-zero.

After 80 % pruning most indices of a weight are 0 (the zero centroid, numbered first by
use). Packed 4-bit indices then deflate to ~1.8 bits a weight; this form stores, for
every non-zero index, one byte ``gap << 4 | index``: ``gap`` (0..15) zero indices come
before it. A longer run of zeros is cut by escape bytes ``0xF0`` (15 zeros, then a 0
written at the next position: 16 positions). All the sparse tensors of one
``share-weights`` step form one stream, decoded by one chain the session folds at load::

    x = Cast<int32>(stream)      gap = Div(x, 16)      index = Mod(x, 16)
    position = CumSum(gap + 1) - 1
    flat = ScatterElements(Expand(0, [total]), position, index)
    part_i = Reshape(Split(flat)[i], shape_i)     (no Split for a single tensor)

Each part is then what ``Cast<int32>(indices)`` was (``passes/codebook/rewrite.py``).
Measured on PP-OCR cls after ``prune-initializers(sparsity=0.8)`` (123 K weights):
the 4-bit indices deflate to 27.4 KB packed, 23.0 KB as a bit mask + packed non-zeros,
21.6 KB as this stream (the byte's Huffman code sees gap and index together).

A tensor takes this form when its indices are below 16 and the stream is at most
``SPARSE_SHARE`` of its packed indices (about 75 % zeros and more); the graph needs
opset 11 (CumSum, ScatterElements). Output values are those of the packed form:
the same indices reach the same Gather.
"""

from __future__ import annotations

import numpy as np

SPARSE_SHARE = 0.5  # the stream at most this share of the packed indices' bytes
SPARSE_OPSET = 11  # CumSum, ScatterElements
ESCAPE = 0xF0  # 15 zeros, then a zero: 16 positions


def encode(flat: np.ndarray) -> np.ndarray:
    """The uint8 stream of ``flat`` indices (each < 16)."""
    flat = np.asarray(flat).reshape(-1)
    where = np.flatnonzero(flat)
    gaps = np.diff(where, prepend=-1) - 1
    escapes = gaps // 16
    counts = escapes + 1
    stream = np.full(int(counts.sum()), ESCAPE, np.uint8)
    last = np.cumsum(counts) - 1  # each non-zero's byte comes after its escapes
    stream[last] = ((gaps - 16 * escapes) << 4 | flat[where].astype(np.int64)).astype(np.uint8)
    return stream


def decode(stream: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` indices of ``stream`` (what the ONNX chain computes), uint8."""
    x = stream.astype(np.int64)
    position = np.cumsum(x // 16 + 1) - 1
    flat = np.zeros(size, np.uint8)
    flat[position] = x % 16
    return flat


def worth_it(indices: np.ndarray, index_bits: int, opset: int) -> bool:
    """Whether ``indices`` are stored smaller as a stream than packed at ``index_bits``."""
    if opset < SPARSE_OPSET or indices.size == 0 or int(indices.max()) > 15:
        return False
    return stream_bytes(indices) <= SPARSE_SHARE * (indices.size * index_bits + 7) // 8


def stream_bytes(indices: np.ndarray) -> int:
    """Bytes of ``indices``' stream (its share of a step's stream)."""
    where = np.flatnonzero(indices.reshape(-1))
    gaps = np.diff(where, prepend=-1) - 1
    return int(where.size + np.sum(gaps // 16))
