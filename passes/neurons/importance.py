"""Group importance and the choice of channels to remove.

Importance of a class (channels removed together) sums, over every weight that
disappears with it — all coupled producers' output channels, depthwise filters, all
consumers' input slices, BatchNormalization scales ``gamma / sqrt(var + eps)`` —
the per-layer magnitude (``l1``: sum |w|, ``l2``: sqrt(sum w^2)) divided by that
layer's mean, like torch-pruning's group importance with mean normalization.
Biases do not count.

Selection, per group, with ``min_channels`` kept and kept counts rounded up to a
multiple of ``round_to`` where the group's size allows:

- ``select_ratio``: remove ``floor(ratio * size)`` lowest-importance classes;
- ``select_target_macs``: one global threshold on importance normalized by the
  group's mean, the smallest that brings the estimated MACs to the target fraction;
- ``select_candidates``: remove given classes (dead channels), lowest first.

Groups with buckets (grouped Conv) remove the same number from every bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxopt.passes.neurons.groups import ChannelGraph, Group


@dataclass
class Limits:
    min_channels: int = 1
    round_to: int = 1


def class_scores(cg: ChannelGraph, norm: str) -> dict[int, np.ndarray]:
    """Importance per class of every unblocked group: ``{group index: scores}``.

    Each contribution (one layer's output rows, input columns, a BatchNormalization
    scale...) is reduced per atom (``l1``: sum |w|; ``l2``: sqrt(sum w^2)) and divided by
    its mean, so every coupled layer has the same say whatever its size; a class
    scores the sum over its atoms."""
    open_groups = np.array([not g.blocked for g in cg.groups], dtype=bool)
    atom_scores = np.zeros(len(cg.atom_group), dtype=np.float64)
    for contribution in cg.contributions:
        atoms = contribution.atoms
        if not len(atoms) or not open_groups[cg.atom_group[atoms]].any():
            continue
        unique, inverse = np.unique(atoms, return_inverse=True)
        per_atom = np.bincount(inverse.ravel(), weights=contribution.magnitudes(norm))
        if norm == "l2":
            per_atom = np.sqrt(per_atom)
        mean = per_atom.mean()
        atom_scores[unique] += per_atom / mean if mean > 0 else per_atom
    scores = {}
    for group in cg.groups:
        if group.blocked or group.size == 0:
            continue
        atoms = np.flatnonzero(cg.atom_group == group.index)
        scores[group.index] = np.bincount(
            cg.atom_class[atoms], weights=atom_scores[atoms], minlength=group.size
        )
    return scores


# ---------------------------------------------------------------------------- counts


def _settle(group: Group, keep_free: int, keep_bucket: int, limits: Limits) -> tuple[int, int]:
    """Adjust kept counts for ``min_channels`` and ``round_to`` (never above the size)."""
    n_free, buckets = len(group.free), len(group.buckets)
    size = len(group.buckets[0]) if buckets else 0
    keep_bucket = max(keep_bucket, 1) if buckets else 0
    keep_free = max(keep_free, 0 if buckets else 1)

    def total() -> int:
        return keep_free + buckets * keep_bucket

    while total() < limits.min_channels and (keep_free < n_free or keep_bucket < size):
        if keep_free < n_free:
            keep_free += 1
        else:
            keep_bucket += 1
    while total() % limits.round_to and (keep_free < n_free or keep_bucket < size):
        if keep_free < n_free:
            keep_free += 1
        else:
            keep_bucket += 1
    if total() % limits.round_to:
        return n_free, size  # cannot reach a multiple: keep everything
    return keep_free, keep_bucket


def _lowest(scores: np.ndarray, pool: np.ndarray, count: int) -> np.ndarray:
    if count <= 0 or not len(pool):
        return pool[:0]
    order = np.argsort(scores[pool], kind="stable")
    return pool[order[:count]]


def _removed(
    group: Group, scores: np.ndarray, keep_free: int, keep_bucket: int, pools
) -> np.ndarray:
    """Class indices to remove: the lowest-scored of each pool (free, then buckets)."""
    free_pool, bucket_pools = pools
    chosen = [_lowest(scores, free_pool, len(group.free) - keep_free)]
    for pool, bucket in zip(bucket_pools, group.buckets):
        chosen.append(_lowest(scores, pool, len(bucket) - keep_bucket))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _plan(group: Group, scores: np.ndarray, pools, limits: Limits) -> np.ndarray:
    free_pool, bucket_pools = pools
    keep_free = len(group.free) - len(free_pool)
    removable = min((len(p) for p in bucket_pools), default=0)
    keep_bucket = (len(group.buckets[0]) - removable) if group.buckets else 0
    keep_free, keep_bucket = _settle(group, keep_free, keep_bucket, limits)
    return _removed(group, scores, keep_free, keep_bucket, pools)


def _all_pools(group: Group):
    return group.free, list(group.buckets)


# ---------------------------------------------------------------------------- strategies

Selection = dict[int, np.ndarray]  # group index -> class indices to remove


def select_ratio(
    cg: ChannelGraph, scores: dict[int, np.ndarray], ratio: float, limits: Limits
) -> Selection:
    selection = {}
    for index, group_scores in scores.items():
        group = cg.groups[index]
        keep_free = len(group.free) - int(np.floor(ratio * len(group.free) + 1e-9))
        size = len(group.buckets[0]) if group.buckets else 0
        keep_bucket = size - int(np.floor(ratio * size + 1e-9))
        keep_free, keep_bucket = _settle(group, keep_free, keep_bucket, limits)
        selection[index] = _removed(group, group_scores, keep_free, keep_bucket, _all_pools(group))
    return selection


def select_candidates(
    cg: ChannelGraph,
    scores: dict[int, np.ndarray],
    candidates: dict[int, np.ndarray],
    limits: Limits,
) -> Selection:
    """Remove only classes in ``candidates[group]`` (lowest importance first)."""
    selection = {}
    for index, wanted in candidates.items():
        if index not in scores or not len(wanted):
            continue
        group = cg.groups[index]
        allowed = np.zeros(group.size, dtype=bool)
        allowed[wanted] = True
        pools = (group.free[allowed[group.free]], [b[allowed[b]] for b in group.buckets])
        selection[index] = _plan(group, scores[index], pools, limits)
    return selection


def select_target_macs(
    cg: ChannelGraph,
    scores: dict[int, np.ndarray],
    target: float,
    estimate: Callable[[np.ndarray], float],
    limits: Limits,
) -> tuple[Selection, float]:
    """Smallest global threshold on normalized importance reaching ``target`` MACs."""
    normalized = {i: s / s.mean() if s.mean() > 0 else s for i, s in scores.items()}
    values = np.unique(np.concatenate(list(normalized.values()))) if normalized else np.zeros(0)

    def at(threshold: float) -> tuple[Selection, float]:
        candidates = {i: np.flatnonzero(s <= threshold) for i, s in normalized.items()}
        selection = select_candidates(cg, normalized, candidates, limits)
        return selection, estimate(keep_mask(cg, selection))

    low, high = 0, len(values) - 1
    if high < 0:
        return {}, estimate(np.ones(len(cg.atom_group), dtype=bool))
    best = at(float(values[high]))
    if best[1] > target:
        return best  # not reachable; the most the limits allow
    while low < high:
        middle = (low + high) // 2
        candidate = at(float(values[middle]))
        if candidate[1] <= target:
            best, high = candidate, middle
        else:
            low = middle + 1
    return best


def keep_mask(cg: ChannelGraph, selection: Selection) -> np.ndarray:
    """``keep[atom]`` for a selection."""
    keep = np.ones(len(cg.atom_group), dtype=bool)
    for index, removed in selection.items():
        if not len(removed):
            continue
        drop = np.zeros(cg.groups[index].size, dtype=bool)
        drop[removed] = True
        atoms = np.flatnonzero(cg.atom_group == index)
        keep[atoms] = ~drop[cg.atom_class[atoms]]
    return keep
