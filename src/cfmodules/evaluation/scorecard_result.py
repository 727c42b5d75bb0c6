"""The :class:`Scorecard` result: its fields, p-values, Holm adjustment and text.

How a scorecard is computed, and what its null, p-values and intervals are:
:mod:`cfmodules.evaluation.scorecard`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cfmodules import checks
from cfmodules.errors import ConfigError, ShapeError, did_you_mean
from cfmodules.results import Result

__all__ = ["Scorecard", "holm", "STATISTICS", "TESTED"]

KIND = "scorecard"

STATISTICS = {
    "iou": "IoU of the module's top pixels with its region",
    "mass_share": "share of the change inside the module's region",
    "specificity": "(in - out) / (in + out), mean change per pixel in / out of the region",
    "concentration": "share of the change inside the module's own change region",
    "pixel_effect": "mean |hybrid - Original 1| over pixels and pairs",
    "pixel_effect_ratio": "pixel effect / mean pixel effect of the null groups",
    "classifier_effect": "mean total variation distance of the classifier's probabilities",
    "classifier_effect_ratio": "classifier effect / mean of the null groups",
}
"""Every statistic of a scorecard, in table order, with what it measures."""

TESTED = ("iou", "specificity", "concentration", "pixel_effect", "classifier_effect")
"""The statistics compared with the null (one-sided: higher than random groups)."""



def _array(dtype: Any) -> Any:
    return field(metadata={"dtype": dtype})


def _channels_from_dict(data: Mapping[str, Mapping[str, Sequence[int]]]
                        ) -> dict[str, dict[str, list[int]]]:
    return {str(m): {str(la): [int(c) for c in ch] for la, ch in v.items()}
            for m, v in data.items()}


@dataclass(repr=False)
class Scorecard(Result):
    """Localisation and causal effect of each module against random channel groups.

    A :class:`cfmodules.results.Result` (``save`` / ``load`` as ``.npz`` + JSON, no
    pickle; each dict of arrays is stored as ``<field>/<statistic>``). See
    :mod:`cfmodules.evaluation.scorecard` for the definitions, the null, the p-values and
    the intervals.

    Attributes
    ----------
    modules : list of str
    module_channels : dict module -> {layer: [channels]}
    regions : list of str
        Names of the reference regions (empty without references).
    masks : ndarray (R, H, W) of bool
    maps : ndarray (K, H, W) float32
        Mean change map of each module, ``mean_p |hybrid - Original 1|`` over colours.
    change : ndarray (K, H, W) of bool
        Its change region (smoothed and thresholded as the clustering does).
    region : ndarray (K,) of int
        Region assigned to each module (index into ``regions``; -1 without references).
    observed : dict statistic -> ndarray (K,)
        The module's value (NaN where the statistic does not apply).
    null : dict statistic -> ndarray (K, n_null)
        The same statistic for each module's random groups (tested statistics only).
    ci_low, ci_high : dict statistic -> ndarray (K,)
        Bias-corrected bootstrap interval over pairs (level ``info["confidence"]``).
    per_pair : dict statistic -> ndarray (K, P)
        ``pixel_effect`` (and ``classifier_effect``) of each pair, for re-analysis.
    info : dict
        Model, pairs (seed, start, n_pairs), n_null, n_boot, window, percentile,
        iou_area, confidence, alpha, classifier name, seconds.
    """

    kind: ClassVar[str] = KIND

    modules: list[str]
    module_channels: dict[str, dict[str, list[int]]] = field(
        metadata={"from_dict": _channels_from_dict})
    regions: list[str]
    masks: np.ndarray = _array(bool)
    maps: np.ndarray = _array(np.float32)
    change: np.ndarray = _array(bool)
    region: np.ndarray = _array(np.int64)
    observed: dict[str, np.ndarray] = _array(np.float64)
    null: dict[str, np.ndarray] = _array(np.float64)
    ci_low: dict[str, np.ndarray] = _array(np.float64)
    ci_high: dict[str, np.ndarray] = _array(np.float64)
    per_pair: dict[str, np.ndarray] = _array(np.float64)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = [str(m) for m in self.modules]
        self.regions = [str(r) for r in self.regions]
        k = len(self.modules)
        problems = []
        if self.maps.ndim != 3 or self.maps.shape[0] != k:
            problems.append(f"maps has shape {self.maps.shape}, not ({k}, H, W)")
        elif self.change.shape != self.maps.shape:
            problems.append(f"change has shape {self.change.shape}, not {self.maps.shape}")
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.regions) or (
                self.maps.ndim == 3 and self.masks.shape[1:] != self.maps.shape[1:]):
            problems.append(f"masks has shape {self.masks.shape} for {len(self.regions)} "
                            "regions")
        if self.region.shape != (k,):
            problems.append(f"region has shape {self.region.shape}, not ({k},)")
        for name in ("observed", "ci_low", "ci_high", "null", "per_pair"):
            for stat, arr in getattr(self, name).items():
                if stat not in STATISTICS:
                    problems.append(f"{name} has an unknown statistic {stat!r}")
                elif np.ndim(arr) < 1 or np.shape(arr)[0] != k:
                    problems.append(f"{name}[{stat!r}] has shape {np.shape(arr)}, not one "
                                    f"row per module ({k})")
        if set(self.module_channels) != set(self.modules):
            problems.append("module_channels does not name the modules")
        if problems:
            raise ShapeError(f"Inconsistent Scorecard: {'; '.join(problems)}.")

    # ------------------------------------------------------------------ derived
    @property
    def n_null(self) -> int:
        """Random groups per module."""
        return int(self.info.get("n_null", 0))

    @property
    def statistics(self) -> list[str]:
        """The statistics this scorecard has, in table order."""
        return [s for s in STATISTICS if s in self.observed]

    @property
    def tested(self) -> list[str]:
        """The statistics compared with the null."""
        return [s for s in TESTED if s in self.null]

    def _mod(self, module: str | int) -> int:
        if isinstance(module, (int, np.integer)):
            if not 0 <= int(module) < len(self.modules):
                raise ConfigError(f"No module {module}: there are {len(self.modules)}.")
            return int(module)
        if module not in self.modules:
            raise ConfigError(f"No module '{module}'.{did_you_mean(module, self.modules)} "
                              f"Modules: {self.modules}.")
        return self.modules.index(module)

    def region_of(self, module: str | int) -> str | None:
        """Name of the region assigned to a module (None without references)."""
        r = int(self.region[self._mod(module)])
        return self.regions[r] if r >= 0 else None

    def p_values(self) -> dict[str, np.ndarray]:
        """One-sided permutation p-value of each tested statistic, ``(K,)`` each.

        ``(1 + #{null >= observed}) / (1 + n_null)``; NaN where the module has no value.
        """
        out = {}
        for s in self.tested:
            obs, null = self.observed[s], self.null[s]
            ge = (null >= obs[:, None]).sum(1)
            out[s] = np.where(np.isnan(obs), np.nan, (1 + ge) / (1 + null.shape[1]))
        return out

    def percentiles(self) -> dict[str, np.ndarray]:
        """Share (in %) of each module's null groups scoring strictly lower, ``(K,)`` each."""
        return {s: np.where(np.isnan(self.observed[s]), np.nan,
                            100.0 * (self.null[s] < self.observed[s][:, None]).mean(1))
                for s in self.tested}

    def p_adjusted(self) -> dict[str, np.ndarray]:
        """Holm-adjusted p-values over the modules, for each statistic apart.

        Each statistic asks its own question ("is the module more specific than random
        groups?", "is its effect larger?"), and the K modules are the family of that
        question: Holm's adjustment controls, for each statistic, the probability of any
        false "better than random" among the modules, whatever the dependence between
        them. Nothing is adjusted across statistics: for one verdict over the whole table,
        compare these with ``alpha / S`` (S tested statistics, Bonferroni).
        """
        out = {}
        for s, pv in self.p_values().items():
            adj = np.full(len(pv), np.nan)
            ok = np.isfinite(pv)
            adj[ok] = holm(pv[ok])
            out[s] = adj
        return out

    def significant(self, alpha: float | None = None, adjusted: bool = True
                    ) -> dict[str, np.ndarray]:
        """Which modules beat the null on each tested statistic, ``(K,)`` bool each."""
        a = self.info.get("alpha", 0.05) if alpha is None else checks.real(
            alpha, "alpha", low=0, high=1, low_open=True, high_open=True)
        p = self.p_adjusted() if adjusted else self.p_values()
        return {s: np.nan_to_num(v, nan=1.0) < a for s, v in p.items()}

    def table(self) -> list[dict[str, Any]]:
        """One row per module and statistic: value, CI, null mean, percentile, p, Holm p
        (over the modules of that statistic)."""
        p, pa, pc = self.p_values(), self.p_adjusted(), self.percentiles()
        rows = []
        for k, m in enumerate(self.modules):
            for s in self.statistics:
                tested = s in p
                rows.append({
                    "module": m, "region": self.region_of(k), "statistic": s,
                    "value": float(self.observed[s][k]),
                    "ci_low": float(self.ci_low[s][k]) if s in self.ci_low else float("nan"),
                    "ci_high": float(self.ci_high[s][k]) if s in self.ci_high else float("nan"),
                    "null_mean": float(np.mean(self.null[s][k])) if tested else float("nan"),
                    "percentile": float(pc[s][k]) if tested else float("nan"),
                    "p": float(p[s][k]) if tested else float("nan"),
                    "p_holm": float(pa[s][k]) if tested else float("nan")})
        return rows

    def _derived(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.null:
            out["p"] = self.p_values()
            out["p_holm"] = self.p_adjusted()
            out["percentile"] = self.percentiles()
        return out

    @classmethod
    def _validate(cls, path: Any, arrays: Mapping[str, np.ndarray],
                  header: Mapping[str, Any]) -> None:
        from cfmodules.errors import ResultFileError

        modules = header.get("modules")
        if not isinstance(modules, list) or not modules or not all(
                isinstance(m, str) for m in modules):
            raise ResultFileError(f"'{path}' is a damaged scorecard: 'modules' in the header "
                                  f"is {modules!r}, not a list of names.")
        for key in ("maps", "change", "region", "masks"):
            if key not in arrays:
                raise ResultFileError(f"'{path}' is a damaged scorecard: no '{key}' array. "
                                      "Compute it again with cfmodules.evaluation.scorecard().")

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        """A block per module: each statistic with its CI, the null, percentile and p."""
        i = self.info
        conf = 100 * float(i.get("confidence", 0.95))
        lines = [f"Scorecard of {len(self.modules)} module(s) of {i.get('model', '?')}: "
                 f"{i.get('n_pairs', '?')} pairs (seed {i.get('seed', '?')}, from pair "
                 f"{i.get('start', '?')}); null: {self.n_null} random channel groups of "
                 f"each module's size at its layer(s); {i.get('n_boot', '?')} bootstrap "
                 f"resamples of the pairs ({conf:g}% CI); p one-sided (smallest possible "
                 f"{1 / (1 + self.n_null):.4f}), Holm over the modules of each statistic"]
        p, pa, pc = self.p_values(), self.p_adjusted(), self.percentiles()
        for k, m in enumerate(self.modules):
            size = sum(len(c) for c in self.module_channels[m].values())
            where = ", ".join(f"{la}: {len(c)}" for la, c in self.module_channels[m].items())
            region = self.region_of(k)
            lines.append(f"{m} ({size} channels; {where})"
                         + (f" -> region '{region}'" if region is not None else ""))
            lines.append(f"  {'statistic':<24}{'value':>8}  {'CI':<22}{'null mean':>10}"
                         f"{'pct':>7}{'p':>9}{'p Holm':>9}")
            for s in self.statistics:
                v = self.observed[s][k]
                ci = ("" if s not in self.ci_low else "[n/a: resampling bias]"
                      if not np.isfinite(self.ci_low[s][k]) else
                      f"[{self.ci_low[s][k]:.3f}, {self.ci_high[s][k]:.3f}]")
                if s in p:
                    star = " *" if pa[s][k] < i.get("alpha", 0.05) else ""
                    tail = (f"{np.mean(self.null[s][k]):>10.3f}{pc[s][k]:>7.1f}"
                            f"{p[s][k]:>9.4f}{pa[s][k]:>9.4f}{star}")
                else:
                    tail = ""
                lines.append(f"  {s:<24}{v:>8.3f}  {ci:<22}{tail}")
        lines.append(f"* Holm-adjusted p < {i.get('alpha', 0.05)}: the module beats random "
                     "groups of its size on that statistic (families: the modules of one "
                     "statistic; nothing is adjusted across statistics)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()

    def _html_figures(self) -> dict[str, Callable[[], Any]]:
        from cfmodules.evaluation.plots import plot_scorecard

        return {"Where each module changes the image, and each statistic against its null":
                lambda: plot_scorecard(self)}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as ``p``; capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if n == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate((n - np.arange(n)) * p[order])
    out = np.empty(n)
    out[order] = np.minimum(adj, 1.0)
    return out
