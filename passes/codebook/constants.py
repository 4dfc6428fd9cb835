"""Small constants of ``share-weights`` (``scope=all``): biases, normalization
parameters, elementwise operands and weights too small for a codebook of their own.

- ``pool_bits=0`` (default): stored as one float16 tensor, cast back and split
  (``try_half``): half the bytes at ~66 dB SQNR, where float16 holds a constant
  faithfully (finite, in range, >= ``HALF_MIN_SQNR_DB``); others stay as they are.
  Biases of BatchNorm-folded Convs carry whole channels' shifts: pooled into one 8-bit
  codebook of mixed scales (13-20 dB for some) they were the largest single error on
  PP-OCR rec (one 64-value bias: 1-cos 0.80 on the logits).
- ``pool_bits=2..8``: one shared codebook of ``2^pool_bits`` values for all of them
  (``try_pool``), the former default, smaller on tiny models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.passes.codebook.kmeans import encode
from onnxopt.passes.codebook.measure import sqnr, stats
from onnxopt.passes.codebook.rewrite import Rewriter, split_bytes
from onnxopt.passes.codebook.selection import Candidate
from onnxopt.results import Skip

HALF_MIN_SQNR_DB = 60.0  # float16 storage only where it is this faithful (float16: ~66 dB)
HALF_MAX = 65504.0


def try_pool(
    rewriter: Rewriter, opts: Any, members: list[Candidate], index_bits: int, skipped: list
) -> dict[str, Any]:
    """One codebook for the small constants ``members`` (same dtype)."""
    finite = []
    for member in members:
        if np.all(np.isfinite(member.tensor.values)):
            finite.append(member)
        else:
            skipped.append(member.skip("has NaN or Inf values"))
    if not finite:
        raise Skip("no finite values")
    parts = [m.tensor.values for m in finite]
    flat = np.concatenate([p.reshape(-1) for p in parts])
    k = 2**opts.pool_bits
    # One tensor like any other: weighting the members by their norms (so each one's
    # relative error counts the same) was measured and lost accuracy on the CNN.
    encoded = encode(flat, k, None, init=opts.init, max_iter=opts.max_iter)
    shared = encoded.reconstruct()
    pieces = np.split(shared, np.cumsum([p.size for p in parts])[:-1])
    bits = 4 if index_bits == 4 and opts.pool_bits <= 4 else 8
    names: dict[str, str] = {}
    if opts.materialize:
        if encoded.exact_rows:
            raise Skip(f"the pooled constants already have at most {k} distinct values")
        for member, piece in zip(finite, pieces):
            member.tensor.values = piece.reshape(member.tensor.shape)
        bytes_after = flat.nbytes
    else:
        bytes_after = encoded.stored_bytes(bits) + split_bytes(finite)
        if bytes_after >= flat.nbytes:
            raise Skip(
                f"pooled indices + codebook ({bytes_after} bytes) would not be smaller "
                f"than the {len(finite)} small constants ({flat.nbytes} bytes); a lower "
                "pool_bits shrinks the codebook"
            )
        stem = rewriter.stem()
        _, indices, codebook, head = rewriter.gather_chain(stem, encoded, bits)
        rewriter.rewire_pool(stem, finite, head)
        names = {"indices": indices.name, "codebook": codebook.name}
    record = stats(flat, shared, encoded)
    record.update(
        tensor=f"pool of {len(finite)} constants",
        pool=[m.tensor.name for m in finite],
        member_sqnr_db={
            m.tensor.name: round(sqnr(p.reshape(-1), piece), 2)
            for m, p, piece in zip(finite, parts, pieces)
        },
        shape=[int(flat.size)],
        consumers=sorted({node.name or node.op for m in finite for node, _ in m.uses}),
        bits=opts.pool_bits,
        granularity="pool",
        axis=None,
        index_bits=bits if not opts.materialize else None,
        bytes_before=int(flat.nbytes),
        bytes_after=int(bytes_after),
        **names,
    )
    return record


def try_half(
    rewriter: Rewriter, opts: Any, members: list[Candidate], skipped: list
) -> dict[str, Any] | None:
    """Store the small constants ``members`` (same dtype) as one float16 tensor, cast
    back and split: half the bytes at ~66 dB. A member float16 would not hold
    faithfully (out of range, or under ``HALF_MIN_SQNR_DB``) stays as it is (None:
    none is left, each skip already recorded)."""
    kept, halves, held = [], [], {}
    for member in members:
        values = member.tensor.values
        reason = _half_problem(values)
        if not reason and opts.materialize and _in_half(values):
            reason = "already holds float16 values"
        if reason:
            skipped.append(member.skip(reason))
            continue
        half = values.astype(np.float16)
        kept.append(member)
        halves.append(half.reshape(-1))
        held[member.tensor.name] = round(sqnr(values, half.astype(values.dtype)), 2)
    if not kept:
        return None
    before = sum(m.tensor.values.nbytes for m in kept)
    flat = np.concatenate(halves)
    after = flat.nbytes + split_bytes(kept)
    if after >= before:
        raise Skip(f"float16 + split ({after} bytes) would not be smaller ({before} bytes)")
    if opts.materialize:
        for member, half in zip(kept, halves):
            values = member.tensor.values
            member.tensor.values = half.astype(values.dtype).reshape(values.shape)
        after = before
    else:
        stem = rewriter.stem()
        stored = gs.Constant(rewriter.fresh(f"{stem}.h"), flat)
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(kept[0].tensor.dtype))
        cast = gs.Node("Cast", rewriter.fresh(f"{stem}.cast"), {"to": int(to)}, [stored])
        rewriter.rewire_pool(stem, kept, [cast])
    return {
        "tensor": f"{len(kept)} constants in float16",
        "pool": [m.tensor.name for m in kept],
        "member_sqnr_db": held,
        "shape": [int(flat.size)],
        "consumers": sorted({node.name or node.op for m in kept for node, _ in m.uses}),
        "bits": 16,
        "granularity": "float16",
        "axis": None,
        "index_bits": None,
        "bytes_before": int(before),
        "bytes_after": int(after),
        "zeros": int(sum(np.count_nonzero(h == 0) for h in halves)),
        "zeros_kept": True,  # float16 holds 0 exactly
        "kmeans_seconds": 0.0,
    }


def by_dtype(members: list[Candidate]) -> list[list[Candidate]]:
    groups: dict[np.dtype, list[Candidate]] = {}
    for member in members:
        groups.setdefault(np.dtype(member.tensor.dtype), []).append(member)
    return list(groups.values())


def _half_problem(values: np.ndarray) -> str:
    """Why float16 would not hold ``values`` faithfully ('' when it does)."""
    if values.dtype == np.float16:
        return "already float16"
    if not np.all(np.isfinite(values)):
        return "has NaN or Inf values"
    if values.size and float(np.max(np.abs(values))) > HALF_MAX:
        return "values beyond float16's range"
    held = sqnr(values, values.astype(np.float16).astype(values.dtype))
    if held < HALF_MIN_SQNR_DB:
        return f"float16 would hold it at {held:.1f} dB SQNR (< {HALF_MIN_SQNR_DB:g})"
    return ""


def _in_half(values: np.ndarray) -> bool:
    return bool(np.array_equal(values.astype(np.float16).astype(values.dtype), values))
