"""hybridize(): exactness against hand-made splices, the two limits, conditional inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cfmodules import GeneratorAdapter, hybridize
from cfmodules.errors import ChannelError, ConfigError, LatentError, LayerNotFoundError

pytestmark = pytest.mark.numerics  # compares results across chunkings and code paths


def hand_splice(model, z1, z2, channels):
    """Run the tiny Sequential by hand: act(z1) with `channels` from act(z2), then `out`."""
    a1 = F.relu(model.up(z1))
    a2 = F.relu(model.up(z2))
    a = a1.clone()
    a[:, channels] = a2[:, channels]
    return model.out(a)


@pytest.mark.parametrize("channels", [[0], [1, 3], [0, 1, 2, 3]])
def test_hybrid_equals_hand_made_splice(tiny, channels):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    z1, z2 = ad.sample_latents(5, seed=0), ad.sample_latents(5, seed=1)
    got = hybridize(ad, z1, z2, {"act": channels})
    want = hand_splice(tiny, z1, z2, channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_channel_gives_original_1_and_all_channels_give_original_2(skip):
    ad = GeneratorAdapter(skip, (3, 1, 1))
    z1, z2 = ad.sample_latents(4, seed=0), ad.sample_latents(4, seed=1)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"up": []}), ad.generate(z1))
    # every channel of the first layer: everything downstream is Original 2's
    torch.testing.assert_close(hybridize(ad, z1, z2, {"up": range(4)}), ad.generate(z2))


def test_hybrid_changes_only_what_the_module_reaches(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    z1, z2 = ad.sample_latents(8, seed=0), ad.sample_latents(8, seed=1)
    h = hybridize(ad, z1, z2, {"act": [0, 1]})
    assert not torch.allclose(h, ad.generate(z1)) and not torch.allclose(h, ad.generate(z2))


def test_conditional_inputs_travel_with_their_sample(conditional):
    ad = GeneratorAdapter(conditional, ((3,), (2,)))
    z1 = (torch.randn(4, 3), F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float())
    z2 = (torch.randn(4, 3), F.one_hot(torch.tensor([1, 1, 0, 0]), 2).float())
    ch = [0, 2]
    got = hybridize(ad, z1, z2, {"act": ch})
    m = conditional
    h1 = F.relu(m.fc(torch.cat(z1, 1)).view(-1, 4, 2, 2))
    h2 = F.relu(m.fc(torch.cat(z2, 1)).view(-1, 4, 2, 2))
    h1[:, ch] = h2[:, ch]
    want = m.out(h1 + m.embed(z1[1])[:, :, None, None])  # Original 1's class after the layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_layer_module_equals_hand_splice(skip):
    ad = GeneratorAdapter(skip, (3, 1, 1))
    z1, z2 = ad.sample_latents(3, seed=0), ad.sample_latents(3, seed=1)
    got = hybridize(ad, z1, z2, {"act": [1], "act2": [0, 2]})
    m = skip
    h1, h2 = F.relu(m.up(z1)), F.relu(m.up(z2))
    g2 = F.relu(m.mid(h2))
    h = h1.clone()
    h[:, [1]] = h2[:, [1]]
    g = F.relu(m.mid(h))
    g[:, [0, 2]] = g2[:, [0, 2]]
    want = torch.tanh(m.out(g + h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_hybrids(skip):
    ad = GeneratorAdapter(skip, (3, 1, 1))
    z1, z2 = ad.sample_latents(7, seed=0), ad.sample_latents(7, seed=1)
    a = hybridize(ad, z1, z2, {"act": [0, 3]})
    b = hybridize(ad, z1, z2, {"act": [0, 3]}, batch_size=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "module, error, words",
    [
        ({"actt": [0]}, LayerNotFoundError, "Did you mean 'act'"),
        ({"act": [4]}, ChannelError, "out of range"),
        ({"act": [-1]}, ChannelError, "out of range"),
        ({"act": [1, 1]}, ChannelError, "more than once"),
        ({"act": [0.5]}, ChannelError, "integers"),
        ({}, ConfigError, "maps layer names"),
        ([0, 1], ConfigError, "maps layer names"),
    ],
)
def test_bad_modules_raise_library_errors(tiny, module, error, words):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    z = ad.sample_latents(2)
    with pytest.raises(error, match=words):
        hybridize(ad, z, z, module)


def test_mismatched_and_misshapen_latents(tiny):
    ad = GeneratorAdapter(tiny, (2, 1, 1))
    with pytest.raises(LatentError, match="same batch size"):
        hybridize(ad, ad.sample_latents(2), ad.sample_latents(3), {"act": [0]})
    with pytest.raises(LatentError, match=r"expected \(N, 2, 1, 1\)"):
        hybridize(ad, torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1), {"act": [0]})
    with pytest.raises(LatentError, match="batch axis"):
        hybridize(ad, torch.randn(2, 1, 1), torch.randn(2, 1, 1), {"act": [0]})
