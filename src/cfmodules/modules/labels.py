"""From module labels to modules: ``{layer: channels}`` and the size of each module.

numpy only, so that reading a result (its modules, their sizes) needs neither
scikit-learn nor scipy; :mod:`cfmodules.modules.clustering` gives the labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cfmodules.errors import ConfigError, ShapeError

__all__ = ["module_sizes", "modules_from_labels"]


def module_sizes(labels: Any, n_modules: int | None = None) -> np.ndarray:
    """Number of channels in each module.

    Parameters
    ----------
    labels : array (C,) of int
        Module of each channel (``ModuleClustering.labels_``).
    n_modules : int, optional
        K; default ``max(labels) + 1``.

    Returns
    -------
    ndarray (K,) of int
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
        raise ShapeError(f"labels must be a non-empty 1-D array of non-negative integers, "
                         f"got {lab.dtype} array of shape {lab.shape}.")
    k = int(lab.max()) + 1 if n_modules is None else int(n_modules)
    if k <= lab.max():
        raise ConfigError(f"labels go up to {int(lab.max())} but n_modules={k}.")
    return np.bincount(lab, minlength=k)


def modules_from_labels(labels: Any, units: str | Mapping[str, int] | Sequence[tuple[str, int]],
                        n_modules: int | None = None) -> list[dict[str, list[int]]]:
    """Turn the module label of each unit into modules ``{layer: channels}``, for one or
    several layers.

    The one way from a clustering to the modules that :func:`cfmodules.hybridize` and
    :func:`cfmodules.influence.module_influence_maps` take. Clustering the maps of two
    successive layers together (the paper's "channels from the same cluster in two
    successive layers") gives modules that span both.

    Parameters
    ----------
    labels : array (C,) of int
        Module of each unit, 0..K-1 (e.g. ``ModuleClustering.labels_``).
    units : str, dict layer -> number of channels, or sequence of (layer, channel)
        What row ``i`` of the clustered maps was: a layer name (row ``i`` is its channel
        ``i``); layers with their channel counts in the order their maps were stacked
        (``{"conv_1": 256, "conv_2": 256}``: rows 0..255 are ``conv_1``); or one
        ``(layer, channel)`` per row.
    n_modules : int, optional
        K; default ``max(labels) + 1``.

    Returns
    -------
    list of K dicts layer -> list of int
        Module ``k`` holds the units labelled ``k``; a layer where it has no channel is
        left out (a label no unit has gives ``{}``).

    Raises
    ------
    ShapeError
        When ``units`` does not describe one unit per label.
    """
    sizes = module_sizes(labels, n_modules)
    lab = np.asarray(labels)
    if isinstance(units, str):
        rows = [(units, c) for c in range(lab.size)]
    elif isinstance(units, Mapping):
        rows = [(str(layer), c) for layer, n in units.items() for c in range(int(n))]
    else:
        rows = [(str(layer), int(c)) for layer, c in units]
    if len(rows) != lab.size:
        raise ShapeError(f"{lab.size} labels but {len(rows)} units ({_describe(units)}); give "
                         "one label per unit, in the order the maps were stacked.")
    modules: list[dict[str, list[int]]] = [{} for _ in range(len(sizes))]
    for (layer, channel), k in zip(rows, lab.tolist()):
        modules[k].setdefault(layer, []).append(int(channel))
    return modules


def _describe(units: Any) -> str:
    if isinstance(units, str):
        return f"layer '{units}'"
    if isinstance(units, Mapping):
        return " + ".join(f"{n} of {layer}" for layer, n in units.items())
    return "(layer, channel) rows"
