"""Figures of an analysis, as matplotlib figures: returned, never shown, never written.

Every function takes plain arrays (numpy arrays or torch tensors) with the shapes given in
its docstring, so it plots maps and images from any source, and returns a
``matplotlib.figure.Figure`` built without pyplot (no GUI backend, no global state).
Write one with ``fig.savefig(path)`` or :func:`save_figure`; in Jupyter, a returned figure
displays itself as the cell's value.

Module ``k`` has the same colour in every figure (:func:`module_color`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfmodules import checks
from cfmodules.errors import ShapeError
from cfmodules.files import atomic_write
from cfmodules.names import module_name

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "module_color",
    "plot_images",
    "plot_influence_maps",
    "plot_templates",
    "plot_hybrid_grid",
    "plot_stability",
    "plot_module_influence",
    "plot_scan",
    "plot_modularity_curves",
    "plot_template_strip",
    "figure_to_png",
    "save_figure",
]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f")
_METHOD_STYLE = {"nmf": ("#1f77b4", "o", "NMF"), "kmeans": ("#ff7f0e", "s", "k-means")}


def module_color(k: int) -> str:
    """The colour of module ``k`` in every figure (a hex string)."""
    return _PALETTE[int(k) % len(_PALETTE)]


# ---------------------------------------------------------------------- arrays
def _array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{what} must be a numeric array, got {type(x).__name__}.") from e


def _images(images: Any, what: str = "images",
            value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) with C in {1, 3} (or (N, H, W)) -> (N, H, W, 3) in [0, 1]."""
    arr = _array(images, what)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ShapeError(
            f"{what} must have shape (N, C, H, W) with 1 or 3 colour channels, got {arr.shape}."
        )
    lo, hi = value_range
    arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    return arr.transpose(0, 2, 3, 1)


def _maps(maps: Any, what: str = "maps") -> np.ndarray:
    arr = _array(maps, what)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ShapeError(f"{what} must have shape (N, H, W), got {arr.shape}.")
    return arr


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(max(width, 1.0), max(height, 1.0)), layout="constrained")


class _ImageGrid:
    """A grid of equal cells, each holding one image, drawn on ONE axes of a figure laid out
    in inches (no layout engine).

    A report has about 150 images; one axes per image under a constrained layout took most
    of the report's time (axes creation and the layout solver), while the pixels are the
    same drawn as images placed by ``extent`` on one axes. Data coordinates are inches from
    the grid's top-left corner, so cells, frames, captions and labels are placed exactly.

    Parameters
    ----------
    nrows, ncols : int
    cell : (float, float)
        Width and height of a cell, inches.
    gap : (float, float)
        Horizontal and vertical space between cells, inches (captions sit in the vertical
        space above their cell: see ``caption_height``).
    left : float
        Inches left of the grid, for the row labels.
    caption_height : float
        Inches above each row for its captions (0: none).
    every_row : bool
        Captions above every row (True) or above the first only (False).
    title : str or None
        Figure title (suptitle) above everything.
    top, bottom : float
        More inches above the captions (e.g. for a panel title) and below the grid (the
        left margin and these leave room for other axes, as in :func:`plot_scan`).

    Attributes
    ----------
    fig, ax : the figure, and the one axes of the grid
    rect : (left, bottom, width, height)
        The grid's axes in inches from the figure's bottom-left corner.
    """

    def __init__(self, nrows: int, ncols: int, cell: tuple[float, float], *,
                 gap: tuple[float, float] = (0.06, 0.06), left: float = 0.05,
                 caption_height: float = 0.0, every_row: bool = True,
                 title: str | None = None, top: float = 0.0, bottom: float = 0.06) -> None:
        from matplotlib.figure import Figure

        nrows, ncols = max(int(nrows), 1), max(int(ncols), 1)
        self.cw, self.ch = cell
        self.gx = gap[0]
        self.gy = gap[1] + (caption_height if every_row else 0.0)
        grid_w = ncols * self.cw + (ncols - 1) * self.gx
        grid_h = nrows * self.ch + (nrows - 1) * self.gy
        top = top + caption_height + 0.06 + (0.4 if title else 0.0)
        right = 0.06
        width = max(left + grid_w + right, 1.0)
        height = max(top + grid_h + bottom, 1.0)
        self.fig = Figure(figsize=(width, height))
        self.rect = (left, height - top - grid_h, grid_w, grid_h)
        self.ax = self.fig.add_axes((left / width, 1 - (top + grid_h) / height,
                                     grid_w / width, grid_h / height))
        self.ax.set_axis_off()
        self.ax.set_xlim(0, grid_w)
        self.ax.set_ylim(grid_h, 0)
        self.ax.set_autoscale_on(False)
        if title:
            self.fig.suptitle(title, y=1 - 0.08 / height, va="top")

    def _corner(self, r: int, c: int) -> tuple[float, float]:
        return c * (self.cw + self.gx), r * (self.ch + self.gy)

    def image(self, r: int, c: int, img: np.ndarray, **kwargs: Any) -> Any:
        """``imshow`` of ``img`` filling cell (r, c); keyword arguments go to imshow."""
        x, y = self._corner(r, c)
        kwargs.setdefault("interpolation", "nearest")
        return self.ax.imshow(img, extent=(x, x + self.cw, y + self.ch, y), aspect="auto",
                              **kwargs)

    def frame(self, r: int, c: int, color: str, width: float) -> None:
        """A coloured frame of ``width`` points around cell (r, c)."""
        from matplotlib.patches import Rectangle

        x, y = self._corner(r, c)
        self.ax.add_patch(Rectangle((x, y), self.cw, self.ch, fill=False, edgecolor=color,
                                    linewidth=width, clip_on=False))

    def caption(self, r: int, c: int, text: str, fontsize: float, *, ha: str = "center",
                **kwargs: Any) -> None:
        """``text`` above cell (r, c): centred, or from its left edge (``ha="left"``, for a
        row's title that may run on over the next cells)."""
        x, y = self._corner(r, c)
        self.ax.text(x + (self.cw / 2 if ha == "center" else 0.0), y - 0.03, text, ha=ha,
                     va="bottom", fontsize=fontsize, clip_on=False, **kwargs)

    def row_label(self, r: int, text: str, color: str = "black", fontsize: float = 8) -> None:
        """``text`` right-aligned left of row ``r``, centred on it."""
        _, y = self._corner(r, 0)
        self.ax.text(-0.08, y + self.ch / 2, text, ha="right", va="center", color=color,
                     fontsize=fontsize, clip_on=False)


def _label_width(labels: Sequence[str], fontsize: float) -> float:
    """Inches a column of right-aligned labels needs (longest line, DejaVu Sans ~0.6 em)."""
    longest = max((len(line) for lab in labels for line in str(lab).split("\n")), default=0)
    return 0.2 + longest * fontsize * 0.6 / 72 if longest else 0.05


def _fitting_font(text: str, width: float, fontsize: float, smallest: float = 3.5) -> float:
    """``fontsize``, made smaller where ``text`` would be wider than ``width`` inches (long
    layer names, e.g. ``G.blocks.2.activation:1[79]``, would overlap their neighbours)."""
    return max(smallest, min(fontsize, width * 72 / (0.6 * max(len(text), 1))))


def _cell(shape: tuple[int, ...], size: float) -> tuple[float, float]:
    """A cell ``size`` inches wide with the aspect of an (H, W, ...) image."""
    h, w = shape[0], shape[1]
    return size, size * h / max(w, 1)


def _show_map(grid: _ImageGrid, r: int, c: int, m: np.ndarray, cmap: str,
              interpolation: str = "nearest") -> None:
    """A map (H, W) in cell (r, c), scaled to its own maximum (an all-zero map stays zero)."""
    grid.image(r, c, m / m.max() if m.max() > 0 else m, cmap=cmap, vmin=0, vmax=1,
               interpolation=interpolation)


def _titled(fig: Figure, title: str | None) -> Figure:
    """``fig`` with ``title`` over it, when there is one (the last step of every figure)."""
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------- images
def plot_images(
    images: Any,
    ncols: int = 8,
    *,
    title: str | None = None,
    titles: Sequence[str] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    size: float = 1.2,
) -> Figure:
    """A grid of images, e.g. samples of the generator.

    Parameters
    ----------
    images : array or tensor (N, C, H, W), C = 1 or 3 (or (N, H, W))
        Values in ``value_range`` (``adapter.to_unit(images)`` gives [0, 1]).
    ncols : int, default 8
    title : str, optional
        Figure title.
    titles : list of str, optional
        One caption per image.
    value_range : (float, float), default (0, 1)
    size : float, default 1.2
        Inches per image.

    Returns
    -------
    matplotlib.figure.Figure
    """
    imgs = _images(images, value_range=value_range)
    n = len(imgs)
    ncols = max(1, min(int(ncols), n))
    nrows = -(-n // ncols)
    grid = _ImageGrid(nrows, ncols, _cell(imgs.shape[1:], size), title=title,
                      caption_height=0.15 if titles is not None else 0.0)
    for i in range(n):
        grid.image(i // ncols, i % ncols, imgs[i])
        if titles is not None and i < len(titles):
            grid.caption(i // ncols, i % ncols, str(titles[i]), 7)
    return grid.fig


def plot_influence_maps(
    maps: Any,
    labels: Any | None = None,
    *,
    per_module: int = 10,
    names: Sequence[str] | None = None,
    module_names: Sequence[str] | None = None,
    order: Any | None = None,
    cmap: str = "magma",
    size: float = 0.9,
    title: str | None = None,
) -> Figure:
    """Influence maps, one row per module (the left panels of Fig. 4 and Fig. 8).

    Each map is scaled to its own maximum, so its shape is visible whatever its strength.

    Parameters
    ----------
    maps : array or tensor (C, H, W)
        Elementary influence maps, one per channel (non-negative).
    labels : array (C,) of int, optional
        Module of each channel; without it, one grid of the strongest maps.
    per_module : int, default 10
        Maps shown per module (the module's strongest, or those first in ``order``).
    names : list of str, optional
        A caption per map (e.g. ``"main.8[5]"``); default the row index.
    module_names : list of str, optional
        Row labels; default ``"module k"``.
    order : array (C,), optional
        Ranking of the channels inside each module (higher first), e.g. the NMF weight of
        the module's template; default each map's mean (its influence).
    cmap : str, default "magma"
    size : float, default 0.9
        Inches per map.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    arr = _maps(maps, "influence maps")
    c = len(arr)
    lab = np.zeros(c, dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64)
    if lab.shape != (c,):
        raise ShapeError(f"labels must have shape ({c},), one module per map; got {lab.shape}.")
    score = arr.mean(axis=(1, 2)) if order is None else _array(order, "order")
    if score.shape != (c,):
        raise ShapeError(f"order must have shape ({c},), got {score.shape}.")
    k = int(lab.max()) + 1 if c else 0
    rows = [np.flatnonzero(lab == j) for j in range(k)]
    rows = [r[np.argsort(-score[r], kind="stable")][:per_module] for r in rows]
    ncols = max(1, min(per_module, max((len(r) for r in rows), default=1)))
    row_labels = []
    if labels is not None:
        row_labels = [f"{module_names[j] if module_names is not None else module_name(j)}"
                      f"\n({int((lab == j).sum())} ch.)" for j in range(k)]
    grid = _ImageGrid(k, ncols, _cell(arr.shape[1:], size), gap=(0.1, 0.06),
                      left=_label_width(row_labels, 8), caption_height=0.13, title=title)
    for j, row in enumerate(rows):
        for i, channel in enumerate(row):
            _show_map(grid, j, i, arr[channel], cmap)
            if labels is not None:
                grid.frame(j, i, module_color(j), 2.0)
            text = names[channel] if names is not None else str(channel)
            grid.caption(j, i, text, _fitting_font(text, grid.cw + grid.gx, 6))
        if labels is not None:
            grid.row_label(j, row_labels[j], module_color(j))
    return grid.fig


def plot_templates(
    templates: Any,
    *,
    background: Any | None = None,
    names: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
    cmap: str = "viridis",
    size: float = 2.0,
    title: str | None = None,
) -> Figure:
    """The K templates of the modules; optionally laid over an image to locate them.

    Parameters
    ----------
    templates : array or tensor (K, H, W)
        ``ModuleClustering.templates_``.
    background : array (C, H, W) in [0, 1] or (H, W), optional
        An image of the same size, e.g. the mean of samples; adds a second row with each
        template over it, so one sees which part of the picture each module paints.
    names : list of str, optional
        Column titles; default ``"module k"``.
    sizes : list of int, optional
        Channels per module, added to the titles.
    cmap : str, default "viridis"
    size : float, default 2.0
        Inches per panel.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    tm = _maps(templates, "templates")
    k = len(tm)
    bg = None
    if background is not None:
        bg = _images(_array(background, "background")[None], "background")[0]
        if bg.shape[:2] != tm.shape[1:]:
            raise ShapeError(
                f"background is {bg.shape[0]}x{bg.shape[1]} but the templates are "
                f"{tm.shape[1]}x{tm.shape[2]}; give an image of the maps' size."
            )
    nrows = 1 if bg is None else 2
    row_labels = ["template", "over mean\nsample"] if bg is not None else []
    grid = _ImageGrid(nrows, k, _cell(tm.shape[1:], size), gap=(0.12, 0.1),
                      left=_label_width(row_labels, 8), caption_height=0.34, every_row=False,
                      title=title)
    for r, label in enumerate(row_labels):
        grid.row_label(r, label)
    for j in range(k):
        t = tm[j] / tm[j].max() if tm[j].max() > 0 else tm[j]
        label = names[j] if names is not None else module_name(j)
        if sizes is not None:
            label += f"\n{int(sizes[j])} channels"
        grid.image(0, j, t, cmap=cmap, vmin=0, vmax=1)
        grid.frame(0, j, module_color(j), 3.0)
        grid.caption(0, j, label, 9, color=module_color(j))
        if bg is not None:
            gray = bg.mean(axis=2, keepdims=True).repeat(3, axis=2)
            grid.image(1, j, 0.2 + 0.6 * gray, interpolation="bilinear")
            grid.image(1, j, t, cmap=cmap, vmin=0, vmax=1, alpha=0.25 + 0.6 * t,
                       interpolation="bilinear")
            grid.frame(1, j, module_color(j), 3.0)
    return grid.fig


def plot_hybrid_grid(
    original1: Any,
    original2: Any,
    hybrids: Any,
    *,
    module_names: Sequence[str] | None = None,
    module_ids: Sequence[int] | None = None,
    templates: Any | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    size: float = 1.1,
    title: str | None = None,
) -> Figure:
    """Original 1, Original 2 and the hybrid of each module (Fig. 4 and Fig. 8 centre).

    Column ``i`` is pair ``i``: row "Original 1", row "Original 2", then one row per
    module with Original 1 whose module channels took Original 2's values.

    Parameters
    ----------
    original1, original2 : array or tensor (N, C, H, W)
        The two originals of each pair, in ``value_range``.
    hybrids : array (K, N, C, H, W), list of K arrays (N, C, H, W), or dict name -> array
        The hybrids of each module; a dict's keys name the rows.
    module_names : list of str, optional
        Row labels of the hybrids; default ``"module k"`` (or the dict keys).
    module_ids : list of int, optional
        Module number of each hybrid row (for its colour); default 0..K-1.
    templates : array (K, h, w), optional
        The module templates, drawn in a first column next to each module's row.
    value_range : (float, float), default (0, 1)
    size : float, default 1.1
        Inches per image.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    o1 = _images(original1, "original1", value_range)
    o2 = _images(original2, "original2", value_range)
    if isinstance(hybrids, Mapping):
        module_names = list(hybrids) if module_names is None else module_names
        hybrids = list(hybrids.values())
    if isinstance(hybrids, (list, tuple)):
        hy = [_images(h, "hybrids", value_range) for h in hybrids]
    else:
        arr = _array(hybrids, "hybrids")
        if arr.ndim == 4:
            arr = arr[None]
        hy = [_images(h, "hybrids", value_range) for h in arr]
    n = len(o1)
    if o2.shape != o1.shape or any(h.shape != o1.shape for h in hy):
        raise ShapeError(
            f"original1 {o1.shape[:3]}, original2 {o2.shape[:3]} and every module's hybrids "
            f"{[h.shape[:3] for h in hy]} must have the same shape (one column per pair)."
        )
    k = len(hy)
    ids = list(range(k)) if module_ids is None else [int(i) for i in module_ids]
    names = [module_name(i) for i in ids] if module_names is None else list(module_names)
    tm = None
    if templates is not None:
        tm = _maps(templates, "templates")
        if len(tm) != k:
            raise ShapeError(f"{len(tm)} templates for {k} rows of hybrids; give one per module.")
    extra = 0 if tm is None else 1
    rows = [("Original 1", o1, "black"), ("Original 2", o2, "black")]
    rows += [(f"hybrid:\n{names[j]}", hy[j], module_color(ids[j])) for j in range(k)]
    grid = _ImageGrid(k + 2, n + extra, _cell(o1.shape[1:], size), gap=(0.1, 0.1),
                      left=_label_width([r[0] for r in rows], 8),
                      caption_height=0.0 if tm is None else 0.05, every_row=False,
                      title=title)
    for r, (label, imgs, color) in enumerate(rows):
        for i in range(n):
            grid.image(r, i + extra, imgs[i])
            if r >= 2:
                grid.frame(r, i + extra, color, 2.5)
        if tm is not None and r >= 2:
            _show_map(grid, r, 0, tm[r - 2], "viridis", "bilinear")
            grid.frame(r, 0, color, 1.0)
            if r == 2:
                grid.caption(r, 0, "template", 7)
        grid.row_label(r, label, color)
    return grid.fig


# ---------------------------------------------------------------------- curves
def plot_stability(
    stability: Any,
    *,
    chosen_k: int | None = None,
    title: str | None = None,
) -> Figure:
    """Label consistency and template cosine similarity against K (Fig. 9).

    Parameters
    ----------
    stability : StabilityResult, or dict with ``ks`` (n_k,), ``methods`` (n_methods,),
        ``consistency`` and ``cosine`` (n_methods, n_k, n_repeats)
        As returned by :func:`cfmodules.modules.cluster_stability` (or its ``to_dict()``).
    chosen_k : int, optional
        Marked with a dashed vertical line.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Two panels; error bars are the standard deviation over repetitions.
    """
    data = stability.to_dict() if hasattr(stability, "to_dict") else dict(stability)
    ks = np.asarray(data["ks"]).astype(int)
    methods = [str(m) for m in np.asarray(data["methods"]).tolist()]
    fig = _new_figure(8.0, 3.2 + (0.3 if title else 0))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, key, label in ((axes[0], "consistency", "label consistency"),
                           (axes[1], "cosine", "template cosine similarity")):
        vals = _array(data[key], key)
        if vals.ndim != 3 or vals.shape[:2] != (len(methods), len(ks)):
            raise ShapeError(f"{key} must have shape (n_methods, n_k, n_repeats) = "
                             f"({len(methods)}, {len(ks)}, R); got {vals.shape}.")
        for i, m in enumerate(methods):
            color, marker, name = _METHOD_STYLE.get(m, ("#555555", "^", m))
            ax.errorbar(ks, vals[i].mean(axis=-1), yerr=vals[i].std(axis=-1), color=color,
                        marker=marker, capsize=3, label=name)
        if chosen_k is not None:
            ax.axvline(chosen_k, color="#777777", linestyle="--", linewidth=1)
        ax.set_xticks(ks)
        ax.set_xlabel("number of modules K")
        ax.set_ylabel(label)
        ax.set_ylim(min(0.4, float(np.nanmin(vals)) - 0.05), 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    return _titled(fig, title)


def plot_module_influence(
    sizes: Any,
    influence: Any,
    *,
    names: Sequence[str] | None = None,
    module_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """Individual influence of each module against its number of channels (Fig. 8 right).

    Parameters
    ----------
    sizes : array (K,) of int
        Channels per module (:func:`cfmodules.modules.module_sizes`).
    influence : array (K,)
        Each module's influence map averaged over pixels.
    names : list of str, optional
        Point labels; default ``"module k"``.
    module_ids : list of int, optional
        Module number of each point (its colour); default 0..K-1.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        A scatter plot with the least-squares line (dashed) when K >= 2.
    """
    x = _array(sizes, "sizes").ravel()
    y = _array(influence, "influence").ravel()
    if x.shape != y.shape:
        raise ShapeError(f"sizes {x.shape} and influence {y.shape} need one value per module.")
    k = len(x)
    ids = list(range(k)) if module_ids is None else [int(i) for i in module_ids]
    labels = [module_name(i) for i in ids] if names is None else list(names)
    fig = _new_figure(5.0, 3.4 + (0.3 if title else 0))
    ax = fig.subplots()
    for j in range(k):
        ax.scatter([x[j]], [y[j]], s=60, color=module_color(ids[j]), zorder=3)
        ax.annotate(labels[j], (x[j], y[j]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8, color=module_color(ids[j]))
    if k >= 2 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.linspace(x.min() * 0.9, x.max() * 1.1, 50)
        ax.plot(xs, slope * xs + icpt, "--", color="#777777", linewidth=1,
                label="linear fit")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, max(float(x.max()) * 1.4, 1.0))  # room for the labels
    ax.set_ylim(0, max(float(y.max()) * 1.2, 1e-6))
    ax.set_xlabel("channels in the module")
    ax.set_ylabel("module influence\n(mean |hybrid − Original 1|)")
    ax.grid(alpha=0.3)
    return _titled(fig, title)


# ---------------------------------------------------------------------- output


# ---------------------------------------------------------------------- training
def _history_arrays(history: Any) -> dict[str, np.ndarray]:
    keys = ("steps", "stability", "stability_chance", "locality", "label_agreement",
            "template_shift", "influence", "sizes")
    get = history.get if isinstance(history, Mapping) else (lambda k: getattr(history, k, None))
    out = {}
    for k in keys:
        v = get(k)
        if v is None:
            raise ShapeError(f"The monitor history lacks '{k}'; pass a MonitorHistory "
                             "(monitor.history() or MonitorHistory.load(log_dir)).")
        out[k] = _array(v, k)
    t = len(out["steps"])
    if out["steps"].ndim != 1 or t == 0:
        raise ShapeError(f"steps must have shape (T,) with T >= 1, got {out['steps'].shape}.")
    for k in ("stability", "stability_chance", "locality", "label_agreement"):
        if out[k].shape != (t,):
            raise ShapeError(f"{k} must have shape ({t},), got {out[k].shape}.")
    for k in ("template_shift", "influence", "sizes"):
        if out[k].ndim != 2 or out[k].shape[0] != t:
            raise ShapeError(f"{k} must have shape ({t}, K), got {out[k].shape}.")
    return out


def plot_modularity_curves(history: Any, *, title: str | None = None) -> Figure:
    """The curves of a :class:`~cfmodules.monitor.ModularityMonitor` over training.

    Parameters
    ----------
    history : MonitorHistory, or a mapping with the same arrays
        ``steps`` (T,), ``stability``, ``stability_chance``, ``label_agreement``,
        ``locality`` (T,), and
        ``template_shift``, ``influence``, ``sizes`` (T, K).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Four panels: stability at K (with its chance level) and the fraction of
        channels that kept their module; how far each template moved since the previous
        check; each module's influence; its size, and the locality of the maps.
    """
    h = _history_arrays(history)
    steps, k = h["steps"], h["sizes"].shape[1]
    fig = _new_figure(11.0, 6.4 + (0.3 if title else 0))
    ax = fig.subplots(2, 2, squeeze=False)
    a = ax[0, 0]
    a.plot(steps, h["stability"], marker="o", ms=3, color="#333333",
           label=f"stability at K={k} (label consistency)")
    a.plot(steps, h["label_agreement"], marker=".", ms=3, color="#9467bd",
           label="channels that kept their module")
    a.plot(steps, h["stability_chance"], color="#999999", linestyle=":", linewidth=1.5,
           label="stability of random modules (chance)")
    a.set_ylim(0, 1.02)
    a.set_ylabel("fraction")
    a.legend(fontsize=7, loc="lower right")
    panels = ((ax[0, 1], "template_shift", "template shift (1 - cosine)"),
              (ax[1, 0], "influence", "module influence (mean |hybrid - original|)"),
              (ax[1, 1], "sizes", "module size (channels)"))
    for a, key, label in panels:
        for j in range(k):
            a.plot(steps, h[key][:, j], marker=".", ms=3, color=module_color(j),
                   label=f"module {j}")
        a.set_ylabel(label, fontsize=8)
    ax[0, 1].set_ylim(bottom=0)
    ax[0, 1].legend(fontsize=7)
    loc = ax[1, 1].twinx()
    loc.plot(steps, h["locality"], color="#777777", linestyle="--", linewidth=1)
    loc.set_ylabel("locality: 1 - area above half max (dashed)", fontsize=8,
                   color="#555555")
    loc.set_ylim(0, 1.02)
    for a in ax.flat:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    return _titled(fig, title)


def plot_template_strip(
    templates: Any,
    steps: Sequence[int] | Any | None = None,
    *,
    max_columns: int = 12,
    cmap: str = "viridis",
    size: float = 1.1,
    title: str | None = None,
) -> Figure:
    """The templates of the modules over training: one row per module, one column per check.

    Parameters
    ----------
    templates : array (T, K, H, W), or a MonitorHistory
        Module ``j`` of every check is matched to module ``j`` of the previous one.
    steps : array (T,) of int, optional
        Column titles (taken from a MonitorHistory).
    max_columns : int, default 12
        At most this many checks, evenly spaced, the first and last included.
    cmap : str, default "viridis"
    size : float, default 1.1
        Inches per panel.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if hasattr(templates, "templates") and not isinstance(templates, np.ndarray):
        if steps is None:
            steps = templates.steps
        templates = templates.templates
    tm = _array(templates, "templates")
    if tm.ndim != 4 or tm.shape[0] == 0:
        raise ShapeError(f"templates must have shape (T, K, H, W), got {tm.shape}.")
    t, k = tm.shape[:2]
    st = np.arange(t) if steps is None else _array(steps, "steps").astype(int)
    if st.shape != (t,):
        raise ShapeError(f"steps must have shape ({t},), got {st.shape}.")
    max_columns = checks.positive_int(max_columns, "max_columns")
    cols = np.unique(np.linspace(0, t - 1, min(t, max_columns)).round().astype(int))
    row_labels = [module_name(j) for j in range(k)]
    grid = _ImageGrid(k, len(cols), _cell(tm.shape[2:], size), gap=(0.08, 0.08),
                      left=_label_width(row_labels, 8), caption_height=0.15, every_row=False,
                      title=title)
    for c, i in enumerate(cols):
        grid.caption(0, c, f"step {int(st[i])}", 7)
        for j in range(k):
            _show_map(grid, j, c, tm[i, j], cmap)
            grid.frame(j, c, module_color(j), 2.0)
    for j, label in enumerate(row_labels):
        grid.row_label(j, label, module_color(j))
    return grid.fig


def plot_scan(scan: Any, *, title: str | None = None) -> Figure:
    """Modularity of each (layer, K) of a scan, and the templates of each layer's K.

    Parameters
    ----------
    scan : ScanResult
        From :func:`cfmodules.scan.scan_layers` (or ``ScanResult.load``): ``layers`` (L),
        ``ks`` (n_k,), ``score`` (L, n_k), ``layer_k`` (L,), ``templates``
        (L, K_max, h, w), the first ``layer_k[l]`` of row ``l`` drawn.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Left: heatmap of the modularity (rows: layers, columns: K), each layer's K boxed,
        the suggested (layer, K) boxed in black. Right: one row per layer, its K templates
        in the module colours.
    """
    layers = list(scan.layers)
    ks = np.asarray(scan.ks).astype(int)
    score = _array(scan.score, "score")
    if score.shape != (len(layers), len(ks)):
        raise ShapeError(f"score must have shape (layers, K) = ({len(layers)}, {len(ks)}), "
                         f"got {score.shape}.")
    layer_k = np.asarray(scan.layer_k).astype(int)
    n_cols = max(int(layer_k.max()), 1)
    names = [f"{la} ({int(c)})" for la, c in zip(layers, scan.channels)]
    # inches: layer labels | heatmap | colorbar and its ticks | gap | one grid of templates
    label_w, heat_w = _label_width(names, 10), 0.55 * len(ks)
    grid = _ImageGrid(len(layers), n_cols, (1.0, 1.0), gap=(0.1, 0.1),
                      left=label_w + heat_w + 0.15 + 0.15 + 0.45 + 0.3, caption_height=0.2,
                      title=title, top=0.3, bottom=0.55)
    fig, (grid_x, y0, grid_w, grid_h) = grid.fig, grid.rect
    width, height = fig.get_size_inches()
    ax = fig.add_axes((label_w / width, y0 / height, heat_w / width, grid_h / height))
    cax = fig.add_axes(((label_w + heat_w + 0.15) / width, y0 / height, 0.15 / width,
                        grid_h / height))
    masked = np.ma.masked_invalid(score)
    im = ax.imshow(masked, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(ks)):
            if np.isfinite(score[i, j]):
                ax.text(j, i, f"{score[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if score[i, j] < 0.6 else "black")
    best = int(np.argmax([score[i, list(ks).index(k)] for i, k in enumerate(layer_k)]))
    from matplotlib.patches import Rectangle

    for i, k in enumerate(layer_k):
        j = list(ks).index(int(k))
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                               edgecolor="black" if i == best else "#dddddd",
                               linewidth=3 if i == best else 1.5))
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(layers)), names)
    ax.set_xlabel("number of modules K")
    ax.set_title("modularity = consistency x similarity x locality", fontsize=9, pad=8)
    fig.colorbar(im, cax=cax)
    for i, tm in enumerate(scan.templates):
        tm = _array(tm, "templates")[:int(layer_k[i])]
        grid.caption(i, 0, f"{layers[i]} K={int(layer_k[i])}", 8, ha="left")
        for j in range(len(tm)):
            grid.image(i, j, tm[j], cmap="gray", vmin=0, vmax=max(float(tm[j].max()), 1e-12))
            grid.frame(i, j, module_color(j), 2.0)
    fig.text((grid_x + grid_w / 2) / width, (y0 + grid_h + 0.2 + 0.12) / height,
             "templates at each layer's K", ha="center", va="bottom", fontsize=9)
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (e.g. for a ``data:image/png;base64`` URL).

    zlib level 1: a report's figures encode in 0.65 s instead of 0.89 s (level 6,
    Pillow's default) for 15% more bytes; PNG is lossless either way.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (temp file + rename); returns the path."""
    return atomic_write(path, figure_to_png(fig, dpi))
