"""Figures of the evaluation: Table 2 as a heatmap, Fig. 6, Fig. 14/16, Table 3 / Fig. 17.

Every function returns a :class:`matplotlib.figure.Figure` (never shown; save it with
``fig.savefig``). matplotlib is imported inside the functions, so importing this module
costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cfmodules.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from cfmodules.evaluation.frechet import DistanceTable
    from cfmodules.evaluation.robustness import RobustnessResult
    from cfmodules.evaluation.scorecard import Scorecard

__all__ = [
    "plot_distance_table",
    "plot_recognition",
    "plot_rate_by_layer",
    "plot_entropy",
    "plot_disagreement",
    "plot_disagreements",
    "plot_scorecard",
]


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def plot_distance_table(table: DistanceTable, normalized: bool = True) -> Figure:
    """Table 2 as a lower-triangular heatmap with the values written in the cells."""
    m = table.normalized if (normalized and table.normalizer is not None) else table.distances
    n = len(table.labels)
    shown = np.where(np.tril(np.ones((n, n), bool)), m, np.nan)
    fig = _figure(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="w" if m[i, j] < np.nanmax(shown) / 2 else "k")
    ax.set_xticks(range(n), table.labels)
    ax.set_yticks(range(n), table.labels)
    title = "Fréchet distance / d(R, G)" if normalized and table.normalizer is not None \
        else "Fréchet distance"
    ax.set_title(f"{title} ({table.n_images} images per set)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_recognition(result: RobustnessResult, classifiers: Sequence[str] | None = None) -> Figure:
    """Fig. 6 per module: share of hybrids given Original 1's / Original 2's class.

    Grouped bars (one per classifier) for each module, with binomial standard errors.
    """
    clfs = list(classifiers) if classifiers is not None else result.classifiers
    fig = _figure(figsize=(max(6.0, 1.2 * len(result.modules) * 2), 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(result.modules))
    width = 0.8 / max(len(clfs), 1)
    for panel, (key, se, title) in enumerate((
            ("original1", "se1", "class of Original 1 kept"),
            ("original2", "se2", "class of Original 2 taken"))):
        ax = axes[panel]
        for k, c in enumerate(clfs):
            r = result.rates(c)
            ax.bar(x + (k - (len(clfs) - 1) / 2) * width, r[key], width, yerr=r[se],
                   capsize=2, label=c)
        ax.set_xticks(x, result.modules, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("recognition rate")
    axes[1].legend(fontsize=7)
    return fig


def plot_rate_by_layer(result: RobustnessResult, which: str = "most") -> Figure:
    """Fig. 6: mean recognition rate of the modules of each layer, one line per classifier."""
    fig = _figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for c in result.classifiers:
        per_layer = result.rate_by_layer(c, which)
        ax.plot(list(per_layer), list(per_layer.values()), marker="o", label=c)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("intervened layer")
    ax.set_ylabel({"most": "rate of the most recognised original",
                   "original1": "rate of Original 1's class",
                   "original2": "rate of Original 2's class"}[which])
    ax.legend(fontsize=7)
    return fig


def plot_entropy(result: RobustnessResult, classifier: str | None = None, bins: int = 20) -> Figure:
    """Fig. 14/16: histograms of the renormalized top-class entropy.

    Columns are the layers, rows the modules of each layer (in the order given).
    """
    c = result._clf(classifier)
    by_layer: dict[str, list[int]] = {}
    for m, name in enumerate(result.modules):
        by_layer.setdefault("+".join(result.module_layers[name]), []).append(m)
    rows = max(len(v) for v in by_layer.values())
    cols = len(by_layer)
    fig = _figure(figsize=(2.4 * cols + 0.5, 1.7 * rows + 0.5))
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    top = np.log(len(result.top_classes[c]))
    edges = np.linspace(0, max(top, 1e-6), bins + 1)
    for j, (layer, mods) in enumerate(by_layer.items()):
        for i in range(rows):
            ax = axes[i, j]
            if i >= len(mods):
                ax.set_axis_off()
                continue
            m = mods[i]
            ax.hist(result.entropy[c][m], bins=edges, color="C0")
            ax.set_title(f"{result.modules[m]}", fontsize=8)
            if i == 0:
                ax.set_title(f"{layer}\n{result.modules[m]}", fontsize=8)
    fig.supxlabel(f"entropy over the top {len(result.top_classes[c])} classes (nats)", fontsize=8)
    return fig


def plot_disagreement(result: RobustnessResult) -> Figure:
    """Share of hybrids of each module on which the classifiers disagree."""
    dis = result.disagreement()
    fig = _figure(figsize=(max(4.0, 0.8 * len(result.modules) + 1), 3))
    ax = fig.add_subplot()
    ax.bar(result.modules, dis, color="C3")
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("classifiers disagree")
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_disagreements(result: RobustnessResult, adapter: Any, module: str, limit: int = 4) -> Figure:
    """Table 3 with Fig. 17: hybrids the classifiers disagree on, with each one's answer.

    Each column shows Original 1, the hybrid and Original 2 of one pair; the answers of
    every classifier on the hybrid are written under it. The images are regenerated from
    the result's seed.
    """
    import torch

    from cfmodules import latents as L

    rows = result.disagreements(module, limit)
    if not rows:
        raise ConfigError(f"The classifiers agree on every hybrid of module '{module}'.")
    pairs = [r["pair"] for r in rows]
    idx = torch.as_tensor(pairs)
    z1, z2 = L.pair_latents(adapter, result.n_pairs, result.info["seed"])
    o1 = adapter.to_unit(adapter.generate(L.select(z1, idx))).cpu()
    o2 = adapter.to_unit(adapter.generate(L.select(z2, idx))).cpu()
    hyb = adapter.to_unit(result.hybrids(adapter, module, pairs)).cpu()
    fig = _figure(figsize=(2.2 * len(rows), 2.2 * 3 + 0.25 * len(result.classifiers)))
    axes = np.atleast_2d(fig.subplots(3, len(rows), squeeze=False))
    for j, row in enumerate(rows):
        for i, (img, title) in enumerate(((o1, "Original 1"), (hyb, "hybrid"), (o2, "Original 2"))):
            ax = axes[i, j]
            x = img[j].permute(1, 2, 0).numpy()
            ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray" if x.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title} (pair {row['pair']})" if i == 0 else title, fontsize=7)
        axes[1, j].set_xlabel("\n".join(f"{c}: {row[c]}" for c in result.classifiers), fontsize=6)
    fig.suptitle(f"Hybrids of module {module} the classifiers disagree on", fontsize=9)
    return fig


_STAT_LABELS = {"iou": "IoU with its region", "specificity": "specificity",
                "concentration": "concentration", "pixel_effect": "pixel effect",
                "classifier_effect": "classifier effect"}


def plot_scorecard(card: Scorecard, background: Any = None) -> Figure:
    """The scorecard as a figure: one row per module.

    Columns: the module's mean change map ``mean |hybrid - Original 1|`` (its assigned
    reference region outlined), its change region (thresholded as the clustering does,
    the region outlined again), then for each tested statistic the histogram of the null
    groups' values with the module's value as a red line, its p-value and percentile.

    Parameters
    ----------
    card : Scorecard
    background : array (C, H, W) or (H, W, C) in [0, 1], optional
        An image (e.g. the mean sample) drawn under the change region.
    """
    from cfmodules.plots import module_color

    stats = card.tested
    k = len(card.modules)
    cols = 2 + len(stats)
    fig = _figure(figsize=(1.9 * cols + 0.4, 1.85 * k + 0.5))
    axes = np.atleast_2d(fig.subplots(k, cols, squeeze=False))
    p, pc = card.p_values(), card.percentiles()
    bg = None
    if background is not None:
        bg = np.asarray(background, dtype=np.float64)
        if bg.ndim == 3 and bg.shape[0] in (1, 3) and bg.shape[-1] not in (1, 3):
            bg = np.moveaxis(bg, 0, -1)
        if bg.ndim == 3 and bg.shape[-1] == 1:
            bg = bg[..., 0]
    for m in range(k):
        r = int(card.region[m])
        outline = card.masks[r] if r >= 0 else None
        region = f"\n~ {card.regions[r]}" if r >= 0 else ""
        ax = axes[m, 0]
        ax.imshow(card.maps[m], cmap="magma")
        ax.set_title(f"{card.modules[m]}{region}", fontsize=7, color=module_color(m))
        ax.set_ylabel("mean |hybrid - Original 1|", fontsize=6)
        ax = axes[m, 1]
        if bg is not None:
            ax.imshow(bg, cmap="gray" if bg.ndim == 2 else None, vmin=0, vmax=1)
            shown = np.ma.masked_where(~card.change[m], card.change[m].astype(float))
            ax.imshow(shown, cmap="autumn", alpha=0.55, vmin=0, vmax=1)
        else:
            ax.imshow(card.change[m], cmap="gray", vmin=0, vmax=1)
        ax.set_title("change region", fontsize=7)
        for a in axes[m, :2]:
            if outline is not None:
                a.contour(outline.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
            a.set_xticks([])
            a.set_yticks([])
        for j, s in enumerate(stats):
            ax = axes[m, 2 + j]
            obs = card.observed[s][m]
            if not np.isfinite(obs):
                ax.set_axis_off()
                continue
            null = card.null[s][m]
            lo, hi = min(null.min(), obs), max(null.max(), obs)
            pad = 0.05 * (hi - lo) if hi > lo else 0.05
            ax.hist(null, bins=np.linspace(lo - pad, hi + pad, 21), color="0.6")
            ax.axvline(obs, color="C3", linewidth=1.5)
            if s in card.ci_low:
                ax.axvspan(card.ci_low[s][m], card.ci_high[s][m], color="C3", alpha=0.15)
            ax.set_title(f"{_STAT_LABELS.get(s, s)}\np={p[s][m]:.3g} ({pc[s][m]:.0f}th pct)",
                         fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])
    fig.suptitle(f"Scorecard: grey = {card.n_null} random channel groups of the module's size,"
                 f" red = the module (shaded: {100 * card.info.get('confidence', 0.95):g}% "
                 "bootstrap CI); cyan: its region", fontsize=8)
    return fig
