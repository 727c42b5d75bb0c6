"""The whole analysis of one generator in one call: the straight line of the paper.

latent pairs -> elementary influence maps (EIMs) of the channels of one or two layers ->
smoothing + threshold -> NMF / k-means -> modules (labels, templates) -> influence of each
module -> stability over K (Fig. 9) -> hybrids of new pairs (Fig. 4).

:func:`analyze` runs it and returns an :class:`AnalysisResult` holding every number and
the images the report shows; ``AnalysisResult.save`` writes them to one ``.npz`` file
(arrays plus a JSON header, no pickle) that ``AnalysisResult.load`` and ``numpy.load`` read.
The command line (``cfmodules analyze``) is a thin wrapper around these functions.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cfmodules import checks
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import (
    CheckpointError,
    ConfigError,
    ResultFileError,
    ShapeError,
)
from cfmodules.hybrid import hybridize
from cfmodules.images import as_uint8
from cfmodules.influence.distributed import distributed_influence_maps, world
from cfmodules.influence.memory import parse_memory
from cfmodules.modules.settings import STABILITY_N_INIT, ClusteringSettings
from cfmodules.names import module_name, unit_name
from cfmodules.results import Result
from cfmodules.samplers import is_diffusion, windowed

__all__ = [
    "AnalysisSettings",
    "AnalysisResult",
    "UnitMaps",
    "analyze",
    "check_layers",
    "sample_images",
    "unit_influence_maps",
    "cluster_maps",
    "module_maps",
    "stability_sweep",
    "make_hybrids",
    "default_layer",
    "template_location",
    "KIND",
]

KIND = "analysis"
AUTO = "auto"
"""``analyze(adapter, AUTO)``: let the scan choose the layer and K."""

DEFAULT_LAYERS = {"dcgan-faces": "main.8", "unet": "up_blocks.1",
                  "ddpm-faces": "up_blocks.2.resnets.0"}
"""Layer analysed by default, per zoo model (the paper intervenes on an intermediate layer)."""


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


def _settings(settings: AnalysisSettings | None, overrides: Mapping[str, Any]) -> AnalysisSettings:
    return AnalysisSettings.coerce(settings, "analysis", overrides)


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
            lines.append(f"  total {sum(self.timings.values()):.1f} s")
        return "\n".join(lines)

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


def default_layer(adapter: GeneratorAdapter) -> str:
    """The layer :func:`analyze` uses when none is given.

    The generator's own ``layer`` attribute if it has one (the planted toy generators),
    else the zoo default for the model's name (``main.8`` for ``dcgan-faces``).

    Raises
    ------
    ConfigError
        Naming candidate layers, when the model has no default.
    """
    own = getattr(adapter.generator, "layer", None)
    if isinstance(own, str) and own:
        return own
    if adapter.name in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[adapter.name]
    convs = [i for i in adapter.layers_cached()
             if i.shape is not None and len(i.shape) == 3 and (i.channels or 0) > 1]
    hint = ", ".join(f"{i.name} ({'x'.join(map(str, i.shape or ()))})" for i in convs[:8])
    raise ConfigError(
        f"{adapter.name} has no default layer; choose one whose channels are the units"
        + (f", e.g. one of {hint}" if hint else "")
        + " (all layers: `cfmodules layers MODEL` or adapter.layers())."
    )


def _display(adapter: GeneratorAdapter, images: torch.Tensor) -> np.ndarray:
    """Images in the adapter's output range -> uint8 (N, C, H, W) for display."""
    return as_uint8(adapter.to_unit(images.detach().float()))


def make_hybrids(
    adapter: GeneratorAdapter,
    modules: Sequence[Mapping[str, Sequence[int]]],
    n: int = 8,
    seed: int = 0,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hybrids of new pairs for each module, as display images.

    Pair ``i`` is pair ``start + i`` of :func:`cfmodules.latents.pair_latents`: samples
    ``2(start + i)`` (Original 1) and ``2(start + i) + 1`` (Original 2) of the stream ``seed``.

    Parameters
    ----------
    adapter : GeneratorAdapter
    modules : list of dict layer -> channels
        E.g. ``AnalysisResult.modules``. An empty module gives Original 1 back.
    n : int, default 8
        Pairs.
    seed, start : int

    Returns
    -------
    original1, original2 : ndarray (n, C, H, W) uint8
    hybrids : ndarray (K, n, C, H, W) uint8
    """
    from cfmodules.latents import pair_latents

    z1, z2 = pair_latents(adapter, n, seed, start)
    y1, y2 = adapter.generate(z1), adapter.generate(z2)
    hy = []
    for module in modules:
        module = {layer: list(ch) for layer, ch in module.items() if len(ch)}
        hy.append(_display(adapter, hybridize(adapter, z1, z2, module) if module else y1))
    return _display(adapter, y1), _display(adapter, y2), np.stack(hy)


class _Steps:
    """Timings of the steps, and one line per step on stderr when ``verbose``."""

    def __init__(self, verbose: bool, total: int):
        self.verbose, self.total, self.i = verbose, total, 0
        self.timings: dict[str, float] = {}

    def run(self, name: str, text: str, fn: Callable[[], Any]) -> Any:
        self.i += 1
        if self.verbose:
            print(f"[{self.i}/{self.total}] {text}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t
        return out


# ---------------------------------------------------------------------- the steps
@dataclass(frozen=True)
class UnitMaps:
    """The elementary influence maps of the units of one or several layers, stacked.

    Attributes
    ----------
    maps, stderr : ndarray (C, H, W) float32
    unit_layer : ndarray (C,) of str
    unit_channel : ndarray (C,) of int64
    """

    maps: np.ndarray
    stderr: np.ndarray
    unit_layer: np.ndarray
    unit_channel: np.ndarray


def check_layers(adapter: GeneratorAdapter, layers: str | Sequence[str] | None,
                 settings: AnalysisSettings) -> list[str]:
    """The layer names an analysis will use, checked against the generator and the settings.

    Raises
    ------
    LayerNotFoundError, ConfigError
        A bad name, a repeated layer, or more modules (or sweep Ks) than units.
    """
    from cfmodules.hooks import resolve_layers

    if layers is None:
        layers = default_layer(adapter)
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"Give one layer, or several distinct layers, got {layers!r}.")
    names = [r.name for r in resolve_layers(adapter.generator, names)]
    n_units = sum(adapter.layer_channels(la) for la in names)
    if settings.n_modules > n_units:
        raise ConfigError(f"K={settings.n_modules} modules is more than the {n_units} channels "
                          f"of {' and '.join(names)}; use n_modules (--k) <= {n_units}.")
    if settings.stability_ks and max(settings.stability_ks) > 2 * (n_units // 3):
        raise ConfigError(
            f"The stability sweep goes up to K={max(settings.stability_ks)}, more than the "
            f"{2 * (n_units // 3)} channels of a two-thirds subset; use smaller Ks.")
    return names


def sample_images(adapter: GeneratorAdapter, settings: AnalysisSettings
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Samples of the model for display, and the mean image the templates are drawn over.

    Returns
    -------
    samples : ndarray (n_samples, C, H, W) uint8
    mean_image : ndarray (C, H, W) float32 in [0, 1]
        Mean of the first ``max(n_samples, 64)`` samples of the stream ``seed``.
    """
    images = adapter.generate(adapter.sample_latents(max(settings.n_samples, 64),
                                                     seed=settings.seed), batch_size=64)
    display = _display(adapter, images)
    return display[:settings.n_samples], display.astype(np.float32).mean(axis=0) / 255.0


def unit_influence_maps(adapter: GeneratorAdapter, layers: Sequence[str],
                        settings: AnalysisSettings, *, checkpoint_dir: Path | None = None,
                        progress: bool = True, assume_same: bool = False,
                        max_memory: int | str | None = None) -> UnitMaps | None:
    """The EIMs of every channel of ``layers``, stacked in layer order (eq. 2).

    Under ``torch.distributed`` the channels are sharded across ranks; rank 0 gets the
    maps and the other ranks None.
    """
    rank, _ = world()
    results = []
    for layer in layers:
        path = None
        if checkpoint_dir is not None:
            path = checkpoint_dir / f"eim_{layer}_pairs{settings.n_pairs}_seed{settings.seed}.npz"
        results.append(distributed_influence_maps(
            adapter, layer, n_pairs=settings.n_pairs, seed=settings.seed,
            progress=progress and rank == 0, checkpoint=path, assume_same=assume_same,
            max_memory=max_memory))
    if rank != 0:  # under torch.distributed, rank 0 alone clusters and reports
        return None
    return UnitMaps(
        maps=np.concatenate([r.maps for r in results]),
        stderr=np.concatenate([r.stderr for r in results]),
        unit_layer=np.array([la for r, la in zip(results, layers) for _ in range(len(r))],
                            dtype=str),
        unit_channel=np.concatenate([r.channels for r in results]).astype(np.int64))


def cluster_maps(maps: np.ndarray, settings: AnalysisSettings, n_jobs: int | None = None
                 ) -> Any:
    """The fitted :class:`~cfmodules.modules.ModuleClustering` of the maps (sec. 3.4)."""
    return settings.estimator(settings.n_modules, n_jobs=n_jobs).fit(maps)


def module_maps(adapter: GeneratorAdapter, modules: Sequence[Mapping[str, Sequence[int]]],
                settings: AnalysisSettings, *, progress: bool = True,
                max_memory: int | str | None = None) -> np.ndarray:
    """(K, H, W) float32: the influence map of each module (zeros for an empty module)."""
    from cfmodules.influence import module_influence_maps

    nonempty = {k: m for k, m in enumerate(modules) if m}
    res = module_influence_maps(adapter, [nonempty[k] for k in nonempty],
                                n_pairs=settings.n_pairs, seed=settings.seed,
                                progress=progress, max_memory=max_memory)
    out = np.zeros((len(modules), *res.maps.shape[1:]), np.float32)
    out[list(nonempty)] = res.maps
    return out


def stability_sweep(maps: np.ndarray, settings: AnalysisSettings, *,
                    progress: bool = True, n_jobs: int | None = None) -> Any:
    """The :class:`~cfmodules.modules.StabilityResult` of the maps over K (Fig. 9)."""
    return settings.stability(maps, settings.stability_ks, methods=settings.stability_methods,
                              n_repeats=settings.stability_repeats, n_init=STABILITY_N_INIT,
                              nmf_pool=settings.stability_pool, progress=progress,
                              n_jobs=n_jobs)


# ---------------------------------------------------------------------- analyze
def analyze(
    adapter: GeneratorAdapter,
    layers: str | Sequence[str] | None = None,
    settings: AnalysisSettings | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_spec: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    assume_same: bool = False,
    n_jobs: int | None = None,
    max_memory: int | str | None = None,
    step_window: Any = None,
    **overrides: Any,
) -> AnalysisResult | None:
    """Run the whole analysis of sec. 3-4 of Besserve et al. (2020) on one or two layers.

    latent pairs -> EIMs of the units (:func:`unit_influence_maps`) -> clustering into
    modules (:func:`cluster_maps`) -> influence map of each module (:func:`module_maps`) ->
    stability over K (:func:`stability_sweep`) -> hybrids of new pairs
    (:func:`make_hybrids`); each step is its own function, and the result is built once
    at the end.

    Parameters
    ----------
    adapter : GeneratorAdapter
    layers : str or list of str, optional
        Default :func:`default_layer`. The layer whose channels are the units (e.g.
        ``"main.8"``), or two layers (e.g. ``["main.5", "main.8"]``): the units of both are
        clustered together and a module's hybrid intervenes on its channels in both layers
        at once. ``"auto"``: :func:`cfmodules.scan.scan_layers` scores every candidate
        layer first and the analysis takes its suggested layer, and its suggested K unless
        ``n_modules`` is given as a keyword; the scan is kept in ``result.scan``.
    settings : AnalysisSettings, optional
        Default ``AnalysisSettings()``; keyword arguments (``n_pairs=16``, ``n_modules=4``,
        ...) override single fields.
    checkpoint_dir : path, optional
        Folder for the influence computation's checkpoints: an interrupted run started
        again with the same settings resumes where it stopped, and a finished one is
        read back instantly (so a new K costs only the clustering). A checkpoint made by
        other code or settings is refused (CheckpointError), never silently reused.
    progress : bool, default True
        Progress bars and one line per step on stderr.
    model_spec : str, optional
        How to load the model again (zoo name or ``file.py:factory``), stored in the
        result for ``cfmodules hybrids``; default ``adapter.name``.
    model_options : dict, optional
        Stored with ``model_spec`` (e.g. the latent shape the CLI was given).
    assume_same : bool, default False
        Resume checkpoints even where cfmodules cannot verify they were made by the same
        code (see :func:`cfmodules.influence.influence_maps`).
    n_jobs : int or None, default None
        Processes for the clustering's restarts and the stability sweep; None: the usable
        cores (:func:`cfmodules.modules.fits.default_jobs`). The numbers do not depend on it.
    max_memory : int or str, optional
        Bound on the memory the influence computations add, in bytes or as ``"2GB"``
        (see :func:`cfmodules.influence.influence_maps`); default half of the available memory.
        The numbers depend on it only by float rounding.
    step_window : "all", "early", "middle", "late" or list of int, optional
        Diffusion models: the sampling steps at which every swap happens (default: the
        adapter's window; not ``window``, the maps' smoothing), kept in ``result.sampler``.

    Returns
    -------
    AnalysisResult, or None on ranks other than 0
        Under ``torch.distributed`` (e.g. ``torchrun``), the channels' influence maps are
        sharded across ranks (:mod:`cfmodules.influence.distributed`); rank 0 gathers
        them, clusters and returns the result; the other ranks return None.

    Raises
    ------
    ConfigError, LayerNotFoundError, ChannelError, CheckpointError, ...
        Bad settings or layers fail before any computation.
    """
    if not isinstance(adapter, GeneratorAdapter):
        raise ConfigError(f"analyze() takes a GeneratorAdapter, got {type(adapter).__name__}; "
                          "wrap your generator with cfmodules.GeneratorAdapter(generator, "
                          "latent_shape).")
    s = _settings(settings, overrides)
    adapter = windowed(adapter, step_window)
    from cfmodules.modules.fits import check_jobs

    jobs = check_jobs(n_jobs)
    parse_memory(max_memory)  # a bad size fails before any computation
    auto = isinstance(layers, str) and layers == AUTO
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    steps = _Steps(progress, 5 + bool(s.stability_ks) + auto)
    scan = None
    if auto:
        from cfmodules.scan import candidate_layers, scan_layers

        if not candidate_layers(adapter):
            raise ConfigError(f"{adapter.name} has no layer for layers='auto' to scan "
                              "(spatial layers with >= 8 channels); give the layer.")
        scan = steps.run("scan", "scan of the candidate layers (which layer, which K)",
                         lambda: scan_layers(adapter, seed=s.seed, progress=progress))
        layers = scan.suggested_layer
        if "n_modules" not in overrides:  # K from the scan unless given
            s = replace(s, n_modules=scan.suggested_k)
    names = check_layers(adapter, layers, s)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        if ckpt.exists() and not ckpt.is_dir():
            raise CheckpointError(f"checkpoint_dir '{ckpt}' is a file, not a folder; give a "
                                  "folder for the checkpoints (it is created if missing).")
        try:
            ckpt.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"Cannot create the checkpoint folder '{ckpt}': "
                                  f"{e.strerror or e}. Give another checkpoint_dir.") from None
    n_units = sum(adapter.layer_channels(la) for la in names)

    samples, mean_image = steps.run("samples", f"{s.n_samples} samples of {adapter.name}",
                                    lambda: sample_images(adapter, s))
    units = steps.run("influence_maps", f"influence maps of {n_units} channels of "
                      f"{' + '.join(names)}, {s.n_pairs} pairs",
                      lambda: unit_influence_maps(adapter, names, s, checkpoint_dir=ckpt,
                                                  progress=progress, assume_same=assume_same,
                                                  max_memory=max_memory))
    if units is None:  # a rank other than 0 under torch.distributed
        return None
    clustering = steps.run("clustering", f"{s.method} clustering into K={s.n_modules} modules",
                           lambda: cluster_maps(units.maps, s, jobs))
    from cfmodules.modules import modules_from_labels

    modules = modules_from_labels(clustering.labels_,
                                  list(zip(units.unit_layer, units.unit_channel)), s.n_modules)
    maps_of_modules = steps.run("module_influence", f"influence maps of the {s.n_modules} "
                                "modules", lambda: module_maps(adapter, modules, s,
                                                               progress=progress,
                                                               max_memory=max_memory))
    stability = None
    if s.stability_ks:
        stability = steps.run(
            "stability", f"stability sweep K={list(s.stability_ks)}, "
            f"{'/'.join(s.stability_methods)}, {s.stability_repeats} repeats",
            lambda: stability_sweep(units.maps, s, progress=progress, n_jobs=jobs))
    original1, original2, hybrids = steps.run(
        "hybrids", f"hybrids of {s.n_hybrids} new pairs per module",
        lambda: make_hybrids(adapter, modules, s.n_hybrids, s.seed, start=s.n_pairs))
    return AnalysisResult(
        model=adapter.name, model_spec=model_spec or adapter.name, layers=names, settings=s,
        maps=units.maps, stderr=units.stderr, unit_layer=units.unit_layer,
        unit_channel=units.unit_channel, labels=clustering.labels_,
        templates=clustering.templates_, weights=clustering.weights_,
        module_maps=maps_of_modules, stability=stability, samples=samples,
        mean_image=mean_image, original1=original1, original2=original2, hybrids=hybrids,
        timings=steps.timings, model_options=dict(model_options or {}), version=_version(),
        created=created, scan=scan,
        sampler=adapter.identity() if is_diffusion(adapter) else {})  # type: ignore[attr-defined]


def _version() -> str:
    from cfmodules import __version__

    return __version__
