"""The library's error family.

Every error that cfmodules raises on purpose derives from :class:`CfModulesError`.
Each subclass also inherits the matching builtin (``KeyError``, ``ValueError``,
``TypeError``, ``RuntimeError``), so ``except ValueError`` in user code keeps working.
Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CfModulesError",
    "LayerNotFoundError",
    "LayerCallError",
    "ChannelError",
    "ModuleError",
    "LatentError",
    "ShapeError",
    "ConfigError",
    "GeneratorOutputError",
    "NondeterministicForwardError",
    "ModelNotAvailableError",
    "NotFittedError",
    "CheckpointError",
    "ResultFileError",
    "MemoryBudgetError",
    "did_you_mean",
]


class CfModulesError(Exception):
    """Root of every error raised on purpose by cfmodules."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that.
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(CfModulesError, KeyError):
    """A layer name does not name a submodule of the generator."""


class LayerCallError(CfModulesError, RuntimeError):
    """A hooked layer ran a number of times per forward that the request cannot handle."""


class ChannelError(CfModulesError, ValueError):
    """Channel indices are out of range, duplicated, empty, or of the wrong type."""


class LatentError(CfModulesError, ValueError):
    """A latent batch has the wrong shape, type or batch size."""


class ShapeError(CfModulesError, ValueError):
    """An array or tensor has a shape the operation cannot use."""


class ConfigError(CfModulesError, ValueError):
    """An argument has a value outside what the operation accepts."""


class ModuleError(ChannelError, ConfigError):
    """A module (a dict layer name -> channel indices) is malformed, empty or out of range.

    Every check of a module raises this one class (:func:`cfmodules.checks.module`); it is
    both a :class:`ChannelError` and a :class:`ConfigError`, so either ``except`` catches it.
    """


class GeneratorOutputError(CfModulesError, RuntimeError):
    """The generator returned something that is not a usable image batch (tuple, NaN, ...)."""


class NondeterministicForwardError(GeneratorOutputError):
    """The generator's forward gives different images for the same latent (it draws noise)."""


class ModelNotAvailableError(CfModulesError, RuntimeError):
    """A zoo model's package or weight file is not installed."""


class NotFittedError(CfModulesError, AttributeError):
    """An estimator was used before ``fit``."""


class CheckpointError(CfModulesError, ValueError):
    """A checkpoint file belongs to another model, layer or configuration."""


class ResultFileError(CfModulesError, ValueError):
    """A results file is missing, truncated, or not a cfmodules file."""


class MemoryBudgetError(CfModulesError, MemoryError):
    """Even the smallest batch of work does not fit the memory given (``max_memory`` or the
    device's): the message says how much one row needs."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'a' or 'b'?"`` for the closest candidates, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"
