"""Old names kept for one release: they still work and raise a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_module", "moved_names", "warn_renamed", "renamed_function"]


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}.",
                  DeprecationWarning, stacklevel=stacklevel)


def warn_renamed(old: str, new: str, *, stacklevel: int = 2) -> None:
    """Warn, from inside a deprecated function or method, that ``old`` is now ``new``.

    ``stacklevel`` counts as in :func:`warnings.warn` from the function that calls this one:
    2 (default) points the warning at the caller of the deprecated function.
    """
    _warn(old, new, stacklevel=stacklevel + 2)


def renamed_function(new: Callable[..., Any], old: str, new_name: str) -> Callable[..., Any]:
    """A deprecated alias ``old`` of the function ``new`` (same signature)."""
    import functools

    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Any:
        _warn(old, new_name)
        return new(*args, **kwargs)

    alias.__name__ = old.rpartition(".")[2]
    alias.__qualname__ = alias.__name__
    alias.__doc__ = f"Deprecated alias of :func:`{new_name}` (removed in the next release)."
    return alias


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
