"""Influence maps across processes and GPUs with ``torch.distributed``.

Under ``torchrun`` (or any initialised process group) the channels of the layer are cut
into contiguous shards, one per rank. Every rank runs the single-process fast path
(:func:`cfmodules.influence.influence_maps`) on its shard with the *same* latent pairs,
so the gathered maps equal a single-process run up to float rounding. Each rank keeps
its own checkpoint file, so a rank that dies loses only its unfinished block and a
restarted job finishes the rest.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (picked from the adapter's device when this
module initialises the group itself).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cfmodules.adapter import GeneratorAdapter
from cfmodules.channels import ChannelSpec, channel_index
from cfmodules.errors import ConfigError
from cfmodules.hooks import resolve_layer
from cfmodules.influence.maps import influence_maps
from cfmodules.influence.result import InfluenceResult

__all__ = ["shard", "world", "init_from_env", "distributed_influence_maps", "shard_checkpoint"]


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of ``range(n)`` for ``rank`` (sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Initialise the default process group from torchrun's variables, if they are set.

    Returns True when a group with more than one rank is (now) initialised. The backend
    is ``nccl`` for a CUDA device and ``gloo`` otherwise.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def shard_checkpoint(checkpoint: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The checkpoint file of one shard: ``maps.ckpt`` -> ``maps.rank1of4.ckpt``."""
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}.rank{rank}of{world_size}{p.suffix or '.npz'}")


def _gather_rows(local: np.ndarray, counts: Sequence[int], device: torch.device) -> np.ndarray:
    """All-gather per-rank row blocks of different lengths (padded to the longest)."""
    longest = max(counts)
    pad = np.zeros((longest, *local.shape[1:]), dtype=np.float32)
    pad[: local.shape[0]] = local
    t = torch.from_numpy(pad).to(device)
    parts = [torch.empty_like(t) for _ in counts]
    dist.all_gather(parts, t)
    return np.concatenate([p.cpu().numpy()[:c] for p, c in zip(parts, counts)], axis=0)


def distributed_influence_maps(
    adapter: GeneratorAdapter,
    layer: str,
    channels: ChannelSpec | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> InfluenceResult:
    """:func:`~cfmodules.influence.influence_maps`, with the channels sharded across ranks.

    Call it on every rank (same arguments). Without a process group (or with one rank)
    it is exactly ``influence_maps``. Every rank returns the full result; save it on rank
    0 only (``if world()[0] == 0: result.save(path)``).

    Parameters
    ----------
    adapter, layer, channels
        As in ``influence_maps``; ``adapter.device`` is this rank's device (e.g.
        ``cuda:{LOCAL_RANK}``).
    checkpoint : path, optional
        Base name; rank ``r`` of ``w`` checkpoints to ``<stem>.rank{r}of{w}<suffix>``.
    **kwargs
        Passed to ``influence_maps`` (``n_pairs``, ``seed``, ``method``, ...).
        ``target_stderr`` is refused: ranks would stop after different numbers of pairs.
    """
    rank, size = world()
    if size == 1:
        return influence_maps(adapter, layer, channels, checkpoint=checkpoint, **kwargs)
    if kwargs.get("target_stderr") is not None:
        raise ConfigError(
            "target_stderr cannot be used across ranks (each shard would stop after a "
            "different number of pairs); give n_pairs instead."
        )
    name = resolve_layer(adapter.generator, layer).name
    n = adapter.layer_channels(name)
    idx = torch.arange(n) if channels is None else channel_index(channels, n, name,
                                                                 allow_empty=False)
    blocks = [shard(len(idx), r, size) for r in range(size)]
    mine = idx[blocks[rank].start: blocks[rank].stop]
    ckpt = None if checkpoint is None else shard_checkpoint(checkpoint, rank, size)
    if len(mine):
        local = influence_maps(adapter, name, mine.tolist(), checkpoint=ckpt, **kwargs)
        maps, stderr, n_pairs = local.maps, local.stderr, local.n_pairs
        settings = local.settings
    else:  # more ranks than channels: this rank only takes part in the gather
        maps = stderr = np.zeros((0, 1, 1), dtype=np.float32)
        n_pairs, settings = 0, {}
    # every rank learns the image size and the pair count from a rank that has work
    meta = torch.tensor([*maps.shape[1:], n_pairs] if len(mine) else [0, 0, 0],
                        dtype=torch.long, device=adapter.device)
    metas = [torch.empty_like(meta) for _ in range(size)]
    dist.all_gather(metas, meta)
    h, w, pairs = (int(v) for v in metas[0].tolist())
    if not len(mine):
        maps = stderr = np.zeros((0, h, w), dtype=np.float32)
    counts = [len(b) for b in blocks]
    all_maps = _gather_rows(maps, counts, adapter.device)
    all_stderr = _gather_rows(stderr, counts, adapter.device)
    settings = {**settings, "world_size": size}
    return InfluenceResult(
        maps=all_maps, stderr=all_stderr, n_pairs=pairs,
        units=[{name: [int(c)]} for c in idx.tolist()],
        names=[f"{name}[{int(c)}]" for c in idx.tolist()],
        layer=name, model=adapter.name, settings=settings,
    )
