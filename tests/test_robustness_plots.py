"""Evaluation figures: they are built, returned, and matplotlib stays out of the core."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cfmodules.adapter import GeneratorAdapter
from cfmodules.evaluation import plots
from cfmodules.evaluation.frechet import DistanceTable
from cfmodules.evaluation.robustness import classifier_robustness


class Pixel(torch.nn.Module):
    """Compares two pixels: (0, 0) vs (1, 1), or (0, 1) vs (1, 0) when ``diagonal=False``."""

    def __init__(self, diagonal):
        super().__init__()
        self.diagonal = diagonal

    def forward(self, x):
        a, b = (x[:, 0, 0, 0], x[:, 0, 1, 1]) if self.diagonal else (x[:, 0, 0, 1], x[:, 0, 1, 0])
        d = (a - b) * 20
        return torch.stack([-d, d, torch.zeros_like(d)], 1)


@pytest.fixture
def result(tiny):
    ad = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    mods = {"up/C0": {"up": [0, 1]}, "up/C1": {"up": [2, 3]}, "act/C0": {"act": [0, 1]}}
    res = classifier_robustness(ad, {"a": Pixel(True), "b": Pixel(False)}, mods, n_pairs=24, seed=1)
    return ad, res


def test_robustness_figures(result):
    from matplotlib.figure import Figure

    ad, res = result
    figs = [plots.plot_recognition(res), plots.plot_rate_by_layer(res),
            plots.plot_entropy(res, "a"), plots.plot_disagreement(res),
            plots.plot_disagreements(res, ad, "up/C0", limit=3)]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[2].axes) == 4  # 2 rows (modules of 'up') x 2 columns (layers)
    assert set(res.rate_by_layer("a")) == {"up", "act"}
    for f in figs:
        f.savefig(io.BytesIO(), format="png")


def test_distance_table_figure():
    t = DistanceTable(["R", "G", "C0"], np.array([[0, 2.0, 3.0], [2.0, 0, 0.5], [3.0, 0.5, 0]]), 10, 2.0)
    fig = plots.plot_distance_table(t)
    assert "d(R, G)" in fig.axes[0].get_title()


def test_lazy_reexports():
    import cfmodules.evaluation as ev

    assert ev.classifier_robustness is classifier_robustness
    assert "hybrid_distance_table" in dir(ev)
    with pytest.raises(AttributeError):
        ev.nothing_here  # noqa: B018
