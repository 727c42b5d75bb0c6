"""The shared argument checks: numpy integers accepted, bools and aliasing seeds refused."""

import numpy as np
import pytest

from cfmodules import checks
from cfmodules.errors import ConfigError


def test_integers_accept_numpy_and_refuse_bool_float_and_out_of_range():
    assert checks.positive_int(np.int64(8), "n_pairs") == 8
    assert type(checks.positive_int(np.int64(8), "n_pairs")) is int
    for bad in (0, -1, True, 2.5, "3", None):
        with pytest.raises(ConfigError, match="n_pairs must be a positive integer"):
            checks.positive_int(bad, "n_pairs")
    assert checks.integer(3, "k", low=2, high=4) == 3
    with pytest.raises(ConfigError, match=r"k must be an integer in \[2, 4\)"):
        checks.integer(4, "k", low=2, high=4)


def test_seeds_that_would_alias_another_stream_are_refused():
    assert checks.seed(np.uint32(2**32 - 1)) == 2**32 - 1
    for bad in (2**32, -1, 1.5, True):
        with pytest.raises(ConfigError, match="seed must be an integer"):
            checks.seed(bad)


def test_one_of_suggests_the_closest_choice():
    with pytest.raises(ConfigError, match="Did you mean 'kmeans'"):
        checks.one_of("kmean", "method", ("nmf", "kmeans"))
    assert checks.one_of("nmf", "method", ("nmf", "kmeans")) == "nmf"
    for bad in (0.0, -1, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError):
            checks.positive_number(bad, "target_stderr")


# ---------------------------------------------------------------------- modules
def test_module_returns_json_ready_lists_from_any_integer_sequence():
    import json

    import torch

    got = checks.module({"a": torch.tensor([3, 1]), "b": np.array([2], dtype=np.int32),
                         "c": range(2), "d": []})
    assert got == {"a": [3, 1], "b": [2], "c": [0, 1], "d": []}
    assert json.loads(json.dumps(got)) == got
    assert all(type(c) is int for chans in got.values() for c in chans)


@pytest.mark.parametrize("value, words", [
    ({}, "has no channels"),
    ([0, 1], "maps layer names"),
    ({"a": [0.5]}, "flat list of integers"),
    ({"a": [[0, 1]]}, "flat list of integers"),
    ({"a": [True]}, "flat list of integers"),
    ({"a": [-2]}, "out of range"),
    ({"a": [1, 1]}, "more than once"),
    ({3: [1]}, "layer names are strings"),
])
def test_every_bad_module_raises_one_class_that_is_both_channel_and_config_error(value, words):
    from cfmodules.errors import ChannelError, ModuleError

    with pytest.raises(ModuleError, match=words) as e:
        checks.module(value)
    assert isinstance(e.value, ChannelError) and isinstance(e.value, ConfigError)


def test_modules_names_a_list_like_every_figure_does():
    from cfmodules.errors import ModuleError
    from cfmodules.names import module_name

    assert module_name(2) == "module 2" and module_name(0, "centre") == "module 0: centre"
    assert list(checks.modules([{"a": [0]}, {"a": [1]}])) == ["module 0", "module 1"]
    assert checks.modules({"eyes": {"a": [0]}}) == {"eyes": {"a": [0]}}
    assert checks.modules({"a": [0, 1]}, allow_single=True) == {"module 0": {"a": [0, 1]}}
    with pytest.raises(ModuleError, match="Module 'x' has no channels in layer 'a'"):
        checks.modules({"x": {"a": []}}, allow_empty=False)
    for bad in ([], "abc", None, {"a": [0, 1]}):  # a bare module only with allow_single
        with pytest.raises(ModuleError):
            checks.modules(bad)


# ---------------------------------------------------------------------- real numbers
def test_real_numbers_within_bounds():
    assert checks.real(np.float32(0.5), "threshold", low=0, high=1, low_open=True) == 0.5
    assert type(checks.real(np.int64(1), "threshold", low=0, high=1)) is float
    assert checks.real(0, "checkpoint_every", low=0) == 0.0
    for bad in (0, 1.5, True, float("nan"), float("inf"), "0.5", None):
        with pytest.raises(ConfigError, match=r"threshold \(the share\) must be a finite "
                                              r"number in \(0, 1\]"):
            checks.real(bad, "threshold", low=0, high=1, low_open=True, meaning="the share")
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        checks.real(-1, "checkpoint_every", low=0)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        checks.real(1.0, "tolerance", low=0, high=1, high_open=True)


def test_window_and_percentile_have_one_check():
    assert checks.window(np.int64(5)) == (5, 5) and checks.window((1, 3)) == (1, 3)
    for bad in (2, 0, -1, True, 3.0, (3,), (3, 4), "3"):
        with pytest.raises(ConfigError, match="window must be a positive odd integer"):
            checks.window(bad)
    assert checks.percentile(np.float32(75)) == 75.0
    for bad in (0, 100, -5, float("nan"), True, "75", None):
        with pytest.raises(ConfigError, match="percentile must be a number strictly between"):
            checks.percentile(bad)


# ---------------------------------------------------------------------- the last hand-written ones
def test_began_sizes_accept_numpy_integers():
    from cfmodules.zoo.began import BEGANDiscriminator, BEGANGenerator

    g = BEGANGenerator(latent_dim=np.int64(8), n_filters=np.int32(4), image_size=np.int64(16),
                       channels=np.uint8(1))
    assert (g.latent_dim, g.n_filters, g.image_size, g.channels) == (8, 4, 16, 1)
    assert all(type(v) is int for v in (g.latent_dim, g.n_filters, g.image_size, g.channels))
    BEGANDiscriminator(latent_dim=np.int64(8), n_filters=np.int64(4), image_size=np.int64(16))
    for bad in ({"latent_dim": 0}, {"n_filters": 2.0}, {"channels": True}, {"image_size": 24},
                {"image_size": 32.0}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            BEGANGenerator(**{"image_size": 16, **bad})


def test_plot_template_strip_max_columns_is_a_config_error():
    from cfmodules import plots

    templates = np.random.default_rng(0).random((3, 2, 4, 4))  # 3 checks, K=2
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ConfigError, match="max_columns must be a positive integer"):
            plots.plot_template_strip(templates, max_columns=bad)
    from matplotlib.text import Text

    fig = plots.plot_template_strip(templates, max_columns=np.int64(2))
    captions = {t.get_text() for t in fig.findobj(Text)}
    assert {"step 0", "step 2"} <= captions and "step 1" not in captions  # 2 columns


def test_biggan_numbers_accept_numpy_and_refuse_the_rest():
    from cfmodules.zoo import biggan

    assert biggan._check_truncation(np.float32(0.5)) == 0.5
    for bad in (0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="truncation"):
            biggan._check_truncation(bad)
    for bad in (2, 4.0, True):
        with pytest.raises(ConfigError, match="channel_width"):
            biggan.biggan_config(channel_width=bad)


def test_the_remaining_numeric_settings_go_through_checks():
    from cfmodules.evaluation.robustness import classifier_robustness
    from cfmodules.influence.maps import InfluenceSettings
    from cfmodules.modules import StabilityResult, suggest_k
    from cfmodules.scan import ScanSettings

    assert InfluenceSettings(target_stderr=np.float32(0.5)).target_stderr == 0.5
    for bad in (0, True, "0.1", float("nan")):
        with pytest.raises(ConfigError, match="target_stderr must be a positive number"):
            InfluenceSettings(target_stderr=bad)
    for bad in (1, -0.1, "0.02", True):
        with pytest.raises(ConfigError, match="tolerance"):
            ScanSettings(tolerance=bad)
    stab = StabilityResult(ks=np.array([2, 3]), methods=["nmf"],
                           consistency=np.ones((1, 2, 2)), cosine=np.ones((1, 2, 2)))
    with pytest.raises(ConfigError, match="tolerance"):
        suggest_k(stab, "nmf", tolerance="0.1")
    with pytest.raises(ConfigError, match="min_confidence"):
        classifier_robustness(None, {"c": lambda x: x}, [{"a": [0]}], 4, min_confidence=1.0)
