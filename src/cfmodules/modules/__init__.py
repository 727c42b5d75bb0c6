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
"""

from cfmodules.modules.clustering import (
    METHODS,
    ModuleClustering,
    module_sizes,
    modules_from_labels,
)
from cfmodules.modules.measures import locality, module_locality
from cfmodules.modules.preprocess import as_maps, preprocess, smooth, threshold
from cfmodules.modules.settings import ClusteringSettings
from cfmodules.modules.stability import (
    DEFAULT_KS,
    StabilityResult,
    cluster_stability,
    match_labels,
    suggest_k,
    template_similarity,
)

__all__ = [
    "ModuleClustering",
    "ClusteringSettings",
    "locality",
    "module_locality",
    "METHODS",
    "module_sizes",
    "modules_from_labels",
    "as_maps",
    "smooth",
    "threshold",
    "preprocess",
    "cluster_stability",
    "StabilityResult",
    "suggest_k",
    "match_labels",
    "template_similarity",
    "DEFAULT_KS",
]
