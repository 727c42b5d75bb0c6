"""Influence maps (Besserve et al. 2020, eq. 2): batched hybrids and streaming statistics.

For a module ``E`` (a set of channels of one or several layers), the influence map is

    IM(E) = E_{z1, z2} | Y_{E <- z2}(z1) - Y(z1) |,

averaged over colour channels, at output resolution; with ``E = {c}`` it is the
elementary influence map (EIM) of channel ``c``. Pair ``p`` is sample ``2p`` (Original 1)
and ``2p + 1`` (Original 2) of the latent stream ``seed``, so the maps do not depend on
how pairs are batched.

The computation runs in blocks of pairs. For each block the generator's prefix runs once
on Original 1 and Original 2; then units and pairs are put together on the batch axis
(row ``u * P + p`` is unit ``u`` with pair ``p``) and only the suffix runs, in chunks that
fit ``max_memory`` (planned from the layers' shapes, :mod:`cfmodules.influence.memory`;
after an out-of-memory error the batch is halved and the run goes on). When the layer
feeds only a linear module (Conv, ConvTranspose, Linear, maybe followed by an eval-mode
BatchNorm), the hybrid is started after that
module from the original pre-activation plus the single channel's contribution (see
:mod:`cfmodules.engine.linear`). Running means and variances are merged per block in
float64, so only ``O(units x pixels)`` memory is kept, and a checkpoint after any block
resumes to the same final numbers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cfmodules import checks
from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.channels import ChannelSpec, channel_index
from cfmodules.engine import (
    BatchChoice,
    BatchShape,
    Swaps,
    default_shape,
    plan_swaps,
)
from cfmodules.errors import CheckpointError, ConfigError, GeneratorOutputError, did_you_mean
from cfmodules.hooks import resolve_layer
from cfmodules.hybrid import module_channels
from cfmodules.influence import memory
from cfmodules.influence.batch import choose_batch
from cfmodules.influence.checkpoint import load_checkpoint, save_checkpoint
from cfmodules.influence.identity import adapter_fingerprints, model_fingerprint
from cfmodules.influence.interrupt import save_on_signals
from cfmodules.influence.result import InfluenceResult
from cfmodules.influence.stats import BlockSums, RunningStats
from cfmodules.names import unit_name
from cfmodules.samplers import is_diffusion, plan_window_swaps, windowed

__all__ = ["InfluenceSettings", "InfluenceProgress", "influence_maps", "module_influence_maps",
           "ALGORITHMS"]

_FRESH_TENSOR_BYTES = 16 * 2**20
_HYBRID_BATCH_BYTES = 32 * 2**20
"""On CPU, the batch of hybrid activations at the cut (reused buffers that every pass of
the suffix reads) is kept this small so that it stays in the last-level cache: on the
2-core benchmark machine (48 MiB L3) main.8 is ~10% faster at 32 MiB than at 64 MiB."""
ALGORITHMS = ("auto", "split", "hook")
"""How the hybrids are computed; all give the same maps up to float rounding (like
scikit-learn's ``NearestNeighbors(algorithm=...)``)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class InfluenceSettings:
    """What an influence run computes (everything that may change its numbers).

    Attributes
    ----------
    n_pairs : int
        Number of latent pairs (the most, with ``target_stderr``).
    seed : int
        Latent stream: pair ``p`` is samples ``2p`` and ``2p+1`` of stream ``seed``.
    pairs_per_block : int
        Pairs whose prefix runs together; statistics, the stopping rule and checkpoints
        advance one block at a time.
    target_stderr : float or None
        Stop after the first block at which the largest per-pixel standard error over all
        maps is at most this (same units as the images; at least 2 pairs are used).
    algorithm : str
        ``"auto"`` (linear shortcut where exact, else prefix/suffix split), ``"split"``
        (never the shortcut) or ``"hook"`` (one full forward per unit with a replacing
        hook: the naive reference). All give the same maps up to float rounding.
    dtype : str
        ``"float32"``, or ``"bfloat16"`` / ``"float16"`` (autocast, CUDA only).
    """

    n_pairs: int = 64
    seed: int = 0
    pairs_per_block: int = 32
    target_stderr: float | None = None
    algorithm: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # numpy integers are accepted and stored as int (as in AnalysisSettings)
        object.__setattr__(self, "n_pairs", checks.positive_int(self.n_pairs, "n_pairs"))
        object.__setattr__(self, "seed", checks.seed(self.seed))
        object.__setattr__(self, "pairs_per_block",
                           checks.positive_int(self.pairs_per_block, "pairs_per_block"))
        if self.target_stderr is not None:
            object.__setattr__(self, "target_stderr",
                               checks.positive_number(self.target_stderr, "target_stderr"))
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"dtype must be one of {tuple(_DTYPES)} (or the torch dtype), got {self.dtype!r}."
            )


@dataclass(frozen=True)
class InfluenceProgress:
    """Passed to ``callback`` after each block of pairs.

    Attributes
    ----------
    n_pairs_done : int
    n_pairs : int
    max_stderr : float
        Largest per-pixel standard error over all maps so far (NaN below 2 pairs).
    elapsed_s : float
        Seconds since this call started (a resumed run counts from its restart).
    """

    n_pairs_done: int
    n_pairs: int
    max_stderr: float
    elapsed_s: float


@dataclass(frozen=True)
class _Unit:
    name: str
    channels: dict[str, torch.Tensor]  # layer -> LongTensor of channel indices


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        for k, v in _DTYPES.items():
            if v == dtype:
                return k
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
    return str(dtype)


# ---------------------------------------------------------------------- runners
class _Runner:
    """|hybrid - Original 1| (averaged over colour) for a set of units, from the engine.

    ``swaps`` computes the hybrids; ``options`` holds the other ways that may be timed
    against it on the first block (the naive rerun), each with its own Original 1.
    ``choice`` is the batch shape in use (None before the first block).
    """

    def __init__(self, swaps: Swaps, units: list[_Unit]):
        self.swaps, self.units = swaps, units
        self.options: dict[str, Swaps] = {swaps.path: swaps}
        self.ys: dict[str, torch.Tensor] = {}
        self.choice: BatchChoice | None = None
        self.rows_cap: int | None = None  # hybrids per call after an out-of-memory error
        self.prefix_pairs = 1  # pairs whose prefix runs together (set by the memory plan)
        self.warned_oom = False

    @property
    def key(self) -> str:
        """The layer of its units (or ``"modules"`` for multi-layer modules)."""
        first = self.units[0].channels
        return next(iter(first)) if len(first) == 1 else "modules"

    def begin_block(self, z1: L.Latent, z2: L.Latent, first_pair: int,
                    paths: Sequence[str] | None = None) -> None:
        for path in paths or (self.swaps.path,):
            y = self.options[path].begin_block(z1, z2)
            self._check_y(y, first_pair)
            self.ys[path] = y
        self.y = self.ys[self.swaps.path]

    def diffs(self, units: slice, pairs: slice, path: str | None = None) -> torch.Tensor:
        """``(u, p, H, W)`` for units ``units`` (of this runner) and pairs ``pairs`` of the block."""
        swaps = self.options[path or self.swaps.path]
        out = swaps.hybrids(units, pairs)
        return _abs_diff(out, self.ys[swaps.path][pairs], len(range(len(self.units))[units]))

    def sums(self, units: slice, pairs: slice, path: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum and sum of squares over ``pairs`` of the maps of ``units``, float64 ``(u, H, W)``:
        from the swaps' fused kernel when it has one for this block, else from :meth:`diffs`."""
        fused = self.options[path or self.swaps.path].sums(units, pairs)
        return fused if fused is not None else _sums(self.diffs(units, pairs, path))

    def _check_y(self, y: torch.Tensor, first_pair: int) -> None:
        if y.dim() != 4:
            raise GeneratorOutputError(
                f"Influence maps need image outputs (N, C, H, W); the generator returned "
                f"shape {tuple(y.shape)}. Use output_transform to return images."
            )
        bad = ~torch.isfinite(y).flatten(1).all(1)
        if bad.any():
            p = first_pair + int(bad.nonzero()[0])
            raise GeneratorOutputError(
                f"The generator output contains NaN or inf for Original 1 of pair {p} "
                f"(latent sample {2 * p}); influence maps would be meaningless."
            )


def _abs_diff(out: torch.Tensor, y: torch.Tensor, n_units: int) -> torch.Tensor:
    """``|out - y|`` averaged over colour channels, as ``(u, p, H, W)``.

    ``out`` is the caller's own (hybrids just made): it is overwritten when contiguous.
    """
    out = out.view(n_units, y.shape[0], *out.shape[1:])
    y = y.unsqueeze(0)
    diff = out.sub_(y) if out.is_contiguous() else out - y
    return diff.abs_().mean(dim=2)


# ---------------------------------------------------------------------- units
def _checked(adapter: object) -> GeneratorAdapter:
    if not isinstance(adapter, GeneratorAdapter):
        raise ConfigError(
            f"The first argument must be a GeneratorAdapter, got {type(adapter).__name__}; "
            "wrap your generator with cfmodules.GeneratorAdapter(generator, latent_shape)."
        )
    return adapter


def _layer_units(adapter: GeneratorAdapter, layer: str, channels: ChannelSpec | None
                 ) -> tuple[str, list[_Unit]]:
    ref = resolve_layer(adapter.generator, layer)
    n = adapter.layer_channels(ref.name)
    idx = torch.arange(n) if channels is None else channel_index(channels, n, ref.name,
                                                                 allow_empty=False)
    return ref.name, [_Unit(unit_name(ref.name, c), {ref.name: idx[i:i + 1]})
                      for i, c in enumerate(idx)]


def _module_units(adapter: GeneratorAdapter, modules: Any) -> list[_Unit]:
    named = checks.modules(modules, allow_empty=False, allow_single=True)
    return [_Unit(name, module_channels(adapter, m, f"module '{name}'", allow_empty=False))
            for name, m in named.items()]


def _runners(adapter: GeneratorAdapter, units: list[_Unit], algorithm: str
             ) -> list[tuple[_Runner, list[int]]]:
    """Group units by how the engine computes them; returns (runner, row indices)."""
    groups = [u.channels for u in units]
    planned = (plan_window_swaps(adapter, groups, algorithm) if is_diffusion(adapter)  # type: ignore[arg-type]
               else plan_swaps(adapter, groups, algorithm))
    return [(_Runner(swaps, [units[i] for i in rows]), rows) for swaps, rows in planned]



def _speed_rows(adapter: GeneratorAdapter, runners: list[tuple[_Runner, list[int]]],
                itemsize: int, most: int) -> int:
    """Hybrids per call wanted for speed (the memory plan may allow fewer); at most ``most``.

    On CPU at most :data:`_FRESH_TENSOR_BYTES` for any new tensor the suffix's modules
    allocate (larger ones come fresh from the operating system each time, and page faults
    then dominate), and at most :data:`_HYBRID_BATCH_BYTES` for the hybrid activations at
    the cut. Elsewhere (CUDA) as many as memory allows.
    """
    shapes = {i.name: i.shape for i in adapter.layers_cached()}
    rows = max(1, most)
    if adapter.device.type == "cpu":
        for runner, _ in runners:
            layers = runner.swaps.suffix_layers
            for layer in list(shapes) if layers is None else layers:
                per_row = math.prod(shapes.get(layer) or ()) * itemsize
                rows = min(rows, max(1, _FRESH_TENSOR_BYTES // max(per_row, 1)))
            cut = runner.swaps.cut
            if cut is not None:
                per_row = math.prod(shapes.get(cut.split(":")[0]) or ()) * itemsize
                rows = min(rows, max(1, _HYBRID_BATCH_BYTES // max(per_row, 1)))
    return rows


# ---------------------------------------------------------------------- main loop
def _run(adapter: GeneratorAdapter, units: list[_Unit], layer: str | None, *,
         settings: InfluenceSettings, max_memory: int | str | None, progress: bool,
         checkpoint: str | os.PathLike | None, checkpoint_every: float,
         callback: Callable[[InfluenceProgress], Any] | None,
         assume_same: bool, step_window: Any = None) -> InfluenceResult:
    adapter = windowed(adapter, step_window)
    sampler = adapter.identity() if is_diffusion(adapter) else None  # type: ignore[attr-defined]
    dtype = _DTYPES[settings.dtype]
    if dtype != torch.float32 and adapter.device.type != "cuda":
        raise ConfigError(
            f"dtype={settings.dtype} is for CUDA devices (autocast); on "
            f"{adapter.device.type} use the default float32."
        )
    budget = memory.parse_memory(max_memory)
    checks.real(checkpoint_every, "checkpoint_every", low=0, meaning="seconds")
    runners = _runners(adapter, units, settings.algorithm)
    itemsize = torch.finfo(dtype).bits // 8
    plan = memory.plan_memory(
        adapter, [r.swaps for r, _ in runners], len(units),
        adapter.image_shape(), settings.pairs_per_block, itemsize,
        memory.default_memory(adapter.device) if budget is None else budget,
        _speed_rows(adapter, runners, itemsize, len(units) * settings.pairs_per_block),
        strict=budget is not None)
    max_rows = plan.rows
    for runner, _ in runners:
        runner.prefix_pairs = plan.pairs
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype != torch.float32
                else nullcontext())
    n_units = len(units)
    identity = {} if checkpoint is None else json.loads(json.dumps({
        "model": adapter.name,
        "state_dict_sha256": model_fingerprint(adapter.generator),
        "latent_shapes": [list(s) for s in adapter.latent_shapes],
        "units": [{k: v.tolist() for k, v in u.channels.items()} for u in units],
        "seed": settings.seed,
        "pairs_per_block": settings.pairs_per_block,
        "dtype": settings.dtype,
        "algorithm": settings.algorithm,
        **adapter_fingerprints(adapter),  # generator, forward, output_transform, prior, ...
        **({"sampler": sampler} if sampler is not None else {}),  # scheduler, steps, window
    }))

    # (pairs done, their statistics) are published together in one assignment, so an
    # interrupt between any two bytecodes sees either the old pair or the new one
    done: tuple[int, RunningStats | None] = (0, None)
    if checkpoint is not None:
        found = load_checkpoint(checkpoint, identity, n_units=n_units, assume_same=assume_same)
        if found is not None:
            n_found, count, mean, m2 = found
            if n_found > settings.n_pairs:
                raise CheckpointError(
                    f"The checkpoint '{checkpoint}' already holds {n_found} pairs, more than "
                    f"n_pairs={settings.n_pairs}; pass n_pairs >= {n_found}."
                )
            resumed = RunningStats(n_units, tuple(mean.shape[1:]), adapter.device)
            resumed.count.copy_(torch.from_numpy(count))
            resumed.mean.copy_(torch.from_numpy(mean))
            resumed.m2.copy_(torch.from_numpy(m2))
            done = (n_found, resumed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.n_pairs * n_units, initial=done[0] * n_units, unit="hybrid",
                   desc=f"influence {layer or f'{n_units} modules'}", leave=False)
    t0 = last_save = time.perf_counter()
    saved_at = done[0]

    def max_stderr(n_done: int, stats: RunningStats | None) -> float:
        if stats is None or n_done < 2:
            return float("nan")
        return float(torch.nan_to_num(stats.stderr(), nan=0.0).max()) if n_units else 0.0

    def save(n_done: int, stats: RunningStats) -> None:
        save_checkpoint(checkpoint, identity, n_done, stats.count, stats.mean, stats.m2)

    # the signals' handlers stay for the saves on the way out: a second signal cannot
    # cut them short, nor kill the process by its default action while they write
    with save_on_signals():
        try:
            with torch.inference_mode(), autocast:
                while done[0] < settings.n_pairs:
                    n_done, stats = done
                    if (settings.target_stderr is not None and n_done >= 2
                            and max_stderr(n_done, stats) <= settings.target_stderr):
                        break
                    n_p = min(settings.pairs_per_block, settings.n_pairs - n_done)
                    block = BlockSums(n_units)
                    # the memory plan (or an out-of-memory error) may run a block's
                    # prefix in parts of fewer pairs
                    for runner, rows in runners:
                        def part(first: int, n_s: int, runner: _Runner = runner,
                                 rows: list[int] = rows, block: BlockSums = block) -> None:
                            z1, z2 = L.pair_latents(adapter, n_s, settings.seed, first)
                            _run_part(adapter, runner, rows, block, z1, z2, first, max_rows,
                                      settings.algorithm, bar)
                        memory.run_parts(runner, n_done, n_p, part, adapter.device)
                    if stats is None:
                        merged = RunningStats(n_units, block.shape, adapter.device)
                    elif tuple(stats.mean.shape[1:]) != block.shape:
                        raise CheckpointError(
                            f"The checkpoint '{checkpoint}' holds maps of shape "
                            f"{tuple(stats.mean.shape[1:])}, but this generator's images give "
                            f"{block.shape}; delete the file or pass another checkpoint path.")
                    else:
                        merged = stats.copy()  # the published statistics are never modified
                    block.merge_into(merged, n_p)
                    done = (n_done + n_p, merged)
                    if callback is not None:
                        callback(InfluenceProgress(done[0], settings.n_pairs, max_stderr(*done),
                                                   time.perf_counter() - t0))
                    if checkpoint is not None and (
                            time.perf_counter() - last_save >= checkpoint_every):
                        save(*done)
                        last_save, saved_at = time.perf_counter(), done[0]
            n_done, stats = done
            if checkpoint is not None and stats is not None and n_done > saved_at:
                save(n_done, stats)  # a signal during this save: saved again just below
                saved_at = n_done
        except BaseException:
            final = done  # one read: a consistent pair even if another signal lands here
            if checkpoint is not None and final[1] is not None and final[0] > saved_at:
                save(*final)
            raise
        finally:
            if bar is not None:
                bar.close()
    assert stats is not None
    return InfluenceResult(
        maps=stats.mean.float().cpu().numpy(),
        stderr=stats.stderr().float().cpu().numpy(),
        n_pairs=n_done,
        units=[{k: v.tolist() for k, v in u.channels.items()} for u in units],
        names=[u.name for u in units],
        layer=layer,
        model=adapter.name,
        settings={**asdict(settings), "linear_shortcut": {
            r.swaps.layer: r.swaps.cut for r, _ in runners if r.swaps.path == "linear shortcut"},
            "paths": _paths(runners, units),
            **({"sampler": sampler} if sampler is not None else {}),
            "batch": {r.key: r.choice.to_dict() for r, _ in runners if r.choice is not None},
            "memory": {**plan.to_dict(), "rows_after_out_of_memory": {
                r.key: r.rows_cap for r, _ in runners if r.rows_cap is not None}}},
    )


def _run_part(adapter: GeneratorAdapter, runner: _Runner, rows: list[int], block: BlockSums,
              z1: L.Latent, z2: L.Latent, first_pair: int, max_rows: int, algorithm: str,
              bar: Any) -> None:
    """Add the sums of ``runner``'s hybrids for pairs ``z1, z2`` (a block or part of one)."""
    n_p = L.batch_size(z1)

    def add(us: slice, ps: slice, sums: tuple[torch.Tensor, torch.Tensor]) -> None:
        block.add(_index(rows, us), *sums)
        if bar is not None:
            bar.update(sums[0].shape[0] * (ps.stop - ps.start))

    start = 0
    if runner.choice is None:  # the first block chooses the batch shape
        start = choose_batch(adapter, runner, z1, z2, first_pair, max_rows, algorithm, add)
    else:
        memory.begin_block(runner, z1, z2, first_pair)
    shape = memory.capped(runner.choice.shape if runner.choice.timed or runner.swaps.fused
                          else default_shape(n_p, max_rows, runner.swaps.path), runner.rows_cap)
    memory.run_chunks(runner, _chunks(len(rows), n_p, shape, start), shape, add, adapter.device)
    if not block.is_finite(_index(rows, slice(None))):
        _find_non_finite(runner, _chunks(len(rows), n_p, shape, 0), first_pair)


def _chunks(n_units: int, n_pairs: int, shape: BatchShape, start: int
            ) -> list[tuple[slice, slice]]:
    """(units, pairs) slices of one call each, for units ``start:`` and every pair."""
    return [(slice(u0, min(u0 + shape.units, n_units)), slice(p0, min(p0 + shape.pairs, n_pairs)))
            for u0 in range(start, n_units, shape.units)
            for p0 in range(0, n_pairs, shape.pairs)]


def _paths(runners: list[tuple[_Runner, list[int]]], units: list[_Unit]) -> dict[str, str]:
    """How each layer's (or multi-layer module's) hybrids were computed, for the result file."""
    out: dict[str, str] = {}
    for runner, rows in runners:
        for i in rows:
            key = next(iter(units[i].channels)) if len(units[i].channels) == 1 else "modules"
            out[key] = runner.swaps.path
    return out


def _index(rows: list[int], us: slice) -> slice | torch.Tensor:
    """Global rows of a runner's units ``us``: a slice when they are contiguous."""
    sel = rows[us]
    if sel == list(range(sel[0], sel[0] + len(sel))):
        return slice(sel[0], sel[0] + len(sel))
    return torch.as_tensor(sel)


def _sums(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares over the pairs of ``d (u, p, H, W)``, as float64.

    The partial sums of one batch (at most ``pairs_per_block`` pairs) are taken in ``d``'s
    float32, which is exact to about 1e-7 relative; blocks are accumulated in float64.
    """
    return d.sum(dim=1).double(), (d * d).sum(dim=1).double()


def _find_non_finite(runner: _Runner, chunks: list[tuple[slice, slice]],
                     first_pair: int) -> None:
    """Re-run a block whose sums are not finite and name the first bad unit and pair."""
    for us, ps in chunks:
        ok = torch.isfinite(runner.diffs(us, ps)).flatten(2).all(2)  # (u, p)
        if not bool(ok.all()):
            u, p = (int(i) for i in (~ok).nonzero()[0])
            raise GeneratorOutputError(
                f"The hybrid of unit '{runner.units[us][u].name}' for pair "
                f"{first_pair + ps.start + p} contains NaN or inf (the generator's output after "
                "the intervention is not finite); influence maps would be meaningless. Check "
                "the generator for overflow at that layer."
            )


# ---------------------------------------------------------------------- public API
def influence_maps(
    adapter: GeneratorAdapter,
    layer: str,
    channels: ChannelSpec | None = None,
    *,
    n_pairs: int = 64,
    seed: int = 0,
    pairs_per_block: int = 32,
    target_stderr: float | None = None,
    algorithm: str = "auto",
    dtype: torch.dtype | str | None = None,
    max_memory: int | str | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    callback: Callable[[InfluenceProgress], Any] | None = None,
    assume_same: bool = False,
    step_window: Any = None,
) -> InfluenceResult:
    """Elementary influence maps (EIMs) of the channels of one layer (sec. 3.3-3.4, eq. 2).

    Parameters
    ----------
    adapter : GeneratorAdapter
    layer : str
        Layer name, e.g. ``"main.8"`` (see ``adapter.layers()``).
    channels : list of int, optional
        Channels to measure (default: all). Row ``i`` of the result is ``channels[i]``.
    n_pairs : int, default 64
        Latent pairs (z1, z2) to average over; pair ``p`` is samples ``2p``, ``2p+1`` of the
        latent stream ``seed``.
    seed : int, default 0
    pairs_per_block : int, default 32
        Pairs whose prefix runs together; statistics, ``target_stderr`` checks, callbacks
        and checkpoints advance per block. Changes the maps only by float rounding.
    target_stderr : float, optional
        Stop early, after the first block where the largest per-pixel standard error over
        all maps is <= this value (in image units), with at least 2 pairs. ``n_pairs`` is
        then the maximum.
    algorithm : {"auto", "split", "hook"}, default "auto"
        How the hybrids are computed (the maps do not depend on it). ``"auto"`` uses the linear shortcut when the layer feeds only a Conv /
        ConvTranspose / Linear (+ eval BatchNorm), else the prefix/suffix split;
        ``"split"`` never uses the shortcut; ``"hook"`` runs one full forward per channel
        with a replacing hook (the naive reference). Same maps up to float rounding.
    dtype : torch.dtype or str, optional
        float32 (default); bfloat16 / float16 run the generator under CUDA autocast
        (CUDA only, statistics stay float64).
    max_memory : int or str, optional
        Bound on the peak memory the run adds beyond the generator's weights (CPU: the
        process's resident memory; CUDA: ``max_memory_allocated``), in bytes or as
        ``"2GB"``, ``"512MB"``, ``"1.5GiB"``. Default: half of the memory available on
        the device when the run starts (a run that does not fit it is not refused). The
        statistics, the pairs whose prefix runs together and the hybrids per call are
        planned from the layers' shapes (:mod:`cfmodules.influence.memory`); too small a
        budget raises MemoryBudgetError saying what one hybrid needs. On CPU a call is
        also kept small enough for speed (its hybrids at the cut within 32 MiB, no layer
        after the cut allocating more than 16 MiB at once). After an out-of-memory error
        the batch is halved and the run goes on, warned once. Changes the maps only by
        float rounding.
    progress : bool, default True
        Show a tqdm progress bar (counted in hybrids).
    checkpoint : path, optional
        Checkpoint file: written every ``checkpoint_every`` seconds (at block boundaries),
        on interruption (Ctrl-C, SIGTERM, SIGHUP, errors) and at the end; an existing
        checkpoint of the same run is resumed, giving the same final maps as an
        uninterrupted run. One made with another model, layer, channels, settings or code
        (the generator's class and forward, ``forward``, ``output_transform``, a callable
        prior, an adapter subclass's methods: see :mod:`cfmodules.influence.identity`)
        raises CheckpointError naming what differs.
    checkpoint_every : float, default 60
        Seconds between checkpoint writes (0: after every block).
    callback : callable, optional
        ``callback(InfluenceProgress)`` after each block.
    assume_same : bool, default False
        Resume a checkpoint even where cfmodules cannot verify that it was made by the
        same code (e.g. an ``output_transform`` that calls an object of an arbitrary
        class): you state that the run is the same. What can be verified still is.
    step_window : "all", "early", "middle", "late" or list of int, optional
        Diffusion models only (:class:`~cfmodules.samplers.DiffusionAdapter`): the steps
        of the sampling chain at which the channels are swapped (default: the adapter's
        own window, all steps unless set with ``adapter.with_window``). The window and
        the sampler's settings are part of the result's settings and of the checkpoint's
        identity. See ``docs/diffusion.md``.

    Returns
    -------
    InfluenceResult
        ``maps`` and ``stderr`` (C, H, W) at output resolution, ``influence`` (C,).

    Raises
    ------
    LayerNotFoundError, ChannelError, ConfigError, GeneratorOutputError, CheckpointError
    """
    options = _options(locals(), given_as_keywords=False)  # first: only the arguments
    name, units = _layer_units(_checked(adapter), layer, channels)
    return _run(adapter, units, name, **options)


def module_influence_maps(
    adapter: GeneratorAdapter,
    modules: Sequence[Mapping[str, ChannelSpec]] | Mapping[str, Any],
    **options: Any,
) -> InfluenceResult:
    """Influence maps of modules: groups of channels of one or several layers (eq. 2).

    Parameters
    ----------
    adapter : GeneratorAdapter
    modules : list of modules, dict name -> module, or one module
        A module maps layer names to channel indices, e.g. ``{"main.8": [0, 5, 9]}`` or,
        for two successive layers, ``{"main.5": [3], "main.8": [0, 5]}``. All channels of
        a module are swapped together (each layer takes Original 2's unintervened values,
        as in :func:`cfmodules.hybridize`).
    n_pairs, seed, pairs_per_block, target_stderr, algorithm, dtype, max_memory, progress, checkpoint, checkpoint_every, callback, assume_same, step_window
        The keyword-only arguments of :func:`influence_maps`, with the same defaults and
        checks (one list, shared). Single-layer modules use the prefix/suffix split (and
        the linear shortcut); multi-layer modules one full forward per module.

    Returns
    -------
    InfluenceResult
        One row per module, named by the dict keys (or ``"module i"``).
    """
    checked = _options(options, given_as_keywords=True)
    units = _module_units(_checked(adapter), modules)
    return _run(adapter, units, None, **checked)


def _keyword_options() -> list[inspect.Parameter]:
    """The keyword-only arguments of :func:`influence_maps`: the one list of the options."""
    return [p for p in inspect.signature(influence_maps).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _options(given: Mapping[str, Any], *, given_as_keywords: bool) -> dict[str, Any]:
    """The options of an influence run, from the keyword arguments of a public function.

    Every option not given gets :func:`influence_maps`' default. With ``given_as_keywords``, ``given`` are a ``**options`` and
    an unknown name is an error (with a 'did you mean'); else they are the ``locals()`` of
    :func:`influence_maps` itself.

    Returns
    -------
    dict
        ``settings`` (:class:`InfluenceSettings`, checked) and the run's options.
    """
    params = _keyword_options()
    names = [p.name for p in params]
    if given_as_keywords:
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ConfigError(f"Unknown argument {unknown[0]!r}."
                              f"{did_you_mean(unknown[0], names)} Arguments: "
                              f"{', '.join(names)}.")
    kw = {p.name: given.get(p.name, p.default) for p in params}
    settings = InfluenceSettings(
        n_pairs=kw.pop("n_pairs"), seed=kw.pop("seed"),
        pairs_per_block=kw.pop("pairs_per_block"), target_stderr=kw.pop("target_stderr"),
        algorithm=kw.pop("algorithm"),
        dtype=_dtype_name(kw.pop("dtype")))
    return {"settings": settings, **kw}


module_influence_maps.__signature__ = inspect.signature(module_influence_maps).replace(  # type: ignore[attr-defined]
    parameters=[*list(inspect.signature(module_influence_maps).parameters.values())[:2],
                *_keyword_options()])
