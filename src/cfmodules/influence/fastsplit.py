"""Deprecated alias of :mod:`cfmodules.engine.fast` (moved there; this name works for one release)."""

from cfmodules._deprecation import moved_module

__getattr__ = moved_module("cfmodules.influence.fastsplit", "cfmodules.engine.fast")
