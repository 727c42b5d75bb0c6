"""Shared pieces of the CLI / report / plots tests: a hand-made AnalysisResult, a factory file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from cfmodules.analysis import AnalysisResult, AnalysisSettings
from cfmodules.modules import StabilityResult

H = W = 8


def blob(cy: float, cx: float, r: float = 0.2) -> np.ndarray:
    """(H, W) Gaussian bump centred at (cy, cx) in image fractions."""
    ys = (np.arange(H) + 0.5) / H
    xs = (np.arange(W) + 0.5) / W
    return np.exp(-((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) / (2 * r * r))


def fake_result(k: int = 2, c: int = 6, n: int = 3, stability: bool = True) -> AnalysisResult:
    """A small AnalysisResult made by hand: channel i belongs to module i % k."""
    rng = np.random.default_rng(0)
    labels = np.arange(c) % k
    templates = np.stack([blob(0.5, 0.5), blob(0.5, 0.1)][:k] + [blob(0.1, 0.5)] * (k - 2))
    maps = np.stack([templates[j] * (1 + 0.1 * i) for i, j in enumerate(labels)])
    imgs = lambda *s: rng.integers(0, 256, size=s, dtype=np.uint8)  # noqa: E731
    stab = None
    if stability:
        stab = StabilityResult(np.array([2, 3]), ("nmf", "kmeans"),
                               rng.uniform(0.6, 1, (2, 2, 4)), rng.uniform(0.6, 1, (2, 2, 4)),
                               {"n_repeats": 4})
    return AnalysisResult(
        model="toy", model_spec="toy", layers=["act"],
        settings=AnalysisSettings(n_pairs=4, n_modules=k, stability_ks=(2, 3),
                                  stability_repeats=4, n_samples=4, n_hybrids=n),
        maps=maps.astype(np.float32), stderr=np.zeros_like(maps, dtype=np.float32),
        unit_layer=np.array(["act"] * c), unit_channel=np.arange(c), labels=labels,
        templates=templates, weights=np.eye(k)[labels],
        module_maps=templates[:k].astype(np.float32) * np.arange(1, k + 1)[:, None, None],
        stability=stab, samples=imgs(4, 3, H, W),
        mean_image=np.full((3, H, W), 0.5, np.float32), original1=imgs(n, 3, H, W),
        original2=imgs(n, 3, H, W), hybrids=imgs(k, n, 3, H, W),
        timings={"influence_maps": 1.5, "clustering": 0.25}, version="0.0.test",
        created="2020-04-26T00:00:00+00:00",
    )


FACTORY_FILE = textwrap.dedent('''
    import torch
    from torch import nn
    from cfmodules import GeneratorAdapter


    def make_module():
        """A tiny conv generator, returned as a bare nn.Module."""
        torch.manual_seed(0)
        return nn.Sequential(nn.ConvTranspose2d(4, 6, 4), nn.ReLU(), nn.Conv2d(6, 3, 1),
                             nn.Tanh())


    def make_adapter(device=None):
        return GeneratorAdapter(make_module(), (4, 1, 1), device=device, name="tiny")


    def make_string():
        return "not a generator"


    def make_broken():
        raise RuntimeError("weights not found")
''')


def factory_file(folder: Path) -> Path:
    """Write a user's generator file with several factories; returns its path."""
    path = folder / "my_gan.py"
    path.write_text(FACTORY_FILE)
    return path
