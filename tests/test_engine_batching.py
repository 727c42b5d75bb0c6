"""Batch shape chosen by timing where batching can hurt (grouped convs grown with the batch)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cfmodules import GeneratorAdapter
from cfmodules.engine import batching, engine_of, explain
from cfmodules.engine.batching import BatchShape, candidate_shapes, time_shapes
from cfmodules.influence import influence_maps
from engine_helpers import SkipDecoder, StyleLike, init


def _style() -> GeneratorAdapter:
    return GeneratorAdapter(init(StyleLike(ch=16), 2), ((4,), (1, 4, 4), (1, 8, 8)))


def test_grouped_convs_grown_with_the_batch_are_found():
    ad = _style()
    why = engine_of(ad).batch_dependent_ops()
    assert why is not None and "groups=2 for 2 samples, 3 for 3" in why
    assert "timed on the first block" in explain(ad, "conv0").batching
    plain = GeneratorAdapter(init(SkipDecoder(), 3), (4,))
    assert engine_of(plain).batch_dependent_ops() is None
    assert "memory budget" in explain(plain, "act").batching


def test_timed_batch_shape_gives_the_hook_paths_maps_and_is_recorded(tmp_path):
    ad = _style()
    res = influence_maps(ad, "conv0", n_pairs=5, pairs_per_block=3, progress=False)
    ref = influence_maps(ad, "conv0", n_pairs=5, pairs_per_block=3, progress=False,
                         algorithm="hook")
    np.testing.assert_allclose(res.maps, ref.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.stderr, ref.stderr, rtol=1e-4, atol=1e-6)
    batch = res.settings["batch"]["conv0"]
    assert batch["chosen_by"] == "timing" and len(batch["timed_ms_per_hybrid"]) >= 2
    # the naive rerun (full forwards) is one of the candidates, so auto is never slower
    assert any(k.startswith("hook 1 unit(s) x 3 pair(s)") for k in batch["timed_ms_per_hybrid"])
    assert res.settings["paths"]["conv0"] == batch["path"]
    res.save(tmp_path / "r.npz")
    assert type(res).load(tmp_path / "r.npz").settings["batch"] == res.settings["batch"]
    assert "the latest run used" in str(explain(ad, "conv0"))


def test_memory_budget_shape_is_recorded_without_timing():
    ad = GeneratorAdapter(init(SkipDecoder(), 3), (4,))
    res = influence_maps(ad, "act", n_pairs=3, progress=False)
    assert res.settings["batch"]["act"]["chosen_by"] == "memory budget"
    assert res.settings["batch"]["act"]["timed_ms_per_hybrid"] == {}
    b = res.settings["batch"]["act"]
    text = explain(ad, "act").batching
    assert text.endswith(f"the latest run used {b['units'] * b['pairs']} hybrid(s) per call "
                         f"({b['path']} {b['units']} unit(s) x {b['pairs']} pair(s))")


def test_candidates_include_pairs_and_units_layouts_and_the_naive_shape():
    shapes = candidate_shapes(n_units=20, n_pairs=8, max_rows=64, path="split", naive="hook")
    assert BatchShape(1, 1, "split") in shapes and BatchShape(8, 8, "split") in shapes
    assert BatchShape(16, 1, "split") in shapes  # units first
    assert BatchShape(1, 8, "hook") in shapes  # the naive rerun's shape
    assert all(s.rows <= 64 and s.units <= 20 for s in shapes)
    assert len(set(shapes)) == len(shapes)


@pytest.mark.parametrize("n_units, n_pairs", [(40, 8), (9, 5), (3, 2)])
def test_timing_covers_each_unit_and_pair_once_and_picks_the_fastest(monkeypatch, n_units,
                                                                      n_pairs):
    """A fake clock: each call costs a known time; every hybrid is computed exactly once."""
    clock = [0.0]
    monkeypatch.setattr(batching.time, "perf_counter", lambda: clock[0])
    cost = {"split": lambda s: 1.0 + 0.1 * s.rows + (0.05 * s.rows ** 2 if s.rows > 4 else 0),
            "hook": lambda s: 2.0 * s.rows}
    seen = np.zeros((n_units, n_pairs), dtype=int)

    def run(shape: BatchShape, us: slice, ps: slice) -> None:
        seen[us, ps] += 1
        clock[0] += cost[shape.path](BatchShape(us.stop - us.start, ps.stop - ps.start,
                                                shape.path))

    cands = candidate_shapes(n_units, n_pairs, 32, "split", "hook")
    choice, done = time_shapes(cands, n_units, n_pairs, run, torch.device("cpu"))
    assert (seen[:done] == 1).all() and (seen[done:] == 0).all()
    assert done <= max(1, n_units // 2)
    if choice is None:  # too few units to time two shapes
        assert len([s for s in cands if s.units <= done]) < 2 or n_units < 4
        return
    per_hybrid = dict(choice.timed)
    assert choice.shape == min(per_hybrid, key=per_hybrid.get)
    for s, t in choice.timed:
        assert t == pytest.approx(cost[s.path](s) / s.rows)


def test_unit_candidates_halve_the_units_and_keep_the_pairs():
    from cfmodules.engine.batching import unit_candidates

    got = unit_candidates(BatchShape(12, 32, "linear shortcut"), n_units=128)
    assert [s.units for s in got] == [12, 6, 3, 1]
    assert {s.pairs for s in got} == {32} and {s.path for s in got} == {"linear shortcut"}
    assert unit_candidates(BatchShape(12, 32, "split"), n_units=5)[0].units == 5
    assert unit_candidates(BatchShape(1, 8, "split"), n_units=5) == [BatchShape(1, 8, "split")]


def test_timing_runs_nothing_when_fewer_than_two_candidates_fit():
    ran = []
    shapes = [BatchShape(8, 4, "split"), BatchShape(4, 4, "split"), BatchShape(1, 4, "split")]
    choice, done = time_shapes(shapes, 10, 4, lambda s, us, ps: ran.append(us),
                               torch.device("cpu"))
    assert (choice, done, ran) == (None, 0, [])  # only the 1-unit candidate fits 5 units


@pytest.mark.numerics
def test_units_per_call_are_timed_where_batching_cannot_hurt_and_change_no_number(monkeypatch):
    """DCGAN: no operation grows with the batch, so only the units per call are timed
    (whole pairs each call); the maps equal the memory budget's shape to float rounding."""
    monkeypatch.setenv("CFMODULES_NATIVE", "0")  # the PyTorch path: hybrids, timed
    from cfmodules import zoo
    from cfmodules.influence import batch

    ad = zoo.load("dcgan-faces")
    res = influence_maps(ad, "main.8", n_pairs=8, progress=False)
    b = res.settings["batch"]["main.8"]
    timed = [BatchShape(*map(int, re.search(r"(\d+) unit\(s\) x (\d+) pair", k).groups()),
                        "linear shortcut") for k in b["timed_ms_per_hybrid"]]
    assert b["chosen_by"] == "timing" and len(timed) >= 2
    assert {s.pairs for s in timed} == {8} and b["pairs"] == 8  # units vary, pairs never
    assert "no number depends on it" in b["reason"]
    monkeypatch.setattr(batch, "unit_candidates", lambda shape, n: [shape])  # budget only
    ref = influence_maps(ad, "main.8", n_pairs=8, progress=False)
    assert ref.settings["batch"]["main.8"]["chosen_by"] == "memory budget"
    np.testing.assert_allclose(res.maps, ref.maps, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.stderr, ref.stderr, rtol=1e-5, atol=1e-8)
