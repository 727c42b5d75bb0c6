"""Running mean and variance over latent pairs (Chan et al.'s parallel merge, float64).

Influence maps are means over many pairs; their standard error needs the variance. Both
are kept as running statistics per unit and pixel, so memory does not grow with the
number of pairs, and batches of pairs are merged in a fixed order so that the result does
not depend on how the pairs were chunked beyond float64 rounding.
"""

from __future__ import annotations

import torch

__all__ = ["RunningStats"]


class RunningStats:
    """Count, mean and sum of squared deviations (M2) of ``U`` maps, updated by batches.

    Parameters
    ----------
    n_units : int
    shape : tuple of int
        Per-unit map shape, e.g. ``(H, W)``.
    device : torch.device
        Where the float64 accumulators live.
    """

    def __init__(self, n_units: int, shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.count = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.mean = torch.zeros((n_units, *shape), dtype=torch.float64, device=device)
        self.m2 = torch.zeros((n_units, *shape), dtype=torch.float64, device=device)

    def merge(self, units: slice | torch.Tensor, count: torch.Tensor | float, mean: torch.Tensor,
              m2: torch.Tensor) -> None:
        """Merge the statistics of a batch (``count`` samples each) into rows ``units``.

        ``count`` is a scalar or ``(u,)``; ``mean`` and ``m2`` are ``(u, *shape)``.
        """
        n_a = self.count[units]
        n_b = torch.as_tensor(count, dtype=torch.float64, device=self.count.device)
        n_b = n_b.expand_as(n_a)
        n = n_a + n_b
        view = (-1,) + (1,) * (mean.dim() - 1)
        w_b = torch.where(n > 0, n_b / n.clamp(min=1), torch.zeros_like(n)).view(view)
        w_ab = torch.where(n > 0, n_a * n_b / n.clamp(min=1), torch.zeros_like(n)).view(view)
        delta = mean.to(torch.float64) - self.mean[units]
        self.mean[units] += delta * w_b
        self.m2[units] += m2.to(torch.float64) + delta * delta * w_ab
        self.count[units] = n

    def update(self, units: slice | torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values (u, k, *shape)``: ``k`` new samples for each unit of ``units``."""
        v = values.to(torch.float64)
        mean = v.mean(dim=1)
        m2 = ((v - mean.unsqueeze(1)) ** 2).sum(dim=1)
        self.merge(units, float(v.shape[1]), mean, m2)

    def merge_all(self, other: RunningStats) -> None:
        """Merge ``other`` (same units and shape) into these statistics."""
        self.merge(slice(None), other.count, other.mean, other.m2)

    def stderr(self) -> torch.Tensor:
        """Per-element standard error of the mean (NaN where fewer than 2 samples)."""
        n = self.count.view((-1,) + (1,) * (self.mean.dim() - 1))
        var = self.m2 / (n - 1).clamp(min=1)
        se = (var / n.clamp(min=1)).sqrt()
        return torch.where(n >= 2, se, torch.full_like(se, float("nan")))
