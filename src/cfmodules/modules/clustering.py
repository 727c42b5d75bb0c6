"""Clustering of influence maps into modules (sec. 3.4 of Besserve et al., 2020).

The pre-processed (smoothed, thresholded) influence maps of the C channels of a layer form
a (C x pixels) matrix S. NMF factorizes it as S ~ W H with K rows of H, the *templates*,
and the *weights* W (C x K); k-means gives K centroids as templates and one-hot weights.
Channel c belongs to the module whose template has the largest weight in its map.
Both keep the best of several restarts. The reference engine wraps scikit-learn's public
estimators (``sklearn.decomposition.NMF``, ``sklearn.cluster.KMeans``); the default one
is faster (:mod:`cfmodules.modules.fits`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

from cfmodules import checks, errors
from cfmodules.errors import ConfigError, ShapeError
from cfmodules.modules.fits import BACKENDS, check_jobs, cluster_features
from cfmodules.modules.labels import module_sizes, modules_from_labels
from cfmodules.modules.preprocess import (
    DEFAULT_PERCENTILE,
    DEFAULT_WINDOW,
    as_maps,
    check_percentile,
    check_window,
    preprocess,
)

__all__ = ["ModuleClustering", "module_sizes", "modules_from_labels", "METHODS"]

METHODS = checks.CLUSTERING_METHODS

_LEARNED = ("labels_", "weights_", "templates_", "modules_", "features_",
            "reconstruction_err_", "n_channels_", "map_shape_", "layer_", "n_features_in_")


class NotFittedError(errors.NotFittedError, SklearnNotFittedError):
    """A ModuleClustering used before ``fit``: both the library's and scikit-learn's error."""


class ModuleClustering(ClusterMixin, BaseEstimator):
    """Group the channels of a layer into modules by clustering their influence maps.

    A scikit-learn estimator (``BaseEstimator``, ``ClusterMixin``): ``__init__`` only stores
    the parameters, ``get_params`` / ``set_params`` / ``sklearn.base.clone`` work,
    :meth:`fit` returns ``self``, learned attributes end in ``_`` and reading one before
    ``fit`` raises :class:`~cfmodules.errors.NotFittedError` (which is also scikit-learn's
    ``NotFittedError``). The channels are the samples; the pixels of their maps the
    features.

    Parameters
    ----------
    n_modules : int, default 3
        K, the number of modules (templates). The paper uses 3; see
        :func:`cfmodules.modules.cluster_stability` to choose it.
    method : {"nmf", "kmeans"}, default "nmf"
        NMF of the binary maps (the paper's method) or k-means (its baseline).
    window : odd int or (odd int, odd int), default 3
        Smoothing window in pixels (1: no smoothing).
    percentile : float in (0, 100) or None, default 75
        Threshold percentile of each map (None: cluster the smoothed maps themselves).
    n_init : int, default 10
        Restarts; the fit with the smallest reconstruction error is kept, so one unlucky
        initialisation cannot split a module. For NMF the first start is the deterministic
        NNDSVDa initialisation, the others are random.
    max_iter : int, default 500
        Iterations per start.
    random_state : int, numpy Generator/RandomState or None, default None
        Seed of the restarts; an int makes :meth:`fit` reproducible.
    backend : {"fast", "sklearn"}, default "fast"
        Engine (:mod:`cfmodules.modules.fits`). ``"sklearn"``, the reference: scikit-learn's
        NMF and KMeans. ``"fast"``: k-means gives the same fit up to float rounding; NMF runs
        scikit-learn's updates (HALS) from the same starts in float32, restarts batched, and
        stops when the labels are stable (:mod:`cfmodules.modules.hals`), so a fit can
        differ slightly.
    n_jobs : int or None, default None
        Processes for the fast NMF's restarts (groups of 5); None: the usable cores
        (:func:`cfmodules.modules.fits.default_jobs`). The fit does not depend on it.

    Attributes
    ----------
    labels_ : ndarray (C,) of int
        Module of each channel, in 0..K-1. Modules are numbered by decreasing size.
    templates_ : ndarray (K, H, W)
        Template of each module: for NMF the row of H scaled to a maximum of 1, for k-means
        the centroid (the fraction of the module's channels whose binary map covers a pixel).
    weights_ : ndarray (C, K)
        Contribution of each template to each channel's map (for k-means, one-hot).
    modules_ : list of K ndarrays of int
        The channels of each module (:func:`modules_from_labels` gives ``{layer: channels}``).
    layer_ : str or None
        The layer of the maps, when they came from an influence result (its ``.layer``).
    features_ : ndarray (C, H, W)
        The pre-processed maps that were clustered.
    reconstruction_err_ : float
        Frobenius norm of ``features - weights @ templates`` (flattened), the fit criterion.
    n_channels_ : int
    map_shape_ : tuple (H, W)
    """

    def __init__(
        self,
        n_modules: int = 3,
        method: str = "nmf",
        *,
        window: int | tuple[int, int] = DEFAULT_WINDOW,
        percentile: float | None = DEFAULT_PERCENTILE,
        n_init: int = 10,
        max_iter: int = 500,
        random_state: Any = None,
        backend: str = "fast",
        n_jobs: int | None = None,
    ):
        self.n_modules = n_modules
        self.method = method
        self.window = window
        self.percentile = percentile
        self.n_init = n_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.backend = backend
        self.n_jobs = n_jobs

    def __getattr__(self, name: str) -> Any:
        # a learned attribute read before fit: the library's NotFittedError, not a bare
        # AttributeError (it is one too, so hasattr() and check_is_fitted still work)
        if name in _LEARNED:
            raise NotFittedError(f"This ModuleClustering is not fitted yet, so it has no "
                                 f"{name}; call fit(maps) first.")
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = self.method == "nmf"  # NMF factorizes S >= 0
        tags.input_tags.three_d_array = True  # maps (C, H, W)
        return tags

    def fit(self, maps: Any, y: None = None) -> ModuleClustering:
        """Cluster the channels' influence maps into ``n_modules`` modules.

        Parameters
        ----------
        maps : array (C, H, W), torch.Tensor (C, H, W), or an influence result with ``.maps``
            The elementary influence maps, one per channel (non-negative).
        y : ignored

        Returns
        -------
        self

        Raises
        ------
        ConfigError
            Bad parameters (K < 1 or more than the channels, even window, percentile outside
            (0, 100)), NaN maps, or every map zero (nothing to cluster).
        ShapeError
            Maps that are not (C, H, W), or of different shapes.

        Warns
        -----
        UserWarning
            Some channels have an all-zero map (dead channels: they join a module
            arbitrarily, which changes no hybrid), or a module received no channel.
        """
        self._check_params()
        layer = getattr(maps, "layer", None)
        arr = self._maps(maps)
        k = self.n_modules
        if k > len(arr):
            raise ConfigError(
                f"n_modules={k} is more than the {len(arr)} channels to cluster "
                f"(n_samples={len(arr)}); use n_modules <= {len(arr)}."
            )
        if k > arr.shape[1] * arr.shape[2]:
            raise ConfigError(
                f"n_modules={k} is more than the {arr.shape[1] * arr.shape[2]} pixels of each "
                f"map (n_features={arr.shape[1] * arr.shape[2]}); use fewer modules."
            )
        feats = preprocess(arr, self.window, self.percentile)
        if self.method == "nmf" and (feats < 0).any():
            raise ConfigError(
                "Negative values in data: NMF needs non-negative maps; influence maps are mean "
                "absolute differences, "
                "so negative values mean these are not influence maps. Threshold them "
                "(percentile=75) or use method='kmeans'."
            )
        flat = feats.reshape(len(feats), -1)
        fit = cluster_features(flat, k, self.method, self.n_init, self.max_iter,
                               self.random_state, self.backend, check_jobs(self.n_jobs))
        labels, weights, templates, err, converged = fit
        if not converged:
            warnings.warn(
                f"The best {self.method} fit did not converge in max_iter={self.max_iter} "
                "iterations; increase max_iter.", ConvergenceWarning, stacklevel=2)
        dead = np.flatnonzero(~flat.any(axis=1))
        if len(dead):
            warnings.warn(
                f"{len(dead)} channel(s) have an all-zero map {dead[:8].tolist()}"
                f"{'...' if len(dead) > 8 else ''}: they do not influence the output and were "
                f"put in module {labels[dead[0]]} arbitrarily.", UserWarning, stacklevel=2)
        sizes = np.bincount(labels, minlength=k)
        if (sizes == 0).any():
            warnings.warn(
                f"{int((sizes == 0).sum())} of the {k} modules received no channel; "
                "the layer may have fewer modules than n_modules (try a smaller K).",
                UserWarning, stacklevel=2)
        self.labels_ = labels
        self.weights_ = weights
        self.templates_ = templates.reshape(k, *feats.shape[1:])
        self.modules_ = [np.flatnonzero(labels == j) for j in range(k)]
        self.features_ = feats
        self.reconstruction_err_ = err
        self.n_channels_ = len(arr)
        self.map_shape_ = tuple(feats.shape[1:])
        self.n_features_in_ = int(np.prod(self.map_shape_))
        self.layer_ = layer if isinstance(layer, str) else None
        return self

    def fit_predict(self, maps: Any, y: None = None) -> np.ndarray:
        """:meth:`fit`, then return ``labels_`` (C,)."""
        return self.fit(maps).labels_

    def predict(self, maps: Any) -> np.ndarray:
        """Assign the channels of new maps (C', H, W) to the fitted modules.

        The maps are pre-processed like the training maps; NMF weights are found by
        non-negative least squares against the fixed templates, k-means labels by the
        nearest centroid.

        Returns
        -------
        ndarray (C',) of int
        """
        self._check_fitted()
        arr = self._maps(maps)
        if tuple(arr.shape[1:]) != self.map_shape_:
            raise ShapeError(
                f"X has {int(np.prod(arr.shape[1:]))} features, but ModuleClustering is "
                f"expecting {self.n_features_in_} features as input: the maps have shape "
                f"{arr.shape[1:]} per channel; this clustering was fitted on maps of shape "
                f"{self.map_shape_}."
            )
        flat = preprocess(arr, self.window, self.percentile).reshape(len(arr), -1)
        tmpl = self.templates_.reshape(self.n_modules, -1)
        if self.method == "kmeans":
            d = ((flat[:, None, :] - tmpl[None]) ** 2).sum(-1)
            return d.argmin(axis=1)
        from scipy.optimize import nnls

        w = np.stack([nnls(tmpl.T, row)[0] for row in flat])
        return w.argmax(axis=1)

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        checks.integer(self.n_modules, "n_modules", low=1)
        checks.clustering_method(self.method)
        check_window(self.window)
        if self.percentile is not None:
            check_percentile(self.percentile)
        checks.integer(self.n_init, "n_init", low=1)
        checks.integer(self.max_iter, "max_iter", low=1)
        checks.one_of(self.backend, "backend", BACKENDS)
        check_jobs(self.n_jobs)

    def _maps(self, maps: Any) -> np.ndarray:
        """(C, H, W) maps; a 2-D ``(C, P)`` array is P features per channel (one row)."""
        if isinstance(maps, (list, tuple)) and maps and all(
                isinstance(row, (list, tuple)) for row in maps):
            try:
                maps = np.asarray(maps)  # rows of numbers, e.g. X.tolist()
            except ValueError:
                pass  # ragged: as_maps says what is wrong
        if hasattr(maps, "toarray") and hasattr(maps, "nnz"):
            raise ShapeError("Sparse input is not supported; pass a dense array (.toarray()).")
        if getattr(maps, "ndim", None) == 2 and not hasattr(maps, "maps"):
            if self.window not in (1, (1, 1)):
                raise ShapeError(
                    f"2-D input {tuple(maps.shape)} is read as (channels, features) rows, which "
                    "have no image to smooth: pass maps of shape (channels, height, width), or "
                    "use window=1 for feature rows.")
            maps = maps[:, None, :]
        return as_maps(maps)

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, "labels_")
        except SklearnNotFittedError:
            raise NotFittedError(
                "This ModuleClustering is not fitted yet; call fit(maps) first.") from None

    def __repr__(self) -> str:
        import inspect

        params = ", ".join(f"{k}={getattr(self, k)!r}"  # in the constructor's order
                           for k in inspect.signature(type(self)).parameters)
        fitted = ""
        if "labels_" in vars(self):
            fitted = f"  # fitted: {self.n_channels_} channels, sizes {module_sizes(self.labels_, self.n_modules).tolist()}"
        return f"ModuleClustering({params}){fitted}"
