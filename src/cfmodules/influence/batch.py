"""How many hybrids one call computes: the memory budget's shape, timed where it matters.

:func:`choose_batch` runs on an influence run's first block of pairs. Where batching can
slow the generator down (:func:`~cfmodules.engine.batch_dependent_ops`), whole shapes and
the naive rerun are timed; elsewhere only the units per call, which change no number,
between the memory budget's and one unit (:func:`~cfmodules.engine.unit_candidates`).
The timed calls compute real hybrids, whose sums are kept; an out-of-memory error while
timing (either kind) halves the batch as anywhere else (:mod:`cfmodules.influence.memory`)
and the rest of the run takes the memory budget's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.engine import (
    BatchChoice,
    BatchShape,
    HookSwaps,
    candidate_shapes,
    default_shape,
    engine_of,
    time_shapes,
    unit_candidates,
)
from cfmodules.influence import memory

__all__ = ["choose_batch"]

_FUSED_UNITS_PER_THREAD = 8
"""Units per call and thread on the fused path: calls of ~20 ms at 32 pairs (DCGAN main.8)."""


def choose_batch(adapter: GeneratorAdapter, runner: Any, z1: L.Latent, z2: L.Latent,
                  first_pair: int, max_rows: int, algorithm: str,
                  add: Callable[[slice, slice, tuple[torch.Tensor, torch.Tensor]], None]) -> int:
    """Begin the first block and choose ``runner``'s batch shape; returns the units done.

    Where the generator has operations that batching can slow down
    (:func:`~cfmodules.engine.batch_dependent_ops`), candidate shapes (and, with
    ``algorithm="auto"``, the naive rerun) are timed on real hybrids of the first units,
    whose sums go into the block through ``add``; else the memory budget sets the shape
    and only its units per call are timed (when two candidates fit in half the units).
    """
    n_p, n_u = L.batch_size(z1), len(runner.units)
    path = runner.swaps.path
    engine = engine_of(adapter)
    why = engine.batch_dependent_ops()
    if why is None:  # only the units per call are timed: they change no number
        memory.begin_block(runner, z1, z2, first_pair)
        if runner.swaps.fused:  # a fused kernel: no hybrid is materialised, nothing to time
            units = min(n_u, _FUSED_UNITS_PER_THREAD * torch.get_num_threads())
            runner.choice = BatchChoice(
                BatchShape(units, n_p, path),
                "the fused DCGAN-tail kernel (cfmodules.engine.tail): each hybrid is made "
                "and summed in cache, one unit per thread at a time; no number depends on it",
                chosen_by="fused kernel")
            engine.record_batch(runner.key, runner.choice)
            return 0
        budget = memory.capped(default_shape(n_p, max_rows, path), runner.rows_cap)
        # timed calls take all the block's pairs, so the units before a failed one are done
        shapes = unit_candidates(budget, n_u) if budget.pairs == n_p else []
        finished = [0]

        def timed(shape: BatchShape, us: slice, ps: slice) -> None:
            add(us, ps, _timed_sums(adapter, runner, shape, us, ps))
            finished[0] = us.stop

        try:
            choice, done = (time_shapes(shapes, n_u, n_p, timed, adapter.device)
                            if len(shapes) > 1 else (None, 0))
        except _TimingOutOfMemory:  # the rest runs halved, as after any out-of-memory error
            choice, done = None, finished[0]
        if choice is None:
            choice = BatchChoice(budget, "set by the memory budget (no operation of the "
                                 "forward grows with the batch)")
        else:
            choice = BatchChoice(choice.shape, "the fastest per hybrid of the units per call "
                                 f"timed on the first block (the memory budget allows "
                                 f"{budget.units}; no number depends on it)", choice.timed)
        runner.choice = choice
        engine.record_batch(runner.key, choice)
        return done
    naive = None
    if algorithm == "auto" and path != "hook":
        runner.options["hook"] = HookSwaps(adapter, runner.swaps.groups)
        naive = "hook"
    memory.begin_block(runner, z1, z2, first_pair, paths=list(runner.options))
    # a group of units is timed over several calls when a shape takes fewer pairs: its
    # sums are added once it has every pair, so an out-of-memory error in the middle of
    # a group loses nothing finished and counts nothing twice
    group: list[tuple[slice, slice, Any]] = []
    finished = [0]

    def run(shape: BatchShape, us: slice, ps: slice) -> None:
        group.append((us, ps, _timed_sums(adapter, runner, shape, us, ps)))
        if ps.stop == n_p:
            for item in group:
                add(*item)
            group.clear()
            finished[0] = us.stop

    try:
        choice, done = time_shapes(candidate_shapes(n_u, n_p, max_rows, path, naive), n_u,
                                   n_p, run, adapter.device)
        too_few = f"{n_u} unit(s) x {n_p} pair(s) are too few to time shapes"
    except _TimingOutOfMemory:  # the rest runs halved, on this runner's own path
        choice, done, too_few = None, finished[0], "timing shapes ran out of memory"
    if choice is None:
        choice = BatchChoice(default_shape(n_p, max_rows, path),
                             f"set by the memory budget: {why}, but {too_few}")
    else:
        choice = BatchChoice(choice.shape, f"{choice.reason}: {why}", choice.timed)
    runner.choice = choice
    runner.swaps = runner.options[choice.shape.path]
    runner.y = runner.ys[runner.swaps.path]
    engine.record_batch(runner.key, choice)
    return done


def _timed_sums(adapter: GeneratorAdapter, runner: Any, shape: BatchShape, us: slice,
                ps: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """``runner.sums`` of one timed call; after an out-of-memory error the batch is halved
    (as anywhere else) and :class:`_TimingOutOfMemory` stops the timing."""
    try:
        return runner.sums(us, ps, shape.path)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
        if not memory.is_out_of_memory(e):
            raise
        memory.halve_rows(runner, adapter.device, e,
                          (us.stop - us.start) * (ps.stop - ps.start), runner.units[us][0].name)
        raise _TimingOutOfMemory() from e


class _TimingOutOfMemory(Exception):
    """An out-of-memory error while timing (the timing stops there)."""
