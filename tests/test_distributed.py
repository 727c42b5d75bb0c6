"""Influence maps sharded across 2 CPU ranks with gloo equal the single-process maps."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfmodules import zoo
from cfmodules.errors import ConfigError
from cfmodules.influence import influence_maps
from cfmodules.influence.distributed import (
    distributed_influence_maps,
    shard,
    shard_checkpoint,
)
from cfmodules.influence.result import InfluenceResult

SETTINGS = dict(n_pairs=6, seed=3, pairs_per_block=4, progress=False)


# Robust on a loaded machine: the ranks meet through a file (no port to find free and lose
# to another process), every wait has minutes of margin, and no rank leaves the group
# while another may still talk to it (a barrier before destroy_process_group).
TIMEOUT = datetime.timedelta(minutes=5)


def _worker(rank: int, world_size: int, store: str, runs) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT)
    try:
        ad = zoo.load("planted-conv")
        for out, channels, ckpt in runs:
            res = distributed_influence_maps(ad, "main.3", channels, checkpoint=ckpt,
                                             **SETTINGS)
            if rank == 0:
                res.save(out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world_size, tmp_path, runs) -> list[InfluenceResult]:
    """Each of ``runs`` (out name, channels, checkpoint) in one group of ``world_size``
    processes (spawning them costs more than the runs)."""
    runs = [(str(tmp_path / name), channels, ckpt) for name, channels, ckpt in runs]
    store = str(tmp_path / f"store{world_size}")  # a fresh rendezvous file per group
    mp.spawn(_worker, args=(world_size, store, runs), nprocs=world_size, join=True)
    return [InfluenceResult.load(out) for out, _, _ in runs]


def test_shards_cover_every_channel_once():
    for n in (0, 1, 5, 128):
        for w in (1, 2, 3, 7):
            got = [i for r in range(w) for i in shard(n, r, w)]
            assert got == list(range(n))
    with pytest.raises(ConfigError):
        shard(4, 2, 2)
    assert shard_checkpoint("/x/maps.npz", 1, 4).name == "maps.rank1of4.npz"


def test_distributed_three_gloo_ranks_equal_single_process(tmp_path):
    """Every channel (each rank keeps its own checkpoint), then 2 channels: more ranks than
    channels, so one rank has none, and the maps keep the order asked for."""
    every, subset = _run(3, tmp_path, [("every.npz", None, str(tmp_path / "ck.npz")),
                                       ("subset.npz", [5, 1], None)])
    single = influence_maps(zoo.load("planted-conv"), "main.3", **SETTINGS)
    assert every.names == single.names and every.n_pairs == single.n_pairs
    np.testing.assert_allclose(every.maps, single.maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(every.stderr, single.stderr, rtol=1e-4, atol=1e-7)
    assert every.settings["world_size"] == 3
    assert sorted(p.name for p in tmp_path.glob("ck.rank*")) == [
        f"ck.rank{r}of3.npz" for r in range(3)]  # each rank kept its own checkpoint
    assert list(subset.channels) == [5, 1]
    np.testing.assert_allclose(subset.maps, single.maps[[5, 1]], rtol=1e-5, atol=1e-7)


@pytest.mark.numerics
def test_without_a_process_group_it_is_influence_maps():
    ad = zoo.load("planted-conv")
    a = distributed_influence_maps(ad, "main.3", [0, 2], **SETTINGS)
    b = influence_maps(ad, "main.3", [0, 2], **SETTINGS)
    np.testing.assert_array_equal(a.maps, b.maps)  # exact: the very same call in one process


@pytest.mark.slow
def test_distributed_analyze_runs_under_torchrun(tmp_path):
    """`cfmodules analyze` under torchrun with 2 gloo ranks writes one set of results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: the rendezvous store binds port 0 itself (a free port, no race)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "cfmodules", "analyze", "--model", "planted-conv", "--layer", "main.3",
           "--pairs", "4", "--k", "3", "--stability-repeats", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "report.html").exists()
