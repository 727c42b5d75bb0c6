"""The whole analysis of one generator in one call: the straight line of the paper.

latent pairs -> elementary influence maps (EIMs) of the channels of one or two layers ->
smoothing + threshold -> NMF / k-means -> modules (labels, templates) -> influence of each
module -> stability over K (Fig. 9) -> hybrids of new pairs (Fig. 4).

:func:`analyze` runs it and returns an :class:`AnalysisResult` holding every number and
the images the report shows; ``AnalysisResult.save`` writes them to one ``.npz`` file
(arrays plus a JSON header, no pickle) that ``AnalysisResult.load`` and ``numpy.load`` read.
The settings and the result live in :mod:`cfmodules.analysis_result`, imported from here.
The command line (``cfmodules analyze``) is a thin wrapper around these functions.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmodules.adapter import GeneratorAdapter
from cfmodules.analysis_result import KIND, AnalysisResult, AnalysisSettings, template_location
from cfmodules.errors import (
    CheckpointError,
    ConfigError,
)
from cfmodules.hybrid import hybridize
from cfmodules.images import as_uint8
from cfmodules.influence.distributed import distributed_influence_maps, world
from cfmodules.influence.memory import parse_memory
from cfmodules.modules.settings import STABILITY_N_INIT
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
    "start_stability_sweep",
    "make_hybrids",
    "default_layer",
    "template_location",
    "KIND",
]

AUTO = "auto"
"""``analyze(adapter, AUTO)``: let the scan choose the layer and K."""

DEFAULT_LAYERS = {"dcgan-faces": "main.8", "unet": "up_blocks.1",
                  "ddpm-faces": "up_blocks.2.resnets.0"}
"""Layer analysed by default, per zoo model (the paper intervenes on an intermediate layer)."""


def _settings(settings: AnalysisSettings | None, overrides: Mapping[str, Any]) -> AnalysisSettings:
    return AnalysisSettings.coerce(settings, "analysis", overrides)


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
        self._started: dict[str, float] = {}

    def _announce(self, text: str) -> None:
        self.i += 1
        if self.verbose:
            print(f"[{self.i}/{self.total}] {text}", file=sys.stderr, flush=True)

    def run(self, name: str, text: str, fn: Callable[[], Any]) -> Any:
        self._announce(text)
        t = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t
        return out

    def start(self, name: str, text: str, fn: Callable[[], Any]) -> Any:
        """Like :meth:`run` for a step that goes on beside the next ones; its timing runs
        from here to :meth:`finish` (wall time, shared with the steps in between)."""
        self._announce(text)
        self._started[name] = time.perf_counter()
        out = fn()
        try:
            if getattr(out, "in_background", False) and self.verbose:
                print("      (on the worker processes, beside the next steps)",
                      file=sys.stderr, flush=True)
        except BaseException:  # an interrupt before the caller holds ``out``: stop it here
            cancel = getattr(out, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        return out

    def finish(self, name: str, fn: Callable[[], Any]) -> Any:
        """The result of a started step (``fn`` waits for it)."""
        out = fn()
        self.timings[name] = time.perf_counter() - self._started.pop(name)
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
    return start_stability_sweep(maps, settings, progress=progress, n_jobs=n_jobs).result()


def start_stability_sweep(maps: np.ndarray, settings: AnalysisSettings, *,
                          progress: bool = True, n_jobs: int | None = None) -> Any:
    """:func:`stability_sweep` started on the worker processes: a
    :class:`~cfmodules.modules.stability.StabilityRun` (``.result()`` waits for it)."""
    return settings.start_stability(
        maps, settings.stability_ks, methods=settings.stability_methods,
        n_repeats=settings.stability_repeats, n_init=STABILITY_N_INIT,
        nmf_pool=settings.stability_pool, progress=progress, n_jobs=n_jobs)


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
    during_sweep: Callable[[AnalysisResult], Any] | None = None,
    **overrides: Any,
) -> AnalysisResult | None:
    """Run the whole analysis of sec. 3-4 of Besserve et al. (2020) on one or two layers.

    latent pairs -> EIMs of the units (:func:`unit_influence_maps`) -> clustering into
    modules (:func:`cluster_maps`) -> influence map of each module (:func:`module_maps`) ->
    stability over K (:func:`stability_sweep`) -> hybrids of new pairs
    (:func:`make_hybrids`); each step is its own function, and the result is built once
    at the end. The stability sweep needs only the units' maps: with worker processes
    (``n_jobs`` > 1) it starts right after them and runs beside the next three steps
    (``result.timings["stability"]`` is then its wall time from start to end, shared with
    them; ``timings["total"]`` is the whole call's).

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
    during_sweep : callable, optional
        Called with the result so far (``stability=None``) while the stability sweep is
        still running on the worker processes, e.g. to draw figures meanwhile (the command
        line draws the report's); not called without a sweep.

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
    t_start = time.perf_counter()
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
    sweep = None
    threads = torch.get_num_threads()
    try:  # from the sweep's start: an interrupt at any point after it must cancel it
        if s.stability_ks:  # needs only the maps: on the workers while the next steps run here
            sweep = steps.start(
                "stability", f"stability sweep K={list(s.stability_ks)}, "
                f"{'/'.join(s.stability_methods)}, {s.stability_repeats} repeats",
                lambda: start_stability_sweep(units.maps, s, progress=progress, n_jobs=jobs))
        busy = sweep is not None and sweep.in_background
        if busy:  # the workers hold the cores: torch's spinning threads would fight them
            torch.set_num_threads(1)  # (hybrids took 8x longer with 2 threads beside them)
        # beside a running sweep the clustering stays in this process: on the workers it
        # would wait behind the sweep's batches (the numbers do not depend on n_jobs)
        clustering = steps.run("clustering", f"{s.method} clustering into K={s.n_modules} "
                               "modules", lambda: cluster_maps(units.maps, s, 1 if busy else jobs))
        from cfmodules.modules import modules_from_labels

        modules = modules_from_labels(clustering.labels_,
                                      list(zip(units.unit_layer, units.unit_channel)),
                                      s.n_modules)
        maps_of_modules = steps.run("module_influence", f"influence maps of the {s.n_modules} "
                                    "modules", lambda: module_maps(adapter, modules, s,
                                                                   progress=progress,
                                                                   max_memory=max_memory))
        original1, original2, hybrids = steps.run(
            "hybrids", f"hybrids of {s.n_hybrids} new pairs per module",
            lambda: make_hybrids(adapter, modules, s.n_hybrids, s.seed, start=s.n_pairs))

        def result(stability: Any) -> AnalysisResult:
            return AnalysisResult(
                model=adapter.name, model_spec=model_spec or adapter.name, layers=names,
                settings=s, maps=units.maps, stderr=units.stderr,
                unit_layer=units.unit_layer, unit_channel=units.unit_channel,
                labels=clustering.labels_, templates=clustering.templates_,
                weights=clustering.weights_, module_maps=maps_of_modules,
                stability=stability, samples=samples, mean_image=mean_image,
                original1=original1, original2=original2, hybrids=hybrids,
                timings={**steps.timings, "total": time.perf_counter() - t_start},
                model_options=dict(model_options or {}),
                version=_version(), created=created, scan=scan,
                sampler=adapter.identity()  # type: ignore[attr-defined]
                if is_diffusion(adapter) else {})

        if sweep is None:
            return result(None)
        if during_sweep is not None:
            during_sweep(result(None))
        return result(steps.finish("stability", sweep.result))
    except BaseException:
        if sweep is not None:
            sweep.cancel()
        raise
    finally:
        torch.set_num_threads(threads)


def _version() -> str:
    from cfmodules import __version__

    return __version__
