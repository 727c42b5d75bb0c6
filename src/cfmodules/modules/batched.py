"""k-means on the Gram matrix: the fast k-means engine of the stability sweep and the scan.

The stability protocol (sec. 4.1) runs hundreds of small k-means fits, each on a subset of
the channels' (pre-processed, flattened) influence maps X (C x pixels). Lloyd's algorithm
only ever needs distances between channels and centroids, and a centroid is a mean of
channels, so everything can be written with the Gram matrix ``G = X X^T`` of the channels:
for a centroid with weights m (a row of the (K, N) matrix of means),
``|x_i - c|^2 = G_ii - 2 (G m)_i + m^T G m``. The Gram matrix of all channels is computed
once; each subset's is a sub-matrix of it, so a step costs (channels^2 x K) instead of
(channels x pixels x K) -- 64x64 maps have 4096 pixels and a layer ~100 channels.

The algorithm is scikit-learn's, step for step: k-means++ seeding with 2 + log K local
trials drawn from the same random stream as ``KMeans(init="k-means++", random_state=...)``,
Lloyd iterations that stop when the labels no longer change or the squared centre shift
falls under ``tol`` times the mean per-pixel variance, empty clusters moved to the
farthest points, and the restart with the smallest inertia kept. So a fit gives the same
labels and centroids as scikit-learn up to float rounding (ties between exactly equal
distances may be broken differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cfmodules.modules.randomness import as_random_state

__all__ = ["kmeans_many", "KMEANS_TOL"]

KMEANS_TOL = 1e-4
"""scikit-learn's default ``KMeans(tol=...)`` (relative to the mean feature variance)."""
_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------- k-means
def _plusplus(gram: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """k-means++ seeding on a Gram matrix (N, N); returns the chosen rows (K,).

    The draws are scikit-learn's ``_kmeans_plusplus`` (2 + log K local trials), from the
    same random stream, so the same points are chosen up to float rounding.
    """
    n = len(gram)
    sq = np.diag(gram)
    n_trials = 2 + int(np.log(k))
    first = rng.choice(n, p=np.full(n, 1.0 / n))
    idx = [int(first)]
    closest = np.clip(sq[first] + sq - 2 * gram[first], 0, None)
    pot = closest.sum()
    for _ in range(1, k):
        rand = rng.uniform(size=n_trials) * pot
        cand = np.searchsorted(np.cumsum(closest), rand)
        cand = np.clip(cand, None, n - 1)
        dist = np.clip(sq[cand, None] + sq[None] - 2 * gram[cand], 0, None)
        np.minimum(closest, dist, out=dist)
        pots = dist.sum(axis=1)
        best = int(np.argmin(pots))
        pot, closest = pots[best], dist[best]
        idx.append(int(cand[best]))
    return np.array(idx)


def _lloyd(gram: np.ndarray, start: np.ndarray, max_iter: int, tol: float
           ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd's algorithm on a Gram matrix, step for step scikit-learn's ``lloyd`` solver.

    Parameters
    ----------
    gram : (N, N) Gram matrix of the points
    start : (K,) rows that are the first centroids
    tol : absolute tolerance on the squared centre shift

    Returns
    -------
    labels (N,), centroid weights (K, N) (each centroid = weights @ X), inertia, n_iter
    """
    n, k = len(gram), len(start)
    sq = np.diag(gram)
    cw = np.zeros((k, n))
    cw[np.arange(k), start] = 1.0
    labels_old = np.full(n, -1)
    strict = False

    def assign(cw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gc = gram @ cw.T  # (N, K) <x_i, c_k>
        cc = np.einsum("kn,nk->k", cw, gc)  # |c_k|^2
        d = cc[None] - 2 * gc
        lab = d.argmin(axis=1)
        return lab, np.clip(d[np.arange(n), lab] + sq, 0, None)

    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        labels, dist = assign(cw)
        new = np.zeros((k, n))
        new[labels, np.arange(n)] = 1.0
        counts = new.sum(axis=1)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # scikit-learn moves empty clusters to the farthest points
            far = np.argsort(-dist, kind="stable")[:len(empty)]
            for e, f in zip(empty, far):
                new[labels[f], f] = 0.0
                new[e, f] = 1.0
        new /= new.sum(axis=1, keepdims=True)
        diff = new - cw
        shift = float(np.einsum("kn,nm,km->", diff, gram, diff))
        cw = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels, dist = assign(cw)
    else:
        dist = np.clip(np.einsum("kn,nm,km->k", cw, gram, cw)[labels] + sq
                       - 2 * (gram @ cw.T)[np.arange(n), labels], 0, None)
    return labels, cw, float(dist.sum()), n_iter


def kmeans_many(
    gram: np.ndarray,
    subsets: Sequence[np.ndarray],
    n_features: int,
    k: int,
    seeds: Sequence[Any],
    n_init: int,
    max_iter: int,
    tol: float = KMEANS_TOL,
) -> list[tuple[np.ndarray, np.ndarray, float, bool]]:
    """k-means with ``n_init`` k-means++ restarts on subsets of the rows of one matrix.

    Parameters
    ----------
    gram : ndarray (C, C)
        Gram matrix ``X X^T`` of all C rows (float64).
    subsets : sequence of B int arrays
        The rows of each fit.
    n_features : int
        Columns of X (the tolerance is relative to the mean variance per column).
    k, n_init, max_iter : int
    seeds : sequence of B ints (or RandomState, None)
        As the scikit-learn backend: ``KMeans(random_state=RandomState(seed).randint(...))``.
    tol : float, default 1e-4

    Returns
    -------
    list of B tuples (labels (N_b,), centroid weights (K, N_b), inertia, converged)
        The restart with the smallest inertia; the centroids are ``weights @ X[rows]``.
    """

    out = []
    for rows, seed in zip(subsets, seeds):
        g = gram[np.ix_(rows, rows)]
        n = len(rows)
        # mean over columns of the per-column variance, from the Gram matrix
        var = (np.trace(g) - g.sum() / n) / (n * n_features)
        km_seed = int(as_random_state(seed).randint(_INT32_MAX))
        rng = np.random.RandomState(km_seed)
        best = None
        for _ in range(n_init):
            start = _plusplus(g, k, rng)
            labels, cw, inertia, n_iter = _lloyd(g, start, max_iter, var * tol)
            if best is None or (inertia < best[2] and not _same_partition(labels, best[0], k)):
                best = (labels, cw, inertia, n_iter < max_iter)
        assert best is not None
        out.append(best)
    return out


def _same_partition(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    """scikit-learn's ``_is_same_clustering``: equal up to renumbering."""
    mapping = np.full(k, -1)
    for x, y in zip(a, b):
        if mapping[x] == -1:
            mapping[x] = y
        elif mapping[x] != y:
            return False
    return True
