"""Figures: returned (never shown), built from plain arrays, bad shapes rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cfmodules import plots
from cfmodules.errors import ShapeError
from report_helpers import blob, fake_result


def _n_images(fig: Figure) -> int:
    return sum(len(ax.images) for ax in fig.axes)


def _texts(fig: Figure) -> list[str]:
    """Captions and row labels of an image grid, in drawing order."""
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _grid_shape(fig: Figure) -> tuple[int, int]:
    """(rows, columns) of the cells holding an image (image grids draw on one axes)."""
    ext = np.array([im.get_extent() for ax in fig.axes for im in ax.images])
    return len(np.unique(ext[:, 3].round(6))), len(np.unique(ext[:, 0].round(6)))


def _cells_do_not_overlap(fig: Figure) -> bool:
    ext = np.array([im.get_extent() for ax in fig.axes for im in ax.images])
    boxes = {tuple(e.round(6)) for e in ext}  # an overlay repeats its cell's box
    for a in boxes:
        for b in boxes:
            if a != b and a[0] < b[1] and b[0] < a[1] and a[3] < b[2] and b[3] < a[2]:
                return False
    return True


def test_images_grid_and_tensor_input():
    imgs = torch.rand(5, 3, 8, 8)
    fig = plots.plot_images(imgs, ncols=2, titles=list("abcde"))
    assert isinstance(fig, Figure)
    assert _n_images(fig) == 5 and _grid_shape(fig) == (3, 2)  # 3 rows x 2 columns, one blank
    assert _texts(fig) == list("abcde") and _cells_do_not_overlap(fig)
    assert len(fig.axes) == 1 and fig.get_layout_engine() is None  # one axes, no solver
    gray = plots.plot_images(np.zeros((2, 1, 4, 4)))
    assert gray.axes[0].images[0].get_array().shape == (4, 4, 3)


def test_images_value_range_is_mapped_to_unit():
    fig = plots.plot_images(np.full((1, 3, 2, 2), 0.0), value_range=(-1.0, 1.0))
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), 0.5)


def test_influence_maps_one_row_per_module_strongest_first():
    maps = np.stack([blob(0.5, 0.5) * s for s in (1, 5, 2, 3, 4)])
    labels = np.array([0, 0, 1, 1, 0])
    fig = plots.plot_influence_maps(maps, labels, per_module=2, names=[f"u{i}" for i in range(5)])
    texts = _texts(fig)
    # module 0: channels 1 (5x) and 4 (4x), then its row label; module 1: 3 then 2
    assert [t for t in texts if t.startswith("u")] == ["u1", "u4", "u3", "u2"]
    assert texts[2].startswith("module 0") and texts[5].startswith("module 1")
    assert _grid_shape(fig) == (2, 2) and _cells_do_not_overlap(fig)
    # each map scaled to its own maximum
    assert fig.axes[0].images[0].get_array().max() == pytest.approx(1.0)


def test_influence_maps_bad_labels():
    with pytest.raises(ShapeError, match="one module per map"):
        plots.plot_influence_maps(np.ones((3, 4, 4)), [0, 1])
    with pytest.raises(ShapeError, match=r"\(N, H, W\)"):
        plots.plot_influence_maps(np.ones((3, 4, 4, 1)))


def test_templates_with_background_adds_overlay_row():
    tm = np.stack([blob(0.5, 0.5), blob(0.2, 0.8)])
    fig = plots.plot_templates(tm, background=np.full((3, 8, 8), 0.5), names=["a", "b"],
                               sizes=[3, 4])
    assert _grid_shape(fig) == (2, 2) and _n_images(fig) == 2 + 2 * 2  # overlay: 2 per cell
    texts = _texts(fig)
    assert texts[:2] == ["template", "over mean\nsample"]
    assert texts[2].startswith("a") and "4 channels" in texts[3]
    assert _grid_shape(plots.plot_templates(tm)) == (1, 2)
    with pytest.raises(ShapeError, match="maps' size"):
        plots.plot_templates(tm, background=np.zeros((3, 4, 4)))


def test_hybrid_grid_rows_and_inputs():
    o1, o2 = np.zeros((4, 3, 8, 8)), np.ones((4, 3, 8, 8))
    hy = np.full((2, 4, 3, 8, 8), 0.5)
    fig = plots.plot_hybrid_grid(o1, o2, hy, module_names=["face", "hair"])
    assert _n_images(fig) == 4 * 4
    assert _texts(fig) == ["Original 1", "Original 2", "hybrid:\nface", "hybrid:\nhair"]
    assert _grid_shape(fig) == (4, 4) and _cells_do_not_overlap(fig)
    as_dict = plots.plot_hybrid_grid(o1, o2, {"bg": hy[0]})
    assert _texts(as_dict)[-1] == "hybrid:\nbg"
    with_templates = plots.plot_hybrid_grid(o1, o2, hy, templates=np.ones((2, 8, 8)))
    assert _grid_shape(with_templates) == (4, 5) and "template" in _texts(with_templates)
    with pytest.raises(ShapeError, match="same shape"):
        plots.plot_hybrid_grid(o1, o2[:3], hy)


def test_stability_plot_from_result_and_dict():
    st = fake_result().stability
    fig = plots.plot_stability(st, chosen_k=3)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_legend() is not None
    fig2 = plots.plot_stability(st.to_dict())
    assert len(fig2.axes[1].lines) >= 2
    bad = st.to_dict()
    bad["cosine"] = bad["cosine"][:, :1]
    with pytest.raises(ShapeError, match="n_methods, n_k"):
        plots.plot_stability(bad)


def test_module_influence_fit_line():
    fig = plots.plot_module_influence([10, 20, 30], [0.1, 0.2, 0.3])
    ax = fig.axes[0]
    line = ax.lines[0].get_xydata()
    slope = (line[-1, 1] - line[0, 1]) / (line[-1, 0] - line[0, 0])
    assert slope == pytest.approx(0.01)
    assert len(plots.plot_module_influence([5], [0.2]).axes[0].lines) == 0  # no fit for one
    with pytest.raises(ShapeError):
        plots.plot_module_influence([1, 2], [0.1])


def test_module_colours_are_stable():
    assert plots.module_color(0) == plots.module_color(10)
    assert len({plots.module_color(k) for k in range(10)}) == 10


def test_save_figure_writes_png(tmp_path):
    path = plots.save_figure(plots.plot_images(np.zeros((1, 3, 4, 4))), tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left
