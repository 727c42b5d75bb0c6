"""The stability protocol of sec. 4.1, Hungarian matching, saving, and the choice of K."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfmodules.errors import ConfigError, ShapeError
from cfmodules.modules import (
    StabilityResult,
    cluster_stability,
    match_labels,
    suggest_k,
    template_similarity,
)
from modules_helpers import block_maps


def test_match_labels_by_hand():
    a = np.array([0, 0, 1, 1, 2, 2])
    b = np.array([2, 2, 0, 0, 1, 0])  # a renumbered, with one channel moved
    cons, match = match_labels(a, b)
    assert cons == pytest.approx(5 / 6)
    assert match.tolist() == [2, 0, 1]
    assert match_labels(a, a)[0] == 1.0
    # the best one-to-one matching, not each module's majority: both a-modules prefer b=0
    cons, match = match_labels(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 0, 0, 1]))
    assert cons == pytest.approx(3 / 5) and match.tolist() == [0, 1]
    with pytest.raises(ShapeError):
        match_labels([0, 1], [0, 1, 1])


def test_template_similarity_by_hand():
    t1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    t2 = np.array([[0.0, 2.0], [1.0, 1.0]])
    assert template_similarity(t1, t2, [1, 0]) == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert template_similarity(t1, t1) == pytest.approx(1.0)
    assert template_similarity(t1, np.zeros((2, 2))) == 0.0
    with pytest.raises(ShapeError):
        template_similarity(t1, np.ones((3, 2)))


def naive_protocol(maps, k, method, random_state, repeat=0, n_init=2):
    """One repetition written out with ModuleClustering and brute-force matching.

    Seeds follow cluster_stability's documented derivation, so the numbers must agree.
    """
    from itertools import permutations

    from cfmodules.modules import METHODS, ModuleClustering

    n = len(maps)
    split_seed, cluster_seed = np.random.RandomState(random_state).randint(2**31 - 1, size=2)
    split_rng = np.random.RandomState(split_seed)
    for _ in range(repeat + 1):
        a, b, c = np.array_split(split_rng.permutation(n), 3)
    s1, s2 = np.random.SeedSequence(
        [int(cluster_seed), repeat, METHODS.index(method), k]).generate_state(2)
    run1 = ModuleClustering(k, method, n_init=n_init, max_iter=300,
                            random_state=int(s1)).fit(maps[np.r_[a, b]])
    run2 = ModuleClustering(k, method, n_init=n_init, max_iter=300,
                            random_state=int(s2)).fit(maps[np.r_[b, c]])
    lab1 = dict(zip(np.r_[a, b], run1.labels_))
    lab2 = dict(zip(np.r_[b, c], run2.labels_))
    best, best_perm = -1.0, None
    for perm in permutations(range(k)):
        agree = np.mean([perm[lab1[i]] == lab2[i] for i in b])
        if agree > best:
            best, best_perm = agree, perm
    t1, t2 = run1.templates_.reshape(k, -1), run2.templates_.reshape(k, -1)
    cos = np.mean([t1[i] @ t2[best_perm[i]] / np.linalg.norm(t1[i]) / np.linalg.norm(
        t2[best_perm[i]]) for i in range(k)])
    return best, cos


@pytest.mark.parametrize("method", ["nmf", "kmeans"])
def test_protocol_matches_a_naive_implementation(method):
    maps, _ = block_maps((5, 6, 7), shape=(8, 9), seed=2, noise=0.8)
    res = cluster_stability(maps, ks=[2, 3, 4], methods=[method], n_repeats=2, n_init=2,
                            seed=3)
    for j, k in enumerate([2, 3, 4]):
        for r in range(2):
            cons, cos = naive_protocol(maps, k, method, 3, repeat=r)
            assert res.consistency[0, j, r] == pytest.approx(cons)
            assert res.cosine[0, j, r] == pytest.approx(cos)
    assert res.consistency.min() < 1.0  # the noisy maps make the check non-trivial


def test_stable_at_true_k_and_result_shapes():
    maps, _ = block_maps((8, 8, 8), shape=(8, 12), seed=0, noise=0.1)
    res = cluster_stability(maps, ks=range(2, 6), n_repeats=6, seed=0)
    assert res.methods == ("nmf", "kmeans")
    assert res.ks.tolist() == [2, 3, 4, 5]
    assert res.consistency.shape == res.cosine.shape == (2, 4, 6)
    assert ((res.consistency > 0) & (res.consistency <= 1)).all()
    assert ((res.cosine >= 0) & (res.cosine <= 1 + 1e-9)).all()
    j3 = 1
    assert (res.consistency[:, j3] == 1.0).all()
    assert (res.mean("cosine")[:, j3] > 0.95).all()
    assert res.suggest_k() == 3 and res.suggest_k("kmeans") == 3
    assert res.mean().shape == res.std("cosine").shape == (2, 4)
    assert "nmf consistency" in repr(res) and "kmeans cosine" in res.to_text()
    assert not hasattr(res, "table")  # one verb: to_text


@pytest.mark.numerics
def test_deterministic_and_methods_independent():
    maps, _ = block_maps((4, 5, 6), shape=(6, 9), seed=4, noise=0.5)
    # exact by design: the same seeded computation, and each method has its own seed stream
    both = cluster_stability(maps, ks=[2, 3], n_repeats=3, seed=5)
    again = cluster_stability(maps, ks=[2, 3], n_repeats=3, seed=5)
    alone = cluster_stability(maps, ks=[2, 3], methods=["kmeans"], n_repeats=3, seed=5)
    assert np.array_equal(both.consistency, again.consistency)
    assert np.array_equal(both.cosine, again.cosine)
    # a method's curve is the same whether or not the other method ran beside it
    assert np.array_equal(alone.consistency[0], both.consistency[1])
    other = cluster_stability(maps, ks=[2, 3], n_repeats=3, seed=6)
    with pytest.raises(TypeError, match="random_state"):  # functions take seed=
        cluster_stability(maps, ks=[2, 3], n_repeats=3, random_state=5)
    assert not np.array_equal(other.cosine, both.cosine)


def test_to_dict_roundtrip_without_pickle(tmp_path):
    maps, _ = block_maps((4, 4, 4), shape=(6, 6))
    res = cluster_stability(maps, ks=[2, 3], n_repeats=2, window=(1, 3), seed=0)
    d = res.to_dict()
    path = tmp_path / "stab.npz"
    np.savez(path, **{k: v for k, v in d.items() if k != "settings"},
             settings=json.dumps(d["settings"]))
    with np.load(path, allow_pickle=False) as f:
        back = StabilityResult.from_dict(dict(f))
    assert back.methods == res.methods
    assert np.array_equal(back.ks, res.ks)
    assert np.array_equal(back.consistency, res.consistency)
    assert back.settings == res.settings
    assert back.settings["window"] == [1, 3] and back.settings["n_channels"] == 12
    with pytest.raises(ConfigError, match="needs the key"):
        StabilityResult.from_dict({"ks": [2]})
    with pytest.raises(ShapeError):
        StabilityResult.from_dict({**d, "cosine": d["cosine"][:, :1]})


def make_result(cons, cos, ks=(2, 3, 4, 5)):
    arr = lambda x: np.asarray(x, dtype=float)[None, :, None]  # noqa: E731
    return StabilityResult(np.array(ks), ("nmf",), arr(cons), arr(cos))


def test_suggest_k_rule():
    # the paper's picture: K=2 and K=3 both reproducible, a considerable drop at K=4
    assert suggest_k(make_result([0.95, 0.94, 0.70, 0.65], [0.92, 0.92, 0.7, 0.6])) == 3
    # splitting a planted module: consistency stays high but templates disagree
    assert suggest_k(make_result([0.7, 1.0, 0.92, 0.91], [0.45, 0.98, 0.95, 0.89])) == 3
    assert suggest_k(make_result([0.7, 1.0, 0.92, 0.91], [0.45, 0.98, 0.95, 0.89]),
                     tolerance=0.15) == 4
    assert suggest_k(make_result([1.0, 0.5], [1.0, 0.5], ks=(1, 2))) == 2  # K=1 is trivial
    assert suggest_k(make_result([1.0], [1.0], ks=(1,))) == 1
    with pytest.raises(ConfigError, match="was not run"):
        suggest_k(make_result([1.0] * 4, [1.0] * 4), "kmeans")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ks": [2, 9]}, ConfigError, "two-thirds subset"),
        ({"ks": [0, 2]}, ConfigError, "ks must be"),
        ({"ks": [2, 2]}, ConfigError, "ks must be"),
        ({"ks": [2.5]}, ConfigError, "ks must be"),
        ({"methods": ["nmf", "dbscan"]}, ConfigError, "methods"),
        ({"methods": []}, ConfigError, "methods"),
        ({"n_repeats": 0}, ConfigError, "n_repeats"),
        ({"window": 2}, ConfigError, "window"),
        ({"percentile": 100.0}, ConfigError, "percentile"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    maps, _ = block_maps((4, 4, 4), shape=(6, 6))
    with pytest.raises(error, match=match):
        cluster_stability(maps, **{"ks": [2], **kwargs})


def test_bad_maps():
    with pytest.raises(ConfigError, match="three"):
        cluster_stability(np.ones((2, 4, 4)), ks=[1])
    with pytest.raises(ConfigError, match="NaN"):
        cluster_stability(np.full((6, 4, 4), np.nan), ks=[2])
    with pytest.raises(ConfigError, match="zero"):
        cluster_stability(np.zeros((6, 4, 4)), ks=[2])
