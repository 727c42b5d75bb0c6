"""The whole pipeline recovers planted modules: influence maps, then clustering (Prop. 3)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cfmodules.hybrid import hybridize
from cfmodules.influence import influence_maps, module_influence_maps
from cfmodules.modules import ModuleClustering, cluster_stability, modules_from_labels
from cfmodules.synthetic import load_planted_conv, load_planted_model1
from modules_helpers import naive_influence_maps

SEEDS = range(4)
GENERATORS = {
    "model1": (load_planted_model1, {"n_modules": 4, "units_per_module": (2, 3, 6, 9),
                                     "image_size": (8, 16)}),
    "conv": (load_planted_conv, {"n_modules": 4, "channels_per_module": (2, 4, 6, 12)}),
}


def influence(adapter, layer, seed):
    """The influence result (maps (C, H, W), layer, influence) of cfmodules.influence."""
    return influence_maps(adapter, layer, n_pairs=8, seed=seed, progress=False)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_influence_maps_of_planted_generators_equal_the_naive_reference(name):
    loader, kwargs = GENERATORS[name]
    adapter = loader(seed=0, **kwargs)
    result = influence(adapter, adapter.generator.layer, 0)
    naive = naive_influence_maps(adapter, adapter.generator.layer, n_pairs=8, seed=0)
    assert result.maps.shape == naive.shape
    assert np.abs(result.maps - naive).max() <= 1e-5 * np.abs(naive).max()


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
            assert clust.layer_ == gen.layer
            got.append(adjusted_rand_score(gen.true_labels(), clust.labels_))
    print(f"{name}: ARI nmf {np.round(scores['nmf'], 3).tolist()} "
          f"kmeans {np.round(scores['kmeans'], 3).tolist()}")
    assert min(scores["nmf"]) >= 0.95
    assert min(scores["kmeans"]) >= 0.95


def test_found_modules_hybridize_and_influence_only_their_own_region():
    adapter = load_planted_conv(seed=3)
    gen = adapter.generator
    clust = ModuleClustering(3, random_state=0).fit(influence(adapter, gen.layer, 3))
    z = adapter.sample_latents(8, seed=9)
    original = adapter.generate(z[:4])
    regions = [gen.regions[gen.true_labels()[channels[0]]] for channels in clust.modules_]
    for module, region in zip(modules_from_labels(clust.labels_, gen.layer), regions):
        hybrid = hybridize(adapter, z[:4], z[4:], module)
        changed = ((hybrid - original).abs().amax(dim=(0, 1)) > 0).numpy()
        assert changed.any() and not (changed & ~region).any()
    # Fig. 8 (right): each module's individual influence against its size
    result = module_influence_maps(adapter, modules_from_labels(clust.labels_, gen.layer), n_pairs=8, progress=False)
    assert result.maps.shape == (3, 16, 16) and result.influence.shape == (3,)
    for k, region in enumerate(regions):
        assert result.maps[k][~region].max() == 0 and result.maps[k][region].max() > 0


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
    res = cluster_stability(maps, ks=range(2, 7), n_repeats=8, seed=0)
    print(res)
    assert res.suggest_k("nmf") == adapter.generator.n_modules
