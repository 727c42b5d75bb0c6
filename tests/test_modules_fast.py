"""The fast clustering engine gives scikit-learn's fits (k-means on the Gram matrix, NMF in
float32), so the stability sweep's numbers do not depend on the backend."""

from __future__ import annotations

import numpy as np
import pytest

from cfmodules.errors import ConfigError
from cfmodules.modules import cluster_stability
from cfmodules.modules.clustering import cluster_features, cluster_many
from modules_helpers import block_maps


def features(seed=0, noise=0.6, binary=True):
    maps, _ = block_maps((5, 7, 9), shape=(6, 10), seed=seed, noise=noise)
    flat = maps.reshape(len(maps), -1)
    if binary:  # like thresholded maps: many exactly equal distances
        flat = (flat > np.percentile(flat, 75, axis=1, keepdims=True)).astype(float)
    return flat


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_on_the_gram_matrix_equals_sklearn(k):
    # continuous features: on 0/1 features a point can be exactly as far from two
    # centroids, and scikit-learn's choice then rests on the rounding of its centred data
    flat = features(seed=k, binary=False)
    for seed in range(3):
        ref = cluster_features(flat, k, "kmeans", 3, 300, seed, backend="sklearn")
        got = cluster_features(flat, k, "kmeans", 3, 300, seed, backend="fast")
        assert np.array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-9, atol=1e-12)  # centroids
        assert got[3] == pytest.approx(ref[3], rel=1e-9)  # sqrt(inertia)
        assert got[4] == ref[4]


def test_kmeans_subsets_share_one_gram_matrix():
    flat = features(seed=1, binary=False)
    rows = [np.arange(0, 14), np.arange(7, 21)]
    together = cluster_many([flat[r] for r in rows], 3, "kmeans", 2, 100, [4, 5],
                            gram=(flat @ flat.T, rows))
    for r, seed, fit in zip(rows, (4, 5), together):
        alone = cluster_features(flat[r], 3, "kmeans", 2, 100, seed, backend="sklearn")
        assert np.array_equal(fit[0], alone[0])


def test_nmf_fast_equals_sklearn_to_float32_rounding():
    flat = features(seed=2)
    ref = cluster_features(flat, 3, "nmf", 3, 200, 0, backend="sklearn")
    got = cluster_features(flat, 3, "nmf", 3, 200, 0, backend="fast")
    assert np.array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[2], ref[2], atol=1e-4)
    assert got[3] == pytest.approx(ref[3], rel=1e-5)


def test_stability_backends_agree():
    maps, _ = block_maps((5, 6, 7), shape=(8, 9), seed=2, noise=0.8)
    kw = dict(ks=[2, 3], n_repeats=2, n_init=2, seed=3, percentile=None)
    ref = cluster_stability(maps, backend="sklearn", **kw)
    got = cluster_stability(maps, **kw)
    np.testing.assert_allclose(got.consistency, ref.consistency, atol=1e-12)
    np.testing.assert_allclose(got.cosine, ref.cosine, atol=1e-5)
    with pytest.raises(ConfigError, match="backend"):
        cluster_stability(maps, backend="gpu", **kw)


def test_pooled_nmf_is_block_constant_and_recorded():
    maps, _ = block_maps((4, 4, 4), shape=(8, 8), seed=0, noise=0.1)
    res = cluster_stability(maps, ks=[3], methods=["nmf"], n_repeats=2, nmf_pool=2, seed=0)
    assert res.settings["nmf_pool"] == 2
    assert res.suggest_k() == 3 and res.consistency.min() == 1.0
    with pytest.raises(ConfigError, match="nmf_pool"):
        cluster_stability(maps, ks=[3], nmf_pool=0)
    with pytest.raises(ConfigError, match="larger than the maps"):
        cluster_stability(maps, ks=[3], nmf_pool=9)
