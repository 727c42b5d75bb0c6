"""Influence maps: how much each unit or module of a generator changes its output.

:func:`influence_maps` computes the elementary influence maps (EIMs) of the channels of a
layer, :func:`module_influence` the influence maps of modules (groups of channels of one or
several layers), both as an :class:`~cfmodules.results.InfluenceResult`.
"""

from cfmodules.influence.maps import (
    DEFAULT_MAX_BATCH_BYTES,
    InfluenceProgress,
    InfluenceSettings,
    influence_maps,
    module_influence,
    pair_latents,
)
from cfmodules.influence.result import InfluenceResult

__all__ = [
    "influence_maps",
    "module_influence",
    "pair_latents",
    "InfluenceResult",
    "InfluenceSettings",
    "InfluenceProgress",
    "DEFAULT_MAX_BATCH_BYTES",
]
