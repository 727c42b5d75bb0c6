"""The memory budget of influence runs (max_memory) and recovery from out-of-memory errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cfmodules.engine import swaps as swaps_mod
from cfmodules.errors import CfModulesError, ConfigError, MemoryBudgetError
from cfmodules.influence import influence_maps, module_influence_maps, parse_memory
from influence_helpers import convt_adapter, skip_adapter

KW = {"progress": False}


@pytest.mark.parametrize("value,want", [
    (1024, 1024), (np.int64(5), 5), ("2GB", 2 * 10**9), ("512MB", 512 * 10**6),
    ("1.5GiB", 3 * 2**29), (" 256 mib ", 256 * 2**20), ("100", 100), ("10kB", 10_000),
    (None, None),
])
def test_parse_memory(value, want):
    assert parse_memory(value) == want


@pytest.mark.parametrize("bad", [0, -3, "0MB", "2XB", "", "GB", True, 2.5, [1]])
def test_parse_memory_refuses(bad):
    with pytest.raises(ConfigError, match="max_memory"):
        parse_memory(bad)


def test_budget_too_small_for_one_hybrid_says_what_is_needed():
    with pytest.raises(MemoryBudgetError, match="at least") as e:
        influence_maps(convt_adapter(), "5", n_pairs=2, max_memory="10kB", **KW)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, CfModulesError)


def test_memory_plan_is_recorded_and_within_budget():
    res = influence_maps(convt_adapter(), "5", n_pairs=4, max_memory="1MB", **KW)
    m = res.settings["memory"]
    assert m["budget_bytes"] == 10**6 and m["estimate_bytes"] <= 10**6
    assert m["rows_per_call"] >= 1 and 1 <= m["pairs_per_prefix"] <= 32
    assert m["rows_after_out_of_memory"] == {}


def _fail_above(monkeypatch, bound: int, error: type[BaseException] = RuntimeError,
                cls=swaps_mod.LinearSwaps) -> list[int]:
    """Make ``cls.hybrids`` raise an allocation failure for batches of more than ``bound``."""
    calls: list[int] = []
    real = cls.hybrids

    def hybrids(self, units, pairs):
        rows = len(range(len(self.groups))[units]) * (pairs.stop - pairs.start)
        calls.append(rows)
        if rows > bound:
            raise error("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                        "123456789 bytes. Error code 12 (Cannot allocate memory)")
        return real(self, units, pairs)

    monkeypatch.setattr(cls, "hybrids", hybrids)
    return calls


def _halved_then_kept(calls: list[int], bound: int) -> None:
    """Failed calls halve the batch until it fits (a few tries); later calls stay small."""
    fails = [c for c in calls if c > bound]
    assert calls[0] > bound and len(fails) <= int(np.log2(calls[0])) + 1
    first_ok = next(i for i, c in enumerate(calls) if c <= bound)
    assert max(calls[first_ok:]) <= bound


@pytest.mark.numerics
@pytest.mark.parametrize("error", [RuntimeError, torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_halves_the_batch_and_gives_the_same_maps(monkeypatch, error):
    ad = convt_adapter()
    want = influence_maps(ad, "5", n_pairs=6, pairs_per_block=4, **KW)
    calls = _fail_above(monkeypatch, 3, error)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = influence_maps(ad, "5", n_pairs=6, pairs_per_block=4, **KW)
    oom = [w for w in seen if "Out of memory" in str(w.message)]
    assert len(oom) == 1 and oom[0].category is RuntimeWarning  # warned once per run
    _halved_then_kept(calls, 3)
    assert got.settings["memory"]["rows_after_out_of_memory"]["5"] <= 3
    # every hybrid counted once: other batch sizes, so float rounding only
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-5, atol=1e-6)
    assert got.n_pairs == 6


@pytest.mark.numerics
def test_out_of_memory_on_the_split_path(monkeypatch):
    ad = skip_adapter()
    want = module_influence_maps(ad, [{"r1": [0, 1]}, {"r1": [2]}, {"r1": [3]}], n_pairs=5,
                                 **KW)
    calls = _fail_above(monkeypatch, 2, cls=swaps_mod.SplitSwaps)
    with pytest.warns(RuntimeWarning, match="Out of memory"):
        got = module_influence_maps(ad, [{"r1": [0, 1]}, {"r1": [2]}, {"r1": [3]}],
                                    n_pairs=5, algorithm="split", **KW)
    _halved_then_kept(calls, 2)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)


def test_out_of_memory_for_one_row_stops_without_a_retry_storm(monkeypatch):
    ad = convt_adapter()
    calls = _fail_above(monkeypatch, 0)
    with pytest.raises(MemoryBudgetError, match="even one hybrid"), \
            pytest.warns(RuntimeWarning, match="Out of memory"):
        influence_maps(ad, "5", n_pairs=4, **KW)
    first = calls[0]
    assert len(calls) <= int(np.log2(first)) + 2  # halving: a handful of tries, not one per row
    assert calls[-1] == 1


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    ad = convt_adapter()

    def broken(self, units, pairs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(swaps_mod.LinearSwaps, "hybrids", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        influence_maps(ad, "5", n_pairs=2, **KW)


def test_the_analysis_passes_max_memory_on():
    from cfmodules.analysis import AnalysisSettings, module_maps, unit_influence_maps

    ad, s = convt_adapter(), AnalysisSettings(n_pairs=2)
    with pytest.raises(MemoryBudgetError):
        unit_influence_maps(ad, ["5"], s, progress=False, max_memory="10kB")
    with pytest.raises(MemoryBudgetError):
        module_maps(ad, [{"5": [0]}], s, progress=False, max_memory="10kB")
    assert unit_influence_maps(ad, ["5"], s, progress=False, max_memory="1GB").maps.shape[0] > 0


def test_the_default_budget_never_refuses_a_run(monkeypatch):
    from cfmodules.influence import memory

    monkeypatch.setattr(memory, "default_memory", lambda device: 10)  # a nearly full machine
    res = influence_maps(convt_adapter(), "5", n_pairs=2, **KW)
    m = res.settings["memory"]
    assert m["rows_per_call"] == 1 and m["pairs_per_prefix"] == 1


def test_default_memory_is_half_of_what_is_available():
    from cfmodules.influence.memory import default_memory

    n = default_memory(torch.device("cpu"))
    assert 0 < n < 2**62


@pytest.mark.numerics
def test_out_of_memory_in_the_prefix_halves_the_pairs_and_gives_the_same_maps(monkeypatch):
    from cfmodules import latents as L

    ad = convt_adapter()
    want = influence_maps(ad, "5", n_pairs=7, pairs_per_block=4, **KW)
    sizes: list[int] = []
    real = swaps_mod.LinearSwaps.begin_block

    def begin_block(self, z1, z2):
        sizes.append(L.batch_size(z1))
        if L.batch_size(z1) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, z1, z2)

    monkeypatch.setattr(swaps_mod.LinearSwaps, "begin_block", begin_block)
    with pytest.warns(RuntimeWarning, match="4 pairs per call"):
        got = influence_maps(ad, "5", n_pairs=7, pairs_per_block=4, **KW)
    assert sizes[:3] == [4, 2, 1] and max(sizes[3:]) == 1  # halved, then kept
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-5, atol=1e-6)
    assert got.n_pairs == 7


def test_out_of_memory_in_the_prefix_of_one_pair_stops(monkeypatch):
    def begin_block(self, z1, z2):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "99999999999 bytes.")

    monkeypatch.setattr(swaps_mod.LinearSwaps, "begin_block", begin_block)
    with pytest.raises(MemoryBudgetError, match="even one pair"), \
            pytest.warns(RuntimeWarning, match="pairs per call"):
        influence_maps(convt_adapter(), "5", n_pairs=4, pairs_per_block=4, **KW)


@pytest.mark.numerics
def test_out_of_memory_while_timing_the_units_per_call(monkeypatch):
    """The first block times units per call; an allocation failure there halves the batch
    like any other, warned once, and no hybrid is lost or counted twice."""
    monkeypatch.setenv("CFMODULES_NATIVE", "0")  # the PyTorch path: hybrids, timed
    from cfmodules import zoo

    ad = zoo.load("dcgan-faces")
    want = influence_maps(ad, "main.8", n_pairs=8, **KW)
    assert want.settings["batch"]["main.8"]["chosen_by"] == "timing"
    calls = _fail_above(monkeypatch, 40)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = influence_maps(ad, "main.8", n_pairs=8, **KW)
    assert len([w for w in seen if "Out of memory" in str(w.message)]) == 1
    _halved_then_kept(calls, 40)
    assert got.settings["memory"]["rows_after_out_of_memory"]["main.8"] <= 40
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-5, atol=1e-7)


def test_out_of_memory_while_timing_whole_shapes_loses_and_repeats_nothing(monkeypatch):
    """A generator whose grouped convolutions grow with the batch has whole shapes timed,
    some over several calls per group of units: an allocation failure in the middle of
    a group halves the batch, warned once, and the maps are those of an undisturbed run."""
    from cfmodules import GeneratorAdapter
    from engine_helpers import StyleLike, init

    ad = GeneratorAdapter(init(StyleLike(ch=16), 2), ((4,), (1, 4, 4), (1, 8, 8)))
    want = influence_maps(ad, "conv0", n_pairs=6, **KW)
    assert want.settings["batch"]["conv0"]["chosen_by"] == "timing"
    calls: list[tuple[int, int, int]] = []  # (rows, first pair, pairs) of every call
    fail_at = [None]
    classes = (swaps_mod.SplitSwaps, swaps_mod.HookSwaps)
    reals = {cls: cls.hybrids for cls in classes}

    def patched(cls):
        def hybrids(self, units, pairs):
            n = pairs.stop - pairs.start
            calls.append((len(range(len(self.groups))[units]) * n, pairs.start, n))
            if fail_at[0] is not None and len(calls) > fail_at[0] and calls[-1][0] > 1:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 123456789 bytes. Error code 12")
            return reals[cls](self, units, pairs)
        return hybrids

    for cls in classes:
        monkeypatch.setattr(cls, "hybrids", patched(cls))
    influence_maps(ad, "conv0", n_pairs=6, **KW)  # a dry run: which call is mid-group?
    fail_at[0] = next(i for i, (_, p0, n) in enumerate(calls) if p0 > 0 and n < 6)
    calls.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = influence_maps(ad, "conv0", n_pairs=6, **KW)
    assert len([w for w in seen if "Out of memory" in str(w.message)]) == 1
    assert "timing shapes ran out of memory" in got.settings["batch"]["conv0"]["reason"]
    assert got.settings["batch"]["conv0"]["chosen_by"] == "memory budget"
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.stderr, want.stderr, rtol=1e-4, atol=1e-6)
