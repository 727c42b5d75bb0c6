"""NMF by HALS, restarts batched, stopped on stable labels: the fast NMF engine.

The same problem as scikit-learn's ``NMF`` (minimise ``|X - W H|_F^2`` over W, H >= 0),
from the same starts (NNDSVDa for the first restart, scikit-learn's random start, from
the same seeds, for the others), by the same updates, computed faster:

- **The updates are scikit-learn's coordinate descent.** Its ``solver="cd"`` is HALS
  (hierarchical alternating least squares; Cichocki & Phan 2009, Gillis & Glineur 2012):
  one product ``X H^T`` then one sweep over the columns of W, one product ``W^T X`` then
  one sweep over the rows of H, each entry set to its non-negative least-squares value
  given the others. The products with X (C x pixels x K) are the whole cost.
- **The restarts of a fit are batched** (their W and H side by side), so each product
  with X is one wide matrix product instead of ``n_init`` skinny ones, in float32.
- **A stopping rule on what the clustering uses.** The modules are the argmax of the
  (scaled) weights and the templates are the rows of H; a restart stops when its labels
  have not changed for ``PATIENCE`` iterations and its loss fell by less than ``RTOL``
  (relative) over those iterations, or at ``max_iter`` -- typically after 20-100
  iterations where scikit-learn's tolerance on the projected gradient takes ~190.

It is **not** bit for bit scikit-learn's fit: float32, and the stop, end a restart
earlier, so fits agree with the reference up to the solvers' tolerances, and where two
local minima have nearly the same loss the best restart may differ. On the DCGAN faces
(main.8 and main.5, K = 2..6, 10 splits) the stability statistics are within 0.015 of the
reference's and the suggested K is the same (docs/choosing.md); ``backend="sklearn"`` is
the reference. (Several sweeps per product -- *accelerated* HALS -- cost the same time
here but led restarts into other local minima than scikit-learn's, so they are not used.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfmodules.modules.randomness import as_random_state, draw_seed

__all__ = ["nmf_init", "nmf_starts", "nmf_hals", "PATIENCE", "RTOL", "INNER_W", "INNER_H"]

PATIENCE = 10
"""Iterations with unchanged labels before a restart may stop."""
RTOL = 1e-4
"""Largest relative fall of the loss over the last ``PATIENCE`` iterations at a stop."""
INNER_W = 1
"""Sweeps over the columns of W after each product ``X H^T`` (1: scikit-learn's updates)."""
INNER_H = 1
"""Sweeps over the rows of H after each product ``W^T X`` (1: scikit-learn's updates)."""
_EPS_W = 0.0  # as scikit-learn's coordinate descent (a column that empties stays so)



def nmf_init(x: np.ndarray, k: int, init: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An NMF start: scikit-learn's ``init="random"`` from its seed, or NNDSVDa.

    ``"random"`` is exactly what ``sklearn.decomposition.NMF(init="random",
    random_state=seed)`` starts from. ``"nndsvda"`` is scikit-learn's NNDSVDa computed from
    the exact truncated SVD of ``x`` (through the eigenvectors of ``x x^T``, C x C)
    instead of scikit-learn's randomized SVD (which approximates it, 10x slower here);
    NNDSVD does not depend on the signs of the singular vectors, so the two starts differ
    only by the randomized SVD's error.

    Parameters
    ----------
    x : ndarray (C, P), non-negative
    k : int, at most min(C, P)
    init : {"nndsvda", "random"}
    seed : int
        Used by ``"random"`` only.

    Returns
    -------
    W (C, K), H (K, P), of the dtype of ``x``
    """
    m, n = x.shape
    if init == "random":
        avg = np.sqrt(x.mean() / k)
        rng = np.random.RandomState(seed)
        h = avg * rng.standard_normal(size=(k, n)).astype(x.dtype, copy=False)
        w = avg * rng.standard_normal(size=(m, k)).astype(x.dtype, copy=False)
        return np.abs(w), np.abs(h)
    if init != "nndsvda":
        raise ValueError(f"init must be 'nndsvda' or 'random', got {init!r}")
    x64 = x.astype(np.float64, copy=False)
    evals, evecs = np.linalg.eigh((x @ x.T).astype(np.float64))  # ascending
    s = np.sqrt(np.maximum(evals[::-1][:k], 0))
    u = evecs[:, ::-1][:, :k]
    v = (u.T @ x64) / np.where(s > 0, s, 1)[:, None]
    u, s, v = u.astype(x.dtype), s.astype(x.dtype), v.astype(x.dtype)
    w = np.zeros_like(u)
    h = np.zeros_like(v)
    w[:, 0] = np.sqrt(s[0]) * np.abs(u[:, 0])
    h[0, :] = np.sqrt(s[0]) * np.abs(v[0, :])
    for j in range(1, k):
        a, b = u[:, j], v[j, :]
        a_p, b_p = np.maximum(a, 0), np.maximum(b, 0)
        a_n, b_n = np.abs(np.minimum(a, 0)), np.abs(np.minimum(b, 0))
        a_pn, b_pn = np.linalg.norm(a_p), np.linalg.norm(b_p)
        a_nn, b_nn = np.linalg.norm(a_n), np.linalg.norm(b_n)
        m_p, m_n = a_pn * b_pn, a_nn * b_nn
        if m_p > m_n:
            uu, vv, sigma = a_p / a_pn, b_p / b_pn, m_p
        else:
            uu, vv, sigma = a_n / a_nn, b_n / b_nn, m_n
        lbd = np.sqrt(s[j] * sigma)
        w[:, j] = lbd * uu
        h[j, :] = lbd * vv
    w[w < 1e-6] = 0
    h[h < 1e-6] = 0
    avg = x.mean()
    w[w == 0] = avg
    h[h == 0] = avg
    return w, h


def nmf_hals(
    x: np.ndarray, w0: np.ndarray, h0: np.ndarray, max_iter: int, *,
    patience: int = PATIENCE, rtol: float = RTOL, inner_w: int = INNER_W,
    inner_h: int = INNER_H,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HALS from R starts of the same data, batched (see the module docstring).

    Parameters
    ----------
    x : ndarray (C, P), float32 or float64, non-negative
    w0 : ndarray (R, C, K)
    h0 : ndarray (R, K, P)
        Starts (e.g. :func:`nmf_init`).
    max_iter : int
        Outer iterations (each: one ``X H^T``, ``inner_w`` sweeps over W, one ``W^T X``,
        ``inner_h`` sweeps over H).
    patience, rtol : stopping rule (module docstring)
    inner_w, inner_h : int

    Returns
    -------
    W (R, C, K), H (R, K, P), reconstruction error ``|X - W H|_F`` (R,), iterations (R,)
    """
    x = np.ascontiguousarray(x)
    dt = x.dtype
    n_r, m, k = w0.shape
    n = x.shape[1]
    xx = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    # restarts side by side, column j = k * R + r (k-major: a sweep step is a slice)
    w = np.ascontiguousarray(np.asarray(w0, dt).transpose(1, 2, 0).reshape(m, k * n_r))
    h = np.ascontiguousarray(np.asarray(h0, dt).transpose(1, 0, 2).reshape(k * n_r, n))
    out_w = np.zeros((n_r, m, k), dt)
    out_h = np.zeros((n_r, k, n), dt)
    err = np.zeros(n_r)
    iters = np.zeros(n_r, dtype=np.int64)
    active = np.arange(n_r)  # restarts still running, in the order of the columns
    history = np.zeros((n_r, max_iter))
    labels_prev = np.full((n_r, m), -1)
    same = np.zeros(n_r, dtype=np.int64)
    masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    hh = h @ h.T
    for it in range(1, max_iter + 1):
        r = len(active)
        if r not in masks:  # (kR, kR): between two columns of the same restart; and not on
            block = np.tile(np.eye(r, dtype=bool), (k, k))  # the diagonal, as 0/1 numbers
            masks[r] = (block, (block & ~np.eye(k * r, dtype=bool)).astype(dt))
        mask, off = masks[r]
        # --- W: one product, then sweeps w_j <- max(0, (a_j - sum_{i != j} w_i b_ij) / b_jj)
        a, bz = _normalised(x @ h.T, hh, off, axis=0)
        for _ in range(inner_w):
            for j in range(k):
                sl = slice(j * r, (j + 1) * r)
                np.maximum(a[:, sl] - w @ bz[:, sl], _EPS_W, out=w[:, sl])
        # --- H: the same, by rows
        wt = np.ascontiguousarray(w.T)
        d = wt @ w
        c, dz = _normalised(wt @ x, d, off, axis=1)
        for _ in range(inner_h):
            for j in range(k):
                sl = slice(j * r, (j + 1) * r)
                np.maximum(c[sl] - dz[sl] @ h, 0, out=h[sl])
        # --- loss |X|^2 - 2 <W^T X, H> + <W^T W, H H^T> per restart, and labels
        hh = h @ h.T
        diag = np.diagonal(d).astype(np.float64)  # c was divided by it
        cross = ((c * h).sum(axis=1) * diag).reshape(k, r).sum(0)  # pairwise sums
        quad = np.where(mask, d * hh, 0).astype(np.float64).reshape(k, r, k, r).sum((0, 2))
        loss = np.maximum(xx - 2 * cross + np.diagonal(quad), 0)
        scale = h.max(axis=1).reshape(k, r)  # labels as _scaled + argmax give them
        labels = (w.reshape(m, k, r) * scale[None]).argmax(axis=1).T  # (r, m)
        history[active, it - 1] = loss
        unchanged = (labels == labels_prev[active]).all(axis=1)
        same[active] = np.where(unchanged, same[active] + 1, 0)
        labels_prev[active] = labels
        done = np.zeros(r, dtype=bool)
        if it > patience:
            before = history[active, it - 1 - patience]
            done = (same[active] >= patience) & (before - loss <= rtol * loss)
        if it == max_iter:
            done[:] = True
        if done.any():
            for i in np.flatnonzero(done):
                q = active[i]
                out_w[q] = w[:, i::r]
                out_h[q] = h[i::r]
                err[q] = np.sqrt(loss[i])
                iters[q] = it
            keep = np.flatnonzero(~done)
            if not len(keep):
                break
            cols = (np.arange(k)[:, None] * r + keep[None]).ravel()
            w = np.ascontiguousarray(w[:, cols])
            h = np.ascontiguousarray(h[cols])
            hh = np.ascontiguousarray(hh[np.ix_(cols, cols)])
            active = active[keep]
    return out_w, out_h, err, iters


def _normalised(p: np.ndarray, g: np.ndarray, off: np.ndarray, axis: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """One HALS sweep's constants: the product ``p`` and the Gram matrix ``g`` (kR, kR)
    of the other factor, divided by the diagonal of ``g`` (zero diagonals read as 1), with
    ``g``'s diagonal and its entries between different restarts set to 0 (``off``: 1
    where kept)."""
    diag = np.diagonal(g).copy()
    diag[diag <= 0] = 1
    if axis == 0:  # columns of W: p (m, kR), g[:, j] / g_jj
        return p / diag, g * off / diag
    return p / diag[:, None], g * off / diag[:, None]


def nmf_starts(x: np.ndarray, k: int, n_init: int, random_state: Any
               ) -> tuple[np.ndarray, np.ndarray]:
    """The starts of ``n_init`` restarts, as the scikit-learn backend draws them.

    Restart i starts as ``NMF(init="nndsvda" if i == 0 else "random",
    random_state=seed_i)`` would (see :func:`nmf_init`), ``seed_i`` drawn from
    ``random_state`` in the same order as the scikit-learn backend draws them.

    Returns
    -------
    W0 (n_init, C, K), H0 (n_init, K, P), of the dtype of ``x``
    """

    rng = as_random_state(random_state)
    starts = [nmf_init(x, k, "nndsvda" if i == 0 else "random", draw_seed(rng))
              for i in range(n_init)]
    return np.stack([s[0] for s in starts]), np.stack([s[1] for s in starts])
