"""Stability of the clustering and the choice of K (sec. 4.1 and Fig. 9 of Besserve et al.).

The protocol, exactly as in the paper: split the channels' influence maps at random into
three subsets A, B, C; cluster A+B and, separately, B+C (two thirds each, overlapping on the
third B); match the two runs' modules with the Hungarian algorithm so as to maximise the
*label consistency* on B (the fraction of B's maps given the same module by both runs);
report that consistency and the mean *cosine similarity* of the matched templates. Repeat
(20 times by default) and sweep K, for NMF and k-means side by side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cfmodules import checks
from cfmodules.errors import ConfigError, ShapeError
from cfmodules.modules.fits import (
    BACKENDS,
    check_jobs,
    engine_description,
    fit_rows,
    start_parallel,
)
from cfmodules.modules.preprocess import (
    DEFAULT_PERCENTILE,
    DEFAULT_WINDOW,
    as_maps,
    check_count,
    check_percentile,
    check_window,
    preprocess,
)
from cfmodules.modules.randomness import as_random_state
from cfmodules.results import Result

__all__ = [
    "StabilityResult",
    "cluster_stability",
    "start_stability",
    "StabilityRun",
    "suggest_k",
    "match_labels",
    "template_similarity",
    "DEFAULT_KS",
]

DEFAULT_KS = (2, 3, 4, 5, 6)
METRICS = ("consistency", "cosine")


def match_labels(labels_a: Any, labels_b: Any, n_modules: int | None = None
                 ) -> tuple[float, np.ndarray]:
    """Match the modules of two labelings of the same channels (Hungarian algorithm).

    Parameters
    ----------
    labels_a, labels_b : array (N,) of int
        Module of each of N channels in two clusterings.
    n_modules : int, optional
        K; default one more than the largest label.

    Returns
    -------
    consistency : float
        The largest fraction of channels with the same module in both, over all one-to-one
        matchings of modules (1.0: identical partitions up to renumbering).
    match : ndarray (K,) of int
        ``match[i]`` is the module of ``labels_b`` matched to module ``i`` of ``labels_a``.
    """
    a = np.asarray(labels_a, dtype=np.int64)
    b = np.asarray(labels_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ShapeError(f"Two labelings of the same channels are needed: shapes {a.shape} "
                         f"and {b.shape}.")
    if min(a.min(), b.min()) < 0:
        raise ConfigError("Labels must be non-negative module numbers.")
    k = int(max(a.max(), b.max())) + 1 if n_modules is None else int(n_modules)
    if k <= max(a.max(), b.max()):
        raise ConfigError(f"Labels go up to {int(max(a.max(), b.max()))} but n_modules={k}.")
    from scipy.optimize import linear_sum_assignment  # here: loading a result needs no scipy

    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (a, b), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    match = np.empty(k, dtype=np.int64)
    match[rows] = cols
    return float(counts[rows, cols].sum() / a.size), match


def template_similarity(templates_a: Any, templates_b: Any, match: Any | None = None) -> float:
    """Mean cosine similarity of matched templates.

    Parameters
    ----------
    templates_a, templates_b : array (K, H, W) or (K, P)
    match : array (K,) of int, optional
        ``templates_b[match[i]]`` is compared with ``templates_a[i]``; default identity.

    Returns
    -------
    float
        Mean over the K pairs of <a, b> / (|a| |b|); 1 for identical templates. A template
        that is zero everywhere has similarity 0 with anything.
    """
    ta = np.asarray(templates_a, dtype=np.float64)
    tb = np.asarray(templates_b, dtype=np.float64)
    ta = ta.reshape(len(ta), -1)
    tb = tb.reshape(len(tb), -1)
    if ta.shape != tb.shape:
        raise ShapeError(f"Templates of shapes {ta.shape} and {tb.shape} cannot be compared.")
    m = np.arange(len(ta)) if match is None else np.asarray(match)
    tb = tb[m]
    na = np.linalg.norm(ta, axis=1)
    nb = np.linalg.norm(tb, axis=1)
    dots = (ta * tb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dots / (na * nb), 0.0)
    return float(cos.mean())


@dataclass(frozen=True)
class StabilityResult(Result):
    """Label consistency and template similarity across K and methods (data of Fig. 9).

    Attributes
    ----------
    ks : ndarray (n_k,) of int
        The numbers of modules tried.
    methods : tuple of str
        Clustering methods, e.g. ``("nmf", "kmeans")``.
    consistency : ndarray (n_methods, n_k, n_repeats)
        Label consistency on the overlapping third, per repetition.
    cosine : ndarray (n_methods, n_k, n_repeats)
        Mean cosine similarity of matched templates, per repetition.
    settings : dict
        The protocol's settings (JSON-serialisable).
    """

    kind: ClassVar[str] = "stability"

    ks: np.ndarray
    methods: tuple[str, ...]
    consistency: np.ndarray
    cosine: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def _metric(self, metric: str) -> np.ndarray:
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}.")
        return self.consistency if metric == "consistency" else self.cosine

    def mean(self, metric: str = "consistency") -> np.ndarray:
        """Mean over repetitions, shape (n_methods, n_k)."""
        return self._metric(metric).mean(axis=-1)

    def std(self, metric: str = "consistency") -> np.ndarray:
        """Standard deviation over repetitions (the paper's error bars), (n_methods, n_k)."""
        return self._metric(metric).std(axis=-1)

    def score(self) -> np.ndarray:
        """Mean consistency x mean cosine similarity, (n_methods, n_k): see :func:`suggest_k`."""
        return self.mean("consistency") * self.mean("cosine")

    def method_index(self, method: str) -> int:
        """Row of ``method`` in the arrays."""
        if method not in self.methods:
            raise ConfigError(f"method {method!r} was not run; this result has "
                              f"{', '.join(self.methods)}.")
        return self.methods.index(method)

    def suggest_k(self, method: str = "nmf", tolerance: float = 0.02) -> int:
        """See :func:`suggest_k`."""
        return suggest_k(self, method, tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Plain arrays and a JSON-serialisable ``settings`` dict, e.g. for ``np.savez``.

        Keys: ``ks`` (n_k,) int64, ``methods`` (n_methods,) unicode, ``consistency`` and
        ``cosine`` (n_methods, n_k, n_repeats) float64, ``settings`` dict. Every array loads
        with ``allow_pickle=False``.
        """
        return {
            "ks": np.asarray(self.ks, dtype=np.int64),
            "methods": np.asarray(self.methods, dtype=str),
            "consistency": np.asarray(self.consistency, dtype=np.float64),
            "cosine": np.asarray(self.cosine, dtype=np.float64),
            "settings": json.loads(json.dumps(self.settings)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StabilityResult:
        """Inverse of :meth:`to_dict` (``settings`` may also be a JSON string)."""
        try:
            ks = np.asarray(data["ks"], dtype=np.int64)
            methods = tuple(str(m) for m in np.asarray(data["methods"]).tolist())
            cons = np.asarray(data["consistency"], dtype=np.float64)
            cos = np.asarray(data["cosine"], dtype=np.float64)
        except KeyError as err:
            raise ConfigError(f"A stability result needs the key {err}; keys present: "
                              f"{sorted(data)}.") from None
        settings = data.get("settings", {})
        if isinstance(settings, (str, bytes, np.ndarray)):
            settings = json.loads(str(np.asarray(settings).item() if isinstance(
                settings, np.ndarray) else settings))
        want = (len(methods), len(ks))
        if cons.shape[:2] != want or cos.shape != cons.shape or cons.ndim != 3:
            raise ShapeError(f"consistency {cons.shape} and cosine {cos.shape} must both have "
                             f"shape (n_methods, n_k, n_repeats) with (n_methods, n_k) = {want}.")
        return cls(ks, methods, cons, cos, dict(settings))

    def _html_figures(self) -> dict[str, Any]:
        from cfmodules.plots import plot_stability

        return {"Label consistency and template similarity against K (Fig. 9)":
                lambda: plot_stability(self)}

    def to_text(self) -> str:
        """The mean +- std of both metrics as a text table, one row per K."""
        head = "   K  " + "  ".join(f"{m + ' consistency':>22}  {m + ' cosine':>18}"
                                     for m in self.methods)
        lines = [head]
        mc, sc = self.mean("consistency"), self.std("consistency")
        mo, so = self.mean("cosine"), self.std("cosine")
        for j, k in enumerate(self.ks):
            cells = "  ".join(
                f"{mc[i, j]:>15.3f} +- {sc[i, j]:.3f}  {mo[i, j]:>11.3f} +- {so[i, j]:.3f}"
                for i in range(len(self.methods)))
            lines.append(f"{int(k):>4}  {cells}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n_rep = self.consistency.shape[-1]
        return (f"StabilityResult(ks={[int(k) for k in self.ks]}, methods={list(self.methods)}, "
                f"n_repeats={n_rep})\n{self.to_text()}")


def suggest_k(result: StabilityResult, method: str = "nmf", tolerance: float = 0.02) -> int:
    """Suggest a number of modules from a stability sweep.

    The rule: score each K by (mean label consistency) x (mean template cosine
    similarity), both in [0, 1]; return the **largest K whose score is within**
    ``tolerance`` **of the best score** -- the finest partition that is as reproducible as
    the most reproducible one. Too few modules merge true modules arbitrarily (consistency
    falls); too many split them differently in each run (the templates' similarity falls),
    so on planted modules the score peaks at the true K. K = 1 is trivially stable and is
    only returned if it is the only K tried.

    This is a heuristic: look at the curves (and the templates) too. The paper chose K = 3
    for its VAE because consistency was > 90% there and dropped considerably at K = 4; a
    score far below ~0.8 at the suggested K means the layer has no clear modular structure.

    Parameters
    ----------
    result : StabilityResult
    method : str, default "nmf"
    tolerance : float, default 0.02

    Returns
    -------
    int
    """
    i = result.method_index(method)
    tolerance = checks.real(tolerance, "tolerance", low=0, high=1, high_open=True)
    score = result.score()[i]
    ks = np.asarray(result.ks)
    eligible = ks > 1 if (ks > 1).any() else np.ones_like(ks, dtype=bool)
    best = score[eligible].max()
    return int(ks[eligible & (score >= best - tolerance)].max())


def _pool(feats: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks of each map (C, H, W); the edge rows and columns
    that do not fill a block are dropped."""
    if factor == 1:
        return feats
    c, h, w = feats.shape
    hh, ww = h // factor, w // factor
    if hh < 1 or ww < 1:
        raise ConfigError(f"nmf_pool={factor} is larger than the maps {h}x{w}.")
    blocks = feats[:, :hh * factor, :ww * factor].reshape(c, hh, factor, ww, factor)
    return blocks.mean(axis=(2, 4))


def _check_ks(ks: Iterable[int]) -> np.ndarray:
    try:
        arr = np.array(list(ks))
    except TypeError:
        arr = np.array([ks])
    if (arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer)
            or (arr < 1).any() or len(np.unique(arr)) != arr.size):
        raise ConfigError(f"ks must be distinct integers >= 1 (numbers of modules to try), "
                          f"got {ks!r}.")
    return np.sort(arr).astype(np.int64)


def cluster_stability(
    maps: Any,
    ks: Iterable[int] = DEFAULT_KS,
    methods: Sequence[str] = checks.CLUSTERING_METHODS,
    *,
    n_repeats: int = 20,
    window: int | tuple[int, int] = DEFAULT_WINDOW,
    percentile: float | None = DEFAULT_PERCENTILE,
    n_init: int = 3,
    max_iter: int = 300,
    seed: Any = 0,
    progress: bool = False,
    backend: str = "fast",
    nmf_pool: int = 1,
    n_jobs: int | None = None,
) -> StabilityResult:
    """Run the paper's cluster stability protocol (sec. 4.1) over K and methods.

    For each repetition the channels are split at random into three subsets A, B, C of
    (nearly) equal size; every method and K is run on A+B and on B+C, the two labelings of
    B are matched with the Hungarian algorithm, and the label consistency on B and the mean
    cosine similarity of matched templates are recorded. The same split serves every
    method and K of a repetition, so the curves are compared on equal terms.

    Parameters
    ----------
    maps : array (C, H, W), torch.Tensor, or influence result with ``.maps``
        Elementary influence maps, C >= 3.
    ks : iterable of int, default (2, 3, 4, 5, 6)
        Numbers of modules to try; each at most the size of a two-thirds subset.
    methods : sequence of {"nmf", "kmeans"}, default both
    n_repeats : int, default 20
    window, percentile : pre-processing, as in :class:`ModuleClustering`
        Applied once to all maps (it acts on each map alone).
    n_init, max_iter : int
        Restarts and iterations of each clustering (fewer restarts than
        :class:`ModuleClustering`'s default, as the protocol runs many clusterings).
    seed : int, numpy RandomState or None, default 0
        Seed of the splits and of the clusterings.
    progress : bool, default False
        Show a tqdm progress bar over the clusterings.
    backend : {"fast", "sklearn"}, default "fast"
        Engine of the clusterings (:mod:`cfmodules.modules.fits`): ``"sklearn"`` is the
        reference (scikit-learn); ``"fast"`` runs the same k-means, and NMF with the same
        updates and starts in float32, restarts batched and stopped when the labels are
        stable (:mod:`cfmodules.modules.hals`): the statistics agree with the reference's
        within 0.02 on the DCGAN faces.
    n_jobs : int or None, default None
        Processes that run the clusterings; None: the usable cores
        (:func:`cfmodules.modules.fits.default_jobs`). Every clustering keeps its own
        seed and is computed the same way in any process, so the result does not depend
        on ``n_jobs`` (bit for bit).
    nmf_pool : int, default 1
        NMF runs on the maps averaged over ``nmf_pool x nmf_pool`` pixel blocks: the same
        loss with templates constant on each block, ``nmf_pool**2`` times fewer pixels. 1
        (default): the maps as they are. An approximation of the protocol: on the DCGAN
        faces (``main.8``, 64x64 maps) 2 changes the curves by < 0.01 up to K = 4 and by
        up to 0.05 at K = 6, where the reference fits stop at ``max_iter`` (docs/choosing.md).

    Returns
    -------
    StabilityResult
    """
    return start_stability(
        maps, ks, methods, n_repeats=n_repeats, window=window, percentile=percentile,
        n_init=n_init, max_iter=max_iter, seed=seed, progress=progress, backend=backend,
        nmf_pool=nmf_pool, n_jobs=n_jobs).result()


def start_stability(
    maps: Any,
    ks: Iterable[int] = DEFAULT_KS,
    methods: Sequence[str] = checks.CLUSTERING_METHODS,
    *,
    n_repeats: int = 20,
    window: int | tuple[int, int] = DEFAULT_WINDOW,
    percentile: float | None = DEFAULT_PERCENTILE,
    n_init: int = 3,
    max_iter: int = 300,
    seed: Any = 0,
    progress: bool = False,
    backend: str = "fast",
    nmf_pool: int = 1,
    n_jobs: int | None = None,
) -> StabilityRun:
    """:func:`cluster_stability` started: a :class:`StabilityRun`, whose ``result()`` is
    the :class:`StabilityResult`.

    The inputs are checked and the clusterings handed to the worker processes here; with
    ``n_jobs`` > 1 and enough work they run while the caller goes on (e.g. clusters the
    maps at its own K), otherwise in ``result()``. The result is the same either way.
    Parameters as in :func:`cluster_stability`.
    """
    methods = tuple(methods) if not isinstance(methods, str) else (methods,)
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"methods must be distinct names among {checks.CLUSTERING_METHODS}, "
                          f"got {methods!r}.")
    for m in methods:
        checks.clustering_method(m, "each of methods")
    k_arr = _check_ks(ks)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    for name, v in (("n_repeats", n_repeats), ("n_init", n_init), ("max_iter", max_iter),
                    ("nmf_pool", nmf_pool)):
        check_count(name, v)
    check_window(window)
    if percentile is not None:
        check_percentile(percentile)
    jobs = check_jobs(n_jobs)
    arr = as_maps(maps)
    n = len(arr)
    if n < 3:
        raise ConfigError(f"The stability protocol splits the maps in three; got only {n}.")
    smallest = 2 * (n // 3)  # size of the smallest union of two thirds
    if k_arr.max() > smallest:
        raise ConfigError(
            f"K={int(k_arr.max())} is more than the {smallest} maps of a two-thirds subset of "
            f"{n} channels; use ks up to {smallest}."
        )
    feats = preprocess(arr, window, percentile)
    if "nmf" in methods and (feats < 0).any():
        raise ConfigError("NMF needs non-negative maps; threshold them (percentile=75).")
    flat = feats.reshape(n, -1)
    # Splits depend only on (seed, repetition); each clustering's seed only on
    # (seed, repetition, method, K): a method's curve is the same run alone or
    # side by side with the other.
    base = as_random_state(seed)
    split_seed, cluster_seed = (int(s) for s in base.randint(np.iinfo(np.int32).max, size=2))
    split_rng = np.random.RandomState(split_seed)
    splits = []
    for _ in range(n_repeats):
        a, b, c = np.array_split(split_rng.permutation(n), 3)
        # the two runs' rows; the overlap B is at len(a).. in the first, at 0.. in the second
        splits.append((np.concatenate([a, b]), np.concatenate([b, c]),
                       np.arange(len(a), len(a) + len(b)), np.arange(len(b))))
    shape = (len(methods), len(k_arr), n_repeats)
    gram = flat @ flat.T if backend == "fast" and "kmeans" in methods else None
    pooled = _pool(feats, nmf_pool).reshape(n, -1) if "nmf" in methods else None
    if pooled is not None and backend == "fast":
        pooled = pooled.astype(np.float32)  # what the fast NMF works on, half the bytes
    # every clustering of the sweep is one task; each has its own seed, so the result does
    # not depend on how the tasks are spread over processes
    tasks, where = [], []
    for i, method in enumerate(methods):
        m = checks.CLUSTERING_METHODS.index(method)
        for j, k in enumerate(int(k) for k in k_arr):
            seeds = [np.random.SeedSequence([cluster_seed, r, m, k]).generate_state(2)
                     for r in range(n_repeats)]
            data = pooled if method == "nmf" else flat
            g = gram if method == "kmeans" else None
            for r, (first, second, _, _) in enumerate(splits):
                tasks += [(data, rows, g, k, method, n_init, max_iter, int(seeds[r][t]),
                           backend) for t, rows in enumerate((first, second))]
                where.append((i, j, r))
    work = sum(len(t[1]) * t[0].shape[1] for t in tasks) * n_init
    h, w = check_window(window)
    settings = {
        "protocol": "sec. 4.1: 3 random subsets, two runs on two thirds overlapping on one",
        "n_channels": n, "map_shape": list(arr.shape[1:]), "n_repeats": int(n_repeats),
        "window": [h, w], "percentile": None if percentile is None else float(percentile),
        "n_init": int(n_init), "max_iter": int(max_iter), "nmf_pool": int(nmf_pool),
        "seed": int(seed) if isinstance(seed, (int, np.integer)) else None,
        "backend": backend, "engine": engine_description(backend),
    }
    return StabilityRun(start_parallel(fit_rows, tasks, jobs, work=work), progress,
                        (k_arr, methods, splits, where, shape, settings))


class StabilityRun:
    """A stability sweep started by :func:`start_stability`; :meth:`result` finishes it.

    Attributes
    ----------
    in_background : bool
        Whether its clusterings run on worker processes while this process goes on (else
        they run in :meth:`result`).
    """

    def __init__(self, run: Any, progress: bool, plan: tuple):
        self._run, self._progress, self._plan = run, progress, plan
        self.in_background: bool = run.in_background

    def result(self) -> StabilityResult:
        """The :class:`StabilityResult` (waits for the clusterings)."""
        k_arr, methods, splits, where, shape, settings = self._plan
        fits = self._run.result(progress=self._progress, desc="stability")
        consistency = np.zeros(shape)
        cosine = np.zeros(shape)
        for q, (i, j, r) in enumerate(where):
            (lab1, _, tm1, _, _), (lab2, _, tm2, _, _) = fits[2 * q], fits[2 * q + 1]
            _, _, in_first, in_second = splits[r]
            cons, match = match_labels(lab1[in_first], lab2[in_second], int(k_arr[j]))
            consistency[i, j, r] = cons
            cosine[i, j, r] = template_similarity(tm1, tm2, match)
        return StabilityResult(k_arr, methods, consistency, cosine, settings)

    def cancel(self) -> None:
        """Stop the clusterings not yet started (after an error or an interrupt)."""
        self._run.cancel()
