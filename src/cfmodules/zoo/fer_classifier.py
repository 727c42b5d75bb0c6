"""Deprecated alias of :mod:`cfmodules.evaluation.fer` (moved there; this name works for one release)."""

from cfmodules._deprecation import moved_module

__getattr__ = moved_module("cfmodules.zoo.fer_classifier", "cfmodules.evaluation.fer")
