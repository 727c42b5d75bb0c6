"""The engine: capture real-world forwards, say which path runs, follow the generator."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.engine import Explanation, engine_of, explain, split
from cfmodules.engine.paths import FxSplit
from cfmodules.errors import NondeterministicForwardError
from cfmodules.hybrid import hybridize
from cfmodules.influence import influence_maps
from conftest import no_hooks_left
from engine_helpers import (
    ConditionalDCGAN,
    DictOut,
    DropoutGen,
    InPlace,
    SkipDecoder,
    StyleLike,
    TupleOut,
    Twice,
    assert_paths_agree,
    cond_adapter,
    float_argument_adapter,
    init,
)

pytestmark = pytest.mark.numerics  # the fast paths against the hook path, by design


# ---------------------------------------------------------------------- capture paths
def test_dim_control_flow_cat_view_is_captured_below_the_forward():
    ad = cond_adapter()
    ex = explain(ad, "main.5")
    assert isinstance(ex, Explanation)
    assert ex.path == "partial" and ex.capture == "partial at 'main'"
    graph, partial, export = ex.attempts
    assert graph.kind == "graph" and "control flow" in graph.error
    assert partial.where == "main" and partial.error is None
    # torch.export (seconds) is not tried once a capture works: the suffix would be the same
    assert export.kind == "export" and export.error.startswith("not tried")
    assert 1 < ex.limit < 10 and ex.flops_hybrid < ex.flops_full
    assert "main.5" in str(ex) and "control flow" in str(ex)
    assert_paths_agree(ad, "main.5")
    assert no_hooks_left(ad.generator)


def test_linear_shortcut_applies_on_a_partial_capture(tmp_path):
    ad = cond_adapter()
    ex = explain(ad, "main.2")
    assert ex.path == "linear shortcut" and ex.linear_cut == "main.4"
    assert ex.limit > explain(ad, "main.2", algorithm="split").limit
    assert explain(ad, "main.2", algorithm="hook").path == "hook"
    assert_paths_agree(ad, "main.2")
    res = influence_maps(ad, "main.2", n_pairs=3, progress=False)
    assert res.settings["paths"] == {"main.2": "linear shortcut"}
    assert res.settings["linear_shortcut"] == {"main.2": "main.4"}
    res.save(tmp_path / "r.npz")  # the result file records the path
    assert type(res).load(tmp_path / "r.npz").settings["paths"] == {"main.2": "linear shortcut"}


def test_forward_function_is_captured_with_the_generator():
    gen = init(SkipDecoder(), 3)
    ad = GeneratorAdapter(gen, (4,), forward=lambda g, z: g(z * 2.0))
    assert isinstance(split(ad, "act").inner, FxSplit)
    assert explain(ad, "act").capture == "graph of the forward"
    assert_paths_agree(ad, "act")  # the skip from before the layer travels with its sample


@pytest.mark.parametrize("model, transform", [
    (DictOut, lambda o: o["image"]), (TupleOut, lambda o: o[0])])
def test_dict_and_tuple_outputs(model, transform):
    ad = GeneratorAdapter(init(model(), 1), (4,), output_transform=transform)
    assert explain(ad, "act").path == "split"
    assert_paths_agree(ad, "act")


def test_in_place_ops_after_the_layer():
    ad = GeneratorAdapter(init(InPlace(), 4), (4, 1, 1))
    assert explain(ad, "act").path in ("split", "linear shortcut")
    assert_paths_agree(ad, "act")
    # the prefix state is not clobbered by suffix runs
    s = split(ad, "act")
    z = ad.sample_latents(2)
    st = s.prefix(z)
    before = st.activation.clone()
    s.suffix(st, st.activation)
    torch.testing.assert_close(st.activation, before, rtol=0, atol=0)


def test_module_called_twice():
    ad = GeneratorAdapter(init(Twice(), 5), (4, 1, 1))
    assert_paths_agree(ad, "block:0")
    assert_paths_agree(ad, "block:1")


def test_stylegan_like_generator_has_no_linear_shortcut():
    ad = GeneratorAdapter(init(StyleLike(), 2), ((4,), (1, 4, 4), (1, 8, 8)))
    ex = explain(ad, "conv0")
    assert ex.path == "split"  # sample-dependent weights: no linear shortcut
    assert engine_of(ad).linear_plan("conv0") is None
    assert_paths_agree(ad, "conv0")
    assert_paths_agree(ad, "conv1")
    # before conv0 the batch is folded into the channels (groups=N): those values are not
    # per-sample, so the suffix recomputes them from the per-sample ones they are made of
    assert explain(ad, "mapping.2").path == "split"
    assert explain(ad, "mapping.1").path == "linear shortcut"
    assert_paths_agree(ad, "mapping.2")
    assert_paths_agree(ad, "mapping.1")


def test_generator_that_draws_its_own_noise_is_not_captured():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act = nn.ConvTranspose2d(4, 3, 4), nn.ReLU()

        def forward(self, z):
            h = self.act(self.up(z))
            return h + torch.randn_like(h)

    with pytest.raises(NondeterministicForwardError):
        explain(GeneratorAdapter(init(Noisy(), 0), (4, 1, 1)), "up")
    ad = GeneratorAdapter(init(Noisy(), 0), (4, 1, 1), noise="per-sample")
    ex = explain(ad, "act")
    assert ex.path == "hook" and "noise='per-sample'" in ex.reason and not ex.attempts
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act": []}), ad.generate(z1))


def test_hook_fallback_warns_once_with_reason_and_cost():
    ad = GeneratorAdapter(init(DictOut(), 1), (4,),
                          forward=lambda g, z: g(z)["image"] * 1.0 if bool(z.isfinite().all())
                          else None)
    assert explain(ad, "act").path == "hook"
    with pytest.warns(UserWarning, match="one full forward .* per hybrid") as rec:
        res = influence_maps(ad, "act", n_pairs=2, progress=False)
    assert len([w for w in rec if "full forward" in str(w.message)]) == 1
    assert "TraceError" in str(rec[0].message)
    assert res.settings["paths"] == {"act": "hook"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        influence_maps(ad, "act", n_pairs=2, progress=False)  # once per layer


def test_partial_prefix_leaves_no_hook_after_an_error():
    ad = cond_adapter()
    split(ad, "main.5")
    bad = (torch.zeros(2, 6, 1, 1), torch.zeros(2, 4))  # wrong class width: the conv refuses
    with pytest.raises(RuntimeError, match="channels"):
        split(ad, "main.5").inner.prefix(bad)  # the generator's own error, through the hook
    assert no_hooks_left(ad.generator)


def test_partial_capture_freezes_non_tensor_arguments_per_value():
    ad = float_argument_adapter()
    assert explain(ad, "inner.act").capture == "partial at 'inner'"
    assert_paths_agree(ad, "inner.act")
    z = ad.sample_latents(3)
    z2 = (z[0], torch.full((3, 1), 2.0))  # another frozen value: its own capture
    s = split(ad, "inner.act")
    st = s.prefix(z2)
    torch.testing.assert_close(s.suffix(st, st.activation), ad.generate(z2))


# ---------------------------------------------------------------------- following the generator
def test_graph_is_traced_in_eval_mode():
    gen = init(DropoutGen(), 0).train()
    ad = GeneratorAdapter(gen, (4, 1, 1))
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    first = hybridize(ad, z1, z2, {"relu": []})
    torch.testing.assert_close(first, ad.generate(z1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": []}), first, rtol=0, atol=0)
    assert gen.training


def test_python_attribute_change_is_seen():
    gen = init(DropoutGen(), 0)
    ad = GeneratorAdapter(gen, (4, 1, 1))
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    hybridize(ad, z1, z2, {"relu": [0]})
    gen.gain = 3.0
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": []}), ad.generate(z1))
    fresh = GeneratorAdapter(copy.deepcopy(gen), (4, 1, 1))
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": [0, 2]}),
                               hybridize(fresh, z1, z2, {"relu": [0, 2]}))


def test_replaced_submodule_is_seen():
    ad = cond_adapter()
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    hybridize(ad, z1, z2, {"main.5": [0]})
    ad.generator.main[7] = init(nn.ConvTranspose2d(8, 3, 4, 2, 1, bias=False), 9)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"main.5": []}), ad.generate(z1))


def test_training_steps_between_calls_match_a_fresh_copy():
    gen = init(ConditionalDCGAN(), 0)
    ad = GeneratorAdapter(gen, ((6, 1, 1), (3,)))
    before = influence_maps(ad, "main.2", n_pairs=3, progress=False).maps
    opt = torch.optim.SGD(gen.parameters(), lr=0.5)
    gen.train()
    for _ in range(3):
        z = ad.sample_latents(4, seed=5)
        opt.zero_grad()
        gen(*z).square().mean().backward()  # BatchNorm statistics move too
        opt.step()
    gen.eval()
    after = influence_maps(ad, "main.2", n_pairs=3, progress=False).maps
    fresh = GeneratorAdapter(copy.deepcopy(gen), ((6, 1, 1), (3,)))
    ref = influence_maps(fresh, "main.2", n_pairs=3, progress=False).maps
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-7)


def test_weight_change_within_a_run_is_followed():
    """A callback changes a weight between blocks: later blocks use the new weights."""
    gen = init(ConditionalDCGAN(), 0)
    ad = GeneratorAdapter(gen, ((6, 1, 1), (3,)))

    def bump(progress):
        with torch.no_grad():
            gen.main[3].weight.mul_(2.0)
            gen.main[4].running_var.mul_(0.5)

    res = influence_maps(ad, "main.2", n_pairs=4, pairs_per_block=2, progress=False,
                         callback=bump)
    # the reference: pairs 0-1 with the old weights, 2-3 with the weights after one bump
    ref_gen = init(ConditionalDCGAN(), 0)
    ref_ad = GeneratorAdapter(ref_gen, ((6, 1, 1), (3,)))
    a = influence_maps(ref_ad, "main.2", n_pairs=2, progress=False, algorithm="hook").maps
    with torch.no_grad():
        ref_gen.main[3].weight.mul_(2.0)
        ref_gen.main[4].running_var.mul_(0.5)
    from cfmodules.latents import pair_latents

    z1, z2 = pair_latents(ref_ad, 2, seed=0, start=2)
    b = []
    for c in range(ref_ad.layer_channels("main.2")):
        h = hybridize(ref_ad, z1, z2, {"main.2": [c]})
        b.append((h - ref_ad.generate(z1)).abs().mean(1).mean(0).numpy())
    np.testing.assert_allclose(res.maps, (a + np.stack(b)) / 2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- subclasses
class Mirrored(GeneratorAdapter):
    """A subclass whose generate() mirrors the images."""

    def generate(self, z, batch_size=None):
        return super().generate(z, batch_size).flip(-1)


class WithForwardMethod(GeneratorAdapter):
    def forward_fn(self, generator, z):
        return generator(z * 0.5)


class Sigmoid(GeneratorAdapter):
    def images(self, raw, n=None):
        return super().images(torch.sigmoid(raw), n)


def test_overridden_generate_is_honoured_everywhere():
    gen = init(SkipDecoder(), 3)
    m = Mirrored(gen, (4,))
    z1, z2 = m.sample_latents(3, seed=1), m.sample_latents(3, seed=2)
    torch.testing.assert_close(hybridize(m, z1, z2, {"act": []}), m.generate(z1))
    torch.testing.assert_close(hybridize(m, z1, z2, {"act": list(range(6))}),
                               hybridize(GeneratorAdapter(gen, (4,)), z1, z2,
                                         {"act": list(range(6))}).flip(-1), rtol=1e-5, atol=1e-6)
    ex = explain(m, "act")
    assert ex.path == "hook" and "overrides generate" in ex.reason
    with pytest.warns(UserWarning, match="overrides generate"):
        res = influence_maps(m, "act", n_pairs=2, progress=False)
    plain = influence_maps(GeneratorAdapter(gen, (4,)), "act", n_pairs=2, progress=False)
    # the hook path against the fast path: float32 rounding, absolute in image units
    np.testing.assert_allclose(res.maps, plain.maps[..., ::-1], rtol=1e-5, atol=1e-6)


def test_forward_fn_method_is_kept_and_captured():
    gen = init(SkipDecoder(), 3)
    ad = WithForwardMethod(gen, (4,))
    z = ad.sample_latents(2)
    torch.testing.assert_close(ad.generate(z), gen(z * 0.5))
    assert explain(ad, "act").capture == "graph of the forward"
    assert_paths_agree(ad, "act")
    # an explicit forward= still wins
    ad2 = WithForwardMethod(gen, (4,), forward=lambda g, z: g(z))
    torch.testing.assert_close(ad2.generate(z), gen(z))


def test_overridden_images_is_honoured():
    gen = init(SkipDecoder(), 3)
    ad = Sigmoid(gen, (4,), output_range=(0, 1))
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"act": []}), ad.generate(z1))
    assert float(ad.generate(z1).min()) >= 0
    assert_paths_agree(ad, "act")


def test_biggan_with_its_forward_function_is_captured():
    """The zoo's BigGAN needs forward= (a float truncation read out of a tensor)."""
    from cfmodules.zoo.biggan import gblock_path, load_random

    ad = load_random(resolution=32, channel_width=4)
    layer = gblock_path(ad.generator, 2)
    ex = explain(ad, layer)
    assert ex.path == "partial" and ex.capture.startswith("partial at the generator")
    assert "control flow" in ex.attempts[0].error and ex.limit > 1
    assert_paths_agree(ad, layer, n=2, n_pairs=2, channels=[0, 5])


@pytest.mark.numerics
@pytest.mark.parametrize("op", [nn.ConvTranspose2d(12, 5, 4, 2, 1), nn.Conv2d(12, 5, 3, 1, 1),
                                nn.Conv1d(12, 4, 3, 2, 0), nn.Linear(12, 3)],
                         ids=["convT2d", "conv2d", "conv1d", "linear"])
def test_group_contributions_equal_one_call_per_group(op):
    """Groups of equal size run as one grouped convolution: the same sums as one call each."""
    from cfmodules.engine.linear import LinearPlan, group_contribution, group_contributions

    torch.manual_seed(0)
    plan = LinearPlan(layer="x", op=op, op_name="op", cut="op", scale=None)
    shape = {nn.ConvTranspose2d: (3, 12, 6, 6), nn.Conv2d: (3, 12, 7, 7),
             nn.Conv1d: (3, 12, 9), nn.Linear: (3, 12)}[type(op)]
    delta = torch.randn(shape)
    w = plan.weight()
    groups = [torch.tensor(g) for g in ([0, 3, 5], [1, 2, 11], [4, 6, 7], [8, 9], [10, 0],
                                        [2], [3, 4, 5, 6, 7])]
    got = group_contributions(plan, w, delta, groups)
    want = torch.stack([group_contribution(plan, w, delta, g) for g in groups])
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
