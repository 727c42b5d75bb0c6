"""How results and images show themselves in a notebook: HTML with embedded PNG figures.

One home for the notebook display of the library:

- :class:`HtmlRepr`, a mixin that gives a result class ``_repr_html_``: its text summary
  (``to_text()``, else its ``repr``) in a ``<pre>`` block, followed by its key figure(s)
  as PNG images embedded in the HTML (each kept under :data:`MAX_PNG_BYTES`). A class
  takes it with one line: inherit from ``HtmlRepr`` and define ``_html_figures``.
- :func:`show` / :meth:`ImageGrid.from_images`: a batch of images (samples, originals,
  hybrids) as one grid laid out by :func:`cfmodules.images.image_grid`
  (the layout of ``torchvision.utils.make_grid``); ``show`` displays it in the notebook.

Nothing here imports matplotlib, torch or IPython at import time.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfmodules import checks
from cfmodules.errors import ConfigError, ShapeError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["HtmlRepr", "ImageGrid", "show", "png_data_url", "figure_png", "MAX_PNG_BYTES"]

MAX_PNG_BYTES = 200_000
"""Largest PNG embedded in a notebook cell (bytes); larger figures are drawn at a lower dpi."""

_DPIS = (100, 80, 64, 50, 40)


def figure_png(fig: Figure, max_bytes: int = MAX_PNG_BYTES) -> bytes:
    """``fig`` as an RGB PNG, at the highest dpi in 100, 80, 64, 50, 40 that fits ``max_bytes``.

    The figure is drawn on an opaque white background and stored without an alpha
    channel (a quarter fewer bytes for the same pixels).

    Raises
    ------
    ConfigError
        When even 40 dpi gives a larger file (a figure with far too many panels).
    """
    from PIL import Image

    size = 0
    for dpi in _DPIS:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
        rgba = Image.open(io.BytesIO(buf.getvalue()))
        rgb = Image.new("RGB", rgba.size, "white")
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        out = io.BytesIO()
        rgb.save(out, format="PNG", optimize=True)
        png = out.getvalue()
        size = len(png)
        if size <= max_bytes:
            return png
    raise ConfigError(f"The figure is {size} bytes as a PNG even at {_DPIS[-1]} dpi, more than "
                      f"{max_bytes}; plot fewer panels.")


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img_tag(png: bytes, alt: str) -> str:
    return (f'<img src="{png_data_url(png)}" alt="{html.escape(alt)}" '
            'style="max-width:100%;height:auto">')


class HtmlRepr:
    """Mixin: ``_repr_html_`` = text summary + key figure(s) as embedded PNGs.

    A subclass defines :meth:`_html_figures` (caption -> function making a matplotlib
    figure); the text comes from ``to_text()`` when the class has one, else ``repr``.
    """

    def _html_figures(self) -> dict[str, Callable[[], Figure]]:
        """Caption -> zero-argument function returning the figure (drawn on display only)."""
        return {}

    def _html_text(self) -> str:
        to_text = getattr(self, "to_text", None)
        return str(to_text()) if callable(to_text) else repr(self)

    def _repr_html_(self) -> str:
        parts = [f"<div class=\"cfmodules-result\"><b>{html.escape(type(self).__name__)}</b>",
                 f"<pre style=\"font-size:12px;line-height:1.3\">"
                 f"{html.escape(self._html_text())}</pre>"]
        for caption, make in self._html_figures().items():
            fig = make()
            parts.append(f"<figure style=\"margin:4px 0 12px 0\">{_img_tag(figure_png(fig), caption)}"
                         f"<figcaption style=\"font-size:12px;color:#555\">"
                         f"{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
        return "\n".join(parts)


# ---------------------------------------------------------------------- image grids
def _as_float_images(images: Any, value_range: tuple[float, float] | None) -> np.ndarray:
    """Images -> float32 array in [0, 1]; uint8 is read as 0..255."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu()
        if str(images.dtype) == "torch.uint8":
            images = images.numpy()
        else:
            images = images.float().numpy()
    if isinstance(images, (list, tuple)):
        rows = [_as_float_images(r, value_range) for r in images]
        shapes = {r.shape[1:] for r in rows}
        if len(shapes) != 1:
            raise ShapeError(f"The batches of a list must share one image shape, got "
                             f"{sorted(shapes)}.")
        n = max(len(r) for r in rows)
        return np.stack([np.concatenate([r, np.ones((n - len(r), *r.shape[1:]), np.float32)])
                         for r in rows])
    try:
        arr = np.asarray(images)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"images must be an array or a tensor, got {type(images).__name__}.") from e
    if arr.dtype == np.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ConfigError(f"uint8 images are read as 0..255; drop value_range={value_range}.")
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.number):
        raise ShapeError(f"images must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ConfigError("images contain NaN or infinite values.")
    lo, hi = (0.0, 1.0) if value_range is None else (float(value_range[0]), float(value_range[1]))
    if not hi > lo:
        raise ConfigError(f"value_range must be (low, high) with low < high, got {value_range}.")
    tol = 1e-3 * (hi - lo)
    if arr.size and (arr.min() < lo - tol or arr.max() > hi + tol):
        raise ConfigError(
            f"The images range over [{arr.min():.3g}, {arr.max():.3g}], outside value_range "
            f"({lo:g}, {hi:g}); pass value_range=(-1, 1) for tanh outputs, or "
            "adapter.to_unit(images).")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


class ImageGrid:
    """A grid of images as one RGB picture, shown inline by Jupyter (``_repr_png_``).

    Attributes
    ----------
    image : ndarray (H, W, 3) uint8
        The grid.
    rows, cols : int
        Layout in images.
    """

    def __init__(self, image: np.ndarray, rows: int, cols: int, labels: Sequence[str] = ()):
        self.image, self.rows, self.cols = image, rows, cols
        self.labels = list(labels)

    @classmethod
    def from_images(
        cls,
        images: Any,
        ncols: int | None = None,
        *,
        value_range: tuple[float, float] | None = None,
        padding: int = 2,
        labels: Sequence[str] = (),
    ) -> ImageGrid:
        """A batch of images (or several) as one grid (:func:`cfmodules.images.image_grid`).

        Parameters
        ----------
        images : array or tensor (N, C, H, W) or (N, H, W), (R, N, C, H, W), or a list of R
            batches (N_r, C, H, W)
            C is 1 or 3 (more: the first 3 are shown). uint8 is read as 0..255, floats as
            ``value_range`` (default (0, 1)). With several batches each is one row, e.g.
            ``AnalysisResult.hybrids`` (K, N, 3, H, W): one row per module.
        ncols : int, optional
            Images per row (default: N for several batches, else min(N, 8)).
        value_range : (low, high), optional
            Range of float images; values outside it raise ConfigError (never clipped silently).
        padding : int, default 2
            Pixels between images.
        labels : list of str, optional
            One label per row, shown left of the grid in HTML.

        Returns
        -------
        ImageGrid
        """
        from cfmodules.images import image_grid

        arr = _as_float_images(images, value_range)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim == 5:
            n_rows, n = arr.shape[:2]
            arr = arr.reshape(n_rows * n, *arr.shape[2:])
            ncols = n if ncols is None else ncols
        if arr.ndim != 4 or arr.shape[0] == 0 or arr.shape[1] < 1:
            raise ShapeError(f"images must be (N, C, H, W), (N, H, W) or (R, N, C, H, W) with N >= 1,"
                             f" got shape {np.shape(images)}.")
        if arr.shape[1] == 2 or arr.shape[1] > 3:
            arr = arr[:, :1] if arr.shape[1] == 2 else arr[:, :3]
        if ncols is None:
            ncols = min(len(arr), 8)
        ncols = checks.positive_int(ncols, "ncols")
        img = image_grid(np.ascontiguousarray(arr), nrow=ncols, padding=padding)
        rows = -(-len(arr) // ncols)
        return cls(np.ascontiguousarray(img), rows, ncols, labels)

    def to_png(self) -> bytes:
        """The grid as PNG bytes."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid as a PNG file (atomically); returns the path."""
        from cfmodules.files import atomic_write

        return atomic_write(path, self.to_png())

    def _repr_png_(self) -> bytes:
        return self.to_png()

    def _repr_html_(self) -> str:
        h, w = self.image.shape[:2]
        scale = 2 if w < 400 else 1  # small images are shown larger, pixels kept sharp
        img = (f'<img src="{png_data_url(self.to_png())}" width="{w * scale}" '
               f'height="{h * scale}" style="image-rendering:pixelated">')
        if not self.labels:
            return img
        rows = "".join(f"<div style=\"height:{h * scale / self.rows:.1f}px;line-height:"
                       f"{h * scale / self.rows:.1f}px;font-size:12px\">{html.escape(t)}</div>"
                       for t in self.labels)
        return f'<div style="display:flex;gap:8px"><div>{rows}</div>{img}</div>'

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return f"ImageGrid({self.rows} rows x {self.cols} columns, {w}x{h} pixels)"


def show(images: Any, ncols: int | None = None, **kwargs: Any) -> None:
    """Display a batch of images (or hybrids) as one grid in the notebook.

    Same arguments as :meth:`ImageGrid.from_images` (which returns the grid instead, e.g.
    to ``.save("grid.png")`` it). Outside IPython the grid's description is printed.

    Examples
    --------
    >>> cfmodules.show(adapter.to_unit(adapter.generate(z)))       # (N, 3, H, W) in [0, 1]
    >>> cfmodules.show(result.hybrids[:, :8])                       # one row per module
    """
    grid = ImageGrid.from_images(images, ncols, **kwargs)
    try:
        from IPython.display import display
    except ImportError:  # plain Python: say what would have been shown
        print(repr(grid))
        return
    display(grid)
