"""The module scorecard: planted answers, a naive reference, calibration, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import CfModulesError, ConfigError, ModuleError, ResultFileError, ShapeError
from cfmodules.evaluation.scorecard import (
    TESTED,
    Scorecard,
    holm,
    null_groups,
    reference_masks,
    scorecard,
)
from cfmodules.hybrid import hybridize
from cfmodules.synthetic import load_planted_conv, load_planted_model1


def planted_modules(adapter):
    gen = adapter.generator
    labels = gen.true_labels()
    return {f"planted {k}": {gen.layer: np.flatnonzero(labels == k).tolist()}
            for k in range(gen.n_modules)}


@pytest.fixture(scope="module")
def conv():
    return load_planted_conv()


@pytest.fixture(scope="module")
def conv_card(conv):
    return scorecard(conv, planted_modules(conv), n_pairs=16, n_boot=200)


# ---------------------------------------------------------------------- the known answer
def test_planted_conv_every_module_finds_its_region(conv_card, conv):
    sc = conv_card
    print(sc)
    p = sc.p_values()
    assert sc.regions == ["region 0", "region 1", "region 2"]
    for k in range(3):
        assert sc.region_of(k) == f"region {k}"  # module k is assigned its own region
        assert sc.observed["iou"][k] >= 0.9
        assert p["iou"][k] < 0.01 and p["specificity"][k] < 0.01
        assert sc.observed["specificity"][k] > 0.99  # nothing changes outside the region
    # the null groups mix regions: their IoU is well below the planted modules'
    assert sc.null["iou"].mean() < 0.7


def test_planted_model1_every_module_finds_its_region():
    adapter = load_planted_model1()
    sc = scorecard(adapter, planted_modules(adapter), n_pairs=16, n_boot=200)
    p = sc.p_values()
    for k in range(3):
        assert sc.region_of(k) == f"region {k}"
        assert sc.observed["iou"][k] >= 0.9
        assert p["iou"][k] < 0.01 and p["specificity"][k] < 0.01


def test_reference_masks_are_the_planted_regions(conv):
    masks, names = reference_masks(conv)
    assert np.array_equal(masks, conv.generator.regions) and len(names) == 3
    assert reference_masks(load_planted_model1())[0].shape == (3, 8, 12)


# ---------------------------------------------------------------------- against a naive reference
@pytest.mark.numerics
def test_maps_effects_and_null_match_hybridize(conv):
    mods = planted_modules(conv)
    clf_w = torch.randn(3 * 16 * 16, 5, generator=torch.Generator().manual_seed(0))

    def classifier(images):  # a fixed linear classifier on the [0, 1] images
        return images.flatten(1) @ clf_w

    sc = scorecard(conv, mods, n_pairs=6, n_null=20, n_boot=50, seed=3, start=2,
                   classifier=classifier, pairs_per_block=4)
    z1, z2 = L.pair_latents(conv, 6, seed=3, start=2)
    y = conv.generate(z1)
    p1 = classifier(conv.to_unit(y)).softmax(1)

    def naive(module):
        h = hybridize(conv, z1, z2, module)
        d = (h - y).abs().mean(1)  # (P, H, W)
        tv = 0.5 * (classifier(conv.to_unit(h)).softmax(1) - p1).abs().sum(1)
        return d, tv

    for k, module in enumerate(mods.values()):
        d, tv = naive(module)
        np.testing.assert_allclose(sc.maps[k], d.mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(sc.per_pair["pixel_effect"][k], d.mean((1, 2)).numpy(),
                                   atol=1e-6)
        np.testing.assert_allclose(sc.per_pair["classifier_effect"][k], tv.numpy(), atol=1e-6)
    # one null group of module 1, recomputed by hand
    group = null_groups(conv, mods, n_null=20, seed=3)["planted 1"][7]
    assert len(group[conv.generator.layer]) == 8
    d, tv = naive(group)
    assert sc.null["pixel_effect"][1, 7] == pytest.approx(float(d.mean()), abs=1e-6)
    assert sc.null["classifier_effect"][1, 7] == pytest.approx(float(tv.mean()), abs=1e-6)


def test_p_values_percentiles_and_holm_by_hand(conv_card):
    sc = conv_card
    p, pc = sc.p_values(), sc.percentiles()
    for s in sc.tested:
        for k in range(3):
            obs, null = sc.observed[s][k], sc.null[s][k]
            assert p[s][k] == (1 + np.sum(null >= obs)) / (1 + len(null))
            assert pc[s][k] == 100 * np.mean(null < obs)
    # Holm: sorted p_(i) times (n - i + 1), running maximum, capped at 1
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.5])),
                               [0.04, 0.09, 0.09, 0.5])
    for s in sc.tested:  # one family per statistic: its modules
        np.testing.assert_allclose(sc.p_adjusted()[s], holm(p[s]))


def test_bootstrap_intervals_hold_the_estimate_and_are_reproducible(conv, conv_card):
    sc = conv_card
    for s in ("pixel_effect", "pixel_effect_ratio", "iou", "specificity"):
        assert np.all(sc.ci_low[s] <= sc.ci_high[s])
        assert np.all(sc.ci_low[s] <= sc.observed[s] + 1e-9)
        assert np.all(sc.observed[s] <= sc.ci_high[s] + 1e-9)
    # a pixel effect is a mean over pairs: its interval is about the usual +-1.96 standard
    # errors of the per-pair effects
    e = sc.per_pair["pixel_effect"]
    se = e.std(1, ddof=1) / np.sqrt(e.shape[1])
    np.testing.assert_allclose(sc.ci_high["pixel_effect"] - sc.ci_low["pixel_effect"],
                               2 * 1.96 * se, rtol=0.3)
    again = scorecard(conv, planted_modules(conv), n_pairs=16, n_boot=200)
    for s in sc.statistics:
        np.testing.assert_allclose(again.ci_low[s], sc.ci_low[s], rtol=1e-6)
        np.testing.assert_allclose(again.null.get(s, 0), sc.null.get(s, 0), rtol=1e-6)


# ---------------------------------------------------------------------- calibration
class RandomGenerator(nn.Module):
    """A small random-weight conv generator: no structure to find."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.main = nn.Sequential(
            nn.ConvTranspose2d(8, 16, 4, 1, 0), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(16, 16, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, z):
        return self.main(z)


def test_calibration_on_structureless_modules():
    """Random labels of the channels: each module is a random group, so at most ~5% of the
    modules may beat the null at 0.05 on any statistic (checked <= 10% over 24 repeats of
    4 modules, half on a random-weight generator, half on the planted one)."""
    n_repeats, k = 24, 4
    rng = np.random.default_rng(2024)
    calls = {s: [] for s in TESTED}
    calls["any statistic (Holm per statistic)"] = []
    conv = load_planted_conv(channels_per_module=8)  # 24 channels of main.3
    clf_w = torch.randn(3 * 16 * 16, 4, generator=torch.Generator().manual_seed(1))
    for r in range(n_repeats):
        if r % 2:
            adapter = GeneratorAdapter(RandomGenerator(r).eval(), (8, 1, 1), name="random")
            layer, width = "main.3", 16
        else:
            adapter, layer, width = conv, conv.generator.layer, 24
        labels = rng.permutation(np.arange(width) % k)  # random labels, equal sizes
        mods = [{layer: np.flatnonzero(labels == j).tolist()} for j in range(k)]
        sc = scorecard(adapter, mods, n_pairs=8, n_null=100, n_boot=20, seed=r,
                       masks=conv.generator.regions,  # both make 16x16 images
                       classifier=lambda x: x.flatten(1) @ clf_w)
        p = sc.p_values()
        for s in TESTED:
            if s in p:
                calls[s].extend((p[s] < 0.05).tolist())
        calls["any statistic (Holm per statistic)"].extend(
            np.any(np.stack(list(sc.significant(0.05).values())), axis=0).tolist())
    print()
    for s, c in calls.items():
        print(f"calibration: {s:<28} {np.mean(c):.3f} of {len(c)} modules significant at 0.05")
    for s, c in calls.items():
        assert len(c) == n_repeats * k
        assert np.mean(c) <= 0.1, s


# ---------------------------------------------------------------------- files and display
def test_save_load_text_and_html(conv_card, tmp_path):
    sc = conv_card
    path = sc.save(tmp_path / "sc.npz")
    back = Scorecard.load(path)
    assert back.modules == sc.modules and back.regions == sc.regions
    for s in sc.statistics:
        np.testing.assert_array_equal(back.observed[s], sc.observed[s])
    for s in sc.tested:
        np.testing.assert_array_equal(back.null[s], sc.null[s])
        np.testing.assert_array_equal(back.p_values()[s], sc.p_values()[s])
    assert np.array_equal(back.masks, sc.masks) and back.masks.dtype == bool
    assert back.to_text() == sc.to_text()
    f = np.load(path, allow_pickle=False)
    assert "p/iou" in f.files and "observed/pixel_effect" in f.files
    text = sc.to_text()
    assert "planted 0" in text and "region 'region 0'" in text and "iou" in text
    html = sc._repr_html_()
    assert "<img" in html and "Scorecard" in html
    with pytest.raises(ResultFileError):
        from cfmodules.analysis import AnalysisResult

        AnalysisResult.load(path)


# ---------------------------------------------------------------------- bad input
def test_bad_input_gets_library_errors(conv):
    mods = planted_modules(conv)
    with pytest.raises(ShapeError, match="masks are 8x8 but the images are 16x16"):
        scorecard(conv, mods, masks=np.eye(8, dtype=bool)[None], n_pairs=2, n_boot=2)
    with pytest.raises(ModuleError, match="K=0"):
        scorecard(conv, {}, n_pairs=2)
    with pytest.raises(ModuleError, match="K=0"):
        scorecard(conv, [], n_pairs=2)
    with pytest.raises(ModuleError, match="no channels"):
        scorecard(conv, {"a": {"main.3": [0, 1]}, "b": {"main.3": []}}, n_pairs=2)
    with pytest.raises(ModuleError, match="out of range|channel"):
        scorecard(conv, {"a": {"main.3": [99]}}, n_pairs=2)
    with pytest.raises(ConfigError, match="empty"):
        scorecard(conv, mods, masks=np.zeros((1, 16, 16), bool), n_pairs=2)
    with pytest.raises(ConfigError, match="whole image"):
        scorecard(conv, mods, masks=np.ones((1, 16, 16), bool), n_pairs=2)
    with pytest.raises(ShapeError, match="booleans"):
        scorecard(conv, mods, masks=np.full((1, 16, 16), 0.5), n_pairs=2)
    with pytest.raises(ConfigError, match="n_null"):
        scorecard(conv, mods, n_null=5, n_pairs=2)
    with pytest.raises(ConfigError, match="AnalysisResult"):
        scorecard("not an adapter", mods)
    dead = GeneratorAdapter(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 1, 1)), (2, 4, 4))
    with torch.no_grad():
        dead.generator[1].weight[:, 1] = 0  # channel 1 of layer 0 does not reach the output
    with pytest.raises(ModuleError, match="does not change the images"):
        scorecard(dead, {"x": {"0": [1]}}, n_pairs=2, n_null=19)
    for exc in (ShapeError, ModuleError, ConfigError):
        assert issubclass(exc, CfModulesError)
