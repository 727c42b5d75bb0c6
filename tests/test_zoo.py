"""The zoo: the pretrained DCGAN faces end to end (slow), and clear errors when missing."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from cfmodules import hybridize, zoo
from cfmodules.errors import ConfigError, ModelNotAvailableError
from cfmodules.zoo._files import package_file


def test_missing_package_names_the_install_command():
    with pytest.raises(ModelNotAvailableError, match="pip install some-pkg"):
        package_file("surely_not_an_installed_package", "w.tar", "pip install some-pkg")


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="Did you mean 'dcgan-faces'"):
        zoo.load("dcgan-face")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gan_face_generate") is None,
                    reason="pip install gan-face-generate")
def test_dcgan_faces_load_and_generate_faces():
    ad = zoo.load("dcgan-faces")
    assert "gan_face_generate" not in sys.modules  # read by file, never imported
    z = ad.sample_latents(64, seed=0)
    x = ad.generate(z)
    assert x.shape == (64, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert float(x.std(0).mean()) > 0.1  # samples differ
    # a face, not noise: neighbouring pixels are strongly correlated ...
    a, b = x[..., :, 1:].flatten(), x[..., :, :-1].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
    # ... and the mean image is left-right symmetric like a face (measured: 0.72 for the
    # trained weights over 64 samples, -0.45 for random weights, whose images are noise)
    m = ad.to_unit(x).mean((0, 1))
    sym = torch.corrcoef(torch.stack([m.flatten(), m.flip(1).flatten()]))[0, 1]
    assert float(sym) > 0.5
    # hybrids at main.8 stay in range and are between the originals
    z2 = ad.sample_latents(64, seed=1)
    h = hybridize(ad, z, z2, {"main.8": range(0, 128, 2)})
    d1, d2 = (h - x).abs().mean(), (h - ad.generate(z2)).abs().mean()
    assert 0 < d1 and 0 < d2 and h.min() >= -1 and h.max() <= 1
