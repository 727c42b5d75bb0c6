"""Measures of influence maps and templates: how local they are, the one definition the library uses.

The scan scores layers with it (``modularity = consistency x similarity x locality``),
the training monitor logs it, and anything else that asks "does this act on a part of the
image or on all of it?" uses :func:`locality` too.

**Definition.** For a map ``m`` of ``P`` pixels (negative values, which influence maps do
not have, count as 0)::

    locality(m) = 1 - #{p : m[p] > max(m) / 2} / P

one minus the fraction of the image where the map exceeds half its maximum (the area at
half maximum, as in a full width at half maximum). It is 0 for a map constant over the
image, ``1 - f`` for a map constant on a fraction ``f`` of the image and zero elsewhere,
and ``1 - 1/P`` for a single pixel. It ignores the low, broad base that every influence
map of a real generator has and measures where the map is strong; a single noisy pixel
sets the maximum, so give it smoothed maps (the scan and the monitor smooth with the
clustering ``window``) or templates. A map that is zero everywhere has no locality: NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfmodules.errors import ConfigError, ShapeError

__all__ = ["locality", "module_locality"]


def locality(maps: Any) -> np.ndarray:
    """How local each map is: 1 - the fraction of its pixels above half its maximum.

    ``locality(m) = 1 - #{p : m[p] > max(m) / 2} / P`` (see :mod:`cfmodules.modules.measures`).

    Parameters
    ----------
    maps : array (K, H, W) or (K, P), numpy or torch
        Influence maps or templates, one per row; negative values count as 0.

    Returns
    -------
    ndarray (K,) float64
        In ``[0, 1 - 1/P]``: 0 for a map constant over the image, ``1 - f`` for one constant
        on a fraction ``f`` of it and zero elsewhere; NaN for a map that is zero everywhere.

    Raises
    ------
    ShapeError
        Not (K, H, W) or (K, P) with K >= 1.
    ConfigError
        NaN or infinite values.
    """
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().numpy()
    t = np.asarray(maps, dtype=np.float64)
    if t.ndim not in (2, 3) or t.shape[0] == 0 or t[0].size == 0:
        raise ShapeError(f"maps must have shape (K, H, W) or (K, P) with K >= 1, got {t.shape}.")
    if not np.isfinite(t).all():
        raise ConfigError("The maps hold NaN or infinite values; locality needs finite maps "
                          "(influence maps of a generator whose output is finite).")
    t = np.clip(t.reshape(len(t), -1), 0, None)
    peak = t.max(axis=1, keepdims=True)
    area = (t > 0.5 * peak).mean(axis=1)
    return np.where(peak[:, 0] > 0, 1.0 - area, np.nan)


def module_locality(maps: Any, labels: Any, n_modules: int) -> float:
    """Mean :func:`locality` of the modules' mean influence maps.

    Parameters
    ----------
    maps : array (C, H, W) or (C, P)
        Influence maps (smoothed, not thresholded: a threshold keeps a quarter of every
        map, so thresholded maps look local whether or not the channel's influence is).
    labels : array (C,) of int
        Module of each channel, in ``0 .. n_modules - 1``.
    n_modules : int

    Returns
    -------
    float
        Mean over the non-empty modules of the locality of the mean map of their channels;
        a module whose channels do nothing (mean map zero) counts as 0, not local.
    """
    m = np.asarray(maps, dtype=np.float64)
    m = m.reshape(len(m), -1)
    lab = np.asarray(labels)
    if lab.shape != (len(m),):
        raise ShapeError(f"labels must have shape ({len(m)},) like the maps, got {lab.shape}.")
    means = [m[lab == k].mean(axis=0) for k in range(int(n_modules)) if (lab == k).any()]
    if not means:
        raise ConfigError(f"No channel has a label in 0..{int(n_modules) - 1}.")
    return float(np.nan_to_num(locality(np.stack(means)), nan=0.0).mean())
