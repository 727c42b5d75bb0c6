"""Checkpoints: an interrupted run resumes to bitwise the same maps; foreign ones are refused.

Bitwise (not allclose): a resumed run processes exactly the same blocks and chunks, in the
same order, with the same float64 merges as an uninterrupted one, and CPU kernels are
deterministic, so any difference would be a bug in what the checkpoint stores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.errors import CheckpointError
from cfmodules.influence import influence_maps, module_influence_maps
from cfmodules.results import read_npz, write_npz
from influence_helpers import convt_adapter, skip_adapter

pytestmark = pytest.mark.numerics  # compares results across chunkings and code paths

KW = {"progress": False, "pairs_per_block": 3, "checkpoint_every": 0}


class Stop(Exception):
    pass


def _interrupt_after(blocks: int, exc: type[BaseException] = KeyboardInterrupt):
    def callback(p):
        if p.n_pairs_done >= blocks * 3:
            raise exc()
    return callback


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Stop])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, exc):
    ad = convt_adapter()
    full = influence_maps(ad, "5", n_pairs=10, **KW)
    ck = tmp_path / "run.ckpt"
    with pytest.raises(exc):
        influence_maps(ad, "5", n_pairs=10, checkpoint=ck, callback=_interrupt_after(2, exc),
                       **KW)
    arrays, header = read_npz(ck, kind="influence-checkpoint")
    assert header["n_pairs_done"] == 6
    resumed = influence_maps(ad, "5", n_pairs=10, checkpoint=ck, **KW)
    # exact by design: the resumed run computes the same blocks of 3 pairs by the same code
    # path as the uninterrupted one, and the checkpoint holds the float64 statistics' bits
    np.testing.assert_array_equal(resumed.maps, full.maps)
    np.testing.assert_array_equal(resumed.stderr, full.stderr)
    assert resumed.n_pairs == 10
    # the finished checkpoint returns the result at once, without running the generator
    again = influence_maps(ad, "5", n_pairs=10, checkpoint=ck,
                           callback=lambda p: pytest.fail("ran again"), **KW)
    np.testing.assert_array_equal(again.maps, full.maps)


def test_interrupted_twice_with_time_based_checkpoints(tmp_path):
    # checkpoint_every large: only the interruption writes the checkpoint.
    ad = skip_adapter()
    kw = {**KW, "checkpoint_every": 3600}
    full = module_influence_maps(ad, [{"r1": [0, 1]}, {"r2": [2]}], n_pairs=9, **KW)
    ck = tmp_path / "m.ckpt"
    for k in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            module_influence_maps(ad, [{"r1": [0, 1]}, {"r2": [2]}], n_pairs=9, checkpoint=ck,
                             callback=_interrupt_after(k), **kw)
    resumed = module_influence_maps(ad, [{"r1": [0, 1]}, {"r2": [2]}], n_pairs=9, checkpoint=ck, **kw)
    np.testing.assert_array_equal(resumed.maps, full.maps)


def test_checkpoint_can_be_extended_with_more_pairs(tmp_path):
    ad = convt_adapter()
    ck = tmp_path / "run.ckpt"
    influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)
    longer = influence_maps(ad, "5", n_pairs=9, checkpoint=ck, **KW)
    # exact by design: 6 is a whole number of blocks of 3, so both runs do the same blocks
    np.testing.assert_array_equal(longer.maps, influence_maps(ad, "5", n_pairs=9, **KW).maps)
    with pytest.raises(CheckpointError, match="already holds 9 pairs"):
        influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)


@pytest.mark.parametrize("change,what", [
    ({"seed": 1}, "seed"),
    ({"layer": "2"}, "units"),
    ({"channels": [0, 1]}, "units"),
    ({"pairs_per_block": 2}, "pairs_per_block"),
    ({"weights": True}, "state_dict_sha256"),
])
def test_checkpoint_of_another_run_is_refused(tmp_path, change, what):
    ad = convt_adapter()
    ck = tmp_path / "run.ckpt"
    influence_maps(ad, "5", n_pairs=3, checkpoint=ck, **KW)
    before = ck.read_bytes()
    kw = {**KW, "n_pairs": 6}
    layer = change.get("layer", "5")
    if "seed" in change:
        kw["seed"] = change["seed"]
    if "pairs_per_block" in change:
        kw["pairs_per_block"] = change["pairs_per_block"]
    if "channels" in change:
        kw["channels"] = change["channels"]
    if change.get("weights"):
        with torch.no_grad():
            ad.generator[6].weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=what) as info:
        influence_maps(ad, layer, checkpoint=ck, **kw)
    assert "delete the file" in str(info.value)
    assert ck.read_bytes() == before  # a refused checkpoint is left untouched


def test_not_a_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "x.npz"
    write_npz(ck, {"maps": np.zeros((1, 2, 2))}, {"kind": "influence"})
    with pytest.raises(CheckpointError, match="'influence' result"):
        influence_maps(convt_adapter(), "5", n_pairs=3, checkpoint=ck, **KW)
    ck.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="Cannot resume"):
        influence_maps(convt_adapter(), "5", n_pairs=3, checkpoint=ck, **KW)
