"""Pre-processing of influence maps before clustering (sec. 3.4 of Besserve et al., 2020).

Each elementary influence map (EIM) is (1) smoothed by local averaging over a small
rectangular sliding window, then (2) thresholded at a percentile of its own values (75 by
default) to give a binary map of the pixels the channel influences most. The binary maps,
flattened, are the rows of the (channels x pixels) matrix that NMF or k-means factorizes.

Everything here works on arrays: numpy arrays or torch tensors of shape (C, H, W), or any
object with a ``.maps`` attribute holding such an array (an influence result). Results are
float64 numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfmodules import checks
from cfmodules.errors import ConfigError, ShapeError

__all__ = [
    "as_maps",
    "smooth",
    "threshold",
    "preprocess",
    "check_window",
    "check_percentile",
    "check_count",
]

DEFAULT_WINDOW = checks.DEFAULT_WINDOW
DEFAULT_PERCENTILE = checks.DEFAULT_PERCENTILE
check_window = checks.window
"""Validate a smoothing window (:func:`cfmodules.checks.window`)."""
check_percentile = checks.percentile
"""Validate a threshold percentile (:func:`cfmodules.checks.percentile`)."""


def as_maps(maps: Any, what: str = "influence maps") -> np.ndarray:
    """Validate influence maps and return them as a float64 numpy array (C, H, W).

    Parameters
    ----------
    maps : array-like (C, H, W), torch.Tensor (C, H, W), or an object with ``.maps``
        One map per channel. A list of 2-D maps is stacked (they must share one shape).
    what : str
        How to call the input in error messages.

    Returns
    -------
    numpy.ndarray (C, H, W), float64
        A copy; the input is never modified.

    Raises
    ------
    ShapeError
        Not three-dimensional, empty, or a list of maps of different shapes.
    ConfigError
        NaN or infinite values, or every map identically zero.
    """
    if hasattr(maps, "maps") and not isinstance(maps, np.ndarray):
        maps = maps.maps
    if _is_tensor(maps):
        maps = maps.detach().to("cpu").double().numpy()
    elif isinstance(maps, (list, tuple)):
        items = [
            m.detach().to("cpu").double().numpy() if _is_tensor(m) else np.asarray(m)
            for m in maps
        ]
        shapes = sorted({tuple(m.shape) for m in items})
        if len(shapes) > 1:
            raise ShapeError(
                f"The {what} have different shapes {shapes[:4]}; every map must have the same "
                "(H, W), e.g. all computed at the same layer and output resolution."
            )
        maps = np.stack(items) if items else np.zeros((0, 0, 0))
    if hasattr(maps, "toarray") and hasattr(maps, "nnz"):
        raise ShapeError(f"Sparse {what} are not supported; pass a dense array (.toarray()).")
    try:
        if np.iscomplexobj(maps):  # float64 would silently drop the imaginary part
            raise ShapeError(f"Complex data not supported: the {what} must be real numbers.")
        arr = np.array(maps, dtype=np.float64)
    except (TypeError, ValueError) as err:
        if isinstance(err, ShapeError):
            raise
        raise ShapeError(
            f"The {what} must be a numeric array (C, H, W), got {type(maps).__name__} ({err})."
        ) from None
    if arr.ndim != 3:
        raise ShapeError(
            f"The {what} must have shape (channels, height, width), got shape {arr.shape}."
            + (" Add a channel axis with maps[None] for a single map." if arr.ndim == 2 else "")
        )
    if arr.size == 0:
        raise ShapeError(f"The {what} are empty (shape {arr.shape}).")
    bad = ~np.isfinite(arr)
    if bad.any():
        channels = np.unique(np.nonzero(bad)[0])
        raise ConfigError(
            f"The {what} contain NaN or infinite values (channels {channels[:8].tolist()}"
            f"{'...' if len(channels) > 8 else ''}). Recompute them: a generator producing NaN "
            "outputs, or an interrupted computation, leaves such values."
        )
    if not arr.any():
        raise ConfigError(
            f"All {len(arr)} {what} are zero: the channels have no effect on the output, so "
            "there is nothing to cluster. Check the layer (does it reach the output? is it "
            "after the last layer?) and that the maps were computed with at least one pair."
        )
    return arr


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def check_count(name: str, value: object, low: int = 1) -> int:
    """An integer parameter (``n_init``, ``n_repeats``, ...) that must be >= ``low``."""
    return checks.integer(value, name, low=low)


def smooth(maps: Any, window: int | tuple[int, int] = DEFAULT_WINDOW) -> np.ndarray:
    """Local average of each map over a rectangular sliding window.

    Parameters
    ----------
    maps : array (C, H, W), tensor, or object with ``.maps``
    window : odd int or (odd int, odd int), default 3
        Window height and width in pixels, centred on each pixel. 1 leaves maps unchanged.
        Near the border the window is filled by repeating the edge pixels.

    Returns
    -------
    numpy.ndarray (C, H, W), float64
    """
    h, w = check_window(window)
    arr = as_maps(maps)
    if h > arr.shape[1] or w > arr.shape[2]:
        raise ConfigError(
            f"The smoothing window {(h, w)} is larger than the maps {arr.shape[1:]}; use a "
            "small window (3 or 5 pixels for 64x64 maps)."
        )
    if (h, w) == (1, 1):
        return arr
    from scipy import ndimage  # here: the clustering's worker processes never smooth

    return ndimage.uniform_filter(arr, size=(1, h, w), mode="nearest")


def threshold(maps: Any, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
    """Binary map of the pixels above a percentile of each map's own values.

    Pixel (c, i, j) is 1 when ``maps[c, i, j]`` is strictly above the ``percentile``-th
    percentile of map c, else 0; so about ``100 - percentile`` % of each map's pixels are 1.
    Where ties make that set empty (a constant map, or a plateau at the top), the pixels
    equal to the percentile count as well, so a map that influences the image uniformly
    is all ones. A map that is zero everywhere (a dead channel) stays all zeros.

    Parameters
    ----------
    maps : array (C, H, W), tensor, or object with ``.maps``
    percentile : float in (0, 100), default 75

    Returns
    -------
    numpy.ndarray (C, H, W), float64 of 0.0 and 1.0
    """
    q = check_percentile(percentile)
    arr = as_maps(maps)
    flat = arr.reshape(len(arr), -1)
    cut = np.percentile(flat, q, axis=1)[:, None]
    binary = flat > cut
    empty = ~binary.any(axis=1) & (flat.max(axis=1) > 0)
    binary[empty] = flat[empty] >= cut[empty]
    return binary.reshape(arr.shape).astype(np.float64)


def preprocess(
    maps: Any,
    window: int | tuple[int, int] = DEFAULT_WINDOW,
    percentile: float | None = DEFAULT_PERCENTILE,
) -> np.ndarray:
    """Smooth, then threshold: the paper's pre-processing of influence maps.

    Parameters
    ----------
    maps : array (C, H, W), tensor, or object with ``.maps``
    window : odd int or pair, default 3
        See :func:`smooth`; 1 skips smoothing.
    percentile : float in (0, 100) or None, default 75
        See :func:`threshold`; None skips thresholding (the smoothed maps are returned).

    Returns
    -------
    numpy.ndarray (C, H, W), float64
        Binary maps (0.0 / 1.0), or smoothed maps when ``percentile`` is None.
    """
    check_window(window)
    if percentile is not None:
        check_percentile(percentile)
    out = smooth(maps, window)
    return out if percentile is None else threshold(out, percentile)
