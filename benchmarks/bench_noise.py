"""Benchmark: what ``GeneratorAdapter(..., noise="per-sample")`` costs.

A StyleGAN-like generator (a latent to 4x4, four upsampling blocks to 64x64, per-pixel
noise ``torch.randn(N, 1, H, W)`` scaled by a learned strength after each block) is run

- ``generate``: the bare forward (``gen(z)``, noise from torch's global generator, under
  ``no_grad``) vs ``adapter.generate(z)`` with per-sample noise (a dispatch mode on every
  operator, latent hashing, one small draw per distinct sample and noise layer);
- ``influence``: influence maps of a middle layer with per-sample noise (every hybrid a
  full forward) vs the same generator without noise through the adapter's default path
  (``algorithm="auto"``: prefix once, suffix only) and through full forwards
  (``algorithm="hook"``), so the cost of the mode and the cost of losing the cut are
  separated.

All timings alternate in this process (``--repeats`` rounds, best of each). Run::

    flock /tmp/cfmodules-bench.lock env PYTHONPATH=src python benchmarks/bench_noise.py

It prints ``RESULT`` lines with ratios (>1: per-sample noise is slower).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.influence import influence_maps


class StyleLike(nn.Module):
    """z (128) -> 4x4x256 -> 8 -> 16 -> 32 -> 64, noise after every block when ``noisy``."""

    def __init__(self, noisy: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.noisy = noisy
        self.fc = nn.Linear(128, 256 * 16)
        chans = [256, 128, 64, 32, 16]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(chans, chans[1:]))
        self.strength = nn.Parameter(torch.full((4,), 0.3))
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 256, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.noisy:
                h = h + self.strength[i] * torch.randn(h.shape[0], 1, *h.shape[2:],
                                                       device=h.device)
        return torch.tanh(self.out(h))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layer", default="blocks.1.2")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    noisy, clean = StyleLike(True).eval(), StyleLike(False).eval()
    ad = GeneratorAdapter(noisy, 128, noise="per-sample")
    ad_clean = GeneratorAdapter(clean, 128)
    z = ad.sample_latents(args.samples)
    ad.generate(z[:2])  # first-use checks outside the timings
    ad_clean.generate(z[:2])

    def bare() -> None:
        with torch.no_grad():
            noisy(z)

    t_bare = t_ps = float("inf")
    for _ in range(args.repeats):
        t_bare = min(t_bare, best(bare, 1))
        t_ps = min(t_ps, best(lambda: ad.generate(z), 1))
    print(f"RESULT what=generate samples={args.samples} per_sample_over_bare="
          f"{t_ps / t_bare:.2f}x bare_s={t_bare:.4f} per_sample_s={t_ps:.4f}")

    kw = dict(n_pairs=args.pairs, pairs_per_block=args.pairs, progress=False)
    t_fast = t_hook = t_noise = float("inf")
    for _ in range(args.repeats):
        t_fast = min(t_fast, best(lambda: influence_maps(ad_clean, args.layer, **kw), 1))
        t_hook = min(t_hook, best(
            lambda: influence_maps(ad_clean, args.layer, algorithm="hook", **kw), 1))
        t_noise = min(t_noise, best(lambda: influence_maps(ad, args.layer, **kw), 1))
    print(f"RESULT what=influence layer={args.layer} pairs={args.pairs} "
          f"per_sample_over_auto={t_noise / t_fast:.2f}x "
          f"per_sample_over_hook={t_noise / t_hook:.2f}x auto_s={t_fast:.3f} "
          f"hook_s={t_hook:.3f} per_sample_s={t_noise:.3f}")


if __name__ == "__main__":
    main()
