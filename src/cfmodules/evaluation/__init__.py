"""Evaluation of hybrids and of classifiers (sec. 4.2, Tables 2-3, Figs. 6, 14, 16).

- :mod:`cfmodules.evaluation.frechet`: Fréchet distances between image sets in the
  feature space of a network, and the hybrid-quality table (Table 2).
- :mod:`cfmodules.evaluation.robustness`: how classifiers answer on hybrids: recognition
  of each original's class, entropy of the top classes, disagreements (Fig. 6, 14, 16, Table 3).
- :mod:`cfmodules.evaluation.scorecard`: a scorecard of modules: localisation and causal
  effect of each module against random channel groups of its size, with bootstrap CIs.
- :mod:`cfmodules.evaluation.plots`: matplotlib figures of these (imports matplotlib lazily).

The main functions are re-exported here and loaded on first access, so
``import cfmodules.evaluation`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfmodules._lazy import lazy_names

_EXPORTS = {
    "frechet_distance": "cfmodules.evaluation.frechet",
    "frechet_distance_images": "cfmodules.evaluation.frechet",
    "feature_statistics": "cfmodules.evaluation.frechet",
    "FeatureStatistics": "cfmodules.evaluation.frechet",
    "default_features": "cfmodules.evaluation.frechet",
    "hybrid_distance_table": "cfmodules.evaluation.frechet",
    "DistanceTable": "cfmodules.evaluation.frechet",
    "classifier_robustness": "cfmodules.evaluation.robustness",
    "robustness_from_probabilities": "cfmodules.evaluation.robustness",
    "RobustnessResult": "cfmodules.evaluation.robustness",
    "scorecard": "cfmodules.evaluation.scorecard",
    "Scorecard": "cfmodules.evaluation.scorecard_result",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.evaluation.frechet import (
        DistanceTable,
        FeatureStatistics,
        default_features,
        feature_statistics,
        frechet_distance,
        frechet_distance_images,
        hybrid_distance_table,
    )
    from cfmodules.evaluation.robustness import (
        RobustnessResult,
        classifier_robustness,
        robustness_from_probabilities,
    )
    from cfmodules.evaluation.scorecard import scorecard
    from cfmodules.evaluation.scorecard_result import Scorecard


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)
