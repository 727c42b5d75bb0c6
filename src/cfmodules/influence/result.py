"""InfluenceResult: the influence maps of units or modules, and their file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cfmodules import checks
from cfmodules.errors import ShapeError
from cfmodules.results import Result, _library_version

__all__ = ["InfluenceResult"]


@dataclass(repr=False)
class InfluenceResult(Result):
    """Influence maps of units or modules (Besserve et al. 2020, eq. 2, sec. 3.3-3.4).

    Row ``i`` is the influence map of ``units[i]``: the mean over latent pairs of
    ``|Y_{E <- z2}(z1) - Y(z1)|``, averaged over colour channels, at output resolution.

    Attributes
    ----------
    maps : ndarray (U, H, W) float32
        Influence maps (for single-channel units: elementary influence maps, EIMs).
    stderr : ndarray (U, H, W) float32
        Per-pixel standard error of ``maps`` over pairs (sample std / sqrt(n_pairs));
        NaN when ``n_pairs == 1``.
    n_pairs : int
        Number of (z1, z2) pairs the maps average over.
    units : list of dict
        ``units[i]`` maps layer name -> channel indices of row ``i``.
    names : list of str
        A name per row: ``"main.8[5]"`` for channel 5 of ``main.8``, or the module's name.
    layer : str or None
        The layer, when every row is a single channel of one layer (EIMs).
    model : str
        The adapter's name.
    settings : dict
        The settings of the run (seed, pairs per block, method, dtype, ...).
    version : str
        cfmodules version that computed the maps.
    """

    maps: np.ndarray
    stderr: np.ndarray
    n_pairs: int
    units: list[dict[str, list[int]]]
    names: list[str]
    layer: str | None = None
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    kind: ClassVar[str] = "influence"

    def __post_init__(self) -> None:
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.stderr = np.asarray(self.stderr, dtype=np.float32)
        if self.maps.ndim != 3 or self.stderr.shape != self.maps.shape:
            raise ShapeError(
                f"maps and stderr must both be (U, H, W); got {self.maps.shape} and "
                f"{self.stderr.shape}."
            )
        if len(self.units) != self.maps.shape[0] or len(self.names) != self.maps.shape[0]:
            raise ShapeError(
                f"{self.maps.shape[0]} maps but {len(self.units)} units and "
                f"{len(self.names)} names."
            )
        self.units = [checks.module(u, f"unit '{n}'") for u, n in zip(self.units, self.names)]
        self.names = [str(n) for n in self.names]
        if not self.version:
            self.version = _library_version()

    # ------------------------------------------------------------------ derived
    @property
    def influence(self) -> np.ndarray:
        """(U,) individual influence: each map's mean over pixels (sec. 3.3)."""
        return self.maps.mean(axis=(1, 2))

    @property
    def channels(self) -> np.ndarray | None:
        """(U,) channel index of each row when the rows are EIMs of one layer, else None."""
        if self.layer is None:
            return None
        return np.array([u[self.layer][0] for u in self.units], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def _html_figures(self) -> dict[str, Any]:
        from cfmodules.plots import plot_influence_maps

        order = np.argsort(-self.influence, kind="stable")[:40]
        return {f"The {len(order)} most influential of {len(self)} influence maps":
                lambda: plot_influence_maps(self.maps[order],
                                            names=[self.names[i] for i in order])}

    # ------------------------------------------------------------------ files, text
    def _derived(self) -> dict[str, Any]:
        out: dict[str, Any] = {"influence": self.influence.astype(np.float32)}
        if self.channels is not None:
            out["channels"] = self.channels
        return out

    def to_text(self, top: int = 10) -> str:
        """The summary line and the ``top`` rows of largest influence."""
        lines = [repr(self)]
        infl = self.influence
        for i in np.argsort(-infl, kind="stable")[:top]:
            lines.append(f"  {self.names[i]:<24} influence {infl[i]:.4g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        u, h, w = self.maps.shape
        what = f"layer={self.layer!r}" if self.layer is not None else f"{u} modules"
        infl = self.influence
        rng = f"{infl.min():.3g}..{infl.max():.3g}" if u else "-"
        se = float(np.nanmax(self.stderr)) if self.n_pairs > 1 and u else float("nan")
        return (f"InfluenceResult({what}, model={self.model!r}, maps {u}x{h}x{w}, "
                f"n_pairs={self.n_pairs}, influence {rng}, max stderr {se:.2g})")
