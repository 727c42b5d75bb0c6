"""Old names kept for one release: they still work and raise a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_module", "moved_names"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}.",
                  DeprecationWarning, stacklevel=3)


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a module moved from ``old`` to ``new``."""

    def __getattr__(name: str) -> Any:
        target = importlib.import_module(new)
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module '{old}' has no attribute '{name}'")
        _warn(f"{old}.{name}", f"{new}.{name}")
        return getattr(target, name)

    return __getattr__


def moved_names(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names of ``module`` that now live elsewhere.

    ``names`` maps an old name to ``"package.module:new_name"``.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module '{module}' has no attribute '{name}'")
        target, _, new_name = names[name].partition(":")
        _warn(f"{module}.{name}", f"{target}.{new_name}")
        return getattr(importlib.import_module(target), new_name)

    return __getattr__
