"""Pre-processing of influence maps: smoothing and thresholding against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.errors import CfModulesError, ConfigError, ShapeError
from cfmodules.modules import as_maps, preprocess, smooth, threshold


def naive_smooth(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mean over an h x w window centred on each pixel, edges repeated."""
    c, hh, ww = maps.shape
    out = np.zeros_like(maps, dtype=float)
    for i in range(hh):
        for j in range(ww):
            rows = np.clip(np.arange(i - h // 2, i + h // 2 + 1), 0, hh - 1)
            cols = np.clip(np.arange(j - w // 2, j + w // 2 + 1), 0, ww - 1)
            out[:, i, j] = maps[:, rows][:, :, cols].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("window", [3, 5, (1, 3), (3, 5)])
def test_smooth_equals_naive_window_mean(window):
    maps = np.random.default_rng(0).random((4, 7, 9))
    h, w = (window, window) if isinstance(window, int) else window
    np.testing.assert_allclose(smooth(maps, window), naive_smooth(maps, h, w), atol=1e-12)


def test_smooth_by_hand():
    m = np.zeros((1, 3, 3))
    m[0, 1, 1] = 9.0
    out = smooth(m, 3)
    assert np.allclose(out, 1.0)  # every 3x3 window (edges repeated) holds the centre once
    assert np.array_equal(smooth(m, 1), m)


def test_threshold_keeps_top_quarter_and_handles_ties():
    m = np.arange(16, dtype=float).reshape(1, 4, 4)
    b = threshold(m, 75)
    assert b.dtype == np.float64 and set(np.unique(b)) <= {0.0, 1.0}
    # 75th percentile of 0..15 is 11.25: pixels 12..15 are on.
    assert np.array_equal(b.ravel(), (np.arange(16) > 11.25).astype(float))
    assert threshold(m, 50).sum() == 8
    const = np.full((1, 4, 4), 2.0)
    assert threshold(const).sum() == 16  # uniform influence: everywhere
    zero_and_map = np.stack([np.zeros((4, 4)), m[0]])
    assert threshold(zero_and_map)[0].sum() == 0  # a dead channel stays empty


def test_preprocess_is_smooth_then_threshold_and_input_kinds():
    rng = np.random.default_rng(1)
    maps = rng.random((5, 8, 8))
    ref = threshold(smooth(maps, 3), 75)
    assert np.array_equal(preprocess(maps), ref)
    assert np.array_equal(preprocess(torch.from_numpy(maps).float()), ref)

    class Result:  # an influence result: anything with .maps
        def __init__(self, maps):
            self.maps = maps

    assert np.array_equal(preprocess(Result(maps)), ref)
    assert np.array_equal(preprocess(list(maps)), ref)
    np.testing.assert_allclose(preprocess(maps, 3, None), smooth(maps, 3))
    before = maps.copy()
    preprocess(maps)
    assert np.array_equal(maps, before)  # input untouched


@pytest.mark.parametrize("window", [0, 2, -3, 4, (3, 2), (3,), 1.0, True, "3"])
def test_bad_window(window):
    with pytest.raises(ConfigError, match="window"):
        smooth(np.ones((2, 8, 8)), window)


def test_window_larger_than_map():
    with pytest.raises(ConfigError, match="larger than the maps"):
        smooth(np.ones((2, 4, 4)), 5)


@pytest.mark.parametrize("percentile", [0, 100, -5, 150, None, "75", True])
def test_bad_percentile(percentile):
    with pytest.raises(ConfigError, match="percentile"):
        threshold(np.ones((2, 4, 4)), percentile)


def test_bad_maps():
    with pytest.raises(ConfigError, match="NaN"):
        as_maps(np.array([[[0.0, np.nan]]]))
    with pytest.raises(ConfigError, match="All 3 influence maps are zero"):
        preprocess(np.zeros((3, 4, 4)))
    with pytest.raises(ShapeError, match="different shapes"):
        as_maps([np.ones((4, 4)), np.ones((4, 5))])
    with pytest.raises(ShapeError, match=r"maps\[None\]"):
        as_maps(np.ones((4, 4)))
    with pytest.raises(ShapeError, match="empty"):
        as_maps(np.ones((0, 4, 4)))
    with pytest.raises(ShapeError, match="numeric"):
        as_maps([["a", "b"]])
    with pytest.raises(CfModulesError):  # every one of them is of the library's family
        as_maps(np.ones((2, 2, 2, 2)))
