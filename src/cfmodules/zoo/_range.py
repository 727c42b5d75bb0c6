"""The display range of a generator whose images have no fixed range (random weights)."""

from __future__ import annotations

from typing import Any

import torch

from cfmodules import checks

__all__ = ["calibrate_display"]


def calibrate_display(adapter: Any, n: int = 8, seed: int = 12345) -> None:
    """Set ``adapter.output_range`` to the 1st and 99th percentiles of ``n`` samples' pixels.

    For display only (reports, figures); the numbers cfmodules computes never depend on it.
    The samples come from their own latent stream ``seed``.
    """
    y = adapter.generate(adapter.sample_latents(n, seed=seed)).float().flatten()
    step = max(1, y.numel() // 200_000)  # torch.quantile takes at most 16M values
    lo, hi = (float(v) for v in torch.quantile(y[::step], torch.tensor([0.01, 0.99])))
    adapter.output_range = checks.output_range((lo, hi if hi > lo else lo + 1.0))
