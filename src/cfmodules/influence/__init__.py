"""Influence maps: how much each unit or module of a generator changes its output.

:func:`influence_maps` computes the elementary influence maps (EIMs) of the channels of a
layer, :func:`module_influence_maps` the influence maps of modules (groups of channels of
one or several layers), both as an :class:`~cfmodules.influence.InfluenceResult`. Pairs
of latents come from :func:`cfmodules.latents.pair_latents`.
"""

from cfmodules.influence.maps import (
    ALGORITHMS,
    InfluenceProgress,
    InfluenceSettings,
    influence_maps,
    module_influence_maps,
)
from cfmodules.influence.memory import MemoryPlan, parse_memory
from cfmodules.influence.result import InfluenceResult

__all__ = [
    "influence_maps",
    "module_influence_maps",
    "InfluenceResult",
    "InfluenceSettings",
    "InfluenceProgress",
    "ALGORITHMS",
    "MemoryPlan",
    "parse_memory",
]
