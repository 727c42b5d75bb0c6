"""What an analysis is run with and what it gives: :class:`AnalysisSettings` and
:class:`AnalysisResult`.

:func:`cfmodules.analysis.analyze` takes the settings and builds the result once, at the
end; ``AnalysisResult.save`` writes every number and the images the report shows to one
``.npz`` file (arrays plus a JSON header, no pickle) that ``AnalysisResult.load`` and
``numpy.load`` read. Both are re-exported by :mod:`cfmodules.analysis`, their usual home
for imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cfmodules import checks
from cfmodules.errors import ConfigError, ResultFileError, ShapeError
from cfmodules.modules.settings import ClusteringSettings
from cfmodules.names import module_name, unit_name
from cfmodules.results import Result

__all__ = ["AnalysisSettings", "AnalysisResult", "template_location", "KIND"]

KIND = "analysis"


@dataclass(frozen=True, kw_only=True)
class AnalysisSettings(ClusteringSettings):
    """Everything that decides the numbers of an analysis.

    A :class:`~cfmodules.modules.ClusteringSettings` (method, window, percentile, n_init,
    max_iter, backend and seed, which also draws the latent pairs) with the fields below;
    keywords only.

    Attributes
    ----------
    n_pairs : int, default 64
        Latent pairs (z1, z2) each influence map averages over.
    n_modules : int, default 3
        K, the number of modules (the paper's choice for faces).
    n_init : int, default 10
        Restarts of the clustering (the best fit is kept); the sweep's fits keep 3 each.
    stability_ks : tuple of int, default (2, 3, 4, 5, 6)
        Numbers of modules of the stability sweep (Fig. 9); empty: no sweep.
    stability_methods : tuple of str, default ("nmf", "kmeans")
    stability_repeats : int, default 10
        Random three-way splits per K (the paper used 20; each costs two clusterings per
        K and method).
    stability_pool : int, default 1
        NMF of the sweep on maps averaged over pool x pool pixel blocks (faster, an
        approximation: see :func:`cfmodules.modules.cluster_stability`); 1: exact.
    n_samples : int, default 16
        Samples of the model shown in the report.
    n_hybrids : int, default 8
        Pairs hybridized per module for the report; they are pairs ``n_pairs ..
        n_pairs + n_hybrids - 1`` of the latent stream ``seed``, so none was used to
        compute the maps.
    """

    n_pairs: int = 64
    n_modules: int = 3
    stability_ks: tuple[int, ...] = (2, 3, 4, 5, 6)
    stability_methods: tuple[str, ...] = ("nmf", "kmeans")
    stability_repeats: int = 10
    stability_pool: int = 1
    n_samples: int = 16
    n_hybrids: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_ints("n_pairs", "n_modules", "stability_repeats", "stability_pool",
                            "n_samples", "n_hybrids")
        self._positive_int_tuple("stability_ks")
        self._set("stability_methods", tuple(
            checks.clustering_method(m, "each of stability_methods")
            for m in self.stability_methods))
        if not self.stability_methods:
            raise ConfigError("stability_methods must name 'nmf' and/or 'kmeans', got ().")


# ---------------------------------------------------------------------- result
def _array(dtype: Any) -> Any:
    """A field holding an array, stored in the file with ``dtype``."""
    return field(metadata={"dtype": dtype})


def _scan_from_dict(data: Any) -> Any:
    from cfmodules.scan import ScanResult

    return data if isinstance(data, ScanResult) else ScanResult.from_dict(data)


def _stability_from_dict(data: Mapping[str, Any]) -> Any:
    from cfmodules.modules import StabilityResult

    return StabilityResult.from_dict(data)


@dataclass(repr=False)
class AnalysisResult(Result):
    """Everything one analysis computed: what was analysed, the numbers, images for display.

    The fields below are the whole content, listed once: ``to_dict``, ``save`` and ``load``
    (:class:`cfmodules.results.Result`) walk them, so the file holds exactly these (plus the
    derived ``influence``, ``module_influence``, ``module_sizes``, ``modules``,
    ``module_names`` and ``suggested_k`` for readers with numpy only).

    Attributes
    ----------
    model : str
        Name of the model (``adapter.name``).
    model_spec : str
        How to load it again: a zoo name or ``path/to/file.py:factory``.
    layers : list of str
        The layer(s) whose channels were intervened on.
    settings : AnalysisSettings
    maps : ndarray (C, H, W) float32
        Elementary influence map of each unit (channel), at output resolution.
    stderr : ndarray (C, H, W) float32
        Per-pixel standard error of ``maps`` over the pairs.
    unit_layer : ndarray (C,) of str
        Layer of each unit (row of ``maps``).
    unit_channel : ndarray (C,) of int
        Channel of each unit inside its layer.
    labels : ndarray (C,) of int
        Module of each unit, 0..K-1 (modules are numbered by decreasing size).
    templates : ndarray (K, H, W)
        Template of each module.
    weights : ndarray (C, K)
        Contribution of each template to each unit's map.
    module_maps : ndarray (K, H, W) float32
        Influence map of each module: all its channels swapped together.
    stability : StabilityResult or None
        The stability sweep (Fig. 9), None when it was not run.
    samples : ndarray (S, C, H, W) uint8
        Samples of the model, for display (0 = low end of the output range, 255 = high).
    mean_image : ndarray (C, H, W) float32 in [0, 1]
        Mean of the samples (the background the templates are drawn over).
    original1, original2 : ndarray (N, C, H, W) uint8
        The new pairs hybridized for the report.
    hybrids : ndarray (K, N, C, H, W) uint8
        ``hybrids[k, i]``: Original 1 of pair i with module k's channels from Original 2.
    timings : dict str -> float
        Seconds spent in each step.
    model_options : dict
        What else is needed to load the model again (e.g. ``{"latent_shape": [100, 1, 1]}``
        for a factory that returns an ``nn.Module``).
    version : str
        cfmodules version that made it.
    created : str
        ISO date and time of the run.
    scan : ScanResult or None
        The scan that chose the layer and K (``analyze(adapter, "auto")``), else None.
    sampler : dict
        A diffusion model's sampler settings (scheduler, steps, timesteps, eta) and
        ``window``, the steps at which every swap happened; empty for other generators.
    """

    kind: ClassVar[str] = KIND
    nested: ClassVar[tuple[str, ...]] = ("stability", "scan")
    compress: ClassVar[bool] = True

    # what was analysed, and how
    model: str
    model_spec: str
    layers: list[str]
    settings: AnalysisSettings = field(metadata={"from_dict": AnalysisSettings.from_dict})
    # the numbers
    maps: np.ndarray = _array(np.float32)
    stderr: np.ndarray = _array(np.float32)
    unit_layer: np.ndarray = _array(str)
    unit_channel: np.ndarray = _array(np.int64)
    labels: np.ndarray = _array(np.int64)
    templates: np.ndarray = _array(np.float64)
    weights: np.ndarray = _array(np.float64)
    module_maps: np.ndarray = _array(np.float32)
    stability: Any | None = field(metadata={"from_dict": _stability_from_dict})
    # images for display
    samples: np.ndarray = _array(np.uint8)
    mean_image: np.ndarray = _array(np.float32)
    original1: np.ndarray = _array(np.uint8)
    original2: np.ndarray = _array(np.uint8)
    hybrids: np.ndarray = _array(np.uint8)
    # the run
    timings: dict[str, float] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    created: str = ""
    # how the layer was chosen (analyze(layers="auto"))
    scan: Any | None = field(default=None, metadata={"from_dict": _scan_from_dict})
    # a diffusion model's sampler and window (empty for a one-forward generator)
    sampler: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def n_modules(self) -> int:
        """K."""
        return int(self.templates.shape[0])

    @property
    def modules(self) -> list[dict[str, list[int]]]:
        """The channels of each module, ``{layer: [channels]}``, ready for ``hybridize``."""
        from cfmodules.modules import modules_from_labels

        return modules_from_labels(self.labels, list(zip(self.unit_layer, self.unit_channel)),
                                   self.n_modules)

    @property
    def module_sizes(self) -> np.ndarray:
        """(K,) channels per module."""
        return np.bincount(self.labels, minlength=self.n_modules)

    @property
    def module_influence(self) -> np.ndarray:
        """(K,) individual influence of each module: its map averaged over pixels."""
        return self.module_maps.reshape(self.n_modules, -1).mean(axis=1)

    @property
    def influence(self) -> np.ndarray:
        """(C,) individual influence of each unit: its map averaged over pixels."""
        return self.maps.reshape(len(self.maps), -1).mean(axis=1)

    @property
    def unit_names(self) -> list[str]:
        """``"main.8[5]"`` for each unit."""
        return [unit_name(la, c) for la, c in zip(self.unit_layer, self.unit_channel)]

    @property
    def locations(self) -> list[str]:
        """Where each module's template lies in the image (see :func:`template_location`)."""
        return [template_location(t) for t in self.templates]

    @property
    def window_name(self) -> str:
        """The window of a diffusion analysis (``"late"``, ``"steps 3-5"``...), else ``""``."""
        if not self.sampler:
            return ""
        from cfmodules.samplers import window_label

        return window_label(self.sampler["window"], int(self.sampler["n_steps"]))

    @property
    def module_names(self) -> list[str]:
        """``"module k: <location>"`` for each module, used in every figure."""
        return [module_name(k, loc) for k, loc in enumerate(self.locations)]

    def suggested_k(self, method: str | None = None) -> int | None:
        """K suggested by the stability sweep (None without a sweep)."""
        if self.stability is None:
            return None
        m = method or self.settings.method
        if m not in self.stability.methods:
            m = self.stability.methods[0]
        return int(self.stability.suggest_k(m))

    def _html_figures(self) -> dict[str, Callable[[], Any]]:
        from cfmodules import plots

        names = self.module_names
        return {
            "Templates of the modules over the mean sample": lambda: plots.plot_templates(
                self.templates, background=self.mean_image, names=names,
                sizes=self.module_sizes),
            "Original 1, Original 2 and the hybrid of each module (first 4 pairs)":
                lambda: plots.plot_hybrid_grid(
                    self.original1[:4] / 255.0, self.original2[:4] / 255.0,
                    self.hybrids[:, :4] / 255.0, module_names=names, templates=self.templates),
        }

    # ------------------------------------------------------------------ dict, file, text
    def _derived(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "influence": self.influence.astype(np.float32),
            "module_influence": self.module_influence.astype(np.float32),
            "module_sizes": self.module_sizes.astype(np.int64),
            "modules": self.modules, "module_names": self.module_names,
        }
        if self.stability is not None:
            out["suggested_k"] = self.suggested_k()
        return out

    @classmethod
    def _validate(cls, path: Any, arrays: Mapping[str, np.ndarray],
                  header: Mapping[str, Any]) -> None:
        from cfmodules.results import check_folder

        check_folder(Path(path).parent, Path(path).name)  # a report folder: all of a piece
        _check_file(path, arrays, header)

    def to_text(self) -> str:
        """The analysis in a few lines: units, K, each module's size and influence."""
        c, h, w = self.maps.shape
        lines = [f"AnalysisResult(model={self.model!r}, layers={self.layers}, {c} units, "
                 f"maps {h}x{w}, n_pairs={self.settings.n_pairs}, "
                 f"K={self.n_modules} ({self.settings.method}))"]
        infl = self.module_influence
        for k, (name, size) in enumerate(zip(self.module_names, self.module_sizes)):
            lines.append(f"  {name:<28} {int(size):>4} channels  influence {infl[k]:.4f}")
        if self.sampler:
            lines.append(f"  sampler {self.sampler.get('scheduler', 'own step')}, "
                         f"{self.sampler.get('n_steps')} steps; window: {self.window_name}")
        if self.stability is not None:
            lines.append(f"  stability sweep K={[int(k) for k in self.stability.ks]}: "
                         f"suggested K={self.suggested_k()}")
        if self.timings:
            lines.append(f"  total {self.total_seconds:.1f} s")
        return "\n".join(lines)

    @property
    def total_seconds(self) -> float:
        """Wall time of the analysis: ``timings["total"]``; the sum of the steps for files
        written before steps ran side by side (the stability sweep beside the next ones)."""
        t = self.timings
        return float(t["total"]) if "total" in t else float(sum(t.values()))

    def __repr__(self) -> str:
        return self.to_text()


def _check_file(path: Any, arrays: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> None:
    """Refuse an analysis file whose arrays do not fit together (edited or damaged)."""
    def bad(what: str) -> ResultFileError:
        return ResultFileError(f"'{path}' is a damaged analysis result: {what}. Write it again "
                               "with cfmodules analyze.")

    for key in ("maps", "labels", "unit_layer", "unit_channel", "templates", "weights",
                "module_maps", "samples", "mean_image", "original1", "original2", "hybrids"):
        if key not in arrays:
            raise ResultFileError(f"'{path}' is an incomplete analysis result: the array "
                                  f"'{key}' is missing. Write it again with cfmodules analyze.")
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise bad(f"'layers' in the header is {layers!r}, not a list of layer names")
    if not isinstance(header.get("settings", {}), dict):
        raise bad("'settings' in the header is not a dict")
    maps, templates = arrays["maps"], arrays["templates"]
    if maps.ndim != 3 or maps.dtype.kind != "f":
        raise bad(f"maps have shape {maps.shape} and dtype {maps.dtype}, not (C, H, W) floats")
    c = maps.shape[0]
    if templates.ndim != 3 or templates.shape[1:] != maps.shape[1:]:
        raise bad(f"templates have shape {templates.shape}, not (K, {maps.shape[1]}, "
                  f"{maps.shape[2]})")
    k = templates.shape[0]
    for key, kind in (("labels", "iu"), ("unit_channel", "iu"), ("unit_layer", "U")):
        a = arrays[key]
        if a.shape != (c,) or a.dtype.kind not in kind:
            raise bad(f"'{key}' has shape {a.shape} and dtype {a.dtype}; expected ({c},) "
                      + ("integers" if kind == "iu" else "layer names"))
    labels = arrays["labels"]
    if c and (labels.min() < 0 or labels.max() >= k):
        raise bad(f"'labels' hold modules {int(labels.min())}..{int(labels.max())}, but there "
                  f"are {k} templates")
    if c and arrays["unit_channel"].min() < 0:
        raise bad("'unit_channel' holds negative channel numbers")
    unknown = set(arrays["unit_layer"].tolist()) - set(layers)
    if unknown:
        raise bad(f"'unit_layer' names layers {sorted(unknown)} not in the header's layers")
    if arrays["weights"].shape != (c, k):
        raise bad(f"'weights' have shape {arrays['weights'].shape}, not ({c}, {k})")


# ---------------------------------------------------------------------- helpers
def template_location(template: Any) -> str:
    """Where a template lies in the image, in words: "centre", "border", "left", "top", ...

    A purely geometric description (the semantics -- face, hair, background -- is for the
    reader of the figures to judge). With the template normalised to a total mass of 1:
    "border" when under 10% of it lies in the central box (the middle half of the height
    and of the width, a quarter of the area) and at least three of the four outer bands
    (top, bottom, left, right quarter) hold 15% or more; else "top", "bottom", "left side", "right
    side" or a combination such as "top-left" when its centre of mass is more than a tenth
    of the image away from the middle; else "centre" when over a third of it lies in the
    central box, "spread" otherwise.

    Parameters
    ----------
    template : array (H, W), non-negative

    Returns
    -------
    str
    """
    t = np.clip(np.asarray(template, dtype=np.float64), 0, None)
    if t.ndim != 2:
        raise ShapeError(f"A template has shape (H, W), got {t.shape}.")
    total = t.sum()
    if total <= 0:
        return "nowhere"
    t = t / total
    h, w = t.shape
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    centre = (np.abs(ys - 0.5) < 0.25)[:, None] & (np.abs(xs - 0.5) < 0.25)[None, :]
    mass_centre = float(t[centre].sum())  # 25% of the area
    cy = float((t.sum(axis=1) * ys).sum()) - 0.5
    cx = float((t.sum(axis=0) * xs).sum()) - 0.5
    bands = [t[ys < 0.25].sum(), t[ys > 0.75].sum(), t[:, xs < 0.25].sum(), t[:, xs > 0.75].sum()]
    if mass_centre < 0.1 and sum(b >= 0.15 for b in bands) >= 3:
        return "border"
    parts = []
    if abs(cy) > 0.1:
        parts.append("top" if cy < 0 else "bottom")
    if abs(cx) > 0.1:
        parts.append("left" if cx < 0 else "right")
    if parts:
        return "-".join(parts) + (" side" if parts in (["left"], ["right"]) else "")
    return "centre" if mass_centre > 0.33 else "spread"
