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
