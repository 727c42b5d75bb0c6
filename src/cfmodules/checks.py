"""Argument checks shared by the whole package: one place for each rule.

Each check returns the value normalised (a numpy integer becomes an ``int``, a module's
channels plain lists ready for JSON) or raises an error of the library's family saying
what was wrong and what is accepted: :class:`~cfmodules.errors.ConfigError`, and
:class:`~cfmodules.errors.ModuleError` for modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cfmodules.errors import ConfigError, ModuleError, did_you_mean
from cfmodules.names import module_name

if TYPE_CHECKING:
    import torch

__all__ = ["integer", "positive_int", "seed", "positive_number", "real", "one_of",
           "clustering_method",
           "window", "percentile", "module", "modules", "device", "output_range", "SEED_LIMIT",
           "CLUSTERING_METHODS", "CLUSTERING_BACKENDS", "DEFAULT_WINDOW", "DEFAULT_PERCENTILE"]

CLUSTERING_METHODS = ("nmf", "kmeans")
"""The clustering methods of influence maps: NMF (the paper's) and k-means (its baseline)."""
CLUSTERING_BACKENDS = ("fast", "sklearn")
"""Engines of the clustering: ``"fast"`` (default) and ``"sklearn"`` (the reference)."""
DEFAULT_WINDOW = 3
"""Smoothing window (pixels) of the influence maps before clustering."""
DEFAULT_PERCENTILE = 75.0
"""Threshold percentile of each smoothed map before clustering (the paper's)."""

_MODULE_EXAMPLE = "e.g. {'main.8': [0, 5, 9]} (one or several layers)"

SEED_LIMIT = 2**32
"""Seeds are integers in ``[0, 2**32)``: every one of them names its own latent stream."""


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` with ``low <= value < high`` (Python or numpy integer, not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v >= high):
        rng = (f">= {low}" if high is None else f"< {high}" if low is None
               else f"in [{low}, {high})")
        raise ConfigError(f"{name} must be an integer {rng}, got {value!r}.")
    return v


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in ``[0, 2**32)`` (larger or negative ones would alias others)."""
    return integer(value, name, low=0, high=SEED_LIMIT)


def positive_number(value: Any, name: str) -> float:
    """``value`` as a finite ``float`` > 0."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not float(value) > 0 or float(value) == float("inf")):
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False, meaning: str = "") -> float:
    """``value`` as a finite ``float`` within ``[low, high]`` (Python or numpy number, not bool).

    ``low_open`` / ``high_open`` exclude a bound; ``meaning`` (e.g. "the share of a map's
    mass inside the region") is said in the message.
    """
    v = float(value) if (isinstance(value, numbers.Real) and not isinstance(value, bool)) else None
    ok = v is not None and np.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        if low is not None and high is not None:
            rng = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rng = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            rng = f" {'<' if high_open else '<='} {high:g}"
        else:
            rng = ""
        what = f" ({meaning})" if meaning else ""
        raise ConfigError(f"{name}{what} must be a finite number{rng}, got {value!r}.")
    return float(v)  # type: ignore[arg-type]


def one_of(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (with a 'did you mean' otherwise)."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        hint = did_you_mean(value, options) if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}, got "
                          f"{value!r}.{hint}")
    return value


def clustering_method(value: Any, name: str = "method") -> str:
    """``"nmf"`` or ``"kmeans"`` (the clustering method; the influence algorithm is another
    argument, ``algorithm``)."""
    if not isinstance(value, str) or value not in CLUSTERING_METHODS:
        hint = did_you_mean(value, CLUSTERING_METHODS) if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be 'nmf' or 'kmeans', got {value!r}.{hint}")
    return value


def window(value: Any) -> tuple[int, int]:
    """A smoothing window: a positive odd integer or a pair of them; returned as (height, width).

    Odd, so that the window is centred on its pixel.
    """
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 and w % 2 == 1
            for w in pair):
        raise ConfigError(
            f"window must be a positive odd integer (or a pair of them, height and width) so "
            f"the window is centred on its pixel; got {value!r}. Use 1 for no smoothing.")
    return int(pair[0]), int(pair[1])


def percentile(value: Any) -> float:
    """A threshold percentile, strictly between 0 and 100, as a ``float``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0 < float(value) < 100):
        raise ConfigError(f"percentile must be a number strictly between 0 and 100 (the paper "
                          f"uses 75); got {value!r}.")
    return float(value)


def module(value: Any, name: str = "module", *, allow_empty: bool = True) -> dict[str, list[int]]:
    """A module: a non-empty dict layer name -> channel indices, as plain lists (JSON-ready).

    This is the one structural check of a module (the range of each channel needs the
    generator: :func:`cfmodules.hybrid.module_channels`).

    Parameters
    ----------
    value : Mapping[str, sequence of int]
        Channels as a list, range, numpy array or 1-d integer tensor.
    name : str
        What to call the module in messages (``"module 0"``, a user's key).
    allow_empty : bool, default True
        Whether a layer may list no channel (a hybrid of no channel is Original 1).

    Returns
    -------
    dict str -> list of int

    Raises
    ------
    ModuleError
        Not a non-empty mapping of layer names, channels that are not a flat list of
        distinct non-negative integers, or (unless ``allow_empty``) a layer without channels.
    """
    if not isinstance(value, Mapping) or not value:
        what = "has no channels" if isinstance(value, Mapping) else f"is {value!r}"
        raise ModuleError(f"{_cap(name)} {what}: a module maps layer names to channel indices "
                          f"(a dict layer -> channels), {_MODULE_EXAMPLE}.")
    out: dict[str, list[int]] = {}
    for layer, channels in value.items():
        if not isinstance(layer, str):
            raise ModuleError(f"{_cap(name)} has layer {layer!r}: layer names are strings, "
                              f"{_MODULE_EXAMPLE}.")
        out[layer] = _channel_list(channels, layer, name)
        if not out[layer] and not allow_empty:
            raise ModuleError(f"{_cap(name)} has no channels in layer '{layer}'; give at "
                              "least one.")
    return out


def modules(value: Any, *, allow_empty: bool = True, allow_single: bool = False
            ) -> dict[str, dict[str, list[int]]]:
    """Named modules from a dict name -> module, a list of modules, or (with ``allow_single``)
    one module.

    A list's modules are named :func:`cfmodules.names.module_name` (``"module 0"``, ...);
    with ``allow_single``, a single module (a dict whose values are channel lists) becomes
    ``{"module 0": it}``.

    Raises
    ------
    ModuleError
        For no modules, or a malformed one (see :func:`module`).
    """
    if allow_single and isinstance(value, Mapping) and value and not any(
            isinstance(v, Mapping) for v in value.values()):
        items: list[tuple[str, Any]] = [(module_name(0), value)]
    elif isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = [(module_name(k), v) for k, v in enumerate(value)]
    else:
        raise ModuleError(
            "modules must be a list of modules or a dict name -> module, each module a dict "
            f"layer -> channel indices, e.g. [{{'main.8': [0, 3]}}, {{'main.8': [1, 2]}}]; got "
            f"{type(value).__name__}.")
    if not items:
        raise ModuleError("No modules given; pass at least one {layer: channels} module.")
    return {key: module(m, f"module '{key}'", allow_empty=allow_empty) for key, m in items}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _channel_list(channels: Any, layer: str, name: str) -> list[int]:
    raw = channels.tolist() if hasattr(channels, "tolist") else channels
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raw = [raw] if isinstance(raw, numbers.Integral) and not isinstance(raw, bool) else None
    arr = np.asarray(list(raw)) if raw is not None else None
    if arr is None or arr.ndim != 1 or (arr.size and (
            arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer))):
        raise ModuleError(f"The channels of layer '{layer}' in {name} must be a flat list of "
                          f"integers, got {channels!r}.")
    if arr.size and int(arr.min()) < 0:
        raise ModuleError(f"Channel(s) {sorted(int(c) for c in arr if c < 0)[:5]} out of range "
                          f"for layer '{layer}' in {name}: channel indices are >= 0.")
    values = [int(c) for c in arr]
    if len(set(values)) != len(values):
        dup = sorted({c for c in values if values.count(c) > 1})
        raise ModuleError(f"Channel(s) {dup[:5]} of layer '{layer}' are listed more than once "
                          f"in {name}.")
    return values


def _available_devices() -> str:
    import torch

    names = ["'cpu'"]
    if torch.cuda.is_available():
        names += [f"'cuda:{i}'" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("'mps'")
    return ", ".join(names)


def device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` that exists on this machine (not ``meta``).

    Raises ConfigError for unknown names (``"gpu"``), ``"cuda:3"`` on a machine without
    that device, and ``"meta"``, listing the devices available here.
    """
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"Unknown {name} {value!r}. Devices available here: "
                          f"{_available_devices()}.") from e
    if dev.type == "meta":
        raise ConfigError(f"{name}='meta' has no values to compute with; choose one of the "
                          f"devices available here: {_available_devices()}.")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            have = f"this machine has {count} CUDA device(s)" if count else "CUDA is not available"
            raise ConfigError(f"{name}={str(dev)!r}, but {have}. Devices available here: "
                              f"{_available_devices()}.")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            raise ConfigError(f"{name}={str(dev)!r}, but {dev.type} is not available here. "
                              f"Devices available here: {_available_devices()}.")
    return dev


def output_range(value: object) -> tuple[float, float]:
    """``(low, high)`` as floats, finite, low < high (raises ConfigError)."""
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):  # an array or tensor
        value = tuple(value.tolist())
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
        for v in value))
    if not ok or not float(value[1]) > float(value[0]):  # type: ignore[index]
        raise ConfigError(
            f"output_range must be (low, high), two finite numbers with low < high, e.g. "
            f"(-1, 1) for tanh outputs or (0, 1) for sigmoid ones; got {value!r}."
        )
    return float(value[0]), float(value[1])  # type: ignore[index]
