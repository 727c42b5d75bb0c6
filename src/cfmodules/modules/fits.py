"""The engines of the clustering, and many clusterings spread over the CPU cores.

Two engines fit the rows of a (C x P) feature matrix (channels x pixels):

- ``backend="sklearn"``, the reference: scikit-learn's ``NMF`` (coordinate descent) and
  ``KMeans`` on float64 features, ``n_init`` restarts, the best kept.
- ``backend="fast"`` (default): NMF by scikit-learn's updates (HALS) on float32 features,
  from the same starts, restarts batched, stopped when the labels are stable
  (:mod:`cfmodules.modules.hals`: not bit for bit the reference's fits; the stability
  statistics agree with the reference's within 0.02 on the DCGAN faces); k-means on the Gram matrix of the
  channels (:mod:`cfmodules.modules.batched`: scikit-learn's algorithm step for step, the
  same fits up to float rounding).

Each fit, and each group of restarts, is computed the same way whether it runs in this
process or in a worker, alone or with others, so the results do not depend on ``n_jobs``
(bit for bit). Workers are joblib's ``loky`` processes, one BLAS thread each; this module
imports only numpy at import time so that a worker starts fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cfmodules.checks import CLUSTERING_BACKENDS
from cfmodules.errors import ConfigError
from cfmodules.modules.randomness import as_random_state, draw_seed

__all__ = ["BACKENDS", "cluster_features", "cluster_many", "fit_rows", "default_jobs",
           "check_jobs", "run_parallel", "start_parallel", "ParallelRun", "start_workers",
           "engine_description", "RESTART_GROUP"]

BACKENDS = CLUSTERING_BACKENDS
"""Engines of the clustering: ``"fast"`` (default) and ``"sklearn"`` (the reference)."""

RESTART_GROUP = 5
"""The fast NMF runs a fit's restarts in groups of this many (batched together; the
groups may run in parallel). Fixed, so that results do not depend on ``n_jobs``."""

MIN_PARALLEL_WORK = 30_000_000
"""Below this much work (matrix entries x restarts, over all fits) the fits run in this
process whatever ``n_jobs`` says: starting the worker processes (~1-2 s) would cost more
than they save. One clustering of 128 maps of 64x64 with 10 restarts is 5e6 (~0.3 s);
the analysis's stability sweep of them is ~1e8. The results are the same either way."""

Fit = tuple[np.ndarray, np.ndarray, np.ndarray, float, bool]


def engine_description(backend: str) -> str:
    """What computes the clusterings of ``backend``, in words (recorded in result files)."""
    if backend == "sklearn":
        return "scikit-learn NMF (coordinate descent) and KMeans, float64"
    from cfmodules.modules import hals

    return (f"NMF: HALS (scikit-learn's updates), float32, restarts batched, stop when the labels are "
            f"unchanged for {hals.PATIENCE} iterations and the loss fell < {hals.RTOL:g} "
            f"(cfmodules.modules.hals); k-means: scikit-learn's algorithm on the Gram matrix")


# ---------------------------------------------------------------------- cores
def default_jobs() -> int:
    """Worker processes used when ``n_jobs=None``: the usable CPU cores.

    The cores this process may run on (its CPU affinity), divided among the processes
    of a ``torchrun`` job on this machine (``LOCAL_WORLD_SIZE``), and at most torch's
    thread count when torch is loaded (``torch.set_num_threads``, ``cfmodules
    --threads``), so an explicit thread limit also limits the clustering.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    jobs = max(1, cores // max(local, 1))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        jobs = min(jobs, max(1, int(torch.get_num_threads())))
    return jobs


def check_jobs(n_jobs: Any) -> int:
    """``n_jobs`` as a number of processes: None -> :func:`default_jobs`, else an int >= 1."""
    if n_jobs is None:
        return default_jobs()
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ConfigError(f"n_jobs must be a whole number >= 1 (processes for the clustering) "
                          f"or None (the usable cores), got {n_jobs!r}.")
    return int(n_jobs)


def run_parallel(fn: Callable[..., Any], tasks: Sequence[tuple], n_jobs: int, *,
                 work: float = np.inf, progress: bool = False, desc: str = "") -> list[Any]:
    """``[fn(*task) for task in tasks]``, on ``n_jobs`` worker processes when > 1 and the
    ``work`` is at least :data:`MIN_PARALLEL_WORK`.

    The tasks are dealt round-robin into at most ``4 n_jobs`` batches (each batch is
    pickled once, so an array shared by its tasks travels once); every task runs with one
    BLAS thread. ``fn`` must be a module-level function. ``progress``: a tqdm bar over
    the batches (over the tasks in this process).
    """
    return start_parallel(fn, tasks, n_jobs, work=work).result(progress=progress, desc=desc)


def start_parallel(fn: Callable[..., Any], tasks: Sequence[tuple], n_jobs: int, *,
                   work: float = np.inf) -> ParallelRun:
    """:func:`run_parallel` started, not waited for: a :class:`ParallelRun`.

    On worker processes the tasks run while the caller goes on (the batches are handed
    out by joblib's result thread); :meth:`ParallelRun.result` collects them. When they
    would run in this process (one job, or too little work), they run in ``result()``.
    """
    return ParallelRun(fn, list(tasks), n_jobs, work)


class ParallelRun:
    """Tasks of :func:`start_parallel`; ``result()`` returns their results in task order.

    Attributes
    ----------
    in_background : bool
        Whether the tasks run on worker processes while this process goes on.
    """

    def __init__(self, fn: Callable[..., Any], tasks: list[tuple], n_jobs: int, work: float):
        self._fn, self._tasks = fn, tasks
        self._done: Any = None
        self.in_background = n_jobs > 1 and len(tasks) > 1 and work >= MIN_PARALLEL_WORK
        if not self.in_background:
            return
        from joblib import Parallel, delayed

        n_batches = min(len(tasks), 4 * n_jobs)
        self._batches = [list(range(i, len(tasks), n_batches)) for i in range(n_batches)]
        # cancel() creates this file; the workers skip their remaining tasks when it exists
        self._stop = os.path.join(tempfile.gettempdir(),
                                  f"cfmodules-stop-{os.getpid()}-{uuid.uuid4().hex}")
        # the call hands out the first batches and returns; joblib's result thread hands
        # out the others as batches finish, whether or not anybody iterates yet
        self._done = Parallel(n_jobs=min(n_jobs, n_batches), backend="loky", max_nbytes=None,
                              return_as="generator")(
            delayed(_worker_batch)(fn, [tasks[i] for i in b], self._stop)
            for b in self._batches)
        self._n_jobs = n_jobs

    def result(self, progress: bool = False, desc: str = "") -> list[Any]:
        """The results, in the order of the tasks (waits for the workers)."""
        tasks = self._tasks
        if not self.in_background:
            if not progress:
                return _run_batch(self._fn, tasks)
            from tqdm.auto import tqdm

            return [_run_batch(self._fn, [t])[0] for t in tqdm(tasks, desc=desc, unit="fit")]
        done = self._done
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(self._batches), desc=f"{desc} ({self._n_jobs} processes)",
                        unit="batch")
        out: list[Any] = [None] * len(tasks)
        try:
            for b, res in zip(self._batches, done):
                for i, r in zip(b, res):
                    out[i] = r
        except BaseException:
            self.cancel()
            raise
        self._done = None  # finished: nothing left for cancel() to stop
        return out

    def cancel(self) -> None:
        """Skip the tasks not started yet and wait for the running ones (one fit each,
        a fraction of a second); idempotent. The workers stay up for the next run:
        killing them mid-task (joblib's abort) races with loky's queue thread."""
        done, self._done = self._done, None
        if done is None:
            return
        try:
            with open(self._stop, "x"):
                pass
            for _ in done:  # the remaining batches return at once
                pass
        except Exception:  # noqa: BLE001 - a failed task: nothing more to wait for
            pass
        finally:
            with contextlib.suppress(OSError):
                os.remove(self._stop)


def start_workers(n_jobs: int) -> None:
    """Start ``n_jobs`` worker processes now, from a background thread, and return.

    For a caller with other work before its clusterings (the command line imports torch
    and computes the influence maps first, mostly on one core): the workers start and
    import what a fit needs meanwhile, and the clusterings find them ready. Nothing
    happens for ``n_jobs`` <= 1; a failure here only means they start later.
    """
    if n_jobs <= 1:
        return

    def start() -> None:
        try:
            from joblib import Parallel, delayed

            # the same pool as run_parallel's (joblib reuses it for the same settings)
            Parallel(n_jobs=n_jobs, backend="loky", max_nbytes=None)(
                delayed(_ready)() for _ in range(n_jobs))
        except Exception:  # noqa: BLE001 - the clusterings start their workers themselves
            pass

    threading.Thread(target=start, name="cfmodules-start-workers", daemon=True).start()


def _ready() -> int:
    """A worker's first task: import the fits' modules (numpy, HALS, k-means)."""
    from cfmodules.modules import batched, hals  # noqa: F401

    return os.getpid()


def _worker_batch(fn: Callable[..., Any], tasks: list[tuple], stop: str) -> list[Any]:
    """:func:`_run_batch` on a worker: each task unless the file ``stop`` exists (then None)."""
    with _one_blas_thread():
        return [None if os.path.exists(stop) else fn(*t) for t in tasks]


def _run_batch(fn: Callable[..., Any], tasks: list[tuple]) -> list[Any]:
    with _one_blas_thread():
        return [fn(*t) for t in tasks]


_LIMITED = threading.local()
"""``_LIMITED.on``: this thread runs inside :func:`_one_blas_thread`."""


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    # One BLAS thread: NMF and k-means multiply skinny matrices thousands of times, where
    # threaded BLAS only adds synchronisation (NMF was 14x slower with 2 threads on a busy
    # 2-core machine). Restored afterwards. Set once, by the outermost batch: a limit costs
    # ~3 ms (threadpoolctl lists the loaded libraries), and a sweep's fits each nest a batch.
    if getattr(_LIMITED, "on", False):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        _LIMITED.on = True
        try:
            yield
        finally:
            _LIMITED.on = False


# ---------------------------------------------------------------------- fits
def cluster_features(
    flat: np.ndarray, k: int, method: str, n_init: int, max_iter: int, random_state: Any,
    backend: str = "fast", n_jobs: int = 1,
) -> Fit:
    """Cluster the rows of a (C x P) feature matrix; the engine of ``ModuleClustering``.

    Parameters
    ----------
    flat : ndarray (C, P)
    k, n_init, max_iter : int
    method : {"nmf", "kmeans"}
    random_state : int, RandomState or None
    backend : {"fast", "sklearn"}, default "fast"
        See the module docstring: ``"sklearn"`` is the reference; ``"fast"`` is another
        NMF engine (scikit-learn's updates in float32, restarts batched, an earlier stop),
        and the same k-means.
    n_jobs : int, default 1
        Processes for the fast NMF's restarts (in groups of :data:`RESTART_GROUP`);
        the result does not depend on it.

    Returns
    -------
    labels (C,), weights (C, K), templates (K, P), reconstruction error, converged
        Modules are renumbered by decreasing size (ties: template order), so equal inputs
        give equal numbering. NMF templates peak at 1 (the weights carry the scale).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "fast" and method == "nmf":
        from cfmodules.modules.hals import nmf_starts

        x = flat.astype(np.float32, copy=False)
        w0, h0 = nmf_starts(x, k, n_init, random_state)
        groups = [slice(i, i + RESTART_GROUP) for i in range(0, n_init, RESTART_GROUP)]
        runs = run_parallel(_nmf_group, [(x, w0[g], h0[g], max_iter) for g in groups],
                            n_jobs, work=x.size * n_init)
        best = min(range(len(runs)), key=lambda i: (runs[i][2], i))  # first of equal errors
        w, h, err, conv = runs[best]
        return _ordered(*_scaled(w.astype(np.float64), h.astype(np.float64)), err, conv, k)
    return cluster_many([flat], k, method, n_init, max_iter, [random_state], backend)[0]


def cluster_many(
    flats: list[np.ndarray], k: int, method: str, n_init: int, max_iter: int,
    random_states: list[Any], backend: str = "fast", gram: tuple[np.ndarray, list] | None = None,
) -> list[Fit]:
    """:func:`cluster_features` of several matrices (same K and method), in this process.

    ``gram``, optional, is ``(G, rows)``: the Gram matrix ``X X^T`` of a matrix X whose
    rows ``rows[i]`` are ``flats[i]``, so that k-means need not compute it again.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    grams: list[np.ndarray | None] = [None] * len(flats)
    if backend == "fast" and method == "kmeans":
        if gram is None:
            grams = [f @ f.T for f in flats]
        else:
            grams = [gram[0][np.ix_(rows, rows)] for rows in gram[1]]
    tasks = [(f, np.arange(len(f)), g, k, method, n_init, max_iter, rs, backend)
             for f, g, rs in zip(flats, grams, random_states)]
    return run_parallel(fit_rows, tasks, 1)


def fit_rows(data: np.ndarray, rows: np.ndarray, gram: np.ndarray | None, k: int,
             method: str, n_init: int, max_iter: int, random_state: Any, backend: str) -> Fit:
    """One clustering of the rows ``rows`` of ``data`` (N, P): the unit of work of the
    stability sweep's processes (the whole ``data`` travels once per batch of tasks).

    ``gram`` (N, N): the Gram matrix ``data @ data.T``, for the fast k-means (computed
    here when None).
    """
    x = data[rows]
    if backend == "sklearn":
        w, h, err, conv = _sklearn_fit(x.astype(np.float64, copy=False), k, method,
                                       n_init, max_iter, random_state)
        return _ordered(w, h, err, conv, k)
    if method == "nmf":
        return cluster_features(x, k, method, n_init, max_iter, random_state, backend)
    from cfmodules.modules.batched import kmeans_many

    if gram is None:
        gram, rows = x @ x.T, np.arange(len(x))
    ((labels, cw, inertia, conv),) = kmeans_many(gram, [rows], x.shape[1], k,
                                                  [random_state], n_init, max_iter)
    return _ordered(np.eye(k)[labels], cw @ x, float(np.sqrt(max(inertia, 0.0))), conv, k)


def _nmf_group(x: np.ndarray, w0: np.ndarray, h0: np.ndarray, max_iter: int
               ) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """The best restart of one group (batched HALS)."""
    from cfmodules.modules.hals import nmf_hals

    w, h, err, iters = nmf_hals(x, w0, h0, max_iter)
    i = int(np.argmin(err))
    return w[i], h[i], float(err[i]), bool(iters[i] < max_iter)


def _sklearn_fit(flat: np.ndarray, k: int, method: str, n_init: int, max_iter: int,
                 random_state: Any) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """One fit with scikit-learn's estimators: weights (C, K), templates (K, P), err, converged."""
    from sklearn.cluster import KMeans

    rng = as_random_state(random_state)
    if method == "nmf":
        return _nmf(flat, k, n_init, max_iter, rng)
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=draw_seed(rng))
    labels = _quietly(km.fit_predict, flat)
    return (np.eye(k)[labels], km.cluster_centers_, float(np.sqrt(max(km.inertia_, 0.0))),
            bool(km.n_iter_ < max_iter))


def _ordered(weights: np.ndarray, templates: np.ndarray, err: float, converged: bool, k: int
             ) -> Fit:
    """Labels = argmax of the weights; modules renumbered by decreasing size."""
    labels = weights.argmax(axis=1)
    sizes = np.bincount(labels, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))  # largest module first
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return (rank[labels].astype(np.int64), weights[:, order], templates[order], float(err),
            bool(converged))


def _scaled(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fix NMF's scale ambiguity: each template peaks at 1, the weights carry the scale, so
    weights of different templates are comparable when taking the argmax."""
    scale = h.max(axis=1)
    scale[scale <= 0] = 1.0
    return w * scale, h / scale[:, None]


def _nmf(
    flat: np.ndarray, k: int, n_init: int, max_iter: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    from sklearn.decomposition import NMF

    best: tuple[float, np.ndarray, np.ndarray, bool] | None = None
    for i in range(n_init):
        init = "nndsvda" if i == 0 else "random"
        model = NMF(n_components=k, init=init, max_iter=max_iter, random_state=draw_seed(rng))
        w = _quietly(model.fit_transform, flat)
        h = model.components_
        err = float(model.reconstruction_err_)
        if best is None or err < best[0] - 1e-12:
            best = (err, w, h, model.n_iter_ < max_iter)
    assert best is not None
    err, w, h, converged = best
    return (*_scaled(w, h), err, converged)


def _quietly(fit: Any, flat: np.ndarray) -> Any:
    """``fit(flat)`` without scikit-learn's per-restart ConvergenceWarning (the best fit's
    convergence is reported once, by ModuleClustering.fit)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(flat)
