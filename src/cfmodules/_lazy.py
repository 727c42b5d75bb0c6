"""Names of a package loaded on first use (PEP 562), so that importing it stays cheap.

One mechanism for the packages that re-export their main names lazily (``cfmodules``,
``cfmodules.modules``, ``cfmodules.evaluation``)::

    __getattr__, __dir__ = lazy_names(__name__, {"ModuleClustering": "cfmodules.modules.clustering"},
                                      __all__)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_names(
    package: str,
    homes: Mapping[str, str | None],
    public: Sequence[str],
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazy names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    homes : dict name -> module
        The module that defines each lazy name; ``None`` when the name is a subpackage of
        ``package`` itself (``cfmodules.zoo``).
    public : sequence of str
        What ``dir(package)`` lists (its ``__all__``).

    Returns
    -------
    __getattr__, __dir__
        A name is imported on its first access, then bound in the package, so later
        accesses do not come back here.
    """
    listed = sorted(public)

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        home = homes[name]
        if home is None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return list(listed)

    return __getattr__, __dir__
