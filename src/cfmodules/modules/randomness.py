"""The random state of a clustering: one stream per call, one seed per restart drawn from it.

The bottom of ``cfmodules.modules``: the fits (``fits``), the batched k-means (``batched``)
and the HALS NMF (``hals``) all draw from here. Imports only numpy at import time, so that
a worker starts fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_random_state", "draw_seed"]


def as_random_state(seed: Any) -> np.random.RandomState:
    """scikit-learn's ``check_random_state`` without importing scikit-learn (for workers):
    None -> numpy's global RandomState, an int -> a new RandomState, a RandomState as is."""
    if seed is None:
        return np.random.mtrand._rand
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    from sklearn.utils import check_random_state

    return check_random_state(seed)  # its error for anything else


def draw_seed(rng: np.random.RandomState) -> int:
    """A seed for one restart, drawn from the clustering's stream."""
    return int(rng.randint(np.iinfo(np.int32).max))
