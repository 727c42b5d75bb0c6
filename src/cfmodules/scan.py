"""Which layer, which K: modularity across the layers of a generator and numbers of modules.

The paper finds modules at several depths (sec. 4); :func:`cfmodules.analysis.analyze`
looks at the one layer it is given. :func:`scan_layers` looks at all candidates: for each
layer it measures the elementary influence maps (stopping early once they are precise
enough), runs a short stability sweep over K (sec. 4.1) and scores every (layer, K):

``modularity = label consistency x template similarity x locality``

- **label consistency** and **template similarity**: the stability protocol's two numbers
  (two clusterings of overlapping two-thirds of the channels agree on the shared third,
  and find the same templates), in [0, 1];
- **locality**: how much of the image a module leaves alone:
  :func:`cfmodules.modules.locality` (``1 - a`` with ``a`` the fraction of the image where
  a map exceeds half its maximum) of the module's mean influence map (the mean of the
  smoothed maps of its channels, in a clustering of all channels), averaged over the K
  modules (:func:`cfmodules.modules.module_locality`). Modules in the paper's
  sense are channels that act on one region together; a layer whose channels each act on
  the whole image has no such regions, however reproducible its clustering. (The maps are
  taken before the threshold: a threshold keeps a quarter of every map, which looks local
  whatever the channel does.)

Each layer's K is the :func:`cfmodules.modules.suggest_k` rule applied to its modularity
(the largest K within ``tolerance`` of the layer's best); the suggested layer is the one
whose modularity at its K is highest. :class:`ScanResult` holds the table, the templates,
the suggestion with its reason in words, and saves to ``.npz`` + JSON like every result.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cfmodules import checks
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError, ShapeError
from cfmodules.modules.settings import STABILITY_MAX_ITER, ClusteringSettings
from cfmodules.results import Result

__all__ = ["ScanSettings", "ScanResult", "scan_layers", "candidate_layers", "KIND"]

KIND = "scan"
MIN_CHANNELS = 8
"""Fewest channels a candidate layer must have (the stability sweep splits them in three)."""


@dataclass(frozen=True, kw_only=True)
class ScanSettings(ClusteringSettings):
    """Settings of a scan (everything that decides its numbers).

    Inherits the clustering fields and checks of
    :class:`~cfmodules.modules.ClusteringSettings` (``seed`` also draws the latent pairs and
    the scanned channels); keywords only.

    Attributes
    ----------
    ks : tuple of int, default (2, 3, 4, 5, 6)
        Numbers of modules tried (capped per layer at two thirds of its units).
    max_units : int, default 64
        A layer with more channels is scanned on this many of them, drawn at random
        (seeded by ``seed``): the cost of a channel's influence map grows with the depth
        of the generator after the layer, and the stability protocol itself measures
        whether modules are found again in subsets of the channels.
    n_pairs : int, default 16
        Most latent pairs per influence map.
    target_stderr : float or None, default 0.05
        Stop a layer's influence maps once every pixel's standard error is at most this
        (image units), checked every ``pairs_per_block`` pairs (at least 2 pairs).
    pairs_per_block : int, default 8
    n_repeats : int, default 4
        Repetitions of the stability protocol per layer and K.
    n_init : int, default 2
        Restarts per clustering.
    nmf_pool : int or None, default None
        Pixel blocks NMF averages over (see :func:`cfmodules.modules.cluster_stability`);
        None: 2 for maps of 32 pixels or more a side, else 1.
    tolerance : float, default 0.02
        Of the K rule (:func:`cfmodules.modules.suggest_k`).
    """

    ks: tuple[int, ...] = (2, 3, 4, 5, 6)
    max_units: int = 64
    n_pairs: int = 16
    target_stderr: float | None = 0.05
    pairs_per_block: int = 8
    n_repeats: int = 4
    n_init: int = 2
    nmf_pool: int | None = None
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_int_tuple("ks", "ks")
        if not self.ks or len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"ks must be distinct positive integers, got {self.ks!r}.")
        self._positive_ints("max_units", "n_pairs", "pairs_per_block", "n_repeats")
        if self.target_stderr is not None:
            self._set("target_stderr", checks.positive_number(self.target_stderr,
                                                              "target_stderr"))
        if self.nmf_pool is not None:
            self._positive_ints("nmf_pool")
        self._set("tolerance", checks.real(self.tolerance, "tolerance", low=0, high=1,
                                           high_open=True))


def candidate_layers(adapter: GeneratorAdapter, all_spatial: bool = False) -> list[str]:
    """Layers a scan looks at: spatial feature maps (C, H, W) with >= 8 channels.

    By default the outputs of the nonlinearities (``torch.nn`` activation modules: ReLU,
    LeakyReLU, GELU, Tanh, ...): a convolution, the normalization after it and the
    activation give the same hybrids (they act on each channel alone), so one of the three
    is enough. When the generator has no such module (activations called as functions),
    or with ``all_spatial=True``, every leaf module with a spatial output of >= 8 channels.
    Modules that run more than once per forward are left out (give them as ``name:k``).

    Returns
    -------
    list of str, in the order of the forward pass
    """
    modules = dict(adapter.generator.named_modules())
    spatial = [i for i in adapter.layers_cached()
               if i.calls == 1 and i.shape is not None and len(i.shape) == 3
               and (i.channels or 0) >= MIN_CHANNELS and i.shape[1] * i.shape[2] > 1
               and not list(modules[i.name].children())]
    acts = [i.name for i in spatial
            if type(modules[i.name]).__module__ == "torch.nn.modules.activation"]
    return [i.name for i in spatial] if all_spatial or not acts else acts


def _arr(dtype: Any) -> Any:
    return field(metadata={"dtype": dtype})


@dataclass
class ScanResult(Result):
    """Modularity of every (layer, K) of a scan, and the suggested layer and K.

    A :class:`cfmodules.results.Result`: ``save`` / ``load`` (``.npz`` + JSON header, no
    pickle), ``to_dict`` / ``from_dict``, ``to_text``; in a notebook it shows its table and
    :func:`cfmodules.plots.plot_scan`.

    Attributes
    ----------
    model : str
    layers : list of str
        The layers scanned (L).
    ks : ndarray (n_k,) of int
    consistency, cosine, locality : ndarray (L, n_k)
        Mean label consistency and template similarity of the stability sweep, and the
        mean locality of the modules (:func:`cfmodules.modules.module_locality`); NaN where K is more than
        two thirds of the layer's scanned units.
    channels : ndarray (L,) of int
        Channels of each layer.
    units : ndarray (L, U) of int
        The channels scanned in each layer (all, or ``max_units`` drawn at random), padded
        with -1 (see :meth:`layer_units`).
    n_pairs : ndarray (L,) of int
        Latent pairs the layer's influence maps average over (early stopping).
    max_stderr : ndarray (L,)
        Largest per-pixel standard error of the layer's influence maps.
    templates : ndarray (L, K_max, h, w)
        Templates of each layer at its K (:attr:`layer_k`; the rest zero), at the
        resolution NMF ran at.
    settings : ScanSettings
    timings : dict layer -> seconds
    version, created : str
    """

    kind: ClassVar[str] = KIND
    compress: ClassVar[bool] = True

    model: str
    layers: list[str]
    ks: np.ndarray = _arr(np.int64)
    consistency: np.ndarray = _arr(np.float64)
    cosine: np.ndarray = _arr(np.float64)
    locality: np.ndarray = _arr(np.float64)
    channels: np.ndarray = _arr(np.int64)
    units: np.ndarray = _arr(np.int64)
    n_pairs: np.ndarray = _arr(np.int64)
    max_stderr: np.ndarray = _arr(np.float64)
    templates: np.ndarray = _arr(np.float64)
    settings: ScanSettings = field(default_factory=ScanSettings,
                                   metadata={"from_dict": lambda d: ScanSettings.from_dict(d)})
    timings: dict[str, float] = field(default_factory=dict)
    version: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        self.layers = [str(la) for la in self.layers]
        self.ks = np.asarray(self.ks, dtype=np.int64)
        shape = (len(self.layers), len(self.ks))
        for name in ("consistency", "cosine", "locality"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ShapeError(f"{name} must have shape (layers, K) = {shape}, got "
                                 f"{arr.shape}.")
            setattr(self, name, arr)

    # ------------------------------------------------------------------ derived
    @property
    def score(self) -> np.ndarray:
        """Modularity (L, n_k): consistency x template similarity x locality (NaN: not run)."""
        return self.consistency * self.cosine * self.locality

    @property
    def layer_k(self) -> np.ndarray:
        """(L,) K of each layer: the largest K whose modularity is within ``tolerance`` of
        the layer's best (the rule of :func:`cfmodules.modules.suggest_k`)."""
        out = []
        for row in self.score:
            ok = np.isfinite(row) & (self.ks > 1)
            if not ok.any():
                ok = np.isfinite(row)
            best = row[ok].max()
            out.append(int(self.ks[ok & (row >= best - self.settings.tolerance)].max()))
        return np.array(out, dtype=np.int64)

    def layer_score(self) -> np.ndarray:
        """(L,) modularity of each layer at its K."""
        idx = [int(np.flatnonzero(self.ks == k)[0]) for k in self.layer_k]
        return self.score[np.arange(len(self.layers)), idx]

    def layer_units(self, i: int) -> np.ndarray:
        """The channels scanned in layer ``i`` (its row of ``units`` without padding)."""
        row = np.asarray(self.units[i])
        return row[row >= 0]

    @property
    def suggested_layer(self) -> str:
        """The layer whose modularity at its K is highest."""
        return self.layers[int(np.argmax(self.layer_score()))]

    @property
    def suggested_k(self) -> int:
        """K of :attr:`suggested_layer`."""
        return int(self.layer_k[int(np.argmax(self.layer_score()))])

    def reason(self) -> str:
        """Why this layer and this K, in words."""
        i = int(np.argmax(self.layer_score()))
        j = int(np.flatnonzero(self.ks == self.layer_k[i])[0])
        k = int(self.ks[j])
        layer_scores = self.layer_score()
        others = [f"{la} {s:.2f} (K={int(kk)})" for la, s, kk in
                  zip(self.layers, layer_scores, self.layer_k) if la != self.layers[i]]
        text = (f"{self.layers[i]} with K={k}: its channels form {k} modules that two "
                f"clusterings of overlapping thirds agree on (label consistency "
                f"{self.consistency[i, j]:.2f}, template similarity {self.cosine[i, j]:.2f}), "
                f"and each module acts mostly on about {100 * (1 - self.locality[i, j]):.0f}% "
                f"of the image (locality {self.locality[i, j]:.2f}); modularity "
                f"{layer_scores[i]:.2f}, the highest of the {len(self.layers)} layers")
        text += f" (others: {', '.join(others)})." if others else "."
        row = self.score[i]
        finer = [int(kk) for kk, s in zip(self.ks, row) if kk > k and np.isfinite(s)]
        if finer:
            text += (f" More modules are less reproducible: modularity "
                     f"{row[j + 1]:.2f} at K={finer[0]}.")
        if layer_scores[i] < 0.3:
            text += (" The modularity is low everywhere: the generator may have no clear "
                     "modules at these layers; try more pairs (n_pairs) or look at the "
                     "templates.")
        return text

    def _derived(self) -> dict[str, Any]:
        return {"score": self.score, "layer_k": self.layer_k,
                "suggested_layer": self.suggested_layer, "suggested_k": self.suggested_k,
                "reason": self.reason()}

    def _html_figures(self) -> dict[str, Callable[[], Any]]:
        from cfmodules import plots

        return {"Modularity per layer and K, templates at each layer's K":
                lambda: plots.plot_scan(self)}

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        """The table of modularity per (layer, K) and the suggestion, as text."""
        head = f"{'layer':<14}{'units':>9}{'pairs':>6}  " + "".join(
            f"{'K=' + str(int(k)):>7}" for k in self.ks) + "   K  cons   sim   loc"
        lines = [f"Scan of {self.model}: modularity = consistency x template similarity x "
                 "locality", head]
        for i, la in enumerate(self.layers):
            j = int(np.flatnonzero(self.ks == self.layer_k[i])[0])
            cells = "".join(f"{s:>7.2f}" if np.isfinite(s) else f"{'-':>7}"
                            for s in self.score[i])
            units = f"{len(self.layer_units(i))}/{int(self.channels[i])}"
            lines.append(f"{la:<14}{units:>9}{int(self.n_pairs[i]):>6}  "
                         f"{cells}  {int(self.layer_k[i]):>2}  {self.consistency[i, j]:.2f}  "
                         f"{self.cosine[i, j]:.2f}  {self.locality[i, j]:.2f}")
        lines.append(f"Suggestion: {self.reason()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()


def _pool_for(shape: Sequence[int], pool: int | None) -> int:
    if pool is not None:
        return int(pool)
    return 2 if min(shape) >= 32 else 1


def scan_layers(
    adapter: GeneratorAdapter,
    layers: Sequence[str] | None = None,
    settings: ScanSettings | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> ScanResult:
    """Score the modularity of every candidate layer and K, and suggest one of each.

    Parameters
    ----------
    adapter : GeneratorAdapter
    layers : list of str, optional
        Default :func:`candidate_layers` (the nonlinearities' outputs with >= 8 channels).
    settings : ScanSettings, optional
        Keyword arguments (``n_pairs=16``, ``ks=(2, 3)``, ...) override single fields.
    progress : bool, default True
        One line per layer on stderr.

    Returns
    -------
    ScanResult
        ``to_text()`` for the table, ``suggested_layer``, ``suggested_k``, ``reason()``;
        :func:`cfmodules.plots.plot_scan` draws it.

    Raises
    ------
    ConfigError
        No candidate layer, a layer with fewer than 3 channels, bad settings.
    LayerNotFoundError
        A misspelt layer (before anything runs).
    """
    import datetime
    import sys

    from cfmodules.hooks import resolve_layers
    from cfmodules.influence import influence_maps
    from cfmodules.modules.clustering import cluster_features
    from cfmodules.modules.measures import module_locality
    from cfmodules.modules.preprocess import preprocess, smooth
    from cfmodules.modules.stability import _pool

    if not isinstance(adapter, GeneratorAdapter):
        raise ConfigError(f"scan_layers() takes a GeneratorAdapter, got "
                          f"{type(adapter).__name__}.")
    s = ScanSettings.coerce(settings, "scan", overrides)
    if layers is None:
        names = candidate_layers(adapter)
        if not names:
            raise ConfigError(
                f"{adapter.name} has no spatial layer with >= {MIN_CHANNELS} channels to "
                "scan; give layers=[...] (see `cfmodules layers MODEL`).")
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"Give distinct layer names, got {layers!r}.")
        names = [r.name for r in resolve_layers(adapter.generator, names)]
    n_channels = [adapter.layer_channels(la) for la in names]
    for la, c in zip(names, n_channels):
        if c < 3:
            raise ConfigError(f"{la} has {c} channel(s); the stability protocol needs >= 3.")
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    ks = np.array(sorted(s.ks), dtype=np.int64)
    shape = (len(names), len(ks))
    cons, cos, loc = (np.full(shape, np.nan) for _ in range(3))
    pairs, stderr, templates, timings, scanned = [], [], [], {}, []
    for li, (la, n_ch) in enumerate(zip(names, n_channels)):
        t0 = time.perf_counter()
        units = np.arange(n_ch)
        if n_ch > s.max_units:
            # the subset depends on (seed, layer name) only, not on the other layers
            rng = np.random.default_rng([s.seed, zlib.crc32(la.encode())])
            units = np.sort(rng.choice(n_ch, s.max_units, replace=False))
        scanned.append(units)
        c = len(units)
        if progress:
            print(f"[{li + 1}/{len(names)}] {la}: influence maps of {c} of {n_ch} channels, "
                  f"stability K={ks.tolist()}", file=sys.stderr, flush=True)
        eim = influence_maps(adapter, la, [int(u) for u in units], n_pairs=s.n_pairs,
                             seed=s.seed, pairs_per_block=s.pairs_per_block,
                             target_stderr=s.target_stderr, progress=False)
        pairs.append(int(eim.n_pairs))
        stderr.append(float(np.nanmax(eim.stderr)) if eim.n_pairs > 1 else float("nan"))
        ok = ks[ks <= 2 * (c // 3)]
        pool = _pool_for(eim.maps.shape[1:], s.nmf_pool) if s.method == "nmf" else 1
        stab = s.stability(eim.maps, ok, n_repeats=s.n_repeats, nmf_pool=pool)
        feats = _pool(preprocess(eim.maps, s.window, s.percentile), pool)
        flat = feats.reshape(c, -1)
        smoothed = smooth(eim.maps, s.window).reshape(c, -1)
        best_tmpl = {}
        for k in ok:
            j = int(np.flatnonzero(ks == k)[0])
            cons[li, j] = stab.mean("consistency")[0, list(ok).index(k)]
            cos[li, j] = stab.mean("cosine")[0, list(ok).index(k)]
            labels, _, tm, _, _ = cluster_features(flat, int(k), s.method, s.n_init,
                                                   s.max_iter or STABILITY_MAX_ITER, s.seed,
                                                   s.backend)
            loc[li, j] = module_locality(smoothed, labels, int(k))
            best_tmpl[int(k)] = tm.reshape(int(k), *feats.shape[1:])
        templates.append(best_tmpl)
        timings[la] = time.perf_counter() - t0
    units = np.full((len(names), max(len(u) for u in scanned)), -1, dtype=np.int64)
    for i, u in enumerate(scanned):
        units[i, :len(u)] = u
    result = ScanResult(
        model=adapter.name, layers=names, ks=ks, consistency=cons, cosine=cos, locality=loc,
        channels=np.array(n_channels, dtype=np.int64), units=units,
        n_pairs=np.array(pairs, np.int64), max_stderr=np.array(stderr),
        templates=np.zeros((len(names), 0, 1, 1)), settings=s, timings=timings,
        version=_version(), created=created)
    best = [tm[int(k)] for tm, k in zip(templates, result.layer_k)]
    padded = np.zeros((len(names), int(result.layer_k.max()), *best[0].shape[1:]))
    for i, tm in enumerate(best):
        padded[i, :len(tm)] = tm
    result.templates = padded
    return result


def _version() -> str:
    from cfmodules import __version__

    return __version__
