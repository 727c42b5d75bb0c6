"""Evaluation of hybrids and of classifiers (sec. 4.2, Tables 2-3, Figs. 6, 14, 16).

- :mod:`cfmodules.evaluation.frechet`: Fréchet distances between image sets in the
  feature space of a network, and the hybrid-quality table (Table 2).
- :mod:`cfmodules.evaluation.robustness`: how classifiers answer on hybrids: recognition
  of each original's class, entropy of the top classes, disagreements (Fig. 6, 14, 16, Table 3).
- :mod:`cfmodules.evaluation.plots`: matplotlib figures of both (imports matplotlib lazily).

Nothing is imported here, so ``import cfmodules.evaluation`` stays cheap.
"""

__all__ = ["frechet", "robustness", "plots"]
