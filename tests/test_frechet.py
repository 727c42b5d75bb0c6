"""Fréchet distance: exactness against naive numpy, closed forms, streaming, Table 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.errors import ConfigError, ShapeError
from cfmodules.evaluation.frechet import (
    DistanceTable,
    FeatureStatistics,
    feature_statistics,
    frechet_distance,
    frechet_distance_images,
)


def naive_frechet(xa: np.ndarray, xb: np.ndarray) -> float:
    """Reference: stacked features, np.cov, square root through eigendecompositions.

    tr((Sa Sb)^1/2) = tr((Sa^1/2 Sb Sa^1/2)^1/2), the latter symmetric PSD, so eigh
    suffices -- independent of scipy.linalg.sqrtm.
    """
    ma, mb = xa.mean(0), xb.mean(0)
    sa, sb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(ra @ sb @ ra)
    return float(((ma - mb) ** 2).sum() + np.trace(sa) + np.trace(sb)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_statistics_match_numpy_whatever_the_batching():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 5)) * [1, 2, 3, 4, 5] + 7.0
    for sizes in ([103], [1] * 103, [50, 3, 50], [2, 100, 1]):
        st = FeatureStatistics()
        s = 0
        for b in sizes:
            st.update(x[s:s + b])
            s += b
        assert st.n == 103
        np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.cov, np.cov(x, rowvar=False), rtol=1e-10)


def test_statistics_accumulate_in_float64():
    # large offset, tiny spread: a float32 naive sum would lose the variance entirely
    x = (1e4 + np.arange(1000) * 1e-3).astype(np.float64)[:, None]
    st = FeatureStatistics()
    for s in range(0, 1000, 7):
        st.update(torch.tensor(x[s:s + 7]))
    np.testing.assert_allclose(st.cov[0, 0], np.var(x, ddof=1), rtol=1e-8)


def test_distance_matches_naive_reference():
    rng = np.random.default_rng(1)
    xa = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    xb = rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) + 0.5
    sa = FeatureStatistics().update(xa)
    sb = FeatureStatistics().update(xb)
    d = frechet_distance(sa, sb)
    assert d == pytest.approx(naive_frechet(xa, xb), rel=1e-8)
    assert frechet_distance(sb, sa) == pytest.approx(d, rel=1e-8)
    assert frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-8)


def test_closed_form_gaussians():
    # commuting (diagonal) covariances: d = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, -2.0])
    expected = 9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(expected)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(([0.0], [[4.0]]), ([3.0], [[1.0]])) == pytest.approx(9 + 1)


def test_non_commuting_covariances():
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    s2 = np.array([[1.0, 0.0], [0.0, 3.0]])
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    assert frechet_distance((np.zeros(2), s1), (np.zeros(2), s2)) == pytest.approx(expected)


def test_sample_estimate_converges_to_the_population_distance():
    rng = np.random.default_rng(2)
    n = 20000
    xa = rng.normal(size=(n, 2)) * [1.0, 2.0]
    xb = rng.normal(size=(n, 2)) * [2.0, 1.0] + [1.0, 0.0]
    expected = 1.0 + 2 * (2 - 1) ** 2
    d = frechet_distance(FeatureStatistics().update(xa), FeatureStatistics().update(xb))
    assert d == pytest.approx(expected, rel=0.03)


def test_singular_covariances_use_eps_offset():
    s = np.zeros((3, 3))
    s[0, 0] = 1.0
    d = frechet_distance((np.zeros(3), s), (np.ones(3), s))
    assert np.isfinite(d) and d == pytest.approx(3.0, abs=1e-4)


def test_few_samples_warn():
    x = np.random.default_rng(0).normal(size=(4, 6))
    st = FeatureStatistics().update(x)
    with pytest.warns(UserWarning, match="singular"):
        frechet_distance(st, st)


def test_invalid_covariance_is_an_error():
    bad = np.array([[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(ShapeError, match="imaginary"):
        frechet_distance((np.zeros(2), bad), (np.zeros(2), np.eye(2)))


def test_bad_inputs():
    with pytest.raises(ShapeError, match=r"\(batch, dim\)"):
        FeatureStatistics().update(np.zeros((2, 3, 4)))
    st = FeatureStatistics().update(np.zeros((2, 3)))
    with pytest.raises(ShapeError, match="dimension changed"):
        st.update(np.zeros((2, 4)))
    with pytest.raises(ShapeError, match="NaN"):
        FeatureStatistics().update(np.array([[np.nan]]))
    with pytest.raises(ConfigError, match="at least 2"):
        _ = FeatureStatistics().update(np.zeros((1, 3))).cov
    with pytest.raises(ShapeError, match="different sizes"):
        frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(3), np.eye(3)))
    with pytest.raises(ConfigError, match="mean, covariance"):
        frechet_distance("x", (np.zeros(2), np.eye(2)))
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\)"):
        feature_statistics(torch.zeros(3, 8, 8), features=lambda x: x.flatten(1))


class Pool(torch.nn.Module):
    """A tiny feature network: per-channel mean and std, plus a linear map."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)
        torch.nn.init.eye_(self.lin.weight[:2])

    def forward(self, x):
        return self.lin(torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1))


def test_images_streamed_through_a_module_equal_the_batch_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 1, 6, 6, generator=g)
    b = torch.rand(50, 1, 6, 6, generator=g) ** 2
    net = Pool().train()
    d1 = frechet_distance_images(a, b, net, batch_size=7)
    assert net.training  # restored
    loader = [(b[:20], None), (b[20:], None)]  # DataLoader-like (images, labels)
    d2 = frechet_distance_images(a.numpy(), loader, net, batch_size=40)
    with torch.no_grad():
        ref = naive_frechet(net(a).double().numpy(), net(b).double().numpy())
    assert d1 == pytest.approx(ref, rel=1e-6) and d2 == pytest.approx(ref, rel=1e-6)


def test_distance_table_rendering():
    t = DistanceTable(["R", "G", "C0"], np.array([[0, 2.0, 3.0], [2.0, 0, 0.5], [3.0, 0.5, 0]]), 10, 2.0)
    assert t.distance("C0", "R", normalized=True) == pytest.approx(1.5)
    txt = t.to_text()
    assert "1.500" in txt and "0.250" in txt and "d(R, G)" in txt
    md = t.to_markdown()
    assert md.splitlines()[0].startswith("|") and "0.250" in md
    assert t.to_dict()["normalized"][2][1] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="Did you mean 'C0'"):
        t.distance("C1", "G")


# ------------------------------------------------------------------ Table 2 on a tiny generator


def _flat(x):
    return x.flatten(1)


@pytest.mark.numerics
def test_hybrid_distance_table_matches_a_naive_computation(tiny):
    from cfmodules.adapter import GeneratorAdapter
    from cfmodules.evaluation.frechet import hybrid_distance_table
    from cfmodules.hybrid import hybridize

    ad = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    n = 60
    mods = {"A": {"act": [0, 1]}, "B": {"act": [2, 3]}}
    real = torch.rand(n + 5, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    t = hybrid_distance_table(ad, mods, n, real=real, features=_flat, seed=4, batch_size=13)
    t2 = hybrid_distance_table(ad, mods, n, real=[real[:50], real[50:]], features=_flat, seed=4,
                               batch_size=n)
    # float32 images in batches of 13 vs 60: the features agree to float rounding (an AMD
    # EPYC differs by 2e-8 relative), the float64 statistics then add nothing
    np.testing.assert_allclose(t.distances, t2.distances, rtol=1e-5, atol=1e-9)
    assert t.labels == ["R", "G", "A", "B"]

    def feats(x):
        return _flat(x).double().numpy()

    sets = {"R": feats(real[:n]),
            "G": feats(ad.to_unit(ad.generate(ad.sample_latents(n, seed=4))))}
    for k, (name, m) in enumerate(mods.items()):
        z = ad.sample_latents(2 * n, seed=4, start=2 * (k + 1) * n)  # disjoint from G's
        z1, z2 = z[0::2], z[1::2]
        sets[name] = feats(ad.to_unit(hybridize(ad, z1, z2, m)))
    for i, a in enumerate(t.labels):
        assert t.distances[i, i] == 0
        for j, b in enumerate(t.labels[:i]):
            assert t.distances[i, j] == pytest.approx(naive_frechet(sets[a], sets[b]), rel=1e-6, abs=1e-9)
    assert t.normalizer == pytest.approx(t.distances[0, 1])
    assert t.normalized[0, 1] == pytest.approx(1.0)
    assert t.info["modules"]["A"] == {"act": [0, 1]}
    no_real = hybrid_distance_table(ad, [mods["A"]], n, features=_flat, seed=4)
    assert no_real.labels == ["G", "module 0"] and no_real.normalized is None
    assert "raw" in no_real.to_text()


def test_hybrid_distance_table_bad_inputs(tiny):
    from cfmodules.adapter import GeneratorAdapter
    from cfmodules.evaluation.frechet import hybrid_distance_table

    ad = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    with pytest.raises(ConfigError, match="at least n_images"):
        hybrid_distance_table(ad, [{"act": [0]}], 20, real=torch.rand(5, 1, 2, 2), features=_flat)
    with pytest.raises(ConfigError, match="layer -> channel"):
        hybrid_distance_table(ad, {"A": [0, 1]}, 20, features=_flat)
    with pytest.raises(ConfigError, match="n_images"):
        hybrid_distance_table(ad, [{"act": [0]}], 1, features=_flat)
