"""Running mean and variance over latent pairs (Chan et al.'s parallel merge, float64).

Influence maps are means over many pairs; their standard error needs the variance. Both
are kept as running statistics per unit and pixel, so memory does not grow with the
number of pairs. Within a block of pairs, float64 sums and sums of squares are
accumulated (:class:`BlockSums`, cheap per chunk, each chunk's partial sums taken in the
input's precision); each finished block is merged into the
running mean and M2 with Chan et al.'s parallel formula, in a fixed order, so the result
does not depend on how a block was chunked beyond float64 rounding.
"""

from __future__ import annotations

import torch

__all__ = ["RunningStats", "BlockSums"]


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

    def copy(self) -> RunningStats:
        """An independent copy (merging into it leaves this one as it was)."""
        new = RunningStats.__new__(RunningStats)
        new.count, new.mean, new.m2 = self.count.clone(), self.mean.clone(), self.m2.clone()
        return new

    def stderr(self) -> torch.Tensor:
        """Per-element standard error of the mean (NaN where fewer than 2 samples)."""
        n = self.count.view((-1,) + (1,) * (self.mean.dim() - 1))
        var = self.m2 / (n - 1).clamp(min=1)
        se = (var / n.clamp(min=1)).sqrt()
        return torch.where(n >= 2, se, torch.full_like(se, float("nan")))


class BlockSums:
    """Per-unit float64 sums and sums of squares of samples over one block.

    Parameters
    ----------
    n_units : int
        Rows; the per-unit shape is taken from the first :meth:`add`.
    """

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.s: torch.Tensor | None = None
        self.q: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-unit shape, e.g. ``(H, W)``."""
        assert self.s is not None, "no samples added yet"
        return tuple(self.s.shape[1:])

    def add(self, index: slice | torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> None:
        """Add sums ``s`` and sums of squares ``q`` (``(u, *shape)``) to rows ``index``."""
        if self.s is None or self.q is None:
            self.s = s.new_zeros(self.n_units, *s.shape[1:])
            self.q = s.new_zeros(self.n_units, *s.shape[1:])
        if self.s.device.type == "cpu" and s.device.type == "cpu":
            # numpy's add: one thread, so PyTorch's OpenMP threads are not woken between
            # the calls of a fused kernel, where they would spin on the cores it uses
            rows = index if isinstance(index, slice) else index.numpy()
            self.s.numpy()[rows] += s.detach().numpy()
            self.q.numpy()[rows] += q.detach().numpy()
        elif isinstance(index, slice):
            self.s[index] += s
            self.q[index] += q
        else:
            index = index.to(s.device)
            self.s.index_add_(0, index, s)
            self.q.index_add_(0, index, q)

    def is_finite(self, index: slice | torch.Tensor) -> bool:
        """Whether the sums of rows ``index`` are all finite (NaN and inf propagate)."""
        assert self.s is not None and self.q is not None, "no samples added yet"
        if not isinstance(index, slice):
            index = index.to(self.s.device)
        return bool(torch.isfinite(self.s[index]).all() and torch.isfinite(self.q[index]).all())

    def merge_into(self, stats: RunningStats, n: int) -> None:
        """Merge this block (``n`` samples for every unit) into ``stats``."""
        assert self.s is not None and self.q is not None, "no samples added yet"
        mean = self.s / n
        m2 = (self.q - self.s * mean).clamp_(min=0)
        stats.merge(slice(None), float(n), mean, m2)
