"""The whole pipeline recovers planted modules: influence maps, then clustering (Prop. 3)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cfmodules.modules import ModuleClustering, cluster_stability
from cfmodules.zoo.planted import load_planted_conv, load_planted_model1
from modules_helpers import naive_influence_maps

SEEDS = range(4)
GENERATORS = {
    "model1": (load_planted_model1, {"n_modules": 4, "units_per_module": (2, 3, 6, 9),
                                     "image_size": (8, 16)}),
    "conv": (load_planted_conv, {"n_modules": 4, "channels_per_module": (2, 4, 6, 12)}),
}


def influence(adapter, layer, seed):
    return naive_influence_maps(adapter, layer, n_pairs=8, seed=seed)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_pipeline_recovers_planted_modules(name):
    loader, kwargs = GENERATORS[name]
    scores = {"nmf": [], "kmeans": []}
    for seed in SEEDS:
        adapter = loader(seed=seed, **kwargs)
        gen = adapter.generator
        maps = influence(adapter, gen.layer, seed)
        for method, got in scores.items():
            clust = ModuleClustering(gen.n_modules, method, random_state=seed).fit(maps)
            got.append(adjusted_rand_score(gen.true_labels(), clust.labels_))
    print(f"{name}: ARI nmf {np.round(scores['nmf'], 3).tolist()} "
          f"kmeans {np.round(scores['kmeans'], 3).tolist()}")
    assert min(scores["nmf"]) >= 0.95
    assert min(scores["kmeans"]) >= 0.95


def test_wrong_k_does_not_recover():
    """The ARI check has teeth: one module too few cannot reach 0.95."""
    adapter = load_planted_conv(seed=0)
    gen = adapter.generator
    maps = influence(adapter, gen.layer, 0)
    clust = ModuleClustering(gen.n_modules - 1, random_state=0).fit(maps)
    assert adjusted_rand_score(gen.true_labels(), clust.labels_) < 0.95


@pytest.mark.parametrize(
    ("loader", "kwargs"),
    [(load_planted_model1, {"n_modules": 4, "units_per_module": (4, 5, 6, 7),
                            "image_size": (8, 16)}),
     (load_planted_conv, {"n_modules": 4, "channels_per_module": (3, 4, 6, 12)})],
)
def test_stability_suggests_the_planted_k(loader, kwargs):
    # A module must have a few channels in each two-thirds subset to be reproducible.
    adapter = loader(seed=1, **kwargs)
    maps = influence(adapter, adapter.generator.layer, 1)
    res = cluster_stability(maps, ks=range(2, 7), n_repeats=8, random_state=0)
    print(res)
    assert res.suggest_k("nmf") == adapter.generator.n_modules
