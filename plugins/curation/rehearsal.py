"""Rehearsal: how many past examples a dataset mixes in, and which (the most diverse ones).

The reference design's method: k-means on the embeddings with one cluster per wanted example,
then the example nearest each centroid. ``kmeans`` is a plain numpy implementation (seeded
k-means++ initialisation on a sample, then Lloyd iterations with the distances computed as
one matrix product per chunk), fast enough for 100,000 vectors on two cores; it is
deterministic for a seed on one machine, so a replay picks the same rows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["assign", "initial_centres", "kmeans", "kmeans_pp", "rehearsal_count", "select_diverse"]

_CHUNK = 8192


def rehearsal_count(share: float, train_rows: int) -> int:
    """Rehearsal rows to add to ``train_rows`` new rows so that they are ``share`` of the total.

    R = floor(s * T / (1 - s) + 1/2), computed exactly in rational arithmetic on the decimal
    value of ``share`` (so 0.15 is 3/20, not its binary neighbour): the nearest integer, halves
    rounded up. With 85 new rows and 0.15, R = 15 and rehearsal is exactly 15 % of 100.
    """
    if share <= 0 or train_rows <= 0:
        return 0
    s = Fraction(repr(share))
    return math.floor(s * train_rows / (1 - s) + Fraction(1, 2))


def _sq_norms(x: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.einsum("ij,ij->i", x, x)
    return norms


def assign(x: np.ndarray, centroids: np.ndarray, x_norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row and the squared distance to it."""
    if x_norms is None:
        x_norms = _sq_norms(x)
    c_norms = _sq_norms(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK]
        d = block @ centroids.T
        d *= -2.0
        d += c_norms[None, :]
        d += x_norms[start : start + _CHUNK, None]
        lab = np.argmin(d, axis=1)
        labels[start : start + len(block)] = lab
        dist[start : start + len(block)] = np.maximum(d[np.arange(len(block)), lab], 0.0)
    return labels, dist


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` rows of ``x`` chosen by k-means++ (each next centre drawn with
    probability proportional to its squared distance from the nearest centre so far)."""
    n = len(x)
    norms = _sq_norms(x)
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(norms - 2.0 * (x @ x[chosen[0]]) + norms[chosen[0]], 0.0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0.0:  # every row sits on a centre already: take the first unused rows
            unused = np.setdiff1d(np.arange(n), np.asarray(chosen))
            chosen.extend(int(i) for i in unused[: k - len(chosen)])
            break
        idx = int(np.searchsorted(np.cumsum(d2, dtype=np.float64), rng.random() * total, side="right"))
        idx = min(idx, n - 1)
        chosen.append(idx)
        d2 = np.minimum(d2, np.maximum(norms - 2.0 * (x @ x[idx]) + norms[idx], 0.0))
    return np.asarray(chosen[:k], dtype=np.int64)


def initial_centres(x: np.ndarray, k: int, seed: int = 0, sample: int | None = None) -> np.ndarray:
    """``k`` initial centres: k-means++ on a seeded sample of ``sample`` rows of ``x`` (default
    ``max(4k, 4096)``; k-means++ is sequential, so a sample keeps it fast)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    size = min(n, sample or max(4 * k, 4096))
    rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    centres: np.ndarray = x[rows[kmeans_pp(x[rows], k, rng)]].copy()
    return centres


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, iterations: int = 5, sample: int | None = None,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, labels, squared distances) of ``k``-means on the rows of ``x``.

    The initial centres are ``init`` if given, else ``initial_centres`` (seeded k-means++ on a
    sample), then ``iterations`` Lloyd steps on all rows, stopping early when no label changes.
    A cluster left empty is re-seeded with the row farthest from its centre.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if k <= 0 or n == 0:
        return np.zeros((0, x.shape[1]), np.float32), np.zeros(n, np.int64), np.zeros(n, np.float32)
    k = min(k, n)
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init must be {k} centres of width {x.shape[1]}, not shape {init.shape}")
        centroids = np.array(init, dtype=np.float32)
    else:
        centroids = initial_centres(x, k, seed, sample)
    norms = _sq_norms(x)
    labels, dist = assign(x, centroids, norms)
    for _ in range(iterations):
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        present = counts > 0
        sums = np.add.reduceat(x[order], starts[present], axis=0)
        centroids[present] = sums / counts[present, None]
        if not present.all():
            empty = np.flatnonzero(~present)
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            centroids[empty] = x[far]
        new_labels, dist = assign(x, centroids, norms)
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed:
            break
    return centroids, labels, dist


def select_diverse(x: np.ndarray, k: int, seed: int = 0, iterations: int = 5,
                   init: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``k`` distinct rows of ``x`` spread over its space: k-means with ``k``
    clusters (from ``init`` if given) and the row nearest each centroid (ties: the lower index).
    Sorted ascending."""
    n = len(x)
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    _, labels, dist = kmeans(x, k, seed=seed, iterations=iterations, init=init)
    order = np.lexsort((np.arange(n), dist, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    picked = order[first]
    if len(picked) < k:  # clusters that ended empty: the rows farthest from their centres
        rest = np.setdiff1d(np.arange(n), picked)
        far = rest[np.lexsort((rest, -dist[rest]))][: k - len(picked)]
        picked = np.concatenate([picked, far])
    return np.sort(picked[:k])
