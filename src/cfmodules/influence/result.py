"""InfluenceResult: the influence maps of units or modules, and their file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfmodules.display import HtmlRepr
from cfmodules.errors import ResultFileError, ShapeError
from cfmodules.results import _library_version, read_npz, write_npz

__all__ = ["InfluenceResult"]


def _unit_json(channels: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    return {str(layer): [int(c) for c in chs] for layer, chs in channels.items()}


@dataclass
class InfluenceResult(HtmlRepr):
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

    kind = "influence"

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
        self.units = [_unit_json(u) for u in self.units]
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

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, Any]:
        """The JSON header written to the file."""
        return {
            "kind": self.kind,
            "n_pairs": int(self.n_pairs),
            "units": self.units,
            "names": self.names,
            "layer": self.layer,
            "model": self.model,
            "settings": self.settings,
            "version": self.version,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``maps``, ``stderr``, ``influence`` (and ``channels`` for EIMs) to ``path``.

        The file opens with ``numpy.load(path, allow_pickle=False)``; see the module
        docstring for its keys.
        """
        arrays = {"maps": self.maps, "stderr": self.stderr, "influence": self.influence}
        if self.channels is not None:
            arrays["channels"] = self.channels
        return write_npz(path, arrays, self.header())

    @classmethod
    def load(cls, path: str | os.PathLike) -> InfluenceResult:
        """Read a file written by :meth:`save`."""
        arrays, header = read_npz(path, kind=cls.kind)
        try:
            return cls(
                maps=arrays["maps"], stderr=arrays["stderr"], n_pairs=int(header["n_pairs"]),
                units=header["units"], names=header["names"], layer=header.get("layer"),
                model=header.get("model", ""), settings=header.get("settings", {}),
                version=header.get("version", ""),
            )
        except (KeyError, ShapeError) as e:
            raise ResultFileError(f"'{path}' is an incomplete influence result: {e}") from e

    def __repr__(self) -> str:
        u, h, w = self.maps.shape
        what = f"layer={self.layer!r}" if self.layer is not None else f"{u} modules"
        infl = self.influence
        rng = f"{infl.min():.3g}..{infl.max():.3g}" if u else "-"
        se = float(np.nanmax(self.stderr)) if self.n_pairs > 1 and u else float("nan")
        return (f"InfluenceResult({what}, model={self.model!r}, maps {u}x{h}x{w}, "
                f"n_pairs={self.n_pairs}, influence {rng}, max stderr {se:.2g})")
