"""The planted toy generators: Model 1 of the paper and a small conv generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError
from cfmodules.hybrid import hybridize
from cfmodules.synthetic import (
    PlantedConvGenerator,
    PlantedModel1,
    load_planted_conv,
    load_planted_model1,
)


def module_pixels_changed(adapter, layer, labels, module, n=6):
    """Pixels (H, W) where hybridizing the channels of ``module`` changes the image."""
    z = adapter.sample_latents(2 * n, seed=1)
    channels = np.flatnonzero(labels == module).tolist()
    diff = (hybridize(adapter, z[:n], z[n:], {layer: channels}) - adapter.generate(z[:n])).abs()
    return (diff.amax(dim=(0, 1)) > 0).numpy()


def test_model1_structure_and_supports():
    gen = PlantedModel1(n_modules=3, units_per_module=(2, 3, 4), image_size=(5, 9), seed=3)
    assert gen.latent_shape == (3,) and gen.prior == "uniform"
    assert gen.true_labels().tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    # Model 1: V = S(H z) block by block, Y = W V with W^k supported on I_k
    z = torch.rand(4, 3) * 2 - 1
    v = torch.nn.functional.leaky_relu(gen.mix.weight @ z.T, 0.2).T
    y = (gen.readout.weight @ v.T).T.reshape(4, 1, 5, 9)
    torch.testing.assert_close(gen(z), y)
    mix = gen.mix.weight.detach().numpy()
    assert np.array_equal(mix != 0, np.eye(3)[gen.true_labels()].astype(bool))
    read = gen.readout.weight.detach().numpy()
    for k in range(3):
        cols = read[:, gen.true_labels() == k]
        assert np.array_equal((cols != 0).any(axis=1), gen.supports[k].ravel())
    # each module has pixels of its own, and the sets overlap elsewhere (overlap=1)
    owners = gen.supports.sum(axis=0)
    assert all((gen.supports[k] & (owners == 1)).any() for k in range(3))
    assert (owners > 1).any()


@pytest.mark.parametrize("loader", [load_planted_model1, load_planted_conv])
def test_runs_through_the_adapter_and_modules_paint_their_own_pixels(loader):
    adapter = loader(seed=2)
    assert isinstance(adapter, GeneratorAdapter)
    gen = adapter.generator
    assert not gen.training
    layer = gen.layer
    info = {i.name: i for i in adapter.layers()}
    labels = gen.true_labels()
    assert info[layer].channels == len(labels)
    img = adapter.generate(adapter.sample_latents(3, seed=0))
    assert img.ndim == 4 and img.shape[0] == 3 and torch.isfinite(img).all()
    region = gen.supports if isinstance(gen, PlantedModel1) else gen.regions
    for k in range(gen.n_modules):
        changed = module_pixels_changed(adapter, layer, labels, k)
        assert changed.any()
        assert not (changed & ~region[k]).any()  # a module never reaches outside its region


def test_conv_generator_shapes_seed_and_unequal_modules():
    gen = PlantedConvGenerator(n_modules=4, latent_per_module=2, channels_per_module=(1, 2, 3, 6),
                               image_size=32, colours=1, seed=5)
    assert gen.latent_shape == (8, 1, 1) and gen.layer == "main.5"
    assert gen(torch.randn(2, 8, 1, 1)).shape == (2, 1, 32, 32)
    assert gen.true_labels().tolist() == [0, 1, 1, 2, 2, 2] + [3] * 6
    assert gen.true_labels("main.0").tolist() == gen.true_labels().tolist()
    assert gen.regions.shape == (4, 32, 32)
    assert np.array_equal(gen.regions.sum(axis=0), np.ones((32, 32)))  # a partition
    out = gen(torch.randn(5, 8, 1, 1))
    assert out.abs().max() <= 1
    same = PlantedConvGenerator(n_modules=4, latent_per_module=2,
                                channels_per_module=(1, 2, 3, 6), image_size=32, colours=1,
                                seed=5)
    z = torch.randn(2, 8, 1, 1)
    torch.testing.assert_close(gen(z), same(z))
    other = PlantedConvGenerator(n_modules=4, latent_per_module=2,
                                 channels_per_module=(1, 2, 3, 6), image_size=32, colours=1,
                                 seed=6)
    assert not torch.allclose(gen(z), other(z))
    # latent group k reaches only channel group k of the hidden layers
    with torch.no_grad():
        base = gen.main[:6](z)
        z2 = z.clone()
        z2[:, 2:4] += 1.0  # latent group 1
        moved = (gen.main[:6](z2) - base).abs().amax(dim=(0, 2, 3)) > 0
    assert np.array_equal(moved.numpy(), gen.true_labels() == 1)


def test_bad_parameters():
    with pytest.raises(ConfigError, match="units_per_module"):
        PlantedModel1(units_per_module=1)
    with pytest.raises(ConfigError, match="one per module"):
        PlantedModel1(n_modules=3, units_per_module=(2, 3))
    with pytest.raises(ConfigError, match="private"):
        PlantedModel1(n_modules=4, image_size=(4, 8), overlap=2)
    with pytest.raises(ConfigError, match="smaller than n_modules"):
        PlantedModel1(n_modules=5, image_size=(4, 4))
    with pytest.raises(ConfigError, match="negative_slope"):
        PlantedModel1(negative_slope=0.0)
    with pytest.raises(ConfigError, match="image_size"):
        PlantedConvGenerator(image_size=12)
    with pytest.raises(ConfigError, match="planted"):
        PlantedConvGenerator().true_labels("main.5")
    with pytest.raises(ConfigError, match="planted"):
        PlantedModel1().true_labels("readout")
