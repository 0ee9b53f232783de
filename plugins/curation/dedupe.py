"""Exact and near-duplicate removal, keeping the better example of each group.

Both work on a priority order (the caller's: new before past, higher reward first, then the
earlier event): walking it, an example is dropped when it duplicates one already kept.

- **Exact**: the same prompt and target after whitespace is collapsed (SHA-256 of both).
- **Near**: cosine similarity of the prompt embeddings at or above a threshold. Up to
  ``EXACT_LIMIT`` examples every pair is compared. Above it, pairs are only compared inside
  blocks: each vector joins the blocks of its ``PROBES`` most similar of ~sqrt(n) seeded
  sample vectors, so two near-identical prompts (which rank the sample alike) share a block
  while the work stays about n^1.5 instead of n^2. A pair split across blocks can be missed
  there; that is the price of a 100,000-example build in seconds on two cores.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["EXACT_LIMIT", "PROBES", "exact_key", "exact_duplicates", "near_duplicate_pairs", "near_duplicates"]

EXACT_LIMIT = 16_384
PROBES = 4
_CHUNK = 2048
_WS = re.compile(r"\s+")


def exact_key(prompt: str, target: str) -> str:
    """Identity of an example up to whitespace."""
    norm = _WS.sub(" ", prompt).strip() + "\x00" + _WS.sub(" ", target).strip()
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()


def exact_duplicates(keys: Sequence[str], order: Sequence[int]) -> np.ndarray:
    """Mask of the rows whose key an earlier row in ``order`` already has."""
    dropped = np.zeros(len(keys), dtype=bool)
    seen: set[str] = set()
    for i in order:
        if keys[i] in seen:
            dropped[i] = True
        else:
            seen.add(keys[i])
    return dropped


def _pairs_within(x: np.ndarray, members: np.ndarray, threshold: float) -> list[np.ndarray]:
    """(i, j) pairs (global indices, i < j) among ``members`` at or above ``threshold``."""
    found: list[np.ndarray] = []
    sub = x[members]
    for start in range(0, len(members), _CHUNK):
        sims = sub[start : start + _CHUNK] @ sub.T
        rows, cols = np.nonzero(sims >= threshold)
        keep = cols > rows + start
        if keep.any():
            found.append(np.stack([members[rows[keep] + start], members[cols[keep]]], axis=1))
    return found


def near_duplicate_pairs(x: np.ndarray, threshold: float, seed: int = 0) -> np.ndarray:
    """Every pair (i < j) of unit vectors with cosine similarity >= ``threshold`` (see the
    module docstring for the blocking used above ``EXACT_LIMIT`` rows), sorted."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if n <= EXACT_LIMIT:
        found = _pairs_within(x, np.arange(n), threshold)
    else:
        rng = np.random.default_rng(seed)
        k = math.isqrt(n)
        pivots = x[np.sort(rng.choice(n, size=k, replace=False))]
        blocks = np.empty((n, PROBES), dtype=np.int64)
        for start in range(0, n, _CHUNK * 4):
            sims = x[start : start + _CHUNK * 4] @ pivots.T
            top = np.argpartition(-sims, PROBES - 1, axis=1)[:, :PROBES]
            blocks[start : start + len(sims)] = np.sort(top, axis=1)
        flat_block = blocks.ravel()
        flat_row = np.repeat(np.arange(n), PROBES)
        order = np.lexsort((flat_row, flat_block))
        flat_block, flat_row = flat_block[order], flat_row[order]
        bounds = np.flatnonzero(np.diff(flat_block)) + 1
        found = []
        for members in np.split(flat_row, bounds):
            if len(members) > 1:
                found.extend(_pairs_within(x, members, threshold))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs


def near_duplicates(x: np.ndarray, order: Sequence[int], threshold: float, seed: int = 0) -> np.ndarray:
    """Mask of the rows dropped as near-duplicates: walking ``order``, a row is dropped when
    it is similar to a row kept before it."""
    n = len(x)
    dropped = np.zeros(n, dtype=bool)
    pairs = near_duplicate_pairs(x, threshold, seed)
    if not len(pairs):
        return dropped
    rank = np.empty(n, dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(n)
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs.tolist():
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    for i in sorted(neighbours, key=lambda v: rank[v]):
        if any(not dropped[j] and rank[j] < rank[i] for j in neighbours[i]):
            dropped[i] = True
    return dropped
