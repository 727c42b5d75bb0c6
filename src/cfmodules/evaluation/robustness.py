"""Robustness of classifiers to counterfactual changes (sec. 4.2, Fig. 6, 14, 16, Table 3).

Hybrids change one module of Original 1 to its value in Original 2. A classifier whose
answer on the hybrid follows Original 2 when only the *context* module (background) was
swapped relies on the context; a robust one keeps Original 1's class. For each module
(and so for each layer when modules of several layers are given) and each classifier this
module reports:

- the recognition rate of each original's class: the share of hybrids classified as
  Original 1's class and as Original 2's class, over the pairs whose originals differ in
  class (Fig. 6), with standard errors;
- the entropy of the classifier's probabilities renormalized over its top classes, the
  classes with the largest total probability over all hybrids (Fig. 14 and 16);
- where several classifiers disagree on which original a hybrid belongs to (Table 3).

The class of an original is its true class when ``labels`` is given (class-conditional or
synthetic generators), otherwise each classifier's own answer on the original image.
Classifiers take images in **[0, 1]** ``(N, C, H, W)`` and return ``(N, K)`` logits (or
probabilities with ``outputs="probabilities"``). Plots: :mod:`cfmodules.evaluation.plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from cfmodules import checks
from cfmodules.errors import ConfigError, ResultFileError, ShapeError, did_you_mean
from cfmodules.evaluation._run import EvalNoGrad, call_on
from cfmodules.latents import pair_latents
from cfmodules.results import KEY_SEP, Result

__all__ = [
    "Classifier",
    "OUTCOME_EXCLUDED",
    "OUTCOME_NEITHER",
    "OUTCOME_ORIGINAL1",
    "OUTCOME_ORIGINAL2",
    "OUTCOME_SAME_CLASS",
    "RobustnessResult",
    "classifier_robustness",
    "robustness_from_probabilities",
    "renormalized_entropy",
]

KIND = "robustness"

Classifier = Callable[[torch.Tensor], torch.Tensor]
"""``classifier(images (N, C, H, W) in [0, 1]) -> (N, K)`` logits or probabilities."""

OUTCOME_NEITHER = 0
"""The hybrid got a class that is neither original's."""
OUTCOME_ORIGINAL1 = 1
"""The hybrid got Original 1's class (the originals' classes differ)."""
OUTCOME_ORIGINAL2 = 2
"""The hybrid got Original 2's class (the originals' classes differ)."""
OUTCOME_SAME_CLASS = 3
"""Both originals have the same class and the hybrid got it too (uninformative pair)."""
OUTCOME_EXCLUDED = -1
"""An original has no class (label -1, e.g. the classifier was not confident on it)."""


def renormalized_entropy(probabilities: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Entropy (nats) of probabilities restricted to ``classes`` and renormalized to sum 1.

    Parameters
    ----------
    probabilities : ndarray (..., K)
    classes : ndarray (k,) of int
        The classes kept (the paper keeps the 10 top classes over all hybrids).

    Returns
    -------
    ndarray (...)
        Between 0 (all mass on one kept class) and ``log(k)`` (uniform).
    """
    p = np.asarray(probabilities, dtype=np.float64)[..., np.asarray(classes)]
    total = p.sum(-1, keepdims=True)
    p = np.divide(p, total, out=np.full_like(p, 1.0 / p.shape[-1]), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(-1)


def _outcomes(pred: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(pred, l1, l2).shape, OUTCOME_NEITHER, dtype=np.int8)
    valid = (l1 >= 0) & (l2 >= 0)
    differ = (l1 != l2) & valid
    out[(pred == l1) & differ] = OUTCOME_ORIGINAL1
    out[(pred == l2) & differ] = OUTCOME_ORIGINAL2
    out[(pred == l1) & (l1 == l2) & valid] = OUTCOME_SAME_CLASS
    out[np.broadcast_to(~valid, out.shape)] = OUTCOME_EXCLUDED
    return out


def _array(dtype: Any) -> Any:
    """A field holding a dict classifier -> array, stored with ``dtype``."""
    return field(metadata={"dtype": dtype})


def _layers_from_dict(data: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    return {str(k): tuple(v) for k, v in data.items()}


@dataclass(repr=False)
class RobustnessResult(Result):
    """How classifiers answer on the hybrids of each module.

    A :class:`cfmodules.results.Result`: ``save`` / ``load`` (``.npz`` + JSON header, no
    pickle; each classifier's arrays are the file's arrays ``predictions/<classifier>``,
    ...), ``to_dict`` / ``from_dict`` (the fields, plus the ``summary`` per classifier and
    the ``disagreement`` that the file's header also carries), ``to_text``.

    Attributes
    ----------
    classifiers : list of str
    modules : list of str
    module_layers : dict module -> tuple of layer names
        The layer(s) each module lives in (for per-layer summaries and plots).
    predictions : dict classifier -> ndarray (M, N) of int
        Predicted class of hybrid ``n`` of module ``m``.
    labels1, labels2 : dict classifier -> ndarray (N,) of int
        Class of Original 1 / Original 2 of pair ``n``; -1 for an original left out (the
        classifier was less confident than ``min_confidence``), which excludes the pair.
    entropy : dict classifier -> ndarray (M, N)
        Entropy (nats) of the probabilities renormalized over ``top_classes``.
    top_classes : dict classifier -> ndarray (k,)
        The classes with the largest total probability over all hybrids of all modules.
    class_names : dict classifier -> list of str or None
    info : dict
        How the result was made (seed, number of pairs, modules).
    """

    kind: ClassVar[str] = KIND

    classifiers: list[str]
    modules: list[str]
    module_layers: dict[str, tuple[str, ...]] = field(
        metadata={"from_dict": _layers_from_dict})
    predictions: dict[str, np.ndarray] = _array(np.int64)
    labels1: dict[str, np.ndarray] = _array(np.int64)
    labels2: dict[str, np.ndarray] = _array(np.int64)
    entropy: dict[str, np.ndarray] = _array(np.float64)
    top_classes: dict[str, np.ndarray] = _array(np.int64)
    class_names: dict[str, list[str] | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classifiers = [str(c) for c in self.classifiers]
        self.modules = [str(m) for m in self.modules]
        problem = _inconsistency(self.classifiers, self.modules, self.module_layers,
                                 {"predictions": self.predictions, "labels1": self.labels1,
                                  "labels2": self.labels2, "entropy": self.entropy,
                                  "top_classes": self.top_classes})
        if problem:
            raise ShapeError(f"Inconsistent RobustnessResult: {problem}.")

    # ------------------------------------------------------------------ lookups
    def _clf(self, classifier: str | None) -> str:
        if classifier is None:
            if len(self.classifiers) != 1:
                raise ConfigError(f"Name the classifier: one of {self.classifiers}.")
            return self.classifiers[0]
        if classifier not in self.classifiers:
            raise ConfigError(
                f"No classifier '{classifier}'.{did_you_mean(classifier, self.classifiers)} "
                f"Classifiers: {self.classifiers}."
            )
        return classifier

    def _mod(self, module: str) -> int:
        if module not in self.modules:
            raise ConfigError(
                f"No module '{module}'.{did_you_mean(module, self.modules)} Modules: {self.modules}."
            )
        return self.modules.index(module)

    @property
    def n_pairs(self) -> int:
        """Number of (Original 1, Original 2) pairs, the same for every module."""
        return int(next(iter(self.labels1.values())).shape[0])

    def class_name(self, classifier: str, index: int) -> str:
        """Name of class ``index`` of ``classifier`` (the index as text without names)."""
        names = self.class_names.get(classifier)
        return names[index] if names is not None and 0 <= index < len(names) else str(index)

    # ------------------------------------------------------------------ analyses
    def outcomes(self, classifier: str | None = None) -> np.ndarray:
        """Outcome code of each hybrid, ``(M, N)``: see ``OUTCOME_*`` constants."""
        c = self._clf(classifier)
        return _outcomes(self.predictions[c], self.labels1[c][None], self.labels2[c][None])

    def rates(self, classifier: str | None = None) -> dict[str, np.ndarray]:
        """Recognition rates per module over informative pairs (originals' classes differ).

        Returns
        -------
        dict of ndarray (M,)
            ``original1``, ``original2``, ``neither`` (they sum to 1), ``se1``, ``se2``
            (binomial standard errors), ``n_informative`` (pairs used). Rates are NaN for a
            module without informative pairs.
        """
        c = self._clf(classifier)
        out = self.outcomes(c)
        l1, l2 = self.labels1[c], self.labels2[c]
        informative = (l1 != l2) & (l1 >= 0) & (l2 >= 0)
        n = np.full(len(self.modules), float(informative.sum()))
        with np.errstate(divide="ignore", invalid="ignore"):
            r1 = (out == OUTCOME_ORIGINAL1).sum(1) / n
            r2 = (out == OUTCOME_ORIGINAL2).sum(1) / n
            se1 = np.sqrt(r1 * (1 - r1) / n)
            se2 = np.sqrt(r2 * (1 - r2) / n)
        return {"original1": r1, "original2": r2, "neither": 1 - r1 - r2,
                "se1": se1, "se2": se2, "n_informative": n.astype(int)}

    def rate_by_layer(self, classifier: str | None = None, which: str = "most") -> dict[str, float]:
        """Mean recognition rate of the modules of each layer (Fig. 6's curves).

        ``which``: ``"original1"``, ``"original2"`` or ``"most"`` (the better recognised
        of the two originals' classes for each module, as in Fig. 6).
        """
        if which not in ("original1", "original2", "most"):
            raise ConfigError(f"which must be 'original1', 'original2' or 'most', got {which!r}.")
        r = self.rates(classifier)
        per_module = np.maximum(r["original1"], r["original2"]) if which == "most" else r[which]
        groups: dict[str, list[float]] = {}
        for m, name in enumerate(self.modules):
            groups.setdefault("+".join(self.module_layers[name]), []).append(float(per_module[m]))
        return {layer: float(np.nanmean(v)) for layer, v in groups.items()}

    def context_sensitive(self, module: str, threshold: float = 0.5) -> dict[str, bool]:
        """Which classifiers change their answer when only ``module`` is swapped.

        Meant for a module that carries context (background): a classifier is flagged when
        it keeps Original 1's class on fewer than ``threshold`` of the informative hybrids,
        i.e. its decision follows the swapped context rather than the unchanged object.
        """
        m = self._mod(module)
        return {c: bool(self.rates(c)["original1"][m] < threshold) for c in self.classifiers}

    def disagreement(self) -> np.ndarray:
        """Share of hybrids of each module on which the classifiers' outcomes differ, ``(M,)``.

        Outcomes (Original 1's class, Original 2's, neither) are compared rather than raw
        labels, so classifiers with different label sets can be compared. Pairs excluded
        for any classifier are left out. Needs two or more classifiers.
        """
        if len(self.classifiers) < 2:
            raise ConfigError("Disagreement needs at least two classifiers.")
        outs = np.stack([self.outcomes(c) for c in self.classifiers])  # (C, M, N)
        kept = (outs != OUTCOME_EXCLUDED).all(0)
        differ = (outs != outs[:1]).any(0) & kept
        with np.errstate(divide="ignore", invalid="ignore"):
            return differ.sum(1) / kept.sum(1)

    def disagreements(self, module: str, limit: int = 10) -> list[dict[str, Any]]:
        """Hybrids of ``module`` on which the classifiers disagree (Table 3's rows).

        Returns
        -------
        list of dict
            ``{"pair": n, classifier: "class name (original 1|original 2|neither)", ...}``
            for at most ``limit`` pairs, in pair order.
        """
        m = self._mod(module)
        outs = np.stack([self.outcomes(c)[m] for c in self.classifiers])  # (C, N)
        kept = (outs != OUTCOME_EXCLUDED).all(0)
        where = np.flatnonzero((outs != outs[:1]).any(0) & kept)[:limit]
        words = {OUTCOME_NEITHER: "neither", OUTCOME_ORIGINAL1: "original 1",
                 OUTCOME_ORIGINAL2: "original 2", OUTCOME_SAME_CLASS: "both"}
        rows = []
        for n in where:
            row: dict[str, Any] = {"pair": int(n)}
            for ci, c in enumerate(self.classifiers):
                label = self.class_name(c, int(self.predictions[c][m, n]))
                row[c] = f"{label} ({words[int(outs[ci, n])]})"
            rows.append(row)
        return rows

    def _derived(self) -> dict[str, Any]:
        """``summary``: per classifier, the rates, mean entropies and top class names (plain
        JSON data, None for NaN); ``disagreement`` with two or more classifiers."""
        summary: dict[str, Any] = {}
        for c in self.classifiers:
            r = self.rates(c)
            summary[c] = {k: [None if not np.isfinite(x) else float(x) for x in v]
                          for k, v in r.items()}
            summary[c]["mean_entropy"] = self.entropy[c].mean(1).tolist()
            summary[c]["top_classes"] = [self.class_name(c, int(i)) for i in self.top_classes[c]]
        out: dict[str, Any] = {"summary": summary}
        if len(self.classifiers) > 1:
            out["disagreement"] = self.disagreement().tolist()
        return out

    @classmethod
    def _validate(cls, path: Any, arrays: Mapping[str, np.ndarray],
                  header: Mapping[str, Any]) -> None:
        classifiers, modules = header.get("classifiers"), header.get("modules")
        layers = header.get("module_layers")
        for key, value in (("classifiers", classifiers), ("modules", modules)):
            if not isinstance(value, list) or not value or not all(
                    isinstance(x, str) for x in value):
                raise ResultFileError(f"'{path}' is a damaged robustness result: '{key}' in "
                                      f"the header is {value!r}, not a list of names.")
        if not isinstance(layers, dict):
            raise ResultFileError(f"'{path}' is a damaged robustness result: 'module_layers' "
                                  "in the header is not a dict.")
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key, arr in arrays.items():
            name, _, sub = key.partition(KEY_SEP)
            groups.setdefault(name, {})[sub] = arr
        problem = _inconsistency(classifiers, modules, layers, {
            name: groups.get(name, {}) for name in _PER_CLASSIFIER})
        if problem:
            raise ResultFileError(f"'{path}' is a damaged robustness result: {problem}. "
                                  "Compute it again with classifier_robustness().")

    def to_text(self) -> str:
        """A table: per module and classifier, the rates, standard errors and mean entropy."""
        lines = [f"{'module':<14}{'classifier':<16}{'orig.1':>8}{'orig.2':>8}{'neither':>9}"
                 f"{'n':>6}{'entropy':>9}"]
        for c in self.classifiers:
            r = self.rates(c)
            ent = self.entropy[c].mean(1)
            for m, name in enumerate(self.modules):
                lines.append(
                    f"{name:<14}{c:<16}{r['original1'][m]:>8.3f}{r['original2'][m]:>8.3f}"
                    f"{r['neither'][m]:>9.3f}{r['n_informative'][m]:>6d}{ent[m]:>9.3f}"
                )
        if len(self.classifiers) > 1:
            dis = self.disagreement()
            lines.append("disagreement: " + ", ".join(
                f"{name} {d:.3f}" for name, d in zip(self.modules, dis)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()

    def _html_figures(self) -> dict[str, Any]:
        from cfmodules.evaluation.plots import plot_recognition

        return {"Share of hybrids given Original 1's / Original 2's class (Fig. 6)":
                lambda: plot_recognition(self)}

    def hybrids(self, adapter: Any, module: str, pairs: Sequence[int]) -> torch.Tensor:
        """Regenerate the hybrids of ``module`` for the given pair indices (for figures).

        Uses the same latents as the analysis (``info["seed"]``), so the images are the
        ones the classifiers saw. Returns images in the adapter's output range.
        """
        from cfmodules.hybrid import hybridize

        if "module_channels" not in self.info or "seed" not in self.info:
            raise ConfigError("This result was not made by classifier_robustness(); "
                              "it cannot regenerate its hybrids.")
        self._mod(module)
        z1, z2 = pair_latents(adapter, self.n_pairs, self.info["seed"])
        idx = torch.as_tensor(list(pairs), dtype=torch.long)
        from cfmodules import latents as L

        return hybridize(adapter, L.select(z1, idx), L.select(z2, idx),
                         self.info["module_channels"][module])


_PER_CLASSIFIER = {"predictions": (2, "iu"), "labels1": (1, "iu"), "labels2": (1, "iu"),
                   "entropy": (2, "f"), "top_classes": (1, "iu")}
"""The per-classifier arrays of a RobustnessResult: dimensions and dtype kinds."""


def _inconsistency(classifiers: Sequence[str], modules: Sequence[str],
                   module_layers: Mapping[str, Any],
                   per_classifier: Mapping[str, Mapping[str, Any]]) -> str | None:
    """What does not fit together in a robustness result's arrays, or None."""
    if len(set(classifiers)) != len(classifiers) or len(set(modules)) != len(modules):
        return "classifier and module names must be distinct"
    if set(module_layers) != set(modules):
        return (f"module_layers names {sorted(module_layers)}, not the modules "
                f"{list(modules)}")
    n_pairs = None
    for name, (ndim, kinds) in _PER_CLASSIFIER.items():
        group = per_classifier[name]
        if set(group) != set(classifiers):
            return (f"'{name}' has arrays for {sorted(group)}, not for the classifiers "
                    f"{list(classifiers)}")
        for c in classifiers:
            a = np.asarray(group[c])
            if a.ndim != ndim or a.dtype.kind not in kinds:
                return (f"'{name}' of '{c}' has shape {a.shape} and dtype {a.dtype}; expected "
                        f"{ndim} dimension(s) of {'integers' if kinds == 'iu' else 'floats'}")
            if ndim == 2 and a.shape[0] != len(modules):
                return (f"'{name}' of '{c}' has {a.shape[0]} rows, not one per module "
                        f"({len(modules)})")
            if name != "top_classes":
                n = a.shape[-1]
                if n_pairs is not None and n != n_pairs:
                    return (f"'{name}' of '{c}' has {n} pairs where other arrays have "
                            f"{n_pairs}")
                n_pairs = n
    return None


def _top_classes(prob_sum: np.ndarray, top_k: int) -> np.ndarray:
    k = min(top_k, prob_sum.shape[0])
    return np.argsort(-prob_sum, kind="stable")[:k]


def robustness_from_probabilities(
    hybrid_probabilities: Mapping[str, np.ndarray],
    labels1: Mapping[str, np.ndarray],
    labels2: Mapping[str, np.ndarray],
    modules: Sequence[str],
    module_layers: Mapping[str, Sequence[str]] | None = None,
    class_names: Mapping[str, Sequence[str] | None] | None = None,
    top_k: int = 10,
) -> RobustnessResult:
    """The analysis on precomputed classifier outputs (arrays only, no generator).

    Parameters
    ----------
    hybrid_probabilities : dict classifier -> ndarray (M, N, K)
        Class probabilities of hybrid ``n`` of module ``m``.
    labels1, labels2 : dict classifier -> ndarray (N,) of int
        Class of Original 1 and Original 2 of each pair (-1: no class, pair excluded).
    modules : list of str
        Names of the M modules.
    module_layers : dict module -> layer names, optional
    class_names : dict classifier -> list of K names, optional
    top_k : int, default 10
        Classes kept for the entropy (the paper's 10).

    Returns
    -------
    RobustnessResult
    """
    top_k = checks.positive_int(top_k, "top_k")
    if not hybrid_probabilities:
        raise ConfigError("Give at least one classifier's probabilities.")
    modules = list(modules)
    preds, ent, tops, l1s, l2s = {}, {}, {}, {}, {}
    for c, p in hybrid_probabilities.items():
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 3 or p.shape[0] != len(modules):
            raise ShapeError(
                f"Probabilities of '{c}' must be (modules={len(modules)}, pairs, classes), got {p.shape}."
            )
        a, b = np.asarray(labels1[c]).astype(np.int64), np.asarray(labels2[c]).astype(np.int64)
        if a.shape != (p.shape[1],) or b.shape != (p.shape[1],):
            raise ShapeError(
                f"Labels of '{c}' must be ({p.shape[1]},) like the pairs; got {a.shape} and {b.shape}."
            )
        preds[c] = p.argmax(-1)
        tops[c] = _top_classes(p.sum((0, 1)), top_k)
        ent[c] = renormalized_entropy(p, tops[c])
        l1s[c], l2s[c] = a, b
    layers = {m: tuple(module_layers[m]) if module_layers and m in module_layers else (m,)
              for m in modules}
    names = {c: (list(class_names[c]) if class_names and class_names.get(c) is not None else None)
             for c in hybrid_probabilities}
    return RobustnessResult(list(hybrid_probabilities), modules, layers, preds, l1s, l2s,
                            ent, tops, names)


def _class_or_none(p: np.ndarray, min_confidence: float) -> np.ndarray:
    """Top class of each row of probabilities, -1 where the top probability is too low."""
    return np.where(p.max(1) >= min_confidence, p.argmax(1), -1)


def _probabilities(clf: Classifier, images: torch.Tensor, outputs: str, name: str) -> np.ndarray:
    out = call_on(clf, images)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out))
    if out.dim() != 2 or out.shape[0] != images.shape[0]:
        raise ShapeError(
            f"Classifier '{name}' returned shape {tuple(out.shape)} for {images.shape[0]} images; "
            "it must return (N, classes) scores."
        )
    out = out.detach().double().cpu()
    if outputs == "logits":
        return out.softmax(1).numpy()
    if (out < -1e-6).any() or not torch.allclose(out.sum(1), torch.ones(out.shape[0], dtype=out.dtype), atol=1e-3):
        raise ConfigError(
            f"Classifier '{name}' does not return probabilities (rows must be >= 0 and sum to "
            "1); use outputs='logits' if it returns logits."
        )
    return out.numpy()


def classifier_robustness(
    adapter: Any,
    classifiers: Mapping[str, Classifier] | Classifier,
    modules: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    n_pairs: int,
    seed: int = 0,
    labels: Callable[[Any], Any] | None = None,
    outputs: str = "logits",
    top_k: int = 10,
    class_names: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    min_confidence: float = 0.0,
) -> RobustnessResult:
    """Feed the hybrids of each module to each classifier and analyse the answers.

    The same ``n_pairs`` pairs of latents are used for every module, so modules and layers
    are compared on paired samples. Hybrids are made and classified batch by batch.

    Parameters
    ----------
    adapter : GeneratorAdapter
    classifiers : dict name -> classifier, or one classifier
        ``classifier(images (N, C, H, W) in [0, 1]) -> (N, K)``. nn.Modules run in eval
        mode under no_grad on their own device. A ``classes`` attribute gives class names.
    modules : dict name -> module, or list of modules (named ``module 0``, ``module 1``, ...)
        A module maps layer -> channel indices, as for :func:`cfmodules.hybrid.hybridize`.
        Modules of several layers may be mixed; results are kept per module and
        summarised per layer by :meth:`RobustnessResult.rate_by_layer`.
    n_pairs : int
        Number of (Original 1, Original 2) pairs.
    seed : int
        Latent stream: pair ``i`` is :func:`cfmodules.latents.pair_latents` pair ``i``
        (samples ``2i`` and ``2i + 1``), the same pairs as the influence maps use.
    labels : callable, optional
        ``labels(latent batch) -> (N,)`` true classes of generated images (a
        class-conditional generator's class, a synthetic generator's object). Default:
        each classifier's own answer on the originals.
    outputs : "logits" or "probabilities"
        What the classifiers return.
    top_k : int, default 10
        Classes kept for the entropy.
    class_names : dict classifier -> class names, optional
    batch_size : int
        Pairs per batch (the result does not depend on it).
    min_confidence : float in [0, 1), default 0
        Without ``labels``: an original on which a classifier's top probability is below
        this gets no class (-1) for that classifier, and its pair is left out of the
        rates. Use it when the classifier is unsure on many generated images.

    Returns
    -------
    RobustnessResult
    """
    from cfmodules.hybrid import hybridize, module_channels

    if outputs not in ("logits", "probabilities"):
        raise ConfigError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}.")
    min_confidence = checks.real(min_confidence, "min_confidence", low=0, high=1,
                                 high_open=True)
    n_pairs = checks.positive_int(n_pairs, "n_pairs")
    batch_size = checks.positive_int(batch_size, "batch_size")
    clfs = dict(classifiers) if isinstance(classifiers, Mapping) else {"classifier": classifiers}
    if not clfs or not all(callable(f) for f in clfs.values()):
        raise ConfigError("classifiers must be a callable or a dict name -> callable.")
    named = checks.modules(modules)
    for key, module in named.items():  # every layer and channel checked before any work
        module_channels(adapter, module, f"module '{key}'")
    z1_all, z2_all = pair_latents(adapter, n_pairs, seed)

    from cfmodules import latents as L

    probs = {c: [[] for _ in named] for c in clfs}
    lab1: dict[str, list[np.ndarray]] = {c: [] for c in clfs}
    lab2: dict[str, list[np.ndarray]] = {c: [] for c in clfs}
    for s in range(0, n_pairs, batch_size):
        sl = slice(s, min(s + batch_size, n_pairs))
        z1, z2 = L.select(z1_all, sl), L.select(z2_all, sl)
        if labels is not None:
            given = [np.asarray(labels(z), dtype=np.int64).reshape(-1) for z in (z1, z2)]
            for c in clfs:
                lab1[c].append(given[0])
                lab2[c].append(given[1])
        else:
            o1 = adapter.to_unit(adapter.generate(z1))
            o2 = adapter.to_unit(adapter.generate(z2))
        hyb = [adapter.to_unit(hybridize(adapter, z1, z2, mod)) for mod in named.values()]
        for c, clf in clfs.items():
            with EvalNoGrad(clf):
                if labels is None:
                    lab1[c].append(_class_or_none(_probabilities(clf, o1, outputs, c), min_confidence))
                    lab2[c].append(_class_or_none(_probabilities(clf, o2, outputs, c), min_confidence))
                for m, h in enumerate(hyb):
                    probs[c][m].append(_probabilities(clf, h, outputs, c))

    names = {}
    for c, clf in clfs.items():
        given = (class_names or {}).get(c)
        names[c] = list(given) if given is not None else (
            list(clf.classes) if hasattr(clf, "classes") else None)
    result = robustness_from_probabilities(
        {c: np.stack([np.concatenate(p) for p in per]) for c, per in probs.items()},
        {c: np.concatenate(v) for c, v in lab1.items()},
        {c: np.concatenate(v) for c, v in lab2.items()},
        list(named),
        {n: tuple(m) for n, m in named.items()},
        names,
        top_k,
    )
    result.info.update(seed=seed, n_pairs=n_pairs, top_k=top_k, outputs=outputs,
                       min_confidence=min_confidence,
                       labels="given" if labels is not None else "classifier on originals",
                       module_channels=named)
    return result
