"""Argument checks shared by the whole package: one place for each rule.

Each check returns the value normalised (a numpy integer becomes an ``int``) or raises
:class:`~cfmodules.errors.ConfigError` saying what was wrong and what is accepted.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cfmodules.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = ["integer", "positive_int", "seed", "positive_number", "one_of", "device",
           "SEED_LIMIT"]

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


def one_of(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (with a 'did you mean' otherwise)."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        hint = did_you_mean(value, options) if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}, got "
                          f"{value!r}.{hint}")
    return value


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
