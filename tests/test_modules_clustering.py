"""ModuleClustering: recovery, scikit-learn conventions, determinism, restarts, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from cfmodules.errors import ConfigError, NotFittedError, ShapeError
from cfmodules.modules import (
    ModuleClustering,
    match_labels,
    module_sizes,
    modules_from_labels,
    preprocess,
)
from modules_helpers import block_maps


@pytest.mark.parametrize("method", ["nmf", "kmeans"])
def test_recovers_blocks_and_fitted_attributes(method):
    maps, truth = block_maps((4, 6, 10))
    clust = ModuleClustering(3, method, random_state=0)
    assert clust.fit(maps) is clust
    assert adjusted_rand_score(truth, clust.labels_) == 1.0
    c, h, w = maps.shape
    assert clust.labels_.shape == (c,) and clust.labels_.dtype == np.int64
    assert clust.templates_.shape == (3, h, w)
    assert clust.weights_.shape == (c, 3)
    assert (clust.weights_ >= 0).all() and (clust.templates_ >= 0).all()
    # channel c goes to the template with the largest weight
    assert np.array_equal(clust.labels_, clust.weights_.argmax(axis=1))
    # modules are numbered by decreasing size; modules_ is the same partition
    assert module_sizes(clust.labels_).tolist() == [10, 6, 4]
    assert [len(m) for m in clust.modules_] == [10, 6, 4]
    assert sorted(np.concatenate(clust.modules_).tolist()) == list(range(c))
    assert np.array_equal(clust.features_, preprocess(maps))
    assert clust.n_channels_ == c and clust.map_shape_ == (h, w)
    # each template lights its module's band
    for k in range(3):
        band = clust.templates_[k].mean(axis=0)
        members = clust.features_[clust.labels_ == k].mean(axis=(0, 1))
        assert np.argmax(band) == np.argmax(members)
    if method == "kmeans":
        assert np.array_equal(clust.weights_, np.eye(3)[clust.labels_])
    else:
        np.testing.assert_allclose(clust.templates_.reshape(3, -1).max(axis=1), 1.0)
    expected_err = np.linalg.norm(
        clust.features_.reshape(c, -1) - clust.weights_ @ clust.templates_.reshape(3, -1))
    np.testing.assert_allclose(clust.reconstruction_err_, expected_err, rtol=1e-6)
    assert np.array_equal(clust.predict(maps), clust.labels_)


@pytest.mark.parametrize("method", ["nmf", "kmeans"])
def test_reproducible_and_input_kinds_agree(method):
    maps, _ = block_maps((5, 5, 8), seed=3, noise=0.3)

    class Result:
        def __init__(self, maps):
            self.maps, self.layer, self.influence = maps, "main.8", maps.mean(axis=(1, 2))

    fits = [ModuleClustering(3, method, random_state=7).fit(x)
            for x in (maps, torch.from_numpy(maps), Result(maps), maps)]
    assert fits[2].layer_ == "main.8" and fits[0].layer_ is None
    for f in fits[1:]:
        assert np.array_equal(f.labels_, fits[0].labels_)
        np.testing.assert_allclose(f.templates_, fits[0].templates_, atol=1e-6)


def test_restarts_keep_the_best_fit():
    # Unequal modules: a single k-means start can split the big module; restarts must not.
    maps, truth = block_maps((2, 3, 10, 20), shape=(8, 16), seed=1)
    for method in ("nmf", "kmeans"):
        for seed in range(5):
            clust = ModuleClustering(4, method, n_init=10, random_state=seed).fit(maps)
            assert adjusted_rand_score(truth, clust.labels_) == 1.0, (method, seed)
    # For NMF the first start is deterministic (NNDSVDa), so more restarts never fit worse.
    one = ModuleClustering(4, "nmf", n_init=1, random_state=0).fit(maps)
    ten = ModuleClustering(4, "nmf", n_init=10, random_state=0).fit(maps)
    assert ten.reconstruction_err_ <= one.reconstruction_err_ + 1e-12


def test_an_unlucky_start_is_discarded(monkeypatch):
    """Scripted NMF starts: the one that splits a module fits worse and must not be kept
    (the reference engine; the fast one's restarts: test_restarts_keep_the_best_fit)."""
    import sklearn.decomposition

    from cfmodules.modules import fits

    maps, truth = block_maps((4, 4), shape=(4, 8), noise=0.0)
    feats = preprocess(maps).reshape(8, -1)
    good = np.eye(2)[truth]                      # the true partition
    bad = np.eye(2)[np.arange(8) % 2]            # splits both modules
    starts = iter([bad, good, bad])

    class ScriptedNMF:
        def __init__(self, n_components, **kwargs):
            self.n_iter_ = 1

        def fit_transform(self, x):
            w = next(starts)
            self.components_ = np.linalg.lstsq(w, x, rcond=None)[0].clip(0)
            self.reconstruction_err_ = np.linalg.norm(x - w @ self.components_)
            return w

    monkeypatch.setattr(sklearn.decomposition, "NMF", ScriptedNMF)
    labels, _, _, err, _ = fits.cluster_features(feats, 2, "nmf", 3, 10, 0, backend="sklearn")
    assert adjusted_rand_score(truth, labels) == 1.0
    assert err == pytest.approx(np.linalg.norm(feats - good @ np.linalg.lstsq(
        good, feats, rcond=None)[0].clip(0)))


def test_sklearn_conventions():
    from sklearn.base import clone

    clust = ModuleClustering(2, "kmeans", window=5, percentile=60.0, random_state=1)
    assert clust.get_params() == {
        "n_modules": 2, "method": "kmeans", "window": 5, "percentile": 60.0, "n_init": 10,
        "max_iter": 500, "random_state": 1, "backend": "fast", "n_jobs": None}
    assert clust.set_params(n_modules=3) is clust and clust.n_modules == 3
    with pytest.raises(ValueError, match="Invalid parameter 'k'"):  # scikit-learn's own
        clust.set_params(k=3)
    with pytest.raises(NotFittedError, match="fit"):
        clust.predict(np.ones((3, 4, 4)))
    assert not hasattr(clust, "labels_")
    assert "ModuleClustering(n_modules=3" in repr(clust)
    maps, _ = block_maps((3, 3, 3), shape=(6, 6))
    assert "sizes [3, 3, 3]" in repr(clust.set_params(window=3).fit(maps))
    assert np.array_equal(clust.fit_predict(maps), clust.labels_)
    with pytest.raises(ShapeError, match="fitted on maps of shape"):
        clust.predict(np.ones((3, 5, 5)))
    twin = clone(clust)  # same parameters, nothing learned
    assert twin.get_params() == clust.get_params() and not hasattr(twin, "labels_")
    np.testing.assert_array_equal(twin.fit(maps).labels_, clust.labels_)


def test_learned_attributes_before_fit_raise_both_not_fitted_errors():
    import sklearn.exceptions

    from cfmodules import errors

    clust = ModuleClustering(2)
    for name in ("labels_", "templates_", "weights_", "n_features_in_"):
        with pytest.raises(errors.NotFittedError, match=f"no {name}; call fit"):
            getattr(clust, name)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        clust.labels_  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'labelz_'"):
        clust.labelz_  # noqa: B018


# scikit-learn's estimator checks that cannot apply to a clustering of influence maps,
# with the reason (every other check runs and must pass).
_NOT_APPLICABLE = {
    "check_dtype_object": "object arrays are refused with the library's ShapeError (a "
                          "ValueError, as for every malformed map), not a TypeError",
    "check_estimators_empty_data_messages": "empty maps are refused with the library's own "
                                            "message (ShapeError), not scikit-learn's wording",
    "check_fit2d_predict1d": "1-D input is refused with the library's ShapeError naming the "
                             "(C, H, W) shape it needs, not 'Reshape your data'",
    "check_non_transformer_estimators_n_iter": "n_iter_ is not recorded: each fit keeps the "
                                               "best of n_init restarts of NMF or k-means",
}


@pytest.mark.parametrize("method", ["kmeans", "nmf"])
def test_scikit_learn_estimator_checks(method):
    from sklearn.utils.estimator_checks import check_estimator

    expected = dict(_NOT_APPLICABLE)
    if method == "nmf":
        # check_clustering feeds standardized blobs with negative values although the
        # estimator declares positive_only; NMF refuses them (influence maps are >= 0)
        expected["check_clustering"] = "NMF needs non-negative data; this check ignores the tag"
    # window=1 and percentile=None: the checks' 2-D data are (channels, features) rows
    est = ModuleClustering(2, method, window=1, percentile=None, n_init=2, max_iter=200,
                           random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(est, expected_failed_checks=expected)
def test_dead_channel_warns_and_empty_module_warns():
    maps, _ = block_maps((4, 4), shape=(6, 6))
    maps[0] = 0.0
    with pytest.warns(UserWarning, match="all-zero map"):
        ModuleClustering(2, random_state=0).fit(maps)
    ones = np.ones((4, 6, 6))  # every channel the same: one module at most
    with pytest.warns(UserWarning, match="received no channel"):
        ModuleClustering(2, random_state=0).fit(ones)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_modules": 0}, "n_modules must be an integer >= 1"),
        ({"n_modules": 2.5}, "n_modules must be an integer"),
        ({"n_modules": 7}, "more than the 6 channels"),
        ({"method": "spectral"}, "method must be 'nmf' or 'kmeans'"),
        ({"window": 4}, "window"),
        ({"window": 0}, "window"),
        ({"percentile": 100}, "percentile"),
        ({"percentile": 0}, "percentile"),
        ({"n_init": 0}, "n_init"),
    ],
)
def test_bad_parameters(kwargs, match):
    maps, _ = block_maps((3, 3), shape=(6, 6))
    params = {"n_modules": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ModuleClustering(**params).fit(maps)


def test_bad_maps():
    with pytest.raises(ConfigError, match="NaN"):
        ModuleClustering(2).fit(np.full((3, 4, 4), np.nan))
    with pytest.raises(ConfigError, match="are zero"):
        ModuleClustering(2).fit(np.zeros((3, 4, 4)))
    with pytest.raises(ShapeError, match="different shapes"):
        ModuleClustering(2).fit([np.ones((4, 4)), np.ones((5, 4))])
    with pytest.raises(ShapeError, match="channels, height, width"):
        ModuleClustering(2).fit(np.ones((3, 16)))
    with pytest.raises(ConfigError, match="non-negative"):
        ModuleClustering(2, percentile=None).fit(-np.random.default_rng(0).random((3, 4, 4)))
    with pytest.raises(ConfigError, match="pixels"):
        ModuleClustering(5, window=1).fit(np.random.default_rng(0).random((6, 2, 2)))


def test_unthresholded_maps_can_be_clustered():
    maps, truth = block_maps((4, 6), shape=(6, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clust = ModuleClustering(2, percentile=None, random_state=0).fit(maps)
    assert match_labels(clust.labels_, truth)[0] == 1.0


def test_module_sizes():
    assert module_sizes(np.array([0, 2, 2, 1, 2])).tolist() == [1, 1, 3]
    assert module_sizes(np.array([0, 0]), n_modules=3).tolist() == [2, 0, 0]
    with pytest.raises(ConfigError):
        module_sizes(np.array([0, 3]), n_modules=2)
    with pytest.raises(ShapeError):
        module_sizes(np.array([0.5, 1.0]))


def test_modules_from_labels_for_one_layer_several_layers_and_explicit_units():
    labels = np.array([1, 0, 1, 2, 0])
    assert modules_from_labels(labels, "a") == [{"a": [1, 4]}, {"a": [0, 2]}, {"a": [3]}]
    assert modules_from_labels(labels, {"a": 2, "b": 3}) == [
        {"a": [1], "b": [2]}, {"a": [0], "b": [0]}, {"b": [1]}]
    units = [("a", 7), ("a", 3), ("b", 0), ("b", 5), ("a", 1)]
    assert modules_from_labels(labels, units, n_modules=4) == [
        {"a": [3, 1]}, {"a": [7], "b": [0]}, {"b": [5]}, {}]
    got = modules_from_labels(np.array([0, 0], dtype=np.int32), "x")
    assert all(type(c) is int for c in got[0]["x"])  # JSON-ready
    with pytest.raises(ShapeError, match="5 labels but 4 units"):
        modules_from_labels(labels, {"a": 4})
    with pytest.raises(ConfigError, match="n_modules"):
        modules_from_labels(labels, "a", n_modules=2)


def test_labels_become_modules_by_modules_from_labels_only():
    maps, _ = block_maps((2, 3), shape=(4, 6))
    clust = ModuleClustering(2, random_state=0).fit(maps)
    assert not hasattr(clust, "to_modules")
    assert modules_from_labels(clust.labels_, "main.8") == [
        {"main.8": clust.modules_[k].tolist()} for k in range(2)]


def test_clustering_runs_with_one_blas_thread_and_restores_it(monkeypatch):
    from threadpoolctl import threadpool_info

    from cfmodules.modules import fits, hals

    before = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()
              if p["user_api"] == "blas"]
    seen = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(fits, "_sklearn_fit", spy(fits._sklearn_fit))
    monkeypatch.setattr(hals, "nmf_hals", spy(hals.nmf_hals))
    rng = np.random.default_rng(0)
    for backend in ("sklearn", "fast"):
        fits.cluster_features(rng.random((12, 30)), 3, "nmf", 1, 50, 0, backend=backend)
    assert len(seen) >= 2 and set(seen) == {1}
    after = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()
             if p["user_api"] == "blas"]
    assert after == before
