"""Helpers for the modules tests: a naive reference EIM computed from ``hybridize``."""

from __future__ import annotations

import numpy as np
import torch

from cfmodules.hybrid import hybridize

__all__ = ["naive_influence_maps", "block_maps"]


def naive_influence_maps(adapter, layer: str, n_pairs: int = 32, seed: int = 0) -> np.ndarray:
    """EIM_c = mean over pairs and colour channels of |hybrid_c - Original 1| (eq. 2), (C, H, W).

    The reference implementation: one hybridize call per channel. Pair p is samples 2p
    (Original 1) and 2p+1 (Original 2) of the stream ``seed``, as in
    ``cfmodules.influence.influence_maps``.
    """
    z = adapter.sample_latents(2 * n_pairs, seed=seed)
    z1, z2 = z[0::2], z[1::2]
    original = adapter.generate(z1)
    n_channels = next(i.channels for i in adapter.layers() if i.name == layer)
    maps = []
    for c in range(n_channels):
        hyb = hybridize(adapter, z1, z2, {layer: [c]})
        maps.append((hyb - original).abs().mean(dim=(0, 1)))
    return torch.stack(maps).double().numpy()


def block_maps(sizes=(4, 6, 10), shape=(12, 12), seed=0, noise=0.05):
    """Synthetic influence maps: module k's channels light random parts of band k.

    Returns maps (C, H, W) and the true labels (C,), channels shuffled.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    edges = np.linspace(0, w, len(sizes) + 1).round().astype(int)
    maps, labels = [], []
    for k, n in enumerate(sizes):
        for _ in range(n):
            m = noise * rng.random(shape)
            m[:, edges[k]:edges[k + 1]] += rng.random((h, edges[k + 1] - edges[k]))
            maps.append(m)
            labels.append(k)
    order = rng.permutation(len(labels))
    return np.array(maps)[order], np.array(labels)[order]
