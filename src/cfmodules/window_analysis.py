"""Modules of a diffusion model per window of sampling steps: one analysis per window.

Which channels shape the layout (early steps) and which the detail (late steps):
:func:`analyze_windows` runs :func:`cfmodules.analysis.analyze` once per window, with the
same layer, pairs and settings; ``report.write_window_report`` lays them side by side.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfmodules.adapter import GeneratorAdapter
from cfmodules.analysis import AnalysisResult, AnalysisSettings, analyze
from cfmodules.errors import ConfigError
from cfmodules.samplers import WINDOWS, is_diffusion

__all__ = ["analyze_windows"]


def analyze_windows(
    adapter: GeneratorAdapter,
    layers: str | Sequence[str] | None = None,
    settings: AnalysisSettings | None = None,
    *,
    windows: Sequence[Any] = WINDOWS[1:],
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, AnalysisResult]:
    """One :func:`analyze` of a diffusion model per window of sampling steps.

    Which channels shape the layout (early steps) and which the texture (late steps): the
    same layer, the same latent pairs and settings, the channels swapped in a different
    window each time. ``report.write_window_report`` shows the results side by side.

    Parameters
    ----------
    adapter : DiffusionAdapter
    layers, settings, progress, options
        As for :func:`analyze` (``checkpoint_dir`` gets one subfolder per window).
    windows : sequence, default ("early", "middle", "late")
        Named windows or lists of steps.

    Returns
    -------
    dict window name -> AnalysisResult
        In the order of ``windows``.

    Raises
    ------
    ConfigError
        Not a diffusion model, no window, or two windows with the same steps.
    """
    if not is_diffusion(adapter):
        raise ConfigError(f"analyze_windows() is for diffusion models (a DiffusionAdapter); "
                          f"{getattr(adapter, 'name', type(adapter).__name__)} runs in one "
                          "forward: use analyze().")
    views = [adapter.with_window(w) for w in windows]  # type: ignore[attr-defined]
    names = [v.window_name for v in views]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"Give one or more distinct windows, got {list(windows)!r}.")
    out: dict[str, AnalysisResult] = {}
    for name, view in zip(names, views):
        if progress:
            print(f"== window {name}: steps {list(view.window)}", file=sys.stderr, flush=True)
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / name.replace(" ", "_")
        res = analyze(view, layers, settings, checkpoint_dir=ckpt, progress=progress, **options)
        if res is not None:
            out[name] = res
    return out
