"""How influence maps are clustered: the settings that analysis, scan and monitor share.

:class:`ClusteringSettings` is the one home of the clustering settings -- the method,
the pre-processing (smoothing window, threshold percentile), the restarts and iterations,
the engine and the seed -- and of their checks. :class:`cfmodules.analysis.AnalysisSettings`,
:class:`cfmodules.scan.ScanSettings` and :class:`cfmodules.monitor.MonitorSettings` derive
from it and add what they alone need (latent pairs, K or the Ks of a sweep, ...), so a
setting has one name, one meaning and one check everywhere, and the fields stay flat
(``settings.window``) in code and in result files.

>>> s = ClusteringSettings(method="kmeans", n_init=5)
>>> s.estimator(n_modules=3).fit(maps)             # a ModuleClustering with these settings
>>> s.stability(maps, ks=(2, 3, 4), n_repeats=10)  # the stability protocol (sec. 4.1)
>>> s.updated("clustering", window=5)              # a copy, checked, with one field changed
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from cfmodules import checks
from cfmodules.errors import ConfigError, did_you_mean

__all__ = ["ClusteringSettings", "FIT_MAX_ITER", "STABILITY_MAX_ITER", "STABILITY_N_INIT"]

FIT_MAX_ITER = 500
"""Iterations per start of one clustering (:class:`ModuleClustering`'s default)."""
STABILITY_MAX_ITER = 300
"""Iterations per start of each of the many fits of the stability protocol."""
STABILITY_N_INIT = 3
"""Restarts of each fit of the analysis's stability sweep (fewer than one clustering's)."""

S = TypeVar("S", bound="ClusteringSettings")


@dataclass(frozen=True, kw_only=True)
class ClusteringSettings:
    """How influence maps are clustered into modules (sec. 3.4), with the checks of each field.

    Every field is checked (and numpy integers made ``int``) when the object is made, so a
    bad value fails at once, before any influence map is computed. Fields are keywords
    only.

    Attributes
    ----------
    method : {"nmf", "kmeans"}, default "nmf"
        NMF of the thresholded maps (the paper's method) or k-means (its baseline).
    window : odd int or (odd int, odd int), default 3
        Smoothing window in pixels applied to each map before the threshold (1: none).
    percentile : float in (0, 100) or None, default 75
        Each smoothed map is thresholded at this percentile of its own values (None:
        cluster the smoothed maps themselves).
    n_init : int, default 10
        Restarts of each clustering (the best fit is kept). The analysis, the scan and
        the monitor have their own defaults (10, 2, 3).
    max_iter : int or None, default None
        Iterations per restart; None: 500 (:data:`FIT_MAX_ITER`) for a clustering and 300
        (:data:`STABILITY_MAX_ITER`) for each of the many fits of the stability protocol.
    backend : {"fast", "sklearn"}, default "fast"
        Engine of the clusterings (:mod:`cfmodules.modules.fits`): ``"sklearn"`` is the
        reference (scikit-learn); ``"fast"`` runs the same k-means, and NMF with the same
        updates and starts in float32, restarts batched, stopped when the labels are stable
        (not bit for bit: the sweep's statistics agree within 0.02 on the DCGAN faces).
    seed : int in [0, 2**32), default 0
        Seed of the clusterings (and, in the analysis, scan and monitor, of the latent
        pairs).
    """

    method: str = "nmf"
    window: int | tuple[int, int] = checks.DEFAULT_WINDOW
    percentile: float | None = checks.DEFAULT_PERCENTILE
    n_init: int = 10
    max_iter: int | None = None
    backend: str = "fast"
    seed: int = 0

    def __post_init__(self) -> None:
        self._set("method", checks.clustering_method(self.method))
        pair = checks.window(self.window)
        self._set("window", pair if isinstance(self.window, (tuple, list)) else pair[0])
        if self.percentile is not None:
            self._set("percentile", checks.percentile(self.percentile))
        self._set("n_init", checks.positive_int(self.n_init, "n_init"))
        if self.max_iter is not None:
            self._set("max_iter", checks.positive_int(self.max_iter, "max_iter"))
        self._set("backend", checks.one_of(self.backend, "backend", checks.CLUSTERING_BACKENDS))
        self._set("seed", checks.seed(self.seed))

    def _set(self, name: str, value: Any) -> None:
        """Store a checked (normalised) value in this frozen object (for ``__post_init__``)."""
        object.__setattr__(self, name, value)

    def _positive_ints(self, *names: str) -> None:
        """Check that each named field is an integer >= 1 (stored as ``int``)."""
        for name in names:
            self._set(name, checks.positive_int(getattr(self, name), name))

    def _positive_int_tuple(self, name: str, what: str | None = None) -> None:
        """Check that a field is a sequence of integers >= 1 (stored as a tuple of ``int``)."""
        value = getattr(self, name)
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{name} must be a sequence of positive integers, got {value!r}.")
        self._set(name, tuple(checks.positive_int(v, what or f"each of {name}") for v in value))

    # ------------------------------------------------------------------ copies, dicts
    def updated(self: S, what: str, **overrides: Any) -> S:
        """A checked copy with some fields changed (``what`` names the settings in errors).

        Raises
        ------
        ConfigError
            An unknown setting (with a 'did you mean'), or a bad value.
        """
        names = [f.name for f in fields(self)]
        for key in overrides:
            if key not in names:
                raise ConfigError(f"Unknown {what} setting {key!r}.{did_you_mean(key, names)} "
                                  f"Settings: {', '.join(names)}.")
        return replace(self, **overrides) if overrides else self

    @classmethod
    def coerce(cls: type[S], settings: Any, what: str, overrides: Mapping[str, Any]) -> S:
        """``settings`` (default ``cls()``) with ``overrides``: what a function's
        ``settings=None, **overrides`` arguments mean.

        Raises
        ------
        ConfigError
            ``settings`` of another type, or an unknown or bad setting.
        """
        base = cls() if settings is None else settings
        if not isinstance(base, cls):
            raise ConfigError(f"settings must be a {cls.__name__}, got {type(base).__name__}.")
        return base.updated(what, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """Inverse of :meth:`to_dict`; unknown keys (newer files) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in data.items() if k in names})

    # ------------------------------------------------------------------ what they make
    def estimator(self, n_modules: int, n_jobs: int | None = None) -> Any:
        """An unfitted :class:`~cfmodules.modules.ModuleClustering` with these settings
        (``n_jobs``: its processes, which change no number)."""
        from cfmodules.modules.clustering import ModuleClustering

        return ModuleClustering(n_modules, self.method, window=self.window,
                                percentile=self.percentile, n_init=self.n_init,
                                max_iter=self.max_iter or FIT_MAX_ITER, random_state=self.seed,
                                backend=self.backend, n_jobs=n_jobs)

    def stability(self, maps: Any, ks: Iterable[int], *, methods: Sequence[str] | None = None,
                  n_repeats: int, n_init: int | None = None, nmf_pool: int = 1,
                  progress: bool = False, n_jobs: int | None = None) -> Any:
        """:func:`~cfmodules.modules.cluster_stability` of ``maps`` with these settings.

        Parameters
        ----------
        maps : array (C, H, W)
        ks : iterable of int
        methods : sequence of str, optional
            Default ``(self.method,)``.
        n_repeats : int
        n_init : int, optional
            Restarts of each fit, default ``self.n_init`` (the analysis's sweep keeps the
            protocol's own 3).
        nmf_pool, progress, n_jobs
            As in :func:`~cfmodules.modules.cluster_stability`.
        """
        return self.start_stability(maps, ks, methods=methods, n_repeats=n_repeats,
                                    n_init=n_init, nmf_pool=nmf_pool, progress=progress,
                                    n_jobs=n_jobs).result()

    def start_stability(self, maps: Any, ks: Iterable[int], *,
                        methods: Sequence[str] | None = None, n_repeats: int,
                        n_init: int | None = None, nmf_pool: int = 1, progress: bool = False,
                        n_jobs: int | None = None) -> Any:
        """:meth:`stability` started: a :class:`~cfmodules.modules.stability.StabilityRun`
        (:func:`~cfmodules.modules.stability.start_stability`)."""
        from cfmodules.modules.stability import start_stability

        return start_stability(
            maps, ks=ks, methods=(self.method,) if methods is None else methods,
            n_repeats=n_repeats, window=self.window, percentile=self.percentile,
            n_init=self.n_init if n_init is None else n_init,
            max_iter=self.max_iter or STABILITY_MAX_ITER, seed=self.seed, progress=progress,
            backend=self.backend, nmf_pool=nmf_pool, n_jobs=n_jobs)
