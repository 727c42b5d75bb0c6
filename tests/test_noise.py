"""Generators that draw their own noise in forward: refused by default, held fixed per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfmodules import GeneratorAdapter, hybridize
from cfmodules.engine import explain, split, whole_graph
from cfmodules.errors import ConfigError, GeneratorOutputError, NondeterministicForwardError
from cfmodules.influence import influence_maps, module_influence_maps
from conftest import no_hooks_left

DEAD = 7  # channel of layer 'act' whose outgoing weights are zero: it does nothing


class NoisyGenerator(nn.Module):
    """StyleGAN-like: per-pixel noise (N, 1, H, W) added after two layers, scaled by a strength.

    ``style`` picks how the second noise is drawn, the ways published code draws it.
    Every noise tensor drawn is kept in ``drawn`` (for the naive references).
    """

    def __init__(self, style: str = "randn_like") -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8 * 2 * 2)
        self.act = nn.ReLU()
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.act2 = nn.ReLU()
        self.out = nn.Conv2d(4, 3, 1)
        self.strength = nn.Parameter(torch.tensor([0.7, 0.5]))
        self.style = style
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in (self.fc.weight, self.fc.bias, self.up.weight, self.up.bias,
                      self.out.weight, self.out.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.up.weight[DEAD] = 0
        self.drawn: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 8, 2, 2)
        g = torch.Generator().manual_seed(0) if self.style == "reseeded" else None
        n1 = torch.randn(h.shape[0], 1, 2, 2, device=h.device, generator=g)
        h = self.act(h + self.strength[0] * n1)
        h = self.up(h)
        if self.style == "randn_like":
            n2 = torch.randn_like(h[:, :1])
        elif self.style == "normal_":
            n2 = torch.empty(h.shape[0], 1, 4, 4).normal_()
        elif self.style == "new_empty":  # rosinality's StyleGAN2 NoiseInjection
            n2 = h.new_empty(h.shape[0], 1, 4, 4).normal_()
        elif self.style == "shared":  # one noise image for the whole batch (and each sample)
            n2 = torch.randn(1, 1, 4, 4).expand(h.shape[0], 1, 4, 4)
        elif self.style == "dropout":  # hard-coded train-mode dropout
            n2 = F.dropout(torch.ones_like(h[:, :1]), 0.5, training=True) - 1
        elif self.style == "reseeded":  # deterministic, but by position in the batch
            n2 = torch.randn(h.shape[0], 1, 4, 4, generator=g)
        else:
            raise ValueError(self.style)
        self.drawn = [n1, n2]
        h = self.act2(h + self.strength[1] * n2)
        return torch.tanh(self.out(h))


class NumpyNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        noise = torch.from_numpy(np.random.randn(z.shape[0], 12).astype(np.float32))
        return self.lin(z + 0).add(noise).view(-1, 3, 2, 2)


def z_batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


def assert_clean(gen: nn.Module, train: bool) -> None:
    assert no_hooks_left(gen)
    assert all(m.training == train for m in gen.modules())


# ---------------------------------------------------------------------- detection
@pytest.mark.parametrize("style", ["randn_like", "normal_", "new_empty", "shared", "dropout", "reseeded"])
def test_a_forward_that_draws_noise_is_refused_at_first_use(style):
    gen = NoisyGenerator(style).train()
    ad = GeneratorAdapter(gen, 4)
    with pytest.raises(NondeterministicForwardError, match="noise='per-sample'") as e:
        ad.generate(z_batch())
    assert isinstance(e.value, GeneratorOutputError)  # the family, and the builtin below
    assert isinstance(e.value, RuntimeError)
    msg = str(e.value)
    assert "not deterministic" in msg and "noise floor" in msg
    if style == "reseeded":
        assert "order in the batch" in msg  # same run twice agrees, the position does not
    else:
        assert "aten.randn" in msg or "aten.bernoulli" in msg
    assert_clean(gen, train=True)


def test_every_entry_point_refuses_and_leaves_no_hook():
    gen = NoisyGenerator()
    z1, z2 = z_batch(3, 1), z_batch(3, 2)
    calls = [
        lambda ad: hybridize(ad, z1, z2, {"act": [0, 1]}),
        lambda ad: influence_maps(ad, "act", n_pairs=2, progress=False),
        lambda ad: module_influence_maps(ad, [{"act": [0], "act2": [1]}], n_pairs=2,
                                    progress=False),
        lambda ad: ad.layers(),
        lambda ad: split(ad, "act").prefix(z1),
    ]
    for call in calls:
        ad = GeneratorAdapter(gen, 4)
        with pytest.raises(NondeterministicForwardError, match="per-sample"):
            call(ad)
        assert_clean(gen, train=True)
    ad = GeneratorAdapter(gen, 4)
    with pytest.raises(NondeterministicForwardError):  # first use inside a trace block
        with ad.trace("act"):
            ad.generate(z1)
    assert_clean(gen, train=True)


def test_randomness_outside_torch_is_refused_with_what_to_do():
    ad = GeneratorAdapter(NumpyNoise(), 4, noise=None)
    with pytest.raises(NondeterministicForwardError, match="No torch random operator"):
        ad.generate(z_batch())
    ad.noise = "per-sample"  # cannot hold numpy's draws: says so instead of pretending
    with pytest.raises(NondeterministicForwardError, match="even with noise='per-sample'"):
        ad.generate(z_batch())


def test_deterministic_generators_pass_and_the_users_random_stream_is_untouched(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    torch.manual_seed(123)
    expected = torch.randn(5)
    torch.manual_seed(123)
    ad.generate(ad.sample_latents(3))  # the first-use check forks the random state
    torch.testing.assert_close(torch.randn(5), expected, rtol=0, atol=0)


def test_noise_option_is_checked():
    with pytest.raises(ConfigError, match="Did you mean 'per-sample'"):
        GeneratorAdapter(NoisyGenerator(), 4, noise="per_sample")
    with pytest.raises(ConfigError, match="noise must be one of"):
        GeneratorAdapter(NoisyGenerator(), 4, noise=True)


def test_per_sample_on_a_deterministic_generator_warns_that_it_only_costs(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1), noise="per-sample")
    with pytest.warns(UserWarning, match="draws no random numbers"):
        ad.generate(ad.sample_latents(2))


# ---------------------------------------------------------------------- per-sample noise
@pytest.mark.parametrize("style", ["randn_like", "normal_", "new_empty", "shared", "dropout", "reseeded"])
def test_per_sample_noise_is_fixed_and_batch_independent(style):
    gen = NoisyGenerator(style)
    ad = GeneratorAdapter(gen, 4, noise="per-sample")
    z = z_batch(6)
    y = ad.generate(z)
    torch.testing.assert_close(ad.generate(z), y, rtol=0, atol=0)  # bitwise, by design
    torch.testing.assert_close(ad.generate(z, batch_size=1), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.generate(z[[4, 1, 1]]), y[[4, 1, 1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.generate(z[2:3]), y[2:3], rtol=1e-5, atol=1e-6)
    # the noise is there (not switched off) and differs between samples
    with torch.no_grad():
        gen.strength.zero_()
    quiet = GeneratorAdapter(gen, 4).generate(z)
    assert (y - quiet).abs().max() > 0.05
    ad.generate(z[:2])
    assert not torch.equal(gen.drawn[0][0], gen.drawn[0][1])  # each sample its own noise
    if style != "shared":
        assert not torch.equal(gen.drawn[1][0], gen.drawn[1][1])


def test_per_sample_noise_does_not_touch_the_global_random_stream():
    ad = GeneratorAdapter(NoisyGenerator(), 4, noise="per-sample")
    z = z_batch(3)
    ad.generate(z)
    torch.manual_seed(9)
    expected = torch.randn(4)
    torch.manual_seed(9)
    ad.generate(z)
    torch.testing.assert_close(torch.randn(4), expected, rtol=0, atol=0)


def test_the_engine_runs_full_forwards_with_per_sample_noise(tiny):
    ad = GeneratorAdapter(NoisyGenerator(), 4, noise="per-sample")
    assert ad.noise == "per-sample"
    assert whole_graph(ad) is None and "noise='per-sample'" in explain(ad, "act").reason
    assert not split(ad, "act").exact_graph and explain(ad, "act").path == "hook"
    plain = GeneratorAdapter(tiny, (2, 1, 1))
    assert whole_graph(plain) is not None and split(plain, "act").exact_graph
    plain.noise = "per-sample"  # set later: captured graphs and splits are dropped
    assert whole_graph(plain) is None and not split(plain, "act").exact_graph


def test_hybrids_keep_original_1s_noise():
    gen = NoisyGenerator()
    ad = GeneratorAdapter(gen, 4, noise="per-sample")
    z1, z2 = z_batch(5, 1), z_batch(5, 2)
    y1, y2 = ad.generate(z1), ad.generate(z2)
    # nothing swapped: Original 1, bitwise (the same full forward with the same noise)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act": []}), y1, rtol=0, atol=0)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act": [], "act2": []}), y1,
                               rtol=0, atol=0)
    # every channel after the last noise: Original 2
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act2": range(4)}), y2,
                               rtol=1e-5, atol=1e-6)
    # every channel of 'act': Original 2's activation, then Original 1's later noise
    with ad.trace("act") as acts:
        ad.generate(z2)
    ad.generate(z1)
    n2_of_z1 = gen.drawn[1]
    with torch.no_grad():
        ref = torch.tanh(gen.out(torch.relu(gen.up(acts["act"]) + gen.strength[1] * n2_of_z1)))
    hyb = hybridize(ad, z1, z2, {"act": range(8)})
    torch.testing.assert_close(hyb, ref, rtol=1e-5, atol=1e-6)
    assert (hyb - y2).abs().max() > 1e-2  # not Original 2: the noise after 'act' is z1's
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act": [0, 3]}, batch_size=2),
                               hybridize(ad, z1, z2, {"act": [0, 3]}), rtol=1e-5, atol=1e-6)


def test_influence_maps_have_no_noise_floor():
    ad = GeneratorAdapter(NoisyGenerator(), 4, noise="per-sample")
    with pytest.warns(UserWarning, match="noise fixed per sample.*every hybrid is a full forward"):
        res = influence_maps(ad, "act", n_pairs=6, pairs_per_block=4, progress=False)
    assert res.maps.shape == (8, 4, 4)
    assert res.maps[DEAD].max() < 1e-6  # a channel that does nothing has a zero map
    live = [c for c in range(8) if c != DEAD]
    assert res.maps[live].mean(axis=(1, 2)).min() > 1e-3
    hook = influence_maps(ad, "act", n_pairs=6, pairs_per_block=3, algorithm="hook",
                          progress=False)
    np.testing.assert_allclose(hook.maps, res.maps, rtol=1e-4, atol=1e-6)
    # a naive reference: the mean |hybrid - Original 1| over the same pairs
    z = ad.sample_latents(12, seed=0)
    z1, z2 = z[0::2], z[1::2]
    y1 = ad.generate(z1)
    naive = np.stack([(hybridize(ad, z1, z2, {"act": [c]}) - y1).abs().mean(1).mean(0).numpy()
                      for c in range(8)])
    np.testing.assert_allclose(res.maps, naive, rtol=1e-4, atol=1e-6)
    mods = module_influence_maps(ad, {"dead": {"act": [DEAD]}, "two": {"act": [0], "act2": [1]}},
                            n_pairs=4, progress=False)
    assert mods.maps[0].max() < 1e-6 and mods.maps[1].max() > 1e-3


class RReLUNoise(nn.Module):
    """A hard-coded train-mode randomized ReLU: a draw cfmodules cannot split by sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.rrelu(self.lin(z), training=True).view(-1, 3, 2, 2)


def test_a_draw_that_cannot_be_split_by_sample_is_refused_by_name():
    gen = RReLUNoise().train()
    ad = GeneratorAdapter(gen, 4)
    with pytest.raises(NondeterministicForwardError, match="rrelu_with_noise"):
        ad.generate(z_batch())
    ad.noise = "per-sample"
    with pytest.raises(NondeterministicForwardError, match="cannot hold the draw.*rrelu"):
        ad.generate(z_batch())
    assert_clean(gen, train=True)


def test_a_deterministic_generator_is_checked_without_a_dispatch_mode(tiny, monkeypatch):
    import cfmodules.noise as noise

    def no_mode(*a, **k):
        raise AssertionError("a dispatch mode was entered for a deterministic generator")

    monkeypatch.setattr(noise, "DrawRecorder", no_mode)
    monkeypatch.setattr(noise, "PerSampleNoise", no_mode)
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    z = ad.sample_latents(3)
    hybridize(ad, z, z.flip(0), {"act": [1]})
    assert ad._noise_checked


# the dead channel's map is exactly zero with some CPU kernels (then the clustering says
# so) and ~1e-8 with others (hybrids and originals batched differently)
@pytest.mark.filterwarnings("ignore:.*have an all-zero map:UserWarning")
def test_a_whole_analysis_of_a_noisy_generator():
    from cfmodules.analysis import AnalysisSettings, analyze

    ad = GeneratorAdapter(NoisyGenerator(), 4, noise="per-sample", name="noisy")
    with pytest.warns(UserWarning, match="noise fixed per sample"):
        res = analyze(ad, "act", AnalysisSettings(n_pairs=4, n_modules=2, stability_repeats=2,
                                                  stability_ks=(2,), n_samples=2, n_hybrids=2),
                      progress=False)
    assert res.maps[DEAD].max() < 1e-6
    assert res.maps.shape == (8, 4, 4) and set(np.unique(res.labels)) == {0, 1}
