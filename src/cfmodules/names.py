"""The names cfmodules shows to people: one spelling for each thing, in every figure,
table, file and message.

A *unit* is one channel of one layer, named ``"main.8[5]"``; a *module* is a group of
units, named ``"module 0"``, ``"module 1"``, ... (numbered from 0, by decreasing size when
they come from a clustering), optionally followed by where its template lies
(``"module 0: centre"``). Code that needs a module's name calls :func:`module_name`;
user-given names (the keys of a ``{name: module}`` dict) are kept as given.
"""

from __future__ import annotations

__all__ = ["module_name", "unit_name"]


def module_name(k: int, location: str | None = None) -> str:
    """Display name of module ``k``: ``"module k"``, or ``"module k: <location>"``.

    Parameters
    ----------
    k : int
        The module's index (0-based).
    location : str, optional
        Where its template lies, e.g. ``"centre"``
        (:func:`cfmodules.analysis.template_location`).
    """
    name = f"module {int(k)}"
    return f"{name}: {location}" if location else name


def unit_name(layer: str, channel: int) -> str:
    """Display name of channel ``channel`` of ``layer``: ``"main.8[5]"``."""
    return f"{layer}[{int(channel)}]"
