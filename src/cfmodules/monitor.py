"""Watch modules form while a generator trains: the training-time modularity monitor.

A training loop calls :meth:`ModularityMonitor.step` once per step. Every ``every`` steps
the monitor runs one *check*: the elementary influence maps (EIMs) of the channels of one
layer over a fixed set of latent pairs (the same pairs at every check), their clustering
into K modules, and the Hungarian matching of the new modules to those of the previous
check by their templates, so that module ``j`` is the same module from one check to the
next. Per check it records

- **stability**: the paper's label consistency at K (sec. 4.1: two clusterings of
  overlapping two thirds of the channels agree on the shared third), averaged over a few
  random splits, next to its **chance level** (the consistency of two random labelings
  with the same module sizes, after the same Hungarian matching: well above ``1/K`` for
  a few dozen channels);
- **template shift** of each module: ``1 - cosine`` between its template and the matched
  template of the previous check (0: it did not move);
- **label agreement**: the fraction of channels that stayed in the same (matched) module;
- each module's **size** (channels) and **influence** (mean of the module's influence map,
  the whole module hybridized at once, as in Fig. 8 of the paper);
- how **local** the EIMs are: :func:`cfmodules.modules.locality` of each smoothed map
  (``1 -`` the fraction of the image above half the map's maximum; 0: spread evenly), the
  library's one definition, also the scan's; and the normalized entropy of each map seen
  as a distribution over pixels (1: spread evenly, 0: a single pixel).

It writes ``monitor.jsonl`` (one JSON object per check) and ``monitor.npz`` (the same
numbers as arrays plus every check's templates and labels, no pickle) to ``log_dir``, and
TensorBoard scalars and template images when ``tensorboard`` is installed
(``pip install "cfmodules[monitor]"``). :func:`cfmodules.plots.plot_modularity_curves` and
:func:`cfmodules.plots.plot_template_strip` draw the curves and the templates over training.

The monitor does not disturb training: it runs without gradients, in eval mode (every
module's mode is restored; the adapter's notice that the generator is in train mode is not
shown, since here it is by design), on the adapter's device, and it restores the global random
number generators (Python, numpy, torch CPU and CUDA); it never touches the optimizer, and
BatchNorm running statistics do not move in eval mode. A run with the monitor ends with
weights bitwise identical to a run without it.

>>> adapter = GeneratorAdapter(G, latent_shape=64)
>>> monitor = ModularityMonitor(adapter, "block16.elu2", every=500, log_dir="runs/began")
>>> for step in range(n_steps):
...     train_step(...)
...     monitor.step(step)
>>> monitor.close()
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmodules import checks
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import CfModulesError, ConfigError, ShapeError
from cfmodules.files import atomic_write
from cfmodules.modules.measures import locality
from cfmodules.modules.preprocess import smooth
from cfmodules.modules.settings import ClusteringSettings
from cfmodules.results import read_npz, write_npz

__all__ = [
    "ModularityMonitor",
    "MonitorSettings",
    "ModularityCheck",
    "MonitorHistory",
    "match_templates",
    "map_entropy",
    "chance_consistency",
    "KIND",
]

KIND = "monitor"
_TB_INSTALL = 'pip install "cfmodules[monitor]"  (or: pip install tensorboard)'


@dataclass(frozen=True, kw_only=True)
class MonitorSettings(ClusteringSettings):
    """What a check computes, and how often.

    Adds to the clustering fields of :class:`~cfmodules.modules.ClusteringSettings`, with
    their checks, what a check needs (``seed`` also draws its latent pairs); keywords only.

    Attributes
    ----------
    every : int, default 1000
        Steps between checks (a check runs when ``step % every == 0``, step 0 included).
        At this default a check costs well under 5% of the training time of the
        BEGAN-Olivetti example (``benchmarks/bench_monitor.py``).
    n_modules : int, default 3
        K, the number of modules.
    n_pairs : int, default 32
        Latent pairs of each check (the most, with ``target_stderr``); pairs ``0 ..
        n_pairs-1`` of the latent stream ``seed``, the same at every check.
    target_stderr : float or None, default None
        Stop the influence maps early once the largest per-pixel standard error is at most
        this (image units); the record says how many pairs were used.
    n_init : int, default 3
        Restarts of each clustering.
    stability_repeats : int, default 5
        Random three-way splits of the stability at K (each costs two clusterings).
    module_influence : bool, default True
        Also hybridize each whole module (K more units) for its influence.
    """

    every: int = 1000
    n_modules: int = 3
    n_pairs: int = 32
    target_stderr: float | None = None
    n_init: int = 3
    stability_repeats: int = 5
    module_influence: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_ints("every", "n_modules", "n_pairs", "stability_repeats")
        if self.n_pairs < 2:
            raise ConfigError(f"n_pairs must be at least 2 (a standard error needs two), "
                              f"got {self.n_pairs}.")
        if self.target_stderr is not None:
            self._set("target_stderr", checks.positive_number(self.target_stderr,
                                                              "target_stderr"))
        if not isinstance(self.module_influence, bool):
            raise ConfigError(f"module_influence must be True or False, got "
                              f"{self.module_influence!r}.")


@dataclass(frozen=True, eq=False)
class ModularityCheck:
    """The numbers of one check. Module ``j`` is matched to module ``j`` of the previous check.

    Attributes
    ----------
    step : int
    n_pairs : int
        Latent pairs the influence maps averaged over.
    max_stderr : float
        Largest per-pixel standard error of the EIMs.
    stability : float
        Mean label consistency at K over ``stability_repeats`` splits (sec. 4.1).
    stability_cosine : float
        Mean cosine similarity of the matched templates of those splits.
    stability_chance : float
        The stability two random labelings with these module sizes would get
        (:func:`chance_consistency`).
    locality : float
        Mean :func:`cfmodules.modules.locality` of the EIMs smoothed with ``window`` (1 -
        the fraction of the image above half the map's maximum; dead channels left out).
    entropy : float
        Mean normalized entropy of the EIMs (:func:`map_entropy`; 1: spread evenly).
    label_agreement : float or None
        Fraction of channels in the same matched module as at the previous check.
    sizes : tuple of int (K,)
    influence : tuple of float (K,)
        Mean over pixels of each module's influence map (NaN for an empty module, or when
        ``module_influence`` is off).
    template_shift : tuple of float (K,) or None
        ``1 - cosine`` between each template and its match at the previous check.
    template_locality : tuple of float (K,)
        :func:`cfmodules.modules.locality` of each template (NaN for an empty module).
    seconds : float
        Wall time of the check.
    cpu_seconds : float
        CPU time of the process during the check (all threads).
    labels : ndarray (C,) of int
    templates : ndarray (K, H, W)
    """

    step: int
    n_pairs: int
    max_stderr: float
    stability: float
    stability_cosine: float
    stability_chance: float
    locality: float
    entropy: float
    label_agreement: float | None
    sizes: tuple[int, ...]
    influence: tuple[float, ...]
    template_shift: tuple[float, ...] | None
    template_locality: tuple[float, ...]
    seconds: float
    cpu_seconds: float
    labels: np.ndarray = field(repr=False)
    templates: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON line of this check (templates stay in the ``.npz``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "templates"}
        d["labels"] = [int(x) for x in self.labels]
        for key in ("sizes", "influence", "template_shift", "template_locality"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


@dataclass(frozen=True, eq=False)
class MonitorHistory:
    """Every check of a monitor as arrays (T checks, K modules, C channels).

    Attributes
    ----------
    steps : ndarray (T,) of int
    stability, stability_cosine, stability_chance, locality, entropy, label_agreement,
    max_stderr, seconds, cpu_seconds : ndarray (T,)
        ``label_agreement[0]`` is NaN (no previous check).
    n_pairs : ndarray (T,) of int
    sizes : ndarray (T, K) of int
    influence, template_shift, template_locality : ndarray (T, K)
        ``template_shift[0]`` is NaN.
    labels : ndarray (T, C) of int
    templates : ndarray (T, K, H, W)
    layer : str
    model : str
    settings : dict
    """

    steps: np.ndarray
    stability: np.ndarray
    stability_cosine: np.ndarray
    stability_chance: np.ndarray
    locality: np.ndarray
    entropy: np.ndarray
    label_agreement: np.ndarray
    max_stderr: np.ndarray
    seconds: np.ndarray
    cpu_seconds: np.ndarray
    n_pairs: np.ndarray
    sizes: np.ndarray
    influence: np.ndarray
    template_shift: np.ndarray
    template_locality: np.ndarray
    labels: np.ndarray
    templates: np.ndarray
    layer: str = ""
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    _ARRAYS = ("steps", "stability", "stability_cosine", "stability_chance", "locality",
               "entropy", "label_agreement", "max_stderr", "seconds", "cpu_seconds", "n_pairs", "sizes", "influence", "template_shift",
               "template_locality", "labels", "templates")

    @classmethod
    def from_checks(cls, checks: Sequence[ModularityCheck], layer: str = "", model: str = "",
                    settings: Mapping[str, Any] | None = None) -> MonitorHistory:
        """Stack the records of :class:`ModularityCheck` (at least one)."""
        if not checks:
            raise ConfigError("No check has run yet; call monitor.step(step) in the training "
                              "loop (a check runs when step % every == 0).")
        nan = float("nan")
        k = len(checks[0].sizes)
        return cls(
            steps=np.array([c.step for c in checks], np.int64),
            stability=np.array([c.stability for c in checks], np.float64),
            stability_cosine=np.array([c.stability_cosine for c in checks], np.float64),
            stability_chance=np.array([c.stability_chance for c in checks], np.float64),
            locality=np.array([c.locality for c in checks], np.float64),
            entropy=np.array([c.entropy for c in checks], np.float64),
            label_agreement=np.array([nan if c.label_agreement is None else c.label_agreement
                                      for c in checks], np.float64),
            max_stderr=np.array([c.max_stderr for c in checks], np.float64),
            seconds=np.array([c.seconds for c in checks], np.float64),
            cpu_seconds=np.array([c.cpu_seconds for c in checks], np.float64),
            n_pairs=np.array([c.n_pairs for c in checks], np.int64),
            sizes=np.array([c.sizes for c in checks], np.int64).reshape(-1, k),
            influence=np.array([c.influence for c in checks], np.float64).reshape(-1, k),
            template_shift=np.array([[nan] * k if c.template_shift is None
                                     else c.template_shift for c in checks],
                                    np.float64).reshape(-1, k),
            template_locality=np.array([c.template_locality for c in checks],
                                       np.float64).reshape(-1, k),
            labels=np.stack([c.labels for c in checks]).astype(np.int64),
            templates=np.stack([c.templates for c in checks]).astype(np.float32),
            layer=layer, model=model, settings=dict(settings or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the history to one ``.npz`` (arrays + JSON header, atomically)."""
        return write_npz(path, {k: getattr(self, k) for k in self._ARRAYS},
                         {"kind": KIND, "layer": self.layer, "model": self.model,
                          "settings": self.settings})

    @classmethod
    def load(cls, path: str | Path) -> MonitorHistory:
        """Read a history written by :meth:`save` (or ``log_dir/monitor.npz``; no pickle).

        ``path`` may be the log folder itself.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "monitor.npz"
        arrays, header = read_npz(p, kind=KIND)
        missing = [k for k in cls._ARRAYS if k not in arrays]
        if missing:
            from cfmodules.errors import ResultFileError

            raise ResultFileError(f"'{p}' lacks the arrays {missing} of a monitor history.")
        return cls(**{k: arrays[k] for k in cls._ARRAYS}, layer=str(header.get("layer", "")),
                   model=str(header.get("model", "")), settings=dict(header.get("settings", {})))

    def __len__(self) -> int:
        return len(self.steps)


# ---------------------------------------------------------------------- measures
def map_entropy(maps: Any) -> np.ndarray:
    """Normalized entropy of each map seen as a distribution over its pixels.

    Parameters
    ----------
    maps : array (N, H, W), non-negative

    Returns
    -------
    ndarray (N,)
        ``-sum(p log p) / log(H W)`` with ``p = map / map.sum()``: 1 for a map spread evenly
        over the image, 0 for a single pixel; NaN for an all-zero map.
    """
    flat = _flat_maps(maps)
    n_pix = flat.shape[1]
    total = flat.sum(axis=1, keepdims=True)
    out = np.full(len(flat), np.nan)
    ok = total[:, 0] > 0
    if n_pix < 2:
        out[ok] = 0.0
        return out
    p = flat[ok] / total[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    out[ok] = h / math.log(n_pix)
    return out


def _flat_maps(maps: Any) -> np.ndarray:
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ShapeError(f"maps must have shape (N, H, W) with N >= 1, got {arr.shape}.")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ConfigError("The maps must be finite and non-negative (influence maps are).")
    return arr.reshape(len(arr), -1)


def chance_consistency(sizes: Sequence[int], n_channels: int, n_draws: int = 200,
                       seed: int = 0) -> float:
    """Label consistency of two random labelings after Hungarian matching (the chance level).

    The stability protocol compares two labelings of the third ``B`` of the channels and
    matches their modules so as to agree the most, so even unrelated labelings agree on
    more than ``1/K`` of a small set. This draws both labelings of ``|B| = n_channels // 3``
    channels independently, each channel in module ``j`` with probability
    ``sizes[j] / sum(sizes)``, and averages the matched consistency.

    Parameters
    ----------
    sizes : sequence of int (K,)
        Module sizes (channels).
    n_channels : int
        Channels of the layer.
    n_draws : int, default 200
    seed : int, default 0

    Returns
    -------
    float
    """
    from cfmodules.modules import match_labels

    p = np.asarray(sizes, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"sizes must be non-negative module sizes, got {sizes!r}.")
    k, n_b = len(p), max(1, int(n_channels) // 3)
    rng = np.random.RandomState(seed)
    draws = rng.choice(k, size=(n_draws, 2, n_b), p=p / p.sum())
    return float(np.mean([match_labels(a, b, k)[0] for a, b in draws]))


def match_templates(previous: Any, current: Any) -> tuple[np.ndarray, np.ndarray]:
    """Match the modules of two clusterings by their templates (Hungarian algorithm).

    Parameters
    ----------
    previous, current : array (K, H, W) or (K, P)
        Templates of the previous and the current check.

    Returns
    -------
    order : ndarray (K,) of int
        ``current[order[j]]`` is the template matched to ``previous[j]``: reindexing the
        current modules by ``order`` keeps module numbers across checks.
    cosine : ndarray (K,)
        Cosine similarity of each matched pair (``previous[j]``, ``current[order[j]]``);
        0 where a template is zero everywhere.
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(previous, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape != b.shape:
        raise ShapeError(f"Templates of shapes {a.shape} and {b.shape} cannot be matched "
                         "(the same K and map size are needed).")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where((na[:, None] > 0) & (nb[None] > 0), (a @ b.T) / np.outer(na, nb), 0.0)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    order = np.empty(len(a), dtype=np.int64)
    order[rows] = cols
    return order, sim[np.arange(len(a)), order]


# ---------------------------------------------------------------------- isolation
@contextmanager
def _isolated(adapter: GeneratorAdapter) -> Iterator[None]:
    """Restore the global RNGs (Python, numpy, torch CPU and CUDA) and the grad mode after the block.

    The adapter does not warn that the generator is in train mode: it is, by design, and
    the check runs it in eval mode (module docstring).

    The monitor draws its latents from its own ``torch.Generator`` streams already; this
    guarantees that nothing inside (a user's prior, scikit-learn, a generator with random
    layers) can shift the training's random stream.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = (list(range(torch.cuda.device_count()))
               if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            adapter._train_mode_expected():
        autocast_off = (torch.autocast(adapter.device.type, enabled=False)
                        if adapter.device.type in ("cpu", "cuda") else _null())
        with autocast_off:
            try:
                yield
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


@contextmanager
def _null() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------- the monitor
class ModularityMonitor:
    """Track the modules of one layer of a generator during training.

    Parameters
    ----------
    adapter : GeneratorAdapter
        The generator being trained, wrapped once; keep using the same adapter (it follows
        the weight updates of the optimizer).
    layer : str
        Layer whose channels are the units (e.g. ``"block16.elu2"``).
    settings : MonitorSettings, optional
        Keyword arguments (``every=200``, ``n_modules=4``, ...) override single fields.
    log_dir : path, optional
        Folder for ``monitor.jsonl``, ``monitor.npz`` and TensorBoard event files (created
        if missing). Without it the checks are only kept in memory (:attr:`checks`).
    tensorboard : bool or None, default None
        Write TensorBoard scalars and template images to ``log_dir``: None (default) when
        ``tensorboard`` is installed, True to require it, False never.
    errors : {"warn", "raise"}, default "warn"
        What a check that fails at run time does (e.g. the generator diverged to NaN):
        warn and record the error in ``monitor.jsonl``, so training goes on, or raise.

    Attributes
    ----------
    checks : list of ModularityCheck
    seconds : float
        Total wall time spent in checks (the monitor's overhead).
    """

    def __init__(
        self,
        adapter: GeneratorAdapter,
        layer: str,
        settings: MonitorSettings | None = None,
        *,
        log_dir: str | Path | None = None,
        tensorboard: bool | None = None,
        errors: str = "warn",
        **overrides: Any,
    ):
        if not isinstance(adapter, GeneratorAdapter):
            raise ConfigError(
                f"ModularityMonitor takes a GeneratorAdapter, got {type(adapter).__name__}; wrap "
                "the generator once: cfmodules.GeneratorAdapter(generator, latent_shape).")
        self.settings = MonitorSettings.coerce(settings, "monitor", overrides)
        if errors not in ("warn", "raise"):
            raise ConfigError(f"errors must be 'warn' or 'raise', got {errors!r}.")
        if tensorboard not in (None, True, False):
            raise ConfigError(f"tensorboard must be None, True or False, got {tensorboard!r}.")
        from cfmodules.hooks import resolve_layer

        self.adapter = adapter
        self.layer = resolve_layer(adapter.generator, layer).name
        with adapter._train_mode_expected():  # a generator in training: no notice
            n_channels = adapter.layer_channels(self.layer)
        k = self.settings.n_modules
        if k > n_channels:
            raise ConfigError(f"n_modules={k} is more than the {n_channels} channels of "
                              f"'{self.layer}'; use n_modules <= {n_channels}.")
        if 2 * (n_channels // 3) < k:
            raise ConfigError(f"The stability at K splits the {n_channels} channels of "
                              f"'{self.layer}' in three; K={k} is more than a two-thirds "
                              f"subset ({2 * (n_channels // 3)}). Use a smaller K.")
        self.errors = errors
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if tensorboard and self.log_dir is None:
            raise ConfigError("tensorboard=True needs a log_dir for the event files.")
        if tensorboard:
            _require_tensorboard()
        self._tensorboard = tensorboard
        self._writer: Any = None
        self.checks: list[ModularityCheck] = []
        self.failures: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._last_step: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ the loop's calls
    def step(self, step: int) -> ModularityCheck | None:
        """Call once per training step; runs a check when ``step % every == 0``.

        Parameters
        ----------
        step : int
            The training step (non-negative, increasing from call to call).

        Returns
        -------
        ModularityCheck or None
            The check's record, None when no check ran (or it failed with ``errors="warn"``).
        """
        s = checks.integer(step, "step", low=0)
        if self._last_step is not None and s < self._last_step:
            raise ConfigError(
                f"step went back from {self._last_step} to {s}; pass the training step, which "
                "only increases (start a new ModularityMonitor for a new run).")
        repeat = self._last_step == s
        self._last_step = s
        if repeat or s % self.settings.every != 0:
            return None
        return self.check(s)

    def check(self, step: int) -> ModularityCheck | None:
        """Run one check now (influence maps, clustering, matching, logging)."""
        if self._closed:
            raise ConfigError("This monitor is closed; create a new one.")
        t0 = time.perf_counter()
        try:
            record = self._check(int(step), t0)
        except CfModulesError as err:
            self.seconds += time.perf_counter() - t0
            if self.errors == "raise":
                raise
            failure = {"step": int(step), "error": f"{type(err).__name__}: {err}"}
            self.failures.append(failure)
            warnings.warn(f"Modularity check at step {step} failed and was skipped: "
                          f"{failure['error']}", UserWarning, stacklevel=3)
            self._write_files()
            return None
        self.seconds += record.seconds
        self.checks.append(record)
        self._write_files()
        self._write_tensorboard(record)
        return record

    def history(self) -> MonitorHistory:
        """Every check so far, as arrays (for :func:`cfmodules.plots.plot_modularity_curves`)."""
        return MonitorHistory.from_checks(self.checks, self.layer, self.adapter.name,
                                          self.settings.to_dict())

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSON and npz files are always complete)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> ModularityMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ModularityMonitor({self.adapter.name}, layer={self.layer!r}, "
                f"every={self.settings.every}, K={self.settings.n_modules}, "
                f"checks={len(self.checks)}, seconds={self.seconds:.1f})")

    # ------------------------------------------------------------------ one check
    def _check_device(self) -> None:
        p = next(iter(self.adapter.generator.parameters()), None)
        if p is not None and p.device != self.adapter.device:
            raise ConfigError(
                f"The generator's parameters are on {p.device} but its adapter on "
                f"{self.adapter.device}; wrap the generator after moving it (or move it back) "
                "so the monitor runs where the model is.")

    def _check(self, step: int, t0: float) -> ModularityCheck:
        from cfmodules.influence import influence_maps, module_influence_maps

        s = self.settings
        self._check_device()
        cpu0 = time.process_time()
        with _isolated(self.adapter):
            eims = influence_maps(self.adapter, self.layer, n_pairs=s.n_pairs, seed=s.seed,
                                  target_stderr=s.target_stderr, progress=False)
            maps = eims.maps
            with warnings.catch_warnings():
                # dead channels and empty modules are normal early in training; the record
                # shows them (sizes), a warning per check would drown the training log
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", _convergence_warning())
                if not np.isfinite(maps).all() or not maps.any():
                    raise _no_maps_error(step, self.layer, maps)
                # in this process (n_jobs=1): a check inside a training loop must not
                # start worker processes that compete with the training for the cores
                clust = s.estimator(s.n_modules, n_jobs=1).fit(maps)
                stab = s.stability(maps, (s.n_modules,), n_repeats=s.stability_repeats,
                                   n_jobs=1)
            labels, templates = clust.labels_, clust.templates_
            shift: tuple[float, ...] | None = None
            agreement: float | None = None
            if self.checks:
                prev = self.checks[-1]
                order, cos = match_templates(prev.templates, templates)
                templates = templates[order]
                new_label = np.empty_like(order)
                new_label[order] = np.arange(len(order))
                labels = new_label[labels]
                shift = tuple(float(1.0 - c) for c in cos)
                agreement = float((labels == prev.labels).mean())
            sizes = np.bincount(labels, minlength=s.n_modules)
            influence = [float("nan")] * s.n_modules
            if s.module_influence:
                modules = {f"module {j}": {self.layer: np.flatnonzero(labels == j).tolist()}
                           for j in range(s.n_modules) if sizes[j]}
                mres = module_influence_maps(self.adapter, modules, n_pairs=eims.n_pairs,
                                        seed=s.seed, progress=False)
                for name, m in zip(mres.names, mres.maps):
                    influence[int(name.split()[-1])] = float(np.mean(m))
        ent = map_entropy(maps.clip(0))
        loc = locality(smooth(maps.clip(0), s.window))
        return ModularityCheck(
            step=step, n_pairs=int(eims.n_pairs),
            max_stderr=float(np.nanmax(eims.stderr)) if eims.stderr.size else float("nan"),
            stability=float(stab.mean("consistency")[0, 0]),
            stability_cosine=float(stab.mean("cosine")[0, 0]),
            stability_chance=chance_consistency(sizes, len(labels), seed=s.seed),
            locality=_nanmean(loc), entropy=_nanmean(ent),
            label_agreement=agreement, sizes=tuple(int(x) for x in sizes),
            influence=tuple(influence), template_shift=shift,
            template_locality=tuple(float(x) for x in locality(templates)),
            seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0, labels=np.asarray(labels, np.int64),
            templates=np.asarray(templates, np.float32),
        )

    # ------------------------------------------------------------------ outputs
    def _write_files(self) -> None:
        if self.log_dir is None:
            return
        lines = [json.dumps(c.to_dict(), allow_nan=True) for c in self.checks]
        lines += [json.dumps(f) for f in self.failures]
        atomic_write(self.log_dir / "monitor.jsonl", ("\n".join(lines) + "\n").encode())
        if self.checks:
            self.history().save(self.log_dir / "monitor.npz")

    def _write_tensorboard(self, c: ModularityCheck) -> None:
        if self.log_dir is None or self._tensorboard is False:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if self._tensorboard:
                    raise
                self._tensorboard = False  # not installed: JSON lines and npz only
                return
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        w, s = self._writer, c.step
        w.add_scalar("modularity/stability", c.stability, s)
        w.add_scalar("modularity/stability_chance", c.stability_chance, s)
        w.add_scalar("modularity/locality", c.locality, s)
        w.add_scalar("modularity/entropy", c.entropy, s)
        w.add_scalar("modularity/seconds", c.seconds, s)
        if c.label_agreement is not None:
            w.add_scalar("modularity/label_agreement", c.label_agreement, s)
        for j in range(len(c.sizes)):
            w.add_scalar(f"module{j}/size", c.sizes[j], s)
            if math.isfinite(c.influence[j]):
                w.add_scalar(f"module{j}/influence", c.influence[j], s)
            if c.template_shift is not None:
                w.add_scalar(f"module{j}/template_shift", c.template_shift[j], s)
        strip = np.concatenate(list(c.templates), axis=1)  # (H, K*W), templates in [0, 1]
        w.add_image("modularity/templates", np.clip(strip, 0, 1)[None], s, dataformats="CHW")
        w.flush()


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        from cfmodules.errors import ModelNotAvailableError

        raise ModelNotAvailableError(
            f"tensorboard=True but the tensorboard package is not installed: {_TB_INSTALL}."
        ) from e


def _convergence_warning() -> type[Warning]:
    from sklearn.exceptions import ConvergenceWarning

    return ConvergenceWarning


def _no_maps_error(step: int, layer: str, maps: np.ndarray) -> CfModulesError:
    from cfmodules.errors import GeneratorOutputError

    what = "non-finite values" if not np.isfinite(maps).all() else "only zeros"
    return GeneratorOutputError(
        f"At step {step} the influence maps of '{layer}' hold {what}: no channel changes the "
        "output (dead layer) or the generator diverged; nothing to cluster.")
