"""How many hybrids one call of the generator runs, and in which layout.

Hybrids are put on the batch axis (row ``u * P + p`` is unit ``u`` with pair ``p``), and
larger batches usually mean fewer, better-used operations. Not always: a convolution
whose group count grows with the batch, as in StyleGAN2's modulated convolutions (the
weights depend on the sample, so the batch is folded into the channels and convolved
with ``groups=N``), runs slower per sample at large batches, and its modulated weights
take memory per row. For such generators the batch shape is chosen by timing: on the
first block of pairs, a few candidate shapes (hybrids per call 1, 4, 16, ..., units x
pairs or pairs x units, and, with ``algorithm="auto"``, the naive rerun: one full
forward per unit over the block's pairs) each compute real hybrids of a few units, the
fastest per hybrid is kept for the rest of the run. No work is thrown away: the timed
calls' hybrids are part of the maps. Elsewhere the memory budget alone sets the shape.

:func:`batch_dependent_ops` finds such operations in a small probe forward;
:func:`candidate_shapes` lists the shapes; :func:`time_shapes` runs and times them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["BatchShape", "BatchChoice", "batch_dependent_ops", "candidate_shapes",
           "time_shapes", "default_shape", "unit_candidates"]


@dataclass(frozen=True)
class BatchShape:
    """One call's hybrids: ``units`` units times ``pairs`` pairs, on path ``path``.

    Attributes
    ----------
    units : int
    pairs : int
    path : str
        The way the hybrids are computed (``"split"``, ``"linear shortcut"``, ``"hook"``...).
    """

    units: int
    pairs: int
    path: str

    @property
    def rows(self) -> int:
        """Hybrids per call."""
        return self.units * self.pairs

    def __str__(self) -> str:
        return f"{self.path} {self.units} unit(s) x {self.pairs} pair(s)"


@dataclass(frozen=True)
class BatchChoice:
    """The batch shape an influence run used, and why.

    Attributes
    ----------
    shape : BatchShape
    reason : str
    timed : tuple of (BatchShape, float)
        Each candidate timed on the first block and its seconds per hybrid (empty when the
        memory budget alone chose).
    chosen_by : str
        What chose the shape when neither timing nor the memory budget did (``"fused
        kernel"``: :mod:`cfmodules.engine.tail`); empty otherwise.
    """

    shape: BatchShape
    reason: str
    timed: tuple[tuple[BatchShape, float], ...] = ()
    chosen_by: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: ``{"units", "pairs", "path", "chosen_by", "timed_ms_per_hybrid"}``."""
        return {"units": self.shape.units, "pairs": self.shape.pairs, "path": self.shape.path,
                "chosen_by": self.chosen_by or ("timing" if self.timed else "memory budget"),
                "reason": self.reason,
                "timed_ms_per_hybrid": {str(s): round(t * 1e3, 4) for s, t in self.timed}}

    def shape_text(self) -> str:
        """``"N hybrid(s) per call (path U unit(s) x P pair(s))"``."""
        return f"{self.shape.rows} hybrid(s) per call ({self.shape})"

    def __str__(self) -> str:
        s = f"{self.shape_text()}: {self.reason}"
        if self.timed:
            s += "; timed " + ", ".join(f"{c}: {t * 1e3:.3g} ms/hybrid" for c, t in self.timed)
        return s


def default_shape(n_pairs: int, max_rows: int, path: str) -> BatchShape:
    """The memory budget's shape: all the block's pairs (at most ``max_rows``), then units."""
    p = max(1, min(n_pairs, max_rows))
    return BatchShape(max(1, max_rows // p), p, path)


class _Groups(TorchDispatchMode):
    """Records the ``groups`` argument of every convolution."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says
        # False; that wrapper imports torch._dynamo (3 s) on its first call, and the probe
        # never runs under torch.compile (the pattern of torch's own docstring here)
        return False

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if "conv" in name:
            names = [a.name for a in func._schema.arguments]
            if "groups" in names:
                i = names.index("groups")
                g = kwargs.get("groups", args[i] if i < len(args) else 1)
                self.groups.append((name, int(g)))
        return func(*args, **kwargs)


def batch_dependent_ops(adapter) -> str | None:
    """Convolutions whose group count changes with the batch size, or None.

    Two probe forwards (2 and 3 samples) record every convolution's ``groups``; where
    they differ, batching may hurt (see the module docstring). A forward that fails here
    is left to fail in the real run (None).
    """
    seen = []
    try:
        with adapter.eval_mode():
            for n in (2, 3):
                z = adapter.sample_latents(n, seed=0)
                with _Groups() as rec:
                    adapter._raw(z)
                seen.append(rec.groups)
    except Exception:  # the run itself reports the generator's error
        return None
    if seen[0] == seen[1]:
        return None
    grown = [(a, g2, g3) for (a, g2), (_, g3) in zip(seen[0], seen[1]) if g2 != g3]
    if not grown and len(seen[0]) != len(seen[1]):
        return "the number of convolutions changes with the batch size"
    ops = sorted({a for a, _, _ in grown})
    a, g2, g3 = grown[0]
    return (f"{len(grown)} convolution(s) ({', '.join(ops)}) whose groups grow with the batch "
            f"(groups={g2} for 2 samples, {g3} for 3), as in modulated convolutions")


def candidate_shapes(n_units: int, n_pairs: int, max_rows: int, path: str,
                     naive: str | None = None) -> list[BatchShape]:
    """Shapes to time: 1, 4, 16, 64, ... hybrids per call (and ``n_pairs``, ``max_rows``).

    For each count, pairs first (``units x pairs``, as the memory budget lays them out)
    and units first (many units of one or a few pairs). With ``naive`` (a path, usually
    ``"hook"``), also the naive rerun's shape on it: one unit over the block's pairs,
    and 4 pairs per call.
    """
    counts = sorted({c for c in (1, 4, 16, 64, 256, 1024) if c <= max_rows}
                    | {max(1, min(n_pairs, max_rows)), max(1, max_rows)})
    out: list[BatchShape] = []

    def add(s: BatchShape) -> None:
        if s not in out and s.units <= n_units:
            out.append(s)

    for c in counts:
        p = min(n_pairs, c)
        add(BatchShape(max(1, min(n_units, c // p)), p, path))
    if naive is not None:
        add(BatchShape(1, n_pairs, naive))
        if n_pairs > 4:
            add(BatchShape(1, 4, naive))
    for c in counts:
        u = min(n_units, c)
        add(BatchShape(u, max(1, min(n_pairs, c // u)), path))
    return out


def unit_candidates(shape: BatchShape, n_units: int) -> list[BatchShape]:
    """``shape`` and the same call with 1/2, 1/4, ... of its units (pairs unchanged).

    The units per call change no number (each unit's hybrids and its sums over the
    call's pairs are computed alike in any call), so timing them is free of float
    rounding; which is fastest depends on the CPU's caches: 1 unit x 32 pairs was 18%
    faster than the memory budget's 4 x 32 for DCGAN's ``main.8`` on one machine and 4%
    slower on another.
    """
    out, u = [], min(shape.units, n_units)
    while u >= 1:
        out.append(BatchShape(u, shape.pairs, shape.path))
        if u == 1:
            break
        u = max(1, u // 2)
    return out


_CALLS = 3
"""Calls per timed candidate: one that may pay for allocations, two timed."""


def time_shapes(candidates: list[BatchShape], n_units: int, n_pairs: int,
                run: Callable[[BatchShape, slice, slice], None], device: torch.device,
                budget: float = 0.5) -> tuple[BatchChoice | None, int]:
    """Time ``candidates`` on real work; returns (the choice, units done for all pairs).

    Each candidate computes its hybrids (``run(shape, units, pairs)``, which must keep
    them) for whole units, i.e. every pair of the block, starting after the units done
    so far, for at least three calls; its time per hybrid is the fastest of its full-size
    calls after the first (which may pay for allocations; on a shared machine the
    fastest is the least disturbed).
    At most ``budget`` of the units are spent; candidates that do not fit are skipped.
    Returns ``(None, 0)``, having run nothing, when fewer than two candidates fit (the
    caller uses its default).
    """
    limit = max(1, int(n_units * budget))
    plan, used = [], 0  # the candidates that fit, and their groups of units
    for shape in candidates:
        per_group = -(-n_pairs // shape.pairs)  # calls per group of units
        groups = -(-_CALLS // per_group)
        if used + groups * shape.units <= limit:
            plan.append((shape, groups))
            used += groups * shape.units
    if len(plan) < 2:  # nothing to compare: no call is spent on timing
        return None, 0
    done = 0
    timed: list[tuple[BatchShape, float]] = []
    for shape, groups in plan:
        times: list[float] = []
        for _ in range(groups):
            us = slice(done, done + shape.units)
            for p0 in range(0, n_pairs, shape.pairs):
                ps = slice(p0, min(p0 + shape.pairs, n_pairs))
                _sync(device)
                t = time.perf_counter()
                run(shape, us, ps)
                _sync(device)
                if ps.stop - ps.start == shape.pairs:
                    times.append((time.perf_counter() - t) / shape.rows)
            done = us.stop
        timed.append((shape, min(times[1:]) if len(times) > 1 else times[0]))
    best = min(timed, key=lambda st: st[1])[0]
    return BatchChoice(best, "the fastest per hybrid of the shapes timed on the first block "
                       "(batching can hurt this generator)", tuple(timed)), done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
