"""GeneratorAdapter: sampling, layers, trace/intervene, split paths, modes, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.engine import split
from cfmodules.engine.paths import FxSplit, HookSplit
from cfmodules.errors import (
    CfModulesError,
    ConfigError,
    GeneratorOutputError,
    LayerCallError,
    LayerNotFoundError,
    ShapeError,
)
from conftest import no_hooks_left, tiny_sequential


def test_samples_do_not_depend_on_batch_size_and_are_seeded(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    a = ad.sample_latents(10, seed=3)
    # exact by design: sample i is drawn by its own generator seeded from (seed, i)
    torch.testing.assert_close(ad.sample_latents(4, seed=3), a[:4], rtol=0, atol=0)
    torch.testing.assert_close(ad.sample_latents(3, seed=3, start=7), a[7:], rtol=0, atol=0)
    assert not torch.equal(ad.sample_latents(10, seed=4), a)
    assert a.shape == (10, 2, 1, 1)


def test_priors(tiny):
    u = GeneratorAdapter(tiny, (2, 1, 1), prior="uniform").sample_latents(200)
    assert u.min() >= -1 and u.max() <= 1 and u.abs().mean() > 0.3
    c = GeneratorAdapter(tiny, (2, 1, 1), prior=lambda n, g: torch.full((n, 2, 1, 1), 7.0))
    assert torch.all(c.sample_latents(3) == 7)
    with pytest.raises(ConfigError, match="Unknown prior"):
        GeneratorAdapter(tiny, (2, 1, 1), prior="cauchy")
    bad = GeneratorAdapter(tiny, (2, 1, 1), prior=lambda n, g: torch.zeros(n, 5))
    with pytest.raises(CfModulesError, match="prior"):
        bad.sample_latents(2)


def test_layers_lists_shapes_and_channels(tiny):
    infos = {i.name: i for i in GeneratorAdapter(tiny, (2, 1, 1)).layers()}
    assert infos["act"].shape == (4, 2, 2) and infos["act"].channels == 4
    assert infos["out"].kind == "Conv2d" and infos["out"].calls == 1


def test_layer_typo_suggests_names(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    with pytest.raises(LayerNotFoundError, match="Did you mean 'act'") as e:
        ad.submodule("acts")
    assert isinstance(e.value, KeyError)  # the family also inherits the builtin
    assert not hasattr(ad, "module")  # a layer's nn.Module is a submodule
    with pytest.raises(LayerNotFoundError):
        with ad.trace(["act", "nope"]):
            pass
    assert no_hooks_left(tiny)  # 'act' was valid but must not have been registered


def test_trace_records_and_intervene_replaces(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    z = ad.sample_latents(3)
    with ad.trace("act") as acts:
        y = ad.generate(z)
    torch.testing.assert_close(acts["act"], torch.relu(tiny.up(z)))
    zeros = torch.zeros(3, 4, 2, 2)
    with ad.intervene({"act": (range(4), zeros)}):
        y0 = ad.generate(z)
    torch.testing.assert_close(y0, tiny.out(zeros))
    assert not torch.allclose(y, y0)
    with ad.intervene({"act": lambda out: out * 0}):
        torch.testing.assert_close(ad.generate(z), y0)
    assert no_hooks_left(tiny)


def test_intervene_checks_value_shape(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    with pytest.raises(ShapeError, match=r"expected \(3, 2, 2, 2\)"):
        with ad.intervene({"act": ([0, 1], torch.zeros(3, 2, 3, 3))}):
            ad.generate(ad.sample_latents(3))
    assert no_hooks_left(tiny)


@pytest.mark.numerics
def test_fx_split_and_hook_split_give_the_same_numbers(skip):
    fast = GeneratorAdapter(skip, (3, 1, 1))
    # untraceable (bool of a tensor) and post-processed after the generator: hooks only
    slow = GeneratorAdapter(skip, (3, 1, 1),
                            forward=lambda g, z: g(z) * 1.0 if bool(z.isfinite().all()) else None)
    assert isinstance(split(fast, "act").inner, FxSplit)
    assert isinstance(split(slow, "act").inner, HookSplit)
    z = fast.sample_latents(5)
    for ad in (fast, slow):
        s = split(ad, "act")
        state = s.prefix(z)
        torch.testing.assert_close(s.suffix(state, state.activation), skip(z), rtol=1e-5, atol=1e-6)
    sf, ss = split(fast, "act"), split(slow, "act")
    stf, sts = sf.prefix(z), ss.prefix(z)
    edited = stf.activation * torch.tensor([1.0, 0.0, 2.0, 1.0])[None, :, None, None]
    torch.testing.assert_close(sf.suffix(stf, edited), ss.suffix(sts, edited), rtol=1e-5, atol=1e-6)
    # select() repeats samples with every frontier value (the skip) and latent
    idx = torch.tensor([4, 4, 0])
    torch.testing.assert_close(sf.suffix(stf.select(idx), stf.activation[idx]), skip(z[idx]))


def test_split_keeps_conditional_inputs(conditional):
    ad = GeneratorAdapter(conditional, ((3,), (2,)))
    z = (torch.randn(4, 3), torch.eye(2)[[0, 1, 1, 0]])
    s = split(ad, "act")
    assert isinstance(s.inner, FxSplit)
    st = s.prefix(z)
    torch.testing.assert_close(s.suffix(st, st.activation), conditional(*z))
    with pytest.raises(ShapeError):
        s.suffix(st, st.activation[:2])


def test_tuple_output_needs_a_transform():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = tiny_sequential()

        def forward(self, z):
            return self.g(z), {"aux": 1}

    g = TupleOut()
    with pytest.raises(GeneratorOutputError, match="output_transform"):
        GeneratorAdapter(g, (2, 1, 1)).generate(torch.randn(2, 2, 1, 1))
    ad = GeneratorAdapter(g, (2, 1, 1), output_transform=lambda out: out[0] * 2)
    z = ad.sample_latents(2)
    torch.testing.assert_close(ad.generate(z), g.g(z) * 2)


def test_train_mode_is_restored_and_said_once():
    g = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Conv2d(3, 1, 1))
    g.train()
    g[3].eval()  # a mixed mode is restored module by module
    ad = GeneratorAdapter(g, (2, 1, 1))
    z = ad.sample_latents(6)
    with pytest.warns(UserWarning, match="train mode"):
        a = ad.generate(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ad.generate(z[:2])  # no second warning; eval mode: no batch dependence
    torch.testing.assert_close(a[:2], b)
    assert g.training and g[1].training and g[2].training and not g[3].training


def test_eval_mode_restores_modes_after_an_error():
    g = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Dropout(0.5)).train()
    ad = GeneratorAdapter(g, (2, 1, 1))
    with pytest.warns(UserWarning, match="train mode"), pytest.raises(RuntimeError, match="x"):
        with ad.eval_mode():
            assert not g.training and not g[1].training
            assert not torch.is_grad_enabled()
            raise RuntimeError("x")
    assert g.training and g[1].training and torch.is_grad_enabled()
    assert ad.layer_channels("0") == 3


def test_no_hook_left_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    g = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.ReLU(), Boom())
    ad = GeneratorAdapter(g, (2, 1, 1), forward=lambda gen, z: gen(z))
    z = torch.randn(2, 2, 1, 1)
    for ctx in (lambda: ad.trace(["0", "1"]),
                lambda: ad.intervene({"1": ([0], torch.zeros(2, 1, 2, 2))})):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx():
                ad.generate(z)
        assert no_hooks_left(g)
    with pytest.raises(RuntimeError, match="boom"):
        split(ad, "1").prefix(z)
    assert no_hooks_left(g)


def test_module_called_twice_needs_a_call_index():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.relu = nn.ReLU()

        def forward(self, z):
            return self.relu(self.a(self.relu(z)))

    g = Twice()
    ad = GeneratorAdapter(g, (2, 1, 1), forward=lambda gen, z: gen(z))
    z = torch.randn(3, 2, 1, 1)
    with pytest.raises(LayerCallError, match="relu:0"):
        with ad.trace("relu"):
            ad.generate(z)
    with ad.trace(["relu:0", "relu:1"]) as acts:
        ad.generate(z)
    torch.testing.assert_close(acts["relu:0"], torch.relu(z))
    torch.testing.assert_close(acts["relu:1"], g(z))
    with pytest.raises(LayerCallError, match="ran 2 time"):
        with ad.trace("relu:2"):
            ad.generate(z)
    # the fx split also refuses the ambiguous name and accepts the named call
    fx_ad = GeneratorAdapter(g, (2, 1, 1))
    with pytest.raises(LayerCallError):
        split(fx_ad, "relu")
    s = split(fx_ad, "relu:0")
    st = s.prefix(z)
    torch.testing.assert_close(s.suffix(st, st.activation * 0), g.relu(g.a(torch.zeros_like(z))))
    assert no_hooks_left(g)


@pytest.mark.parametrize("shape", [(), "abc", (0, 1), ((2,), "x"), None])
def test_bad_latent_shapes_are_refused(tiny, shape):
    with pytest.raises(ConfigError, match="latent_shape"):
        GeneratorAdapter(tiny, shape)


def test_not_a_module_and_bad_range():
    with pytest.raises(ConfigError, match="nn.Module"):
        GeneratorAdapter(lambda z: z, (2,))
    with pytest.raises(ConfigError, match="output_range"):
        GeneratorAdapter(tiny_sequential(), (2, 1, 1), output_range=(1, -1))


def test_encoder_roundtrip_and_missing_encoder(tiny):
    enc = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Unflatten(1, (2, 1, 1)))
    ad = GeneratorAdapter(tiny, (2, 1, 1), encoder=enc, output_range=(-3, 3))
    z = ad.encode(torch.randn(5, 1, 2, 2))
    assert z.shape == (5, 2, 1, 1)
    with pytest.raises(ConfigError, match="no encoder"):
        GeneratorAdapter(tiny, (2, 1, 1)).encode(torch.randn(1, 1, 2, 2))
    with pytest.raises(ShapeError):
        ad.encode(torch.randn(4, 4))
    assert 0 <= float(ad.to_unit(torch.tensor([-10.0, 0.0, 10.0]))[1]) == 0.5


def test_each_call_of_a_shared_module_has_its_own_shape():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 2, 1)
            self.relu = nn.ReLU()

        def forward(self, z):
            return self.relu(self.a(self.relu(z)))

    ad = GeneratorAdapter(Shared(), (4, 3, 3))
    info = {i.name: i for i in ad.layers()}["relu"]
    assert info.calls == 2 and info.call_shapes == ((4, 3, 3), (2, 3, 3))
    assert ad.layer_shape("relu:1") == (2, 3, 3) and ad.layer_shape("relu") == (4, 3, 3)
    with pytest.raises(LayerCallError, match="below 2"):
        ad.layer_shape("relu:2")
    from cfmodules.errors import ChannelError

    with pytest.raises(ChannelError, match="out of range"):
        with ad.intervene({"relu:1": ([3], torch.zeros(1, 1, 3, 3))}):
            pass
