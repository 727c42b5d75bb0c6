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
