"""Shared pieces of the explorer tests: one small analysis of the planted conv generator."""

from __future__ import annotations

import functools

from cfmodules import zoo
from cfmodules.analysis import AnalysisResult, analyze


@functools.lru_cache(maxsize=1)
def planted_analysis() -> tuple[object, AnalysisResult]:
    """(adapter, result) of planted-conv: 3 planted modules of 8 channels in main.3 (16x16).

    Channel group k (channels 8k .. 8k+7) paints only region k of the image,
    ``adapter.generator.regions[k]``: the ground truth of a painted selection.
    """
    adapter = zoo.load("planted-conv")
    result = analyze(adapter, n_pairs=4, stability_ks=(), n_init=1, n_hybrids=2, n_samples=2,
                     progress=False)
    return adapter, result
