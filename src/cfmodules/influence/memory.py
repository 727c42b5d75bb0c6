"""How much memory an influence run adds, planned from the shapes the engine knows.

``influence_maps(..., max_memory="2GB")`` bounds the peak memory the run adds (on CPU
the growth of the process's resident memory, on CUDA ``max_memory_allocated``) beyond
the generator's weights. The plan is made before the first block from per-sample shapes
(:meth:`GeneratorAdapter.layers_cached`: every layer's output for one sample, and one
sample's images), with three parts:

``fixed``
    The float64 statistics of the maps (running mean and M2, the copy published after
    each block, a block's sums and sums of squares, the merge's temporaries) and the
    float32 result: ``80 bytes x units x pixels`` (8 bytes x 10 arrays).
``per_pair``
    What one pair of a block keeps while its hybrids run (its activations at the layer
    for both originals, their difference, the value at the cut, Original 1's images) and
    the prefix forward of its two samples (three times the generator's largest layer
    output each: the input, the output and the operator's scratch space).
``per_row``
    One hybrid in a batch: three times its value at the cut (the hybrid, the linear
    shortcut's contribution, its im2col columns), four times the largest layer the
    suffix runs (a layer's input, its output and the scratch space of a GEMM transposed
    convolution, whose columns are up to four times its output) and three times the
    images (the output, the difference, the maps' partial sums). On the hook path a
    hybrid is a full forward.

The budget then sets how many pairs run their prefix together (at most half of what is
left after ``fixed``, at most ``pairs_per_block``) and how many hybrids a call runs. The
estimate errs on the safe side (``benchmarks/bench_memory.py`` measures the real peak).
When even one pair and one hybrid do not fit, :class:`MemoryBudgetError` says how much
they need. The maps do not depend on the budget beyond float rounding.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cfmodules.engine import BatchShape
from cfmodules.errors import ConfigError, MemoryBudgetError

__all__ = ["MemoryPlan", "parse_memory", "plan_memory", "default_memory", "format_bytes",
           "run_chunks", "run_parts", "begin_block", "capped", "is_out_of_memory",
           "halve_rows"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)

_STATS_ARRAYS = 10
"""float64 arrays of units x pixels alive at the worst moment of a run (see ``fixed``)."""


def parse_memory(value: object, name: str = "max_memory") -> int | None:
    """Bytes from ``value``: an int, or a size such as ``"2GB"``, ``"512MB"``, ``"1.5GiB"``.

    KB, MB, GB, TB are powers of 1000 and KiB, MiB, GiB, TiB powers of 1024 (as in
    Hugging Face's ``max_memory``); None stays None.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of bytes or a size like '2GB', got {value!r}.")
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, float)):
        n = int(value)  # numpy integers too
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if m is None:
            raise ConfigError(f"{name} must be a number of bytes or a size like '2GB', "
                              f"'512MB' or '1.5GiB', got {value!r}.")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    return n


def format_bytes(n: float) -> str:
    """``"1.2 GB"``, ``"340 MB"``, ``"12 kB"`` (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def default_memory(device: torch.device) -> int:
    """The budget when none is given: half of the memory the device has available now.

    CUDA: half of ``torch.cuda.mem_get_info``'s free memory. CPU: half of Linux's
    ``MemAvailable`` (free memory plus the page cache it can drop), else half of the
    physical memory, else no bound.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(1, int(line.split()[1]) * 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return max(1, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound beyond the batch's
        return 2**62


@dataclass(frozen=True)
class MemoryPlan:
    """How an influence run fits its memory budget (bytes).

    Attributes
    ----------
    budget : int
    fixed, per_pair, per_row : int
        Estimated bytes of the statistics, of one pair of a block, of one hybrid.
    pairs : int
        Pairs whose prefix runs together (at most ``pairs_per_block``).
    rows : int
        Hybrids per call of the suffix (before any halving after an out-of-memory error).
    """

    budget: int
    fixed: int
    per_pair: int
    per_row: int
    pairs: int
    rows: int

    @property
    def estimate(self) -> int:
        """The planned peak: ``fixed + pairs * per_pair + rows * per_row``."""
        return self.fixed + self.pairs * self.per_pair + self.rows * self.per_row

    def to_dict(self) -> dict:
        """JSON-ready, for the result's settings."""
        return {"budget_bytes": self.budget, "estimate_bytes": self.estimate,
                "fixed_bytes": self.fixed, "per_pair_bytes": self.per_pair,
                "per_row_bytes": self.per_row, "pairs_per_prefix": self.pairs,
                "rows_per_call": self.rows}



def _sizes(adapter) -> dict[str, int]:
    """Elements per sample of every layer's output (the largest of its calls)."""
    out: dict[str, int] = {}
    for info in adapter.layers_cached():
        shapes = [s for s in (info.call_shapes or (info.shape,)) if s is not None]
        if shapes:
            out[info.name] = max(math.prod(s) for s in shapes)
    return out


def plan_memory(adapter, swaps: list, n_units: int, image_shape: tuple[int, ...],
                pairs_per_block: int, itemsize: int, budget: int, max_rows: int,
                strict: bool = True) -> MemoryPlan:
    """The :class:`MemoryPlan` of a run of ``n_units`` units by ``swaps`` (the engine's).

    Parameters
    ----------
    adapter : GeneratorAdapter
    swaps : list of Swaps
        How the hybrids are computed (``cut``, ``suffix_layers``, ``groups``, ``path``).
    n_units : int
    image_shape : tuple
        One sample's images, ``(C, H, W)``.
    pairs_per_block, itemsize, budget : int
    max_rows : int
        The most hybrids per call wanted for speed (the budget may allow fewer).
    strict : bool
        Whether ``budget`` was given by the user. If not (the default budget) and nothing
        fits, the smallest plan (one pair, one hybrid) is returned instead of an error:
        out-of-memory errors, if any, are then handled as they come.

    Raises
    ------
    MemoryBudgetError
        When the statistics, one pair and one hybrid do not fit ``budget``.
    """
    sizes = _sizes(adapter)
    largest = max(sizes.values(), default=1)
    image = math.prod(image_shape)
    pixels = math.prod(image_shape[1:])
    fixed = 8 * _STATS_ARRAYS * n_units * pixels
    per_pair = per_row = 0
    for s in swaps:
        layers = {layer for g in s.groups for layer in g}
        act = sum(sizes.get(la.split(":")[0], largest) for la in layers)
        cut = sizes.get(s.cut.split(":")[0], act) if s.cut is not None else act
        suffix = s.suffix_layers
        after = max((sizes.get(la.split(":")[0], 0) for la in suffix), default=0) \
            if suffix is not None else largest
        per_pair = max(per_pair, itemsize * (6 * largest + 4 * act + 2 * cut + 2 * image))
        if s.path == "hook":
            per_row = max(per_row, itemsize * (4 * largest + act + 3 * image))
        else:
            per_row = max(per_row, itemsize * (3 * cut + 4 * after + 3 * image))
    per_pair, per_row = max(per_pair, 1), max(per_row, 1)
    left = budget - fixed
    if left < per_pair + per_row and not strict:
        return MemoryPlan(budget, fixed, per_pair, per_row, 1, 1)
    if left < per_pair + per_row:
        raise MemoryBudgetError(
            f"max_memory={format_bytes(budget)} is too small for this influence run: the maps' "
            f"statistics of {n_units} unit(s) x {pixels} pixels take {format_bytes(fixed)} and "
            f"one pair with one hybrid {format_bytes(per_pair + per_row)} more, so at least "
            f"{format_bytes(fixed + per_pair + per_row)} is needed. Give a larger max_memory, "
            "or fewer channels per call (channels=...).")
    pairs = max(1, min(pairs_per_block, (left // 2) // per_pair))
    rows = max(1, min(max_rows, (left - pairs * per_pair) // per_row))
    return MemoryPlan(budget, fixed, per_pair, per_row, pairs, rows)


# ---------------------------------------------------------------------- out of memory
def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error or a CPU allocation failure (not our own budget error)."""
    if isinstance(e, MemoryBudgetError):
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return (isinstance(e, (oom, MemoryError))
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def capped(shape: BatchShape, rows: int | None) -> BatchShape:
    """``shape`` with at most ``rows`` hybrids (pairs first, as the default shape)."""
    if rows is None or shape.rows <= rows:
        return shape
    pairs = min(shape.pairs, rows)
    return BatchShape(max(1, rows // pairs), pairs, shape.path)


def _split(chunk: tuple[slice, slice], shape: BatchShape) -> list[tuple[slice, slice]]:
    """``chunk`` (units, pairs) cut into calls of ``shape``."""
    us, ps = chunk
    return [(slice(u0, min(u0 + shape.units, us.stop)), slice(p0, min(p0 + shape.pairs, ps.stop)))
            for u0 in range(us.start, us.stop, shape.units)
            for p0 in range(ps.start, ps.stop, shape.pairs)]


def run_chunks(runner: Any, chunks: list[tuple[slice, slice]], shape: BatchShape,
               add: Callable[[slice, slice, tuple[torch.Tensor, torch.Tensor]], None],
               device: torch.device) -> None:
    """``add(units, pairs, runner.sums(units, pairs))`` for every chunk, halving after OOM.

    On an out-of-memory error (CUDA, or a CPU allocation failure) the failed chunk and
    every later one are cut into calls of half as many hybrids, once warned per run
    (``runner.rows_cap`` keeps the smaller size for the next blocks). Nothing finished is
    recomputed and nothing is lost: a chunk's sums are added only once it has succeeded.
    Raises :class:`MemoryBudgetError` when even one hybrid does not fit.
    """
    pending = deque(chunks)
    while pending:
        us, ps = pending.popleft()
        try:
            sums = runner.sums(us, ps)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(e):
                raise
            rows = (us.stop - us.start) * (ps.stop - ps.start)
            runner.rows_cap = _halve(runner, device, e, rows, "hybrid",
                                     f"one hybrid of unit '{runner.units[us][0].name}'")
            small = capped(shape, runner.rows_cap)
            if small.rows >= rows:  # the failed call was already smaller than the shape
                small = capped(BatchShape(us.stop - us.start, ps.stop - ps.start, shape.path),
                                rows // 2)
            shape = small
            rest = [(us, ps), *pending]
            pending = deque(c for chunk in rest for c in _split(chunk, shape))
            continue
        add(us, ps, sums)


def halve_rows(runner: Any, device: torch.device, error: BaseException, rows: int,
               unit: str) -> None:
    """After an out-of-memory error in a call of ``rows`` hybrids outside
    :func:`run_chunks` (e.g. while timing shapes): ``runner.rows_cap`` = ``rows // 2``,
    warned once per run; raises :class:`MemoryBudgetError` when ``rows`` is 1."""
    runner.rows_cap = _halve(runner, device, error, rows, "hybrid", f"one hybrid of unit '{unit}'")


def _halve(runner: Any, device: torch.device, error: BaseException, n: int, what: str,
           one: str) -> int:
    """After an out-of-memory error with ``n`` of ``what`` per call: ``n // 2``, warned once.

    Frees CUDA's cached blocks; with ``n == 1`` raises :class:`MemoryBudgetError` (``one``
    names the work that did not fit).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    text = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else \
        type(error).__name__
    if n <= 1:
        raise MemoryBudgetError(
            f"Out of memory computing {one} on {device} ({text}); even one {what} does not "
            "fit. Free memory on the device, or use a smaller model or output "
            "resolution.") from error
    if not runner.warned_oom:
        runner.warned_oom = True
        warnings.warn(
            f"Out of memory with {n} {what}s per call ({text}); going on with {n // 2} and "
            "halving again if needed. Nothing computed is lost and the maps are the same; "
            "pass max_memory= to plan for less memory.", RuntimeWarning, stacklevel=5)
    return n // 2


class _PrefixOutOfMemory(Exception):
    """An out-of-memory error in a part's prefix, before any of its sums was added."""


def begin_block(runner: Any, z1: Any, z2: Any, first_pair: int, **kw: Any) -> None:
    """``runner.begin_block``, its out-of-memory errors marked for :func:`run_parts`."""
    try:
        runner.begin_block(z1, z2, first_pair, **kw)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are converted
        if not is_out_of_memory(e):
            raise
        raise _PrefixOutOfMemory() from e


def run_parts(runner: Any, n_done: int, n_p: int, part: Callable[[int, int], None],
              device: torch.device) -> None:
    """``part(first, n)`` over pairs ``n_done .. n_done + n_p``, ``runner.prefix_pairs`` at a time.

    An out-of-memory error in a part's prefix (raised through :func:`begin_block`, so
    before any of the part's sums was added) halves the part and the later ones, warned
    once per run like the batches; one pair failing raises MemoryBudgetError.
    """
    step = runner.prefix_pairs
    parts = deque((f, min(step, n_done + n_p - f)) for f in range(n_done, n_done + n_p, step))
    while parts:
        first, n = parts.popleft()
        try:
            part(first, n)
            continue
        except _PrefixOutOfMemory as e:
            cause = e.__cause__
        runner.prefix_pairs = half = _halve(runner, device, cause, n, "pair",
                                            "the generator's prefix for one pair")
        rest = [(first, n), *parts]
        parts = deque((f, min(half, f0 + n0 - f)) for f0, n0 in rest
                      for f in range(f0, f0 + n0, half))
