"""Influence maps sharded across CPU ranks with gloo equal the single-process maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

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

# One torchrun group of 2 ranks runs every check that needs real ranks: starting a rank (a
# fresh interpreter importing torch) costs more than its maps.
RANKS = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    from cfmodules import zoo
    from cfmodules.cli import main
    from cfmodules.influence.distributed import (distributed_influence_maps, init_from_env,
                                                 world)

    out, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    ad = zoo.load("planted-conv")
    assert init_from_env(), "torchrun's group was not set up"
    rank, _ = world()
    every = distributed_influence_maps(ad, "main.3", checkpoint=out / "ck.npz", **settings)
    two = distributed_influence_maps(ad, "main.3", [5, 1], **settings)  # order kept
    one = distributed_influence_maps(ad, "main.3", [5], **settings)  # a rank has none
    if rank == 0:
        every.save(out / "every.npz")
        two.save(out / "two.npz")
        one.save(out / "one.npz")
    # then the command line, as `torchrun ... -m cfmodules analyze ...` runs it
    sys.exit(main(["analyze", "--model", "planted-conv", "--layer", "main.3", "--pairs", "4",
                   "--k", "3", "--stability-repeats", "2", "--out", str(out / "o")]))
''')


def test_shards_cover_every_channel_once():
    for n in (0, 1, 5, 128):
        for w in (1, 2, 3, 7):
            got = [i for r in range(w) for i in shard(n, r, w)]
            assert got == list(range(n))
    with pytest.raises(ConfigError):
        shard(4, 2, 2)
    assert shard_checkpoint("/x/maps.npz", 1, 4).name == "maps.rank1of4.npz"


@pytest.mark.numerics
def test_without_a_process_group_it_is_influence_maps():
    ad = zoo.load("planted-conv")
    a = distributed_influence_maps(ad, "main.3", [0, 2], **SETTINGS)
    b = influence_maps(ad, "main.3", [0, 2], **SETTINGS)
    np.testing.assert_array_equal(a.maps, b.maps)  # exact: the very same call in one process


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_equal_one_process(tmp_path):
    """Under torchrun with 2 gloo ranks: the maps of every channel (each rank keeps its own
    checkpoint), of 2 channels (the order asked for kept) and of 1 channel (more ranks than
    channels) equal the single-process maps, and `cfmodules analyze` writes one set of
    results."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    # --standalone: the rendezvous store binds port 0 itself (a free port, no race)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), str(tmp_path), json.dumps(SETTINGS)]
    # torchrun leaves its own folder (torchelastic_*) in TMPDIR: keep it under tmp_path
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "TMPDIR": str(scratch)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = influence_maps(zoo.load("planted-conv"), "main.3", **SETTINGS)
    every = InfluenceResult.load(tmp_path / "every.npz")
    assert every.names == single.names and every.n_pairs == single.n_pairs
    np.testing.assert_allclose(every.maps, single.maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(every.stderr, single.stderr, rtol=1e-4, atol=1e-7)
    assert every.settings["world_size"] == 2
    assert sorted(p.name for p in tmp_path.glob("ck.rank*")) == [
        "ck.rank0of2.npz", "ck.rank1of2.npz"]  # each rank kept its own checkpoint
    for name, channels in (("two", [5, 1]), ("one", [5])):
        part = InfluenceResult.load(tmp_path / f"{name}.npz")
        assert list(part.channels) == channels
        np.testing.assert_allclose(part.maps, single.maps[channels], rtol=1e-5, atol=1e-7)
    assert (tmp_path / "o" / "report.html").exists()
    assert (tmp_path / "o" / "results.npz").exists()
