"""The fast clustering engine: the same k-means as scikit-learn (on the Gram matrix), NMF by
scikit-learn's updates batched and stopped earlier (its stability statistics agree with the
reference's), and results that do not depend on the number of processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cfmodules.errors import ConfigError
from cfmodules.modules import ModuleClustering, cluster_stability, fits, hals
from cfmodules.modules.fits import cluster_features, cluster_many
from modules_helpers import block_maps


def features(seed=0, noise=0.6, binary=True, sizes=(5, 7, 9), shape=(6, 10)):
    maps, truth = block_maps(sizes, shape=shape, seed=seed, noise=noise)
    flat = maps.reshape(len(maps), -1)
    if binary:  # like thresholded maps: many exactly equal distances
        flat = (flat > np.percentile(flat, 75, axis=1, keepdims=True)).astype(float)
    return flat, truth


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_on_the_gram_matrix_equals_sklearn(k):
    # continuous features: on 0/1 features a point can be exactly as far from two
    # centroids, and scikit-learn's choice then rests on the rounding of its centred data
    flat, _ = features(seed=k, binary=False)
    for seed in range(3):
        ref = cluster_features(flat, k, "kmeans", 3, 300, seed, backend="sklearn")
        got = cluster_features(flat, k, "kmeans", 3, 300, seed, backend="fast")
        assert np.array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-9, atol=1e-12)  # centroids
        assert got[3] == pytest.approx(ref[3], rel=1e-9)  # sqrt(inertia)
        assert got[4] == ref[4]


def test_kmeans_subsets_share_one_gram_matrix():
    flat, _ = features(seed=1, binary=False)
    rows = [np.arange(0, 14), np.arange(7, 21)]
    together = cluster_many([flat[r] for r in rows], 3, "kmeans", 2, 100, [4, 5],
                            gram=(flat @ flat.T, rows))
    for r, seed, fit in zip(rows, (4, 5), together):
        alone = cluster_features(flat[r], 3, "kmeans", 2, 100, seed, backend="sklearn")
        assert np.array_equal(fit[0], alone[0])


def test_nmf_starts_are_sklearns():
    flat, _ = features(seed=3)
    x = flat.astype(np.float32)
    for k in (2, 4):
        w0, h0 = hals.nmf_starts(x, k, 3, 11)
        # restart i's seed is the i-th draw of RandomState(11), as in the sklearn backend
        seeds = np.random.RandomState(11).randint(np.iinfo(np.int32).max, size=3)
        for i in (1, 2):  # random starts: exactly scikit-learn's (max_iter=0 fits nothing)
            rng = np.random.RandomState(seeds[i])
            avg = np.sqrt(x.mean() / k)
            h = np.abs(avg * rng.standard_normal((k, x.shape[1])).astype(np.float32))
            w = np.abs(avg * rng.standard_normal((len(x), k)).astype(np.float32))
            assert np.array_equal(w0[i], w) and np.array_equal(h0[i], h)
        # NNDSVDa from the exact SVD: scikit-learn's start up to its randomized SVD's error
        try:  # scikit-learn's own start (private: skip if it moved)
            from sklearn.decomposition._nmf import _initialize_nmf
        except ImportError:
            pytest.skip("scikit-learn's _initialize_nmf moved")
        w1, h1 = _initialize_nmf(x, k, "nndsvda", random_state=int(seeds[0]))
        np.testing.assert_allclose(w0[0] @ h0[0], w1 @ h1, atol=2e-2 * np.abs(w1 @ h1).max())


@pytest.mark.parametrize("k", [2, 4])
def test_hals_steps_are_sklearns_coordinate_descent(k):
    # float64, a fixed number of iterations: the same W and H as scikit-learn's solver="cd"
    # from the same start, to float rounding
    import warnings

    from sklearn.decomposition import NMF

    flat, _ = features(seed=7)
    w0, h0 = hals.nmf_starts(flat, k, 2, 3)
    for n_iter in (1, 7):
        w, h, err, _ = hals.nmf_hals(flat, w0, h0, n_iter, patience=10_000)
        for r in range(2):
            model = NMF(k, init="custom", solver="cd", max_iter=n_iter, tol=0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # max_iter reached
                w_ref = model.fit_transform(flat, W=w0[r].copy(), H=h0[r].copy())
            np.testing.assert_allclose(w[r], w_ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(h[r], model.components_, rtol=1e-9, atol=1e-12)
            assert err[r] == pytest.approx(model.reconstruction_err_, rel=1e-9)


def test_hals_loss_is_the_reconstruction_error_and_never_increases():
    flat, _ = features(seed=4)
    x = flat.astype(np.float32)
    w0, h0 = hals.nmf_starts(x, 3, 4, 0)
    errs = []
    for it in (1, 2, 5, 20):
        w, h, err, iters = hals.nmf_hals(x, w0, h0, it, patience=10_000)
        assert (iters == it).all() and (w >= 0).all() and (h >= 0).all()
        naive = [np.linalg.norm(x.astype(np.float64) - w[r].astype(np.float64) @ h[r])
                 for r in range(4)]
        np.testing.assert_allclose(err, naive, rtol=2e-4)
        errs.append(err)
    assert (np.diff(np.array(errs), axis=0) <= 1e-4 * errs[0]).all()


def test_restarts_run_alone_or_batched_end_the_same():
    flat, _ = features(seed=5)
    x = flat.astype(np.float32)
    w0, h0 = hals.nmf_starts(x, 3, 3, 2)
    w, h, err, iters = hals.nmf_hals(x, w0, h0, 200)
    for r in range(3):
        w1, h1, e1, i1 = hals.nmf_hals(x, w0[r:r + 1], h0[r:r + 1], 200)
        assert i1[0] == iters[r]  # the stopping rule sees the same labels and losses
        assert e1[0] == pytest.approx(err[r], rel=1e-4)


def test_fast_nmf_recovers_the_modules_of_the_reference():
    flat, truth = features(seed=6, noise=0.3)
    ref = cluster_features(flat, 3, "nmf", 5, 300, 0, backend="sklearn")
    got = cluster_features(flat, 3, "nmf", 5, 300, 0, backend="fast")
    assert adjusted_rand_score(truth, ref[0]) == adjusted_rand_score(truth, got[0]) == 1.0
    assert np.array_equal(got[0], ref[0])  # the same numbering (by module size)
    assert got[3] == pytest.approx(ref[3], rel=0.01)  # reconstruction error
    assert got[4]  # stopped by the rule, not by max_iter
    cos = (got[2] * ref[2]).sum(1) / np.linalg.norm(got[2], axis=1) / np.linalg.norm(
        ref[2], axis=1)
    assert cos.min() > 0.99


def test_stability_fast_within_0_02_of_the_reference():
    maps, _ = block_maps((10, 20, 30), shape=(12, 16), seed=0, noise=0.6)
    kw = dict(ks=[2, 3, 4], n_repeats=6, n_init=3, seed=3, methods=["nmf"])
    ref = cluster_stability(maps, backend="sklearn", n_jobs=1, **kw)
    got = cluster_stability(maps, n_jobs=1, **kw)
    for metric in ("consistency", "cosine"):
        diff = np.abs(got.mean(metric) - ref.mean(metric))[0]
        assert diff[:2].max() <= 0.02, metric  # K = 2, 3 (planted: 3)
        # K = 4 splits a planted module arbitrarily: both engines are noisy there (the
        # reference moves by 0.03-0.13 between seeds), only the gross shape must agree
        assert diff[2] <= 0.1, metric
    assert got.suggest_k() == ref.suggest_k() == 3
    assert got.settings["backend"] == "fast" and "HALS" in got.settings["engine"]
    assert ref.settings["backend"] == "sklearn"
    with pytest.raises(ConfigError, match="backend"):
        cluster_stability(maps, backend="gpu", **kw)


@pytest.mark.numerics
def test_results_do_not_depend_on_n_jobs(monkeypatch):
    monkeypatch.setattr(fits, "MIN_PARALLEL_WORK", 0)  # tiny problems: workers all the same
    spread = []
    real = fits._run_batch
    monkeypatch.setattr(fits, "_run_batch", lambda fn, tasks: spread.append(len(tasks))
                        or real(fn, tasks))
    maps, _ = block_maps((6, 7, 8), shape=(8, 10), seed=1, noise=0.7)
    kw = dict(ks=[2, 3], n_repeats=3, seed=5)
    one = cluster_stability(maps, n_jobs=1, **kw)
    assert spread[0] == 2 * 2 * 3 * 2  # every clustering in this process, one batch
    n_here = len(spread)
    two = cluster_stability(maps, n_jobs=2, **kw)
    assert len(spread) == n_here  # all in the workers (the spy does not exist there)
    assert np.array_equal(one.consistency, two.consistency)
    assert np.array_equal(one.cosine, two.cosine)
    # the main fit's 12 restarts: groups of 5, 5 and 2, here or in two processes
    a = ModuleClustering(3, n_init=12, random_state=0, n_jobs=1).fit(maps)
    assert spread[-1] == 3
    n_here = len(spread)
    b = ModuleClustering(3, n_init=12, random_state=0, n_jobs=2).fit(maps)
    assert len(spread) == n_here
    assert np.array_equal(a.labels_, b.labels_)
    assert np.array_equal(a.templates_, b.templates_)
    assert a.reconstruction_err_ == b.reconstruction_err_


def test_n_jobs_checked_and_defaults_to_the_usable_cores(monkeypatch):
    import torch

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="n_jobs"):
            fits.check_jobs(bad)
    with pytest.raises(ConfigError, match="n_jobs"):
        ModuleClustering(2, n_jobs=0).fit(np.ones((4, 3, 3)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        assert fits.check_jobs(None) == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # torchrun: share the cores
        assert fits.check_jobs(None) == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        torch.set_num_threads(1)  # cfmodules --threads 1
        assert fits.check_jobs(None) == 1
    finally:
        torch.set_num_threads(threads)


def test_workers_import_neither_sklearn_nor_torch():
    code = ("import sys, cfmodules.modules.fits, cfmodules.modules.hals, "
            "cfmodules.modules.batched; print(sorted(m for m in ('sklearn', 'scipy', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_pooled_nmf_is_block_constant_and_recorded():
    maps, _ = block_maps((4, 4, 4), shape=(8, 8), seed=0, noise=0.1)
    res = cluster_stability(maps, ks=[3], methods=["nmf"], n_repeats=2, nmf_pool=2, seed=0)
    assert res.settings["nmf_pool"] == 2
    assert res.suggest_k() == 3 and res.consistency.min() == 1.0
    with pytest.raises(ConfigError, match="nmf_pool"):
        cluster_stability(maps, ks=[3], nmf_pool=0)
    with pytest.raises(ConfigError, match="larger than the maps"):
        cluster_stability(maps, ks=[3], nmf_pool=9)


def test_blas_is_limited_to_one_thread_once_per_sweep_not_once_per_fit(monkeypatch):
    """Each limit costs ~3 ms (threadpoolctl lists the loaded libraries): a sweep of 16
    fits, each nesting a batch of restarts, sets it once, and the fits run inside it."""
    import threadpoolctl

    from cfmodules.modules import batched

    real, calls, inside = threadpoolctl.threadpool_limits, [], []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits",
                        lambda *a, **k: calls.append(k) or real(*a, **k))

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}

    for module, name in ((hals, "nmf_hals"), (batched, "kmeans_many")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, fn=fn, **k: inside.append(blas_threads()) or fn(*a, **k))
    maps, _ = block_maps((4, 4, 4), shape=(8, 8), seed=0, noise=0.1)
    cluster_stability(maps, ks=[2, 3], methods=["nmf", "kmeans"], n_repeats=2, seed=0,
                      n_jobs=1)
    assert calls == [{"limits": 1, "user_api": "blas"}]
    assert len(inside) >= 16 and all(t <= {1} for t in inside)


def test_a_started_sweep_runs_on_the_workers_while_the_caller_goes_on(monkeypatch):
    import warnings

    from cfmodules.modules.stability import start_stability

    monkeypatch.setattr(fits, "MIN_PARALLEL_WORK", 0)
    maps, _ = block_maps((6, 7, 8), shape=(8, 10), seed=1, noise=0.7)
    kw = dict(ks=[2, 3], n_repeats=3, seed=5)
    ref = cluster_stability(maps, n_jobs=1, **kw)
    here = []
    real = fits._run_batch
    monkeypatch.setattr(fits, "_run_batch", lambda fn, tasks: here.append(len(tasks))
                        or real(fn, tasks))
    run = start_stability(maps, n_jobs=2, **kw)
    assert run.in_background and here == []  # handed to the workers, nothing ran here
    ModuleClustering(2, random_state=0, n_jobs=1).fit(maps)  # the caller's own work
    got = run.result()
    assert np.array_equal(ref.consistency, got.consistency)
    assert np.array_equal(ref.cosine, got.cosine)
    # one job: the clusterings run in result(), not when started
    lazy = start_stability(maps, n_jobs=1, **kw)
    n_here = len(here)
    assert not lazy.in_background
    assert np.array_equal(lazy.result().consistency, ref.consistency) and len(here) > n_here
    # cancelled (after an error in the caller): quietly, twice, and the workers serve again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stopped = start_stability(maps, n_jobs=2, **kw)
        stopped.cancel()
        stopped.cancel()
    again = cluster_stability(maps, n_jobs=2, **kw)
    assert np.array_equal(again.cosine, ref.cosine)


def test_started_workers_serve_the_clusterings():
    from cfmodules.modules.fits import run_parallel, start_workers

    start_workers(1)  # one job: no worker, nothing to start
    start_workers(2)
    pids = set(run_parallel(fits._ready, [()] * 8, 2))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
