"""Influence maps: hand-checked values, shortcut == naive, chunking, modules, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.engine import engine_of
from cfmodules.engine.linear import find_linear_plan
from cfmodules.errors import (
    CfModulesError,
    ChannelError,
    ConfigError,
    GeneratorOutputError,
    LayerNotFoundError,
)
from cfmodules.influence import (
    InfluenceProgress,
    InfluenceResult,
    influence_maps,
    module_influence_maps,
)
from cfmodules.latents import pair_latents
from influence_helpers import (
    conditional_adapter,
    convt_adapter,
    hand_adapter,
    linear_head_adapter,
    naive_maps,
    nan_adapter,
    seq_conv_adapter,
    skip_adapter,
)

pytestmark = pytest.mark.numerics  # compares results across chunkings and code paths

KW = {"progress": False}


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> None:
    scale = max(float(np.abs(b).max()), 1e-12)
    assert float(np.abs(a - b).max()) / scale <= rtol, float(np.abs(a - b).max()) / scale


# ---------------------------------------------------------------------- hand-checked
def test_pairs_are_even_and_odd_samples_of_the_stream():
    ad = hand_adapter()
    z = ad.sample_latents(10, seed=3)
    z1, z2 = pair_latents(ad, 3, 3, 2)  # pairs 2, 3, 4
    assert torch.equal(z1, z[4:10:2]) and torch.equal(z2, z[5:10:2])


def test_the_old_influence_names_are_gone():
    from cfmodules import influence

    assert not hasattr(influence, "pair_latents")  # cfmodules.latents.pair_latents
    assert not hasattr(influence, "module_influence")  # module_influence_maps
    with pytest.raises(ConfigError, match="Unknown argument 'method'"):  # algorithm=
        module_influence_maps(hand_adapter(), [{"layer": [0]}], n_pairs=3, method="split")


def test_module_influence_maps_takes_the_options_of_influence_maps():
    import inspect

    opts = {n: p for n, p in inspect.signature(influence_maps).parameters.items()
            if p.kind is p.KEYWORD_ONLY}
    mod = inspect.signature(module_influence_maps).parameters
    assert list(mod) == ["adapter", "modules", *opts]  # what help() and notebooks show
    assert all(mod[n].default == p.default for n, p in opts.items())
    ad = hand_adapter()
    with pytest.raises(ConfigError, match="Unknown argument 'n_pair'.*'n_pairs'"):
        module_influence_maps(ad, [{"layer": [0]}], n_pair=3)
    for fn, target in ((influence_maps, "layer"), (module_influence_maps, [{"layer": [0]}])):
        with pytest.raises(ConfigError, match="n_pairs"):  # one check for both
            fn(ad, target, n_pairs=0, progress=False)


@pytest.mark.parametrize("n,start", [(0, 0), (2.0, 0), (2, -1)])
def test_pair_latents_rejects_bad_counts(n, start):
    with pytest.raises(ConfigError):
        pair_latents(hand_adapter(), n, 0, start)


@pytest.mark.parametrize("algorithm", ["auto", "split", "hook"])
def test_eims_of_hand_model_equal_hand_computed_values(algorithm):
    # a = z; images (a0, a1, a0 + a1). Swapping channel c changes 2 of 3 colours by
    # z2_c - z1_c, so EIM_c = 2/3 * mean_p |z2_c - z1_c| per pixel.
    ad = hand_adapter()
    n = 7
    res = influence_maps(ad, "layer", n_pairs=n, algorithm=algorithm, pairs_per_block=3, **KW)
    z1, z2 = pair_latents(ad, n, 0, 0)
    d = (z2 - z1).abs().double()
    expected = 2.0 / 3.0 * d.mean(0).numpy()  # (2, 2, 2)
    np.testing.assert_allclose(res.maps, expected, rtol=1e-5, atol=1e-7)
    se = 2.0 / 3.0 * d.std(0, unbiased=True).numpy() / np.sqrt(n)
    np.testing.assert_allclose(res.stderr, se, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.influence, expected.mean(axis=(1, 2)), rtol=1e-5)
    assert res.n_pairs == n and res.layer == "layer" and res.names == ["layer[0]", "layer[1]"]
    assert list(res.channels) == [0, 1]


def test_module_of_all_channels_is_distance_between_originals():
    ad = hand_adapter()
    res = module_influence_maps(ad, {"all": {"layer": [0, 1]}}, n_pairs=5, **KW)
    z1, z2 = pair_latents(ad, 5, 0, 0)
    expected = (ad.generate(z2) - ad.generate(z1)).abs().mean(1).double().mean(0).numpy()
    np.testing.assert_allclose(res.maps[0], expected, rtol=1e-5)
    assert res.names == ["all"] and res.layer is None


def test_first_rows_do_not_depend_on_n_pairs_of_later_pairs():
    ad = hand_adapter()
    a = influence_maps(ad, "layer", n_pairs=4, **KW)
    b = influence_maps(ad, "layer", n_pairs=4, seed=1, **KW)
    assert not np.allclose(a.maps, b.maps)


# ---------------------------------------------------------------------- shortcut == naive
CASES = [
    # (adapter factory, layer, expected cut of the linear shortcut or None)
    (seq_conv_adapter, "2", "4"),          # ReLU -> strided dilated Conv2d -> BN
    (seq_conv_adapter, "5", "6"),          # LeakyReLU -> grouped conv (per-channel loop)
    (seq_conv_adapter, "7", "8"),          # ReLU -> reflect-padded conv
    (seq_conv_adapter, "9", "10"),         # Tanh -> 1x1 conv (the output)
    (convt_adapter, "2", "4"),             # ConvTranspose2d stride 2 + BN
    (convt_adapter, "5", "6"),             # ConvTranspose2d output_padding, no BN
    (convt_adapter, "7", "8"),             # dilated ConvTranspose2d into the output
    (linear_head_adapter, "act", "bn2"),   # Linear + BN1d
    (linear_head_adapter, "act2", "head"),  # Linear into the head
    (skip_adapter, "r2", "bn3"),           # shortcut with the skip 'a' on the frontier
    (skip_adapter, "r1", None),            # two users (c2 and the skip): general path
    (conditional_adapter, "act", "bn"),    # ConvT + BN, class gain gain(y) on the frontier
    (conditional_adapter, "act2", None),   # followed by the class gain: general path
]


@pytest.mark.parametrize("factory,layer,cut", CASES,
                         ids=[f"{f.__name__}-{ly}" for f, ly, _ in CASES])
def test_fast_path_equals_naive(factory, layer, cut):
    ad = factory()
    plan = find_linear_plan(engine_of(ad), layer)
    if cut is None:
        assert plan is None
    else:
        assert plan is not None and plan.cut == cut
    n = 6
    res = influence_maps(ad, layer, n_pairs=n, pairs_per_block=4, **KW)
    n_ch = ad.layer_channels(layer)
    ref = naive_maps(ad, [{layer: [c]} for c in range(n_ch)], n)
    assert res.maps.shape == ref.shape
    _close(res.maps, ref, 1e-5)
    hook = influence_maps(ad, layer, n_pairs=n, algorithm="hook", **KW)
    _close(hook.maps, ref, 1e-5)
    _close(res.stderr, hook.stderr, 1e-4)
    assert res.maps.max() > 0


def test_linear_shortcut_is_reported_in_settings():
    ad = convt_adapter()
    res = influence_maps(ad, "5", n_pairs=2, **KW)
    assert res.settings["linear_shortcut"] == {"5": "6"}
    res = influence_maps(ad, "5", n_pairs=2, algorithm="split", **KW)
    assert res.settings["linear_shortcut"] == {}


def test_conditional_hybrid_keeps_class_of_original_1():
    # Swapping all channels of a layer between pairs must not swap the class input:
    # the module of every channel differs from the distance between the two originals.
    ad = conditional_adapter()
    res = module_influence_maps(ad, [{"act2": list(range(5))}], n_pairs=6, **KW)
    ref = naive_maps(ad, [{"act2": list(range(5))}], 6)
    _close(res.maps, ref, 1e-5)
    z1, z2 = pair_latents(ad, 6, 0, 0)
    full = (ad.generate(z2) - ad.generate(z1)).abs().mean(1).double().mean(0).numpy()
    assert not np.allclose(res.maps[0], full)


# ---------------------------------------------------------------------- modules
def test_modules_single_and_multi_layer_equal_naive():
    ad = convt_adapter()
    modules = {"a": {"5": [0, 3]}, "b": {"2": [1], "5": [2, 4]}, "c": {"7": [4]},
               "d": {"2": [0, 1, 2]}}
    res = module_influence_maps(ad, modules, n_pairs=5, pairs_per_block=2, **KW)
    ref = naive_maps(ad, list(modules.values()), 5)
    _close(res.maps, ref, 1e-5)
    assert res.names == ["a", "b", "c", "d"]
    assert res.units[1] == {"2": [1], "5": [2, 4]}
    for method in ("split", "hook"):
        other = module_influence_maps(ad, list(modules.values()), n_pairs=5, algorithm=method, **KW)
        _close(other.maps, ref, 1e-5)
        assert other.names == ["module 0", "module 1", "module 2", "module 3"]


def test_single_module_dict_is_one_module():
    ad = convt_adapter()
    res = module_influence_maps(ad, {"5": [0, 1]}, n_pairs=2, **KW)
    assert len(res) == 1 and res.units == [{"5": [0, 1]}]


def test_eim_of_one_channel_equals_module_of_that_channel():
    ad = skip_adapter()
    a = influence_maps(ad, "r2", channels=[3], n_pairs=4, **KW)
    b = module_influence_maps(ad, [{"r2": [3]}], n_pairs=4, **KW)
    # two entry points, possibly other kernels: float32 rounding (absolute in image
    # units), not bits
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- chunking
@pytest.mark.parametrize("factory,layer", [(convt_adapter, "5"), (skip_adapter, "r1"),
                                           (conditional_adapter, "act")])
def test_result_does_not_depend_on_chunking(factory, layer):
    ad = factory()
    base = influence_maps(ad, layer, n_pairs=9, **KW)
    m = base.settings["memory"]
    fixed, pair, row = m["fixed_bytes"], m["per_pair_bytes"], m["per_row_bytes"]
    # the smallest budget: one pair's prefix and one hybrid per call
    tiny = influence_maps(ad, layer, n_pairs=9, max_memory=fixed + pair + row + row // 2,
                          pairs_per_block=2, **KW)
    assert tiny.settings["memory"]["pairs_per_prefix"] == 1
    assert tiny.settings["memory"]["rows_per_call"] == 1
    mid = influence_maps(ad, layer, n_pairs=9, max_memory=fixed + 6 * pair + 1,
                         pairs_per_block=4, **KW)
    assert mid.settings["memory"]["pairs_per_prefix"] == 3  # a block in two parts
    for other in (tiny, mid):  # other batch sizes, other kernels: rounding in image units
        np.testing.assert_allclose(other.maps, base.maps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.stderr, base.stderr, rtol=1e-5, atol=1e-6)


def test_channels_subset_and_order():
    ad = convt_adapter()
    full = influence_maps(ad, "2", n_pairs=4, **KW)
    sub = influence_maps(ad, "2", channels=[5, 1], n_pairs=4, **KW)
    # other batches of channels: float32 rounding, absolute in image units
    np.testing.assert_allclose(sub.maps, full.maps[[5, 1]], rtol=1e-5, atol=1e-6)
    assert list(sub.channels) == [5, 1] and sub.names == ["2[5]", "2[1]"]


# ---------------------------------------------------------------------- stopping, progress
def test_target_stderr_stops_early_and_deterministically():
    ad = convt_adapter()
    res = influence_maps(ad, "5", n_pairs=64, pairs_per_block=4, target_stderr=10.0, **KW)
    assert res.n_pairs == 4
    res = influence_maps(ad, "5", n_pairs=8, pairs_per_block=4, target_stderr=1e-9, **KW)
    assert res.n_pairs == 8
    assert np.nanmax(res.stderr) > 1e-9


def test_callback_sees_each_block():
    seen: list[InfluenceProgress] = []
    influence_maps(convt_adapter(), "5", n_pairs=10, pairs_per_block=4, callback=seen.append, **KW)
    assert [p.n_pairs_done for p in seen] == [4, 8, 10]
    assert all(p.n_pairs == 10 for p in seen) and seen[-1].max_stderr > 0


def test_progress_bar_runs(capsys):
    res = influence_maps(hand_adapter(), "layer", n_pairs=2, progress=True)
    assert isinstance(res, InfluenceResult)


def test_one_pair_gives_nan_stderr():
    res = influence_maps(hand_adapter(), "layer", n_pairs=1, **KW)
    assert res.n_pairs == 1 and np.isnan(res.stderr).all() and np.isfinite(res.maps).all()


def test_generator_left_in_train_mode_is_restored():
    ad = convt_adapter()
    ad.generator.train()
    with pytest.warns(UserWarning, match="train mode"):
        res = influence_maps(ad, "5", n_pairs=3, **KW)
    assert ad.generator.training
    ad.generator.eval()
    _close(res.maps, influence_maps(ad, "5", n_pairs=3, **KW).maps, 1e-6)


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,match", [
    ({"n_pairs": 0}, "n_pairs"),
    ({"n_pairs": 2.5}, "n_pairs"),
    ({"pairs_per_block": 0}, "pairs_per_block"),
    ({"target_stderr": -1.0}, "target_stderr"),
    ({"algorithm": "fast"}, "algorithm"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": torch.bfloat16}, "CUDA"),
    ({"max_memory": 0}, "max_memory"),
    ({"max_memory": "lots"}, "max_memory"),
    ({"max_memory": True}, "max_memory"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        influence_maps(convt_adapter(), "5", **{"n_pairs": 2, **kwargs, **KW})


def test_unknown_layer_suggests_names():
    with pytest.raises(LayerNotFoundError, match="Did you mean 'act' or 'act2'"):
        influence_maps(linear_head_adapter(), "act3", n_pairs=2, **KW)
    with pytest.raises(LayerNotFoundError, match="Did you mean"):
        module_influence_maps(linear_head_adapter(), [{"bn3": [0]}], n_pairs=2, **KW)


def test_bad_channels():
    ad = convt_adapter()
    with pytest.raises(ChannelError, match="out of range"):
        influence_maps(ad, "5", channels=[6], n_pairs=2, **KW)
    with pytest.raises(ChannelError, match="no channels"):
        influence_maps(ad, "5", channels=[], n_pairs=2, **KW)
    with pytest.raises(ChannelError, match="Module 'empty'.*no channels"):
        module_influence_maps(ad, {"empty": {"5": []}}, n_pairs=2, **KW)
    with pytest.raises(ChannelError, match="no channels"):
        module_influence_maps(ad, {"empty": {}}, n_pairs=2, **KW)
    with pytest.raises(ConfigError, match="No modules"):
        module_influence_maps(ad, [], n_pairs=2, **KW)
    with pytest.raises(ConfigError, match="GeneratorAdapter"):
        influence_maps(ad.generator, "5", n_pairs=2, **KW)


def test_nan_hybrid_names_unit_and_pair():
    with pytest.raises(GeneratorOutputError, match=r"unit 'layer\[0\]' for pair 0"):
        influence_maps(nan_adapter(), "layer", n_pairs=2, **KW)


def test_nan_original_is_reported():
    with pytest.raises(GeneratorOutputError, match="Original 1 of pair 0"):
        influence_maps(nan_adapter(always=True), "layer", n_pairs=2, **KW)


def test_errors_are_of_the_family():
    with pytest.raises(CfModulesError):
        influence_maps(hand_adapter(), "nope", **KW)


# ---------------------------------------------------------------------- statistics
def test_block_sums_and_chan_merge_equal_numpy_mean_and_variance():
    from cfmodules.influence.stats import BlockSums, RunningStats

    rng = np.random.default_rng(0)
    x = rng.random((3, 23, 4)) * 5 + 100  # units x samples x pixels; large mean
    stats = RunningStats(3, (4,))
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 23)]:  # blocks of 1, 7, 1 and 14 samples
        block = BlockSums(3)
        t = torch.from_numpy(x[:, lo:hi])
        first, last = t[:2], t[2:]  # rows added through a slice and through an index
        block.add(slice(0, 2), first.sum(1), (first * first).sum(1))
        block.add(torch.tensor([2]), last.sum(1), (last * last).sum(1))
        block.merge_into(stats, hi - lo)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(1), rtol=1e-12)
    var = stats.m2.numpy() / 22
    np.testing.assert_allclose(var, x.var(1, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(stats.stderr().numpy(), np.sqrt(x.var(1, ddof=1) / 23), rtol=1e-9)
    assert stats.count.tolist() == [23, 23, 23]
