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
fit ``max_batch_bytes``. When the layer feeds only a linear module (Conv, ConvTranspose,
Linear, maybe followed by an eval-mode BatchNorm), the hybrid is started after that
module from the original pre-activation plus the single channel's contribution (see
:mod:`cfmodules.engine.linear`). Running means and variances are merged per block in
float64, so only ``O(units x pixels)`` memory is kept, and a checkpoint after any block
resumes to the same final numbers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cfmodules import checks
from cfmodules import latents as L
from cfmodules._deprecation import renamed_function, warn_renamed
from cfmodules.adapter import ChannelSpec, GeneratorAdapter, channel_index
from cfmodules.engine.fast import FastSplit
from cfmodules.engine.linear import (
    LinearPlan,
    add_base_,
    channels_last_supported,
    find_linear_plan,
    fused_add_relu_is_exact,
    group_contribution,
    prepare_weight,
    single_channel_contributions,
)
from cfmodules.engine.split import SplitState
from cfmodules.engine.workspace import Workspace
from cfmodules.errors import CheckpointError, ConfigError, GeneratorOutputError
from cfmodules.hooks import resolve_layer
from cfmodules.hybrid import module_channels
from cfmodules.influence.checkpoint import load_checkpoint, model_fingerprint, save_checkpoint
from cfmodules.influence.result import InfluenceResult
from cfmodules.influence.stats import BlockSums, RunningStats
from cfmodules.names import unit_name

__all__ = ["InfluenceSettings", "InfluenceProgress", "influence_maps", "module_influence_maps",
           "ALGORITHMS", "DEFAULT_MAX_BATCH_BYTES"]

DEFAULT_MAX_BATCH_BYTES = {"cpu": 256 * 2**20, "cuda": 1024 * 2**20}
"""Default memory budget of one batch of hybrids per device type (other devices: CPU's).

Large batches mean few operations per hybrid (each operation on a shared, loaded machine
may wait for a thread); the large intermediates of the linear shortcut live in reused
buffers, and on CPU the hybrids at the cut are kept under 32 MiB and the generator's own
layers after the cut under 16 MiB a batch."""

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
        for name in ("n_pairs", "pairs_per_block"):
            object.__setattr__(self, name, checks.positive_int(getattr(self, name), name))
        object.__setattr__(self, "seed", checks.integer(self.seed, "seed"))
        if self.target_stderr is not None and not (
            isinstance(self.target_stderr, (int, float)) and self.target_stderr > 0
        ):
            raise ConfigError(
                f"target_stderr must be a positive number or None, got {self.target_stderr!r}."
            )
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


def pair_latents(adapter: GeneratorAdapter, seed: int, start: int, n: int
                 ) -> tuple[L.Latent, L.Latent]:
    """Deprecated: use :func:`cfmodules.latents.pair_latents` ``(adapter, n, seed, start)``.

    This old spelling takes ``(adapter, seed, start, n)``; it returns the same pairs.
    """
    warn_renamed("cfmodules.influence.pair_latents(adapter, seed, start, n)",
                 "cfmodules.latents.pair_latents(adapter, n, seed, start)")
    return L.pair_latents(adapter, n, seed, start)


# ---------------------------------------------------------------------- runners
class _Runner:
    """Computes |hybrid - Original 1| (averaged over colour) for a set of units."""

    units: list[_Unit]

    def begin_block(self, z1: L.Latent, z2: L.Latent, first_pair: int) -> None:
        raise NotImplementedError

    def diffs(self, units: slice, pairs: slice) -> torch.Tensor:
        """``(u, p, H, W)`` for units ``units`` (of this runner) and pairs ``pairs`` of the block."""
        raise NotImplementedError

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


def _rows(n_units: int, pairs: slice, device: torch.device) -> torch.Tensor:
    return torch.arange(pairs.start, pairs.stop, device=device).repeat(n_units)


def _abs_diff(out: torch.Tensor, y: torch.Tensor, n_units: int) -> torch.Tensor:
    """``|out - y|`` averaged over colour channels, as ``(u, p, H, W)``.

    ``out`` is the caller's own (hybrids just made): it is overwritten when contiguous.
    """
    out = out.view(n_units, y.shape[0], *out.shape[1:])
    y = y.unsqueeze(0)
    diff = out.sub_(y) if out.is_contiguous() else out - y
    return diff.abs_().mean(dim=2)


def _state_rows(split: FastSplit, state: SplitState, n_units: int, pairs: slice,
                activation: torch.Tensor) -> SplitState:
    """State of rows ``u * P + p`` (pair ``p`` of ``pairs``) with a row-expanded activation."""
    need_latent = split.needs_latent and state.latent is not None
    if not state.frontier and not need_latent:
        return SplitState(activation=activation)
    rows = _rows(n_units, pairs, activation.device)
    return SplitState(
        activation=activation,
        frontier=tuple(f.index_select(0, rows.to(f.device)) for f in state.frontier),
        latent=L.select(state.latent, rows) if need_latent else None,
    )


class _SplitRunner(_Runner):
    """Units on one layer: prefix once per block, suffix on channel-swapped activations."""

    def __init__(self, adapter: GeneratorAdapter, layer: str, units: list[_Unit]):
        self.adapter, self.layer, self.units = adapter, layer, units
        self.split = FastSplit(adapter, layer)
        self.idx = [u.channels[layer].to(adapter.device) for u in units]
        self.single = all(i.numel() == 1 for i in self.idx)
        if self.single:
            self.channels = torch.cat(self.idx)

    def begin_block(self, z1: L.Latent, z2: L.Latent, first_pair: int) -> None:
        self.state = self.split.prefix(z1)
        self.a2 = self.split.prefix(z2).activation
        self.y = self.split.suffix(self.state, self.state.activation, owned=False)
        self._check_y(self.y, first_pair)

    def diffs(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.units))[units]
        n_p = pairs.stop - pairs.start
        rows = _rows(len(ids), pairs, self.state.activation.device)
        act = self.state.activation.index_select(0, rows)
        a2 = self.a2[pairs]
        if self.single:  # one indexing op: act[u, :, c_u] = a2[:, c_u]
            ch = self.channels[units]
            view = act.view(len(ids), n_p, *act.shape[1:])
            view[torch.arange(len(ids), device=act.device), :, ch] = a2[:, ch].transpose(0, 1)
        else:
            for k, u in enumerate(ids):
                idx = self.idx[u]
                act[k * n_p:(k + 1) * n_p, idx] = a2[:, idx]
        out = self.split.suffix(_state_rows(self.split, self.state, len(ids), pairs, act), act,
                                owned=True)
        return _abs_diff(out, self.y[pairs], len(ids))


class _LinearRunner(_Runner):
    """Units on one layer feeding a linear module: start the hybrid after that module."""

    def __init__(self, adapter: GeneratorAdapter, plan: LinearPlan, units: list[_Unit]):
        self.adapter, self.plan, self.units = adapter, plan, units
        self.layer_split = adapter.split(plan.layer)
        self.cut_split = FastSplit(adapter, plan.cut)
        self.weight = plan.weight().to(adapter.device)
        self.idx = [u.channels[plan.layer].to(adapter.device) for u in units]
        self.single = all(i.numel() == 1 for i in self.idx)
        if self.single:
            self.channels = torch.cat(self.idx) if self.idx else torch.zeros(0, dtype=torch.long)
            self.prepared = prepare_weight(plan, self.weight)
        self.workspace = Workspace()
        # PyTorch's CPU convolutions after the cut run faster on channels-last input, which
        # the contributions can be written in at no cost (the same values, another layout)
        self.channels_last = (self.single and adapter.device.type == "cpu"
                              and channels_last_supported(plan)
                              and self.cut_split.runs_native_conv2d)

    def begin_block(self, z1: L.Latent, z2: L.Latent, first_pair: int) -> None:
        n = L.batch_size(z1)
        a = self.layer_split.prefix(L.concat([z1, z2])).activation
        self.delta = a[n:] - a[:n]
        if self.cut_split.n_frontier == 0:  # the cut's value is op(+BN) of the layer's
            with self.adapter.eval_mode():
                self.state = SplitState(self.plan.pre_activation(a[:n]), (), z1)
        else:
            self.state = self.cut_split.prefix(z1)
        if self.channels_last and self.state.activation.dim() == 4:
            self.state.activation = self.state.activation.contiguous(
                memory_format=torch.channels_last)  # Y in the hybrids' layout
        self.y = self.cut_split.suffix(self.state, self.state.activation, owned=False)
        self._check_y(self.y, first_pair)
        self.fuse_relu = (self.cut_split.starts_with_relu and self.single
                          and fused_add_relu_is_exact(self.prepared, self.delta,
                                                      self.state.activation))

    def diffs(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.units))[units]
        delta = self.delta[pairs]
        pre = self.state.activation[pairs]
        if self.single:
            hyb = single_channel_contributions(self.plan, self.prepared, delta,
                                               self.channels[units], workspace=self.workspace,
                                               channels_last=self.channels_last)
        else:
            hyb = torch.stack([group_contribution(self.plan, self.weight, delta, self.idx[u])
                               for u in ids])
        add_base_(hyb, pre.unsqueeze(0), relu=self.fuse_relu)
        hyb = hyb.reshape(-1, *pre.shape[1:])
        state = _state_rows(self.cut_split, self.state, len(ids), pairs, hyb)
        out = self.cut_split.suffix(state, hyb, owned=True, rectified=self.fuse_relu)
        return _abs_diff(out, self.y[pairs], len(ids))


class _HookRunner(_Runner):
    """Any units (several layers too): one full forward per unit with replacing hooks."""

    def __init__(self, adapter: GeneratorAdapter, units: list[_Unit]):
        self.adapter, self.units = adapter, units
        self.layers = sorted({layer for u in units for layer in u.channels})
        self.idx = [{k: v.to(adapter.device) for k, v in u.channels.items()} for u in units]

    def begin_block(self, z1: L.Latent, z2: L.Latent, first_pair: int) -> None:
        self.z1 = z1
        self.y = self.adapter.generate(z1)
        self._check_y(self.y, first_pair)
        with self.adapter.trace(self.layers) as acts:
            self.adapter.generate(z2)
        self.a2 = dict(acts)

    def diffs(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.units))[units]
        n_p = pairs.stop - pairs.start
        rows = _rows(len(ids), pairs, torch.device("cpu"))

        def make(layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
            src = self.a2[layer][pairs]

            def edit(out: torch.Tensor) -> torch.Tensor:
                new = out.clone()
                for k, u in enumerate(ids):
                    idx = self.idx[u].get(layer)
                    if idx is not None:
                        new[k * n_p:(k + 1) * n_p, idx] = src[:, idx].to(out.dtype)
                return new
            return edit

        with self.adapter.intervene({layer: make(layer) for layer in self.layers}):
            out = self.adapter.generate(L.select(self.z1, rows))
        return _abs_diff(out, self.y[pairs], len(ids))


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
    """Group units by how they are computed; returns (runner, row indices)."""
    by_layer: dict[str, list[int]] = {}
    multi: list[int] = []
    for i, u in enumerate(units):
        if algorithm != "hook" and len(u.channels) == 1:
            by_layer.setdefault(next(iter(u.channels)), []).append(i)
        else:
            multi.append(i)
    out: list[tuple[_Runner, list[int]]] = []
    for layer, rows in by_layer.items():
        group = [units[i] for i in rows]
        plan = find_linear_plan(adapter, layer) if algorithm == "auto" else None
        runner: _Runner = (_LinearRunner(adapter, plan, group) if plan is not None
                           else _SplitRunner(adapter, layer, group))
        out.append((runner, rows))
    if multi:
        out.append((_HookRunner(adapter, [units[i] for i in multi]), multi))
    return out


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for d in shape or ():
        n *= d
    return n


def _max_rows(adapter: GeneratorAdapter, runners: list[tuple[_Runner, list[int]]],
              budget: int, itemsize: int) -> int:
    """Hybrids per batch: the memory budget over four copies of the largest layer output.

    On CPU also at most :data:`_FRESH_TENSOR_BYTES` for any new tensor the suffix's
    modules allocate (larger ones come fresh from the operating system each time, and
    page faults then dominate), and at most :data:`_HYBRID_BATCH_BYTES` for the hybrid
    activations at the cut.
    """
    shapes = {i.name: i.shape for i in adapter.layers_cached()}
    largest = max([_numel(s) for s in shapes.values()] + [1])
    rows = max(1, budget // (4 * largest * itemsize))
    if adapter.device.type == "cpu":
        for runner, _ in runners:
            split = getattr(runner, "cut_split", None) or getattr(runner, "split", None)
            layers = list(shapes) if split is None else split.suffix_layers
            for layer in layers:
                per_row = _numel(shapes.get(layer)) * itemsize
                rows = min(rows, max(1, _FRESH_TENSOR_BYTES // max(per_row, 1)))
            cut = getattr(getattr(runner, "plan", None), "cut", None) or getattr(
                runner, "layer", None)
            if cut is not None:
                per_row = _numel(shapes.get(cut.split(":")[0])) * itemsize
                rows = min(rows, max(1, _HYBRID_BATCH_BYTES // max(per_row, 1)))
    return rows


# ---------------------------------------------------------------------- main loop
def _run(adapter: GeneratorAdapter, units: list[_Unit], settings: InfluenceSettings,
         layer: str | None, max_batch_bytes: int | None, progress: bool,
         checkpoint: str | os.PathLike | None, checkpoint_every: float,
         callback: Callable[[InfluenceProgress], Any] | None) -> InfluenceResult:
    dtype = _DTYPES[settings.dtype]
    if dtype != torch.float32 and adapter.device.type != "cuda":
        raise ConfigError(
            f"dtype={settings.dtype} is for CUDA devices (autocast); on "
            f"{adapter.device.type} use the default float32."
        )
    budget = (DEFAULT_MAX_BATCH_BYTES.get(adapter.device.type, DEFAULT_MAX_BATCH_BYTES["cpu"])
              if max_batch_bytes is None else max_batch_bytes)
    checks.positive_int(budget, "max_batch_bytes")
    if not (isinstance(checkpoint_every, (int, float)) and checkpoint_every >= 0):
        raise ConfigError(f"checkpoint_every must be seconds >= 0, got {checkpoint_every!r}.")
    runners = _runners(adapter, units, settings.algorithm)
    max_rows = _max_rows(adapter, runners, budget, torch.finfo(dtype).bits // 8)
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype != torch.float32
                else nullcontext())
    n_units = len(units)
    identity = {} if checkpoint is None else json.loads(json.dumps({
        "model": adapter.name,
        "state_dict_sha256": model_fingerprint(adapter.generator),
        "latent_shapes": [list(s) for s in adapter.latent_shapes],
        "prior": adapter.prior if isinstance(adapter.prior, str) else "callable",
        "units": [{k: v.tolist() for k, v in u.channels.items()} for u in units],
        "seed": settings.seed,
        "pairs_per_block": settings.pairs_per_block,
        "dtype": settings.dtype,
    }))

    stats: RunningStats | None = None
    n_done = 0
    if checkpoint is not None:
        found = load_checkpoint(checkpoint, identity)
        if found is not None:
            n_done, count, mean, m2 = found
            if n_done > settings.n_pairs:
                raise CheckpointError(
                    f"The checkpoint '{checkpoint}' already holds {n_done} pairs, more than "
                    f"n_pairs={settings.n_pairs}; pass n_pairs >= {n_done}."
                )
            stats = RunningStats(n_units, tuple(mean.shape[1:]), adapter.device)
            stats.count.copy_(torch.from_numpy(count))
            stats.mean.copy_(torch.from_numpy(mean))
            stats.m2.copy_(torch.from_numpy(m2))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.n_pairs * n_units, initial=n_done * n_units, unit="hybrid",
                   desc=f"influence {layer or f'{n_units} modules'}", leave=False)
    t0 = last_save = time.perf_counter()
    saved_at = n_done

    def max_stderr() -> float:
        if stats is None or n_done < 2:
            return float("nan")
        return float(torch.nan_to_num(stats.stderr(), nan=0.0).max()) if n_units else 0.0

    try:
        with torch.inference_mode(), autocast:
            while n_done < settings.n_pairs:
                if (settings.target_stderr is not None and n_done >= 2
                        and max_stderr() <= settings.target_stderr):
                    break
                n_p = min(settings.pairs_per_block, settings.n_pairs - n_done)
                z1, z2 = L.pair_latents(adapter, n_p, settings.seed, n_done)
                block = BlockSums(n_units)
                for runner, rows in runners:
                    runner.begin_block(z1, z2, n_done)
                    p_step = min(n_p, max_rows)
                    u_step = max(1, max_rows // p_step)
                    chunks = [(slice(u0, min(u0 + u_step, len(rows))),
                               slice(p0, min(p0 + p_step, n_p)))
                              for u0 in range(0, len(rows), u_step)
                              for p0 in range(0, n_p, p_step)]
                    for us, ps in chunks:
                        d = runner.diffs(us, ps)
                        block.add(_index(rows, us), *_sums(d))
                        if bar is not None:
                            bar.update(d.shape[0] * d.shape[1])
                    if not block.is_finite(_index(rows, slice(None))):
                        _find_non_finite(runner, chunks, n_done)
                if stats is None:
                    stats = RunningStats(n_units, block.shape, adapter.device)
                block.merge_into(stats, n_p)
                n_done += n_p
                if callback is not None:
                    callback(InfluenceProgress(n_done, settings.n_pairs, max_stderr(),
                                               time.perf_counter() - t0))
                if checkpoint is not None and (
                        time.perf_counter() - last_save >= checkpoint_every):
                    save_checkpoint(checkpoint, identity, n_done, stats.count, stats.mean,
                                    stats.m2)
                    last_save, saved_at = time.perf_counter(), n_done
    except BaseException:
        if checkpoint is not None and stats is not None and n_done > saved_at:
            save_checkpoint(checkpoint, identity, n_done, stats.count, stats.mean, stats.m2)
        raise
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None and stats is not None and n_done > saved_at:
        save_checkpoint(checkpoint, identity, n_done, stats.count, stats.mean, stats.m2)
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
            r.plan.layer: r.plan.cut for r, _ in runners if isinstance(r, _LinearRunner)}},
    )


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
def _algorithm(algorithm: str, method: str | None) -> str:
    """``algorithm``, or the deprecated ``method=`` keyword it replaced."""
    if method is None:
        return algorithm
    warn_renamed("The method= argument of the influence functions",
                 "algorithm= (method means the clustering method: 'nmf' or 'kmeans')",
                 stacklevel=3)
    return method


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
    max_batch_bytes: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    callback: Callable[[InfluenceProgress], Any] | None = None,
    method: str | None = None,
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
        (Called ``method`` before 0.2; ``method=`` still works with a DeprecationWarning.)
    dtype : torch.dtype or str, optional
        float32 (default); bfloat16 / float16 run the generator under CUDA autocast
        (CUDA only, statistics stay float64).
    max_batch_bytes : int, optional
        Memory budget of one batch of hybrids (default 256 MiB on CPU, 1 GiB on CUDA),
        estimated as four copies of the generator's largest layer output per hybrid. On
        CPU a batch is also kept small enough that its hybrids at the cut fit in 32 MiB
        (the passes over them then hit the cache) and that no layer after the cut
        allocates more than 16 MiB at once (fresh large blocks cost page faults).
    progress : bool, default True
        Show a tqdm progress bar (counted in hybrids).
    checkpoint : path, optional
        Checkpoint file: written every ``checkpoint_every`` seconds (at block boundaries),
        on interruption (Ctrl-C, errors) and at the end; an existing checkpoint of the same
        run is resumed, giving the same final maps as an uninterrupted run. One made with
        another model, layer, channels or settings raises CheckpointError.
    checkpoint_every : float, default 60
        Seconds between checkpoint writes (0: after every block).
    callback : callable, optional
        ``callback(InfluenceProgress)`` after each block.

    Returns
    -------
    InfluenceResult
        ``maps`` and ``stderr`` (C, H, W) at output resolution, ``influence`` (C,).

    Raises
    ------
    LayerNotFoundError, ChannelError, ConfigError, GeneratorOutputError, CheckpointError
    """
    settings = InfluenceSettings(n_pairs=n_pairs, seed=seed, pairs_per_block=pairs_per_block,
                                 target_stderr=target_stderr,
                                 algorithm=_algorithm(algorithm, method),
                                 dtype=_dtype_name(dtype))
    name, units = _layer_units(_checked(adapter), layer, channels)
    return _run(adapter, units, settings, name, max_batch_bytes, progress, checkpoint,
                checkpoint_every, callback)


def module_influence_maps(
    adapter: GeneratorAdapter,
    modules: Sequence[Mapping[str, ChannelSpec]] | Mapping[str, Any],
    *,
    n_pairs: int = 64,
    seed: int = 0,
    pairs_per_block: int = 32,
    target_stderr: float | None = None,
    algorithm: str = "auto",
    dtype: torch.dtype | str | None = None,
    max_batch_bytes: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    callback: Callable[[InfluenceProgress], Any] | None = None,
    method: str | None = None,
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
    n_pairs, seed, pairs_per_block, target_stderr, algorithm, dtype, max_batch_bytes, progress, checkpoint, checkpoint_every, callback
        As in :func:`influence_maps`. Single-layer modules use the prefix/suffix split
        (and the linear shortcut); multi-layer modules one full forward per module.

    Returns
    -------
    InfluenceResult
        One row per module, named by the dict keys (or ``"module i"``).
    """
    settings = InfluenceSettings(n_pairs=n_pairs, seed=seed, pairs_per_block=pairs_per_block,
                                 target_stderr=target_stderr,
                                 algorithm=_algorithm(algorithm, method),
                                 dtype=_dtype_name(dtype))
    units = _module_units(_checked(adapter), modules)
    return _run(adapter, units, settings, None, max_batch_bytes, progress, checkpoint,
                checkpoint_every, callback)


module_influence = renamed_function(module_influence_maps, "cfmodules.influence.module_influence",
                                    "cfmodules.influence.module_influence_maps")
