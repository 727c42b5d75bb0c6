"""The pretrained 64x64 DCGAN faces (PyPI package ``gan-face-generate``, MIT).

The architecture is the PyTorch DCGAN tutorial's generator (nz=100, ngf=64, nc=3), trained
on DigiFace1M faces; output 3x64x64 in [-1, 1]. Layers ``main.0`` .. ``main.13``:
``main.5`` is 256 channels at 8x8, ``main.8`` 128 channels at 16x16, ``main.11`` 64 at 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from cfmodules.adapter import GeneratorAdapter
from cfmodules.zoo._files import package_file

__all__ = ["DCGANGenerator", "load_dcgan_faces", "INSTALL"]

INSTALL = "pip install gan-face-generate   (or: pip install 'cfmodules[zoo]')"


class DCGANGenerator(nn.Module):
    """The DCGAN tutorial generator, with its layers under ``main`` as in the original."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, nz, 1, 1) -> images (N, nc, 64, 64) in [-1, 1]."""
        return self.main(z)


def load_dcgan_faces(device: str | torch.device | None = None) -> GeneratorAdapter:
    """The pretrained DCGAN faces generator wrapped in a :class:`GeneratorAdapter`.

    Weights are read from ``gan_face_generate/weights.tar`` with ``weights_only=True``;
    the ``gan_face_generate`` package itself is never imported.
    """
    path = package_file("gan_face_generate", "weights.tar", INSTALL)
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator = DCGANGenerator()
    generator.load_state_dict(state["netG_state_dict"])
    generator.eval()
    if device is not None:
        generator.to(device)
    return GeneratorAdapter(
        generator, (100, 1, 1), prior="normal", output_range=(-1.0, 1.0),
        device=device, name="dcgan-faces",
    )
