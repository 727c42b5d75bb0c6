"""Modules: clustering of influence maps, stability and the choice of K (sec. 3.4, 4.1).

Works on arrays only -- numpy arrays or torch tensors of influence maps (C, H, W), or any
object with a ``.maps`` attribute -- and knows nothing of adapters or generators, so it can
cluster maps that came from anywhere.

>>> clust = ModuleClustering(n_modules=3, method="nmf", random_state=0).fit(maps)
>>> clust.labels_, clust.templates_, clust.modules_
>>> modules = modules_from_labels(clust.labels_, "main.8")   # [{"main.8": [..]}, ...]
>>> result = cluster_stability(maps, ks=range(2, 7))   # data of Fig. 9, NMF and k-means
>>> result.suggest_k()
>>> ClusteringSettings(method="kmeans").estimator(3)   # settings shared by analysis, scan, monitor

The clustering and the stability sweep load on first use, so that the clustering's
worker processes, which import only :mod:`cfmodules.modules.fits` and the engines, start
without scikit-learn and scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfmodules._lazy import lazy_names

# light (numpy only), and ``preprocess`` is also the name of its submodule: bound here, so
# the function, not the submodule, is ``cfmodules.modules.preprocess`` as an attribute
from cfmodules.modules.preprocess import as_maps, preprocess, smooth, threshold

# name -> submodule that defines it
_EXPORTS = {
    "ModuleClustering": "clustering",
    "METHODS": "clustering",
    "module_sizes": "labels",
    "modules_from_labels": "labels",
    "ClusteringSettings": "settings",
    "locality": "measures",
    "module_locality": "measures",
    "cluster_stability": "stability",
    "start_stability": "stability",
    "StabilityRun": "stability",
    "StabilityResult": "stability",
    "suggest_k": "stability",
    "match_labels": "stability",
    "template_similarity": "stability",
    "DEFAULT_KS": "stability",
}

__all__ = [*_EXPORTS, "as_maps", "smooth", "threshold", "preprocess"]

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.modules.clustering import METHODS, ModuleClustering
    from cfmodules.modules.labels import module_sizes, modules_from_labels
    from cfmodules.modules.measures import locality, module_locality
    from cfmodules.modules.settings import ClusteringSettings
    from cfmodules.modules.stability import (
        DEFAULT_KS,
        StabilityResult,
        StabilityRun,
        cluster_stability,
        match_labels,
        start_stability,
        suggest_k,
        template_similarity,
    )


__getattr__, __dir__ = lazy_names(
    __name__, {name: f"cfmodules.modules.{home}" for name, home in _EXPORTS.items()}, __all__)
