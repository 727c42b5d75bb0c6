"""docs/own_generator.md: its code runs, and a user's generator with several inputs, a custom
forward and a dict output in [0, 255] behaves as the guide says."""

from __future__ import annotations

import pytest
import torch

from cfmodules import GeneratorAdapter, hybridize
from cfmodules.engine import explain
from cfmodules.errors import GeneratorOutputError, LatentError
from families_helpers import run_doc_blocks


@pytest.fixture(scope="module")
def guide() -> dict:
    """The namespace of docs/own_generator.md after running all its code blocks."""
    return run_doc_blocks("own_generator.md")


def test_own_generator_guide_runs(guide) -> None:
    images, hybrids = guide["images"], guide["hybrids"]
    assert images.shape == (6, 3, 16, 16) and hybrids.shape == (4, 3, 16, 16)
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 1  # not [0, 1]
    assert 0 <= guide["shown"].min() and guide["shown"].max() <= 1
    assert torch.allclose(guide["shown"], images / 255)
    assert guide["layer"] in {i.name for i in guide["adapter"].layers()}


def test_own_generator_latent_is_a_tuple_per_sample(guide) -> None:
    ad = guide["adapter"]
    z = ad.sample_latents(5, seed=3)
    assert [p.shape for p in z] == [(5, 16), (5, 4), (5, 1)]
    tail = ad.sample_latents(2, seed=3, start=3)
    assert all(torch.equal(a[3:], b) for a, b in zip(z, tail))
    assert torch.allclose(ad.generate(z, batch_size=2), ad.generate(z), atol=1e-5)
    with pytest.raises(LatentError, match="3 inputs"):
        ad.generate(z[0])


def test_own_generator_hybrid_matches_a_naive_reference(guide) -> None:
    ad, gen, layer = guide["adapter"], guide["generator"], guide["layer"]
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    channels = [0, 3, 5, 7]
    module = dict(gen.named_modules())[layer]

    def run(z, hook=None):
        h = module.register_forward_hook(hook) if hook else None
        try:
            with torch.no_grad():
                return gen(noise=z[0], style=z[1], brightness=z[2])["image"]
        finally:
            if h:
                h.remove()

    donor = {}
    run(z2, lambda m, i, o: donor.setdefault("act", o.clone()))

    def swap(m, i, o):
        o = o.clone()
        o[:, channels] = donor["act"][:, channels]
        return o

    assert torch.allclose(hybridize(ad, z1, z2, {layer: channels}), run(z1, swap), atol=1e-4)


def test_own_generator_hybrid_keeps_the_other_inputs_of_original_1(guide) -> None:
    ad, layer = guide["adapter"], guide["layer"]
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    every = range(16)
    # The brightness enters after the layer: swapping every channel does not give Original 2 ...
    h = hybridize(ad, z1, z2, {layer: every})
    assert (h - ad.generate(z2)).abs().max() > 1.0
    # ... unless Original 2 has Original 1's brightness.
    z2_same = (z2[0], z2[1], z1[2])
    assert torch.allclose(hybridize(ad, z1, z2_same, {layer: every}), ad.generate(z2_same), atol=1e-3)
    assert torch.allclose(hybridize(ad, z1, z2, {layer: []}), ad.generate(z1), atol=1e-4)


def test_own_generator_multi_layer_module(guide) -> None:
    ad = guide["adapter"]
    z1, z2 = ad.sample_latents(2, seed=1), ad.sample_latents(2, seed=2)
    one = hybridize(ad, z1, z2, {"block1.2": [0, 3]})
    two = hybridize(ad, z1, z2, {"block1.2": [0, 3], "block2.2": [1, 2]})
    assert two.shape == (2, 3, 16, 16) and (one - two).abs().max() > 1e-3


def test_own_generator_output_transform_is_needed_and_can_pick_from_a_tuple(guide) -> None:
    gen, prior, forward = guide["generator"], guide["my_prior"], guide["my_forward"]
    shapes = ((16,), (4,), (1,))
    plain = GeneratorAdapter(gen, shapes, prior=prior, forward=forward)
    with pytest.raises(GeneratorOutputError, match="output_transform"):
        plain.generate(plain.sample_latents(2))

    def tuple_forward(generator, latent):
        out = forward(generator, latent)
        return out["image"], out["features"]

    as_tuple = GeneratorAdapter(gen, shapes, prior=prior, forward=tuple_forward,
                                output_transform=lambda out: out[0], output_range=(0, 255))
    z = as_tuple.sample_latents(2)
    assert torch.equal(as_tuple.generate(z), guide["adapter"].generate(z))


def test_own_generator_prior_with_wrong_shapes_is_refused(guide) -> None:
    def bad_prior(n, gen):
        return torch.randn(n, 16, generator=gen), torch.randn(n, 5, generator=gen), torch.zeros(n, 1)

    ad = GeneratorAdapter(guide["generator"], ((16,), (4,), (1,)), prior=bad_prior,
                          forward=guide["my_forward"], output_transform=lambda o: o["image"])
    with pytest.raises(LatentError, match="prior"):
        ad.sample_latents(2)


def test_own_generator_subclasses_are_honoured(guide) -> None:
    """The guide's subclasses: a mirrored generate() and a forward_fn method."""
    layer = guide["layer"]
    mirrored, half, ad = guide["mirrored"], guide["half"], guide["adapter"]
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    torch.testing.assert_close(hybridize(mirrored, z1, z2, {layer: []}), mirrored.generate(z1))
    torch.testing.assert_close(hybridize(mirrored, z1, z2, {layer: [0, 3]}),
                               hybridize(ad, z1, z2, {layer: [0, 3]}).flip(-1))
    assert explain(mirrored, layer).path == "hook"
    torch.testing.assert_close(hybridize(half, z1, z2, {layer: []}), half.generate(z1))
    assert explain(half, layer).path != "hook"
    with_half = (0.5 * z1[0], z1[1], z1[2])
    torch.testing.assert_close(half.generate(z1), ad.generate(with_half))


@pytest.mark.numerics
def test_stylegan_style_example_is_exact_and_off_the_hook_path(guide) -> None:
    """docs/own_generator.md's StyleGAN-style generator: modulated grouped convolutions,
    `*x.shape[2:]`, noise as an input, skips to RGB. torch.export captures it, hybrids and
    influence maps equal the hook path's, and the noise stays with Original 1."""
    from engine_helpers import assert_paths_agree

    ad, layer = guide["styled"], guide["style_layer"]
    assert explain(ad, layer).path == "split"
    assert "torch.export" in explain(ad, layer).capture
    assert_paths_agree(ad, layer, channels=[0, 5, 11])
    za, zb = guide["za"], guide["zb"]
    y1, y2 = ad.generate(za), ad.generate(zb)
    everything = hybridize(ad, za, zb, {layer: range(16)})
    assert (everything - y2).abs().max() > 1e-3  # the next block's noise and style: Original 1's
    # every channel where only the skip of Original 1 and its style follow: still Original 1's
    rgb = hybridize(ad, za, zb, {"blocks.1.to_rgb": range(3)})
    assert (rgb - y2).abs().max() > 1e-3
    maps = guide["style_maps"].maps
    assert maps.shape == (16, 16, 16) and (maps > 0).all()
    assert not torch.equal(y1, y2)
