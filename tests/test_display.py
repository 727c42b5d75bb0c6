"""Notebook display: lazy top-level names, ``_repr_html_`` of every result, image grids."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cfmodules
from cfmodules.display import MAX_PNG_BYTES, HtmlRepr, ImageGrid, figure_png, show
from cfmodules.errors import ConfigError, ShapeError
from report_helpers import fake_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_import_is_cheap_and_lazy():
    code = ("import sys, time; t = time.perf_counter(); import cfmodules; "
            "dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'matplotlib', 'numpy', 'flask', 'IPython') "
            "if m in sys.modules]; print(heavy, dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "[]", f"`import cfmodules` imported {out}"


@pytest.mark.parametrize("name, home", [
    ("zoo", "cfmodules.zoo"), ("analyze", "cfmodules.analysis"),
    ("influence_maps", "cfmodules.influence.maps"), ("module_influence_maps", "cfmodules.influence.maps"),
    ("hybridize", "cfmodules.hybrid"), ("ModuleClustering", "cfmodules.modules.clustering"),
    ("cluster_stability", "cfmodules.modules.stability"), ("explore", "cfmodules.explorer"),
    ("show", "cfmodules.display"), ("AnalysisResult", "cfmodules.analysis_result"),
    ("scan_layers", "cfmodules.scan"), ("ModularityMonitor", "cfmodules.monitor"),
])
def test_top_level_names(name, home):
    obj = getattr(cfmodules, name)
    assert (obj.__name__ if name == "zoo" else obj.__module__) == home
    assert name in dir(cfmodules) and name in cfmodules.__all__


def test_unknown_top_level_name():
    with pytest.raises(AttributeError, match="no attribute 'zooo'"):
        cfmodules.zooo  # noqa: B018


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', html)]


def _results():
    from cfmodules.evaluation.frechet import DistanceTable
    from cfmodules.evaluation.robustness import robustness_from_probabilities
    from cfmodules.influence import InfluenceResult

    res = fake_result(k=2, c=6, n=3)
    rng = np.random.default_rng(0)
    infl = InfluenceResult(res.maps, res.stderr, 4, [{"act": [i]} for i in range(6)],
                           [f"act[{i}]" for i in range(6)], layer="act", model="toy")
    table = DistanceTable(["R", "G", "C0"], np.array([[0, 2.0, 3.0], [2.0, 0, 0.5],
                                                      [3.0, 0.5, 0]]), 10, 2.0)
    probs = rng.dirichlet(np.ones(3), size=(2, 5))
    robust = robustness_from_probabilities({"c": probs}, {"c": np.array([0, 1, 2, 0, 1])},
                                           {"c": np.array([1, 2, 0, 0, 2])}, ["m0", "m1"])
    return {"analysis": res, "influence": infl, "stability": res.stability,
            "frechet": table, "robustness": robust}


@pytest.mark.parametrize("kind", ["analysis", "influence", "stability", "frechet", "robustness"])
def test_results_show_table_and_figure_in_html(kind):
    obj = _results()[kind]
    assert isinstance(obj, HtmlRepr)
    html = obj._repr_html_()
    text = obj.to_text() if hasattr(obj, "to_text") else repr(obj)
    first_line = text.splitlines()[0].strip()
    import html as html_lib

    assert html_lib.escape(first_line) in html  # the table is there, escaped
    pngs = _pngs(html)
    n_figs = 2 if kind == "analysis" else 1
    assert len(pngs) == n_figs
    for png in pngs:
        assert png.startswith(PNG_MAGIC) and 1000 < len(png) <= MAX_PNG_BYTES


def test_figure_png_lowers_the_dpi_to_fit_and_refuses_when_it_cannot():
    from cfmodules.plots import plot_images

    fig = plot_images(np.random.default_rng(0).uniform(size=(16, 3, 32, 32)))
    full = figure_png(fig, max_bytes=10**9)
    small = figure_png(fig, max_bytes=len(full) - 1)
    assert small.startswith(PNG_MAGIC) and len(small) < len(full)
    with pytest.raises(ConfigError, match="even at 40 dpi"):
        figure_png(fig, max_bytes=100)


def test_html_escapes_the_text():
    class Thing(HtmlRepr):
        def to_text(self):
            return "<script>alert(1)</script>"

    html = Thing()._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html


# ---------------------------------------------------------------------- grids
def test_grid_places_each_image_exactly():
    imgs = np.arange(6 * 3 * 4 * 5, dtype=np.uint8).reshape(6, 3, 4, 5)
    g = ImageGrid.from_images(imgs, ncols=3, padding=2)
    assert (g.rows, g.cols) == (2, 3) and g.image.shape == (2 + 2 * 6, 2 + 3 * 7, 3)
    for i in range(6):
        r, c = divmod(i, 3)
        y, x = 2 + r * 6, 2 + c * 7
        np.testing.assert_array_equal(g.image[y:y + 4, x:x + 5], imgs[i].transpose(1, 2, 0))
    assert (g.image[0] == 255).all()  # white padding


def test_grid_of_hybrids_has_one_row_per_module_and_float_tensors_are_read_in_range():
    hy = torch.rand(3, 4, 3, 8, 8)
    g = ImageGrid.from_images(hy)
    assert (g.rows, g.cols) == (3, 4)
    np.testing.assert_allclose(g.image[2:10, 2:10] / 255.0,
                               hy[0, 0].permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
    g2 = ImageGrid.from_images(hy * 2 - 1, value_range=(-1, 1))
    assert np.abs(g2.image.astype(int) - g.image.astype(int)).max() <= 1
    gray = ImageGrid.from_images(torch.rand(2, 8, 8))
    assert gray.image.shape[-1] == 3 and (gray.image[..., 0] == gray.image[..., 1]).all()


def test_grid_refuses_out_of_range_and_bad_shapes():
    with pytest.raises(ConfigError, match=r"value_range=\(-1, 1\)"):
        ImageGrid.from_images(torch.rand(2, 3, 4, 4) * 2 - 1)
    with pytest.raises(ShapeError):
        ImageGrid.from_images(np.zeros((2, 3), np.float32))
    with pytest.raises(ConfigError, match="NaN"):
        ImageGrid.from_images(np.full((1, 3, 2, 2), np.nan, np.float32))
    with pytest.raises(ConfigError, match="ncols"):
        ImageGrid.from_images(np.zeros((2, 3, 2, 2), np.uint8), ncols=0)
    with pytest.raises(ShapeError, match="share one image shape"):
        ImageGrid.from_images([np.zeros((2, 3, 2, 2), np.uint8), np.zeros((2, 3, 4, 4), np.uint8)])


def test_grid_png_and_save(tmp_path):
    from PIL import Image

    g = ImageGrid.from_images(np.zeros((2, 3, 4, 4), np.uint8), labels=["a"])
    assert g._repr_png_().startswith(PNG_MAGIC) and "a</div>" in g._repr_html_()
    path = g.save(tmp_path / "grid.png")
    assert np.asarray(Image.open(path)).shape == g.image.shape


def test_show_displays_one_grid(monkeypatch):
    shown = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", shown.append)
    assert show(np.zeros((3, 3, 4, 4), np.uint8), ncols=2) is None
    assert len(shown) == 1 and isinstance(shown[0], ImageGrid) and shown[0].rows == 2
