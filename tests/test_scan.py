"""The scan across layers and K: locality by hand, candidates, the planted answer, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError, LayerNotFoundError, ResultFileError, ShapeError
from cfmodules.modules import locality, module_locality
from cfmodules.scan import ScanResult, ScanSettings, candidate_layers, scan_layers
from cfmodules.synthetic import PlantedConvGenerator


def test_locality_by_hand():
    flat = np.ones((4, 4))
    half = np.zeros((4, 4))
    half[:, :2] = 1.0
    corner = np.zeros((4, 4))
    corner[0, 0] = 3.0
    got = locality(np.stack([flat, half, corner, np.zeros((4, 4))]))
    np.testing.assert_allclose(got, [0.0, 0.5, 1 - 1 / 16, np.nan])  # zero map: no locality
    # scale does not matter; a graded map counts where it exceeds half its peak
    assert locality((7 * half)[None])[0] == pytest.approx(0.5)
    graded = half * np.arange(1, 5)[:, None]  # rows 3 and 4 (values 3, 4) exceed 2
    assert locality(graded[None])[0] == pytest.approx(1 - 4 / 16)
    # a broad low base does not hide a strong local bump
    assert locality((0.2 + corner)[None])[0] == pytest.approx(1 - 1 / 16)
    # (K, P) rows, torch tensors and negative rounding noise (counted as 0) are accepted
    np.testing.assert_allclose(locality(half.reshape(1, -1)), [0.5])
    np.testing.assert_allclose(locality(torch.tensor(half - 1e-17)[None]), [0.5])
    with pytest.raises(ShapeError):
        locality(np.ones(5))
    with pytest.raises(ShapeError):
        locality(np.ones((0, 4, 4)))
    with pytest.raises(ConfigError):
        locality(np.full((1, 2, 2), np.nan))


def test_module_locality_is_the_mean_over_the_modules_mean_maps():
    half = np.zeros((4, 4))
    half[:, :2] = 1.0
    corner = np.zeros((4, 4))
    corner[0, 0] = 1.0
    maps = np.stack([half, half, corner, np.zeros((4, 4))])
    # module 0: two channels, mean map `half` (0.5); module 1: `corner` and a dead channel,
    # mean map corner / 2 (1 - 1/16); module 2 is empty and left out
    assert module_locality(maps, [0, 0, 1, 1], 3) == pytest.approx((0.5 + 15 / 16) / 2)
    # a module whose channels all do nothing counts as 0 (not local), as the scan always did
    assert module_locality(maps, [0, 0, 1, 2], 3) == pytest.approx((0.5 + 15 / 16 + 0) / 3)
    with pytest.raises(ShapeError):
        module_locality(maps, [0, 1], 2)


def test_locality_has_one_home():
    import cfmodules.monitor as monitor
    import cfmodules.scan as scan

    assert not hasattr(scan, "locality") and not hasattr(scan, "module_locality")
    assert not hasattr(monitor, "map_locality")  # the monitor's former measure is gone


class MixedPlanted(nn.Module):
    """A planted generator with a dense 1x1 convolution after its planted layer.

    Intervening on a channel before the mix reaches every region (no modules there); the
    channels after the mix feed one region each: the modules are at ``main.5`` (and at the
    colour channels ``main.7``, three per region).
    """

    def __init__(self) -> None:
        super().__init__()
        base = PlantedConvGenerator(n_modules=3, channels_per_module=8, seed=0)
        mix = nn.Conv2d(24, 24, 1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            mix.weight.copy_(torch.randn(mix.weight.shape, generator=g) / 24 ** 0.5)
            mix.bias.zero_()
        m = list(base.main)
        self.main = nn.Sequential(*m[:4], mix, nn.LeakyReLU(0.2), *m[4:])
        self.latent_shape = base.latent_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


@pytest.fixture(scope="module")
def mixed():
    return GeneratorAdapter(MixedPlanted(), (12, 1, 1), name="mixed-planted")


@pytest.fixture(scope="module")
def mixed_scan(mixed):
    return scan_layers(mixed, ks=(2, 3, 4, 5), n_pairs=8, target_stderr=None, n_repeats=3,
                       progress=False)


def test_candidates_are_the_nonlinearities_with_enough_channels(mixed):
    # main.7 is the Tanh of the 9 colour channels (>= 8); RegionPaint is no activation
    assert candidate_layers(mixed) == ["main.1", "main.3", "main.5", "main.7"]
    assert "main.4" in candidate_layers(mixed, all_spatial=True)


def test_scan_finds_the_planted_layer_and_k(mixed_scan):
    res = mixed_scan
    assert res.layers == ["main.1", "main.3", "main.5", "main.7"]
    assert res.suggested_layer in ("main.5", "main.7") and res.suggested_k == 3
    i = res.layers.index(res.suggested_layer)
    j = list(res.ks).index(3)
    assert res.consistency[i, j] == 1.0 and res.cosine[i, j] > 0.95
    assert res.layer_k[2:].tolist() == [3, 3]
    # before the mix every channel acts on every region: no locality, no modularity
    assert res.locality[:2].max() < 0.35 and res.score[:2].max() < 0.3
    assert res.locality[i, j] > 0.6 and res.score[i, j] > 0.6
    assert res.templates.shape[:2] == (4, res.layer_k.max())
    assert res.templates[i, :3].max(axis=(1, 2)).min() > 0 and not res.templates[i, 3:].any()
    assert f"{res.suggested_layer} with K=3" in res.reason()
    # K larger than two thirds of a layer's channels is not run (9 channels: K <= 6 ok)
    assert np.isfinite(res.score).all()


def test_scan_result_roundtrip_and_figure(mixed_scan, tmp_path):
    path = mixed_scan.save(tmp_path / "scan.npz")
    back = ScanResult.load(path)
    assert back.to_text() == mixed_scan.to_text()
    np.testing.assert_array_equal(back.score, mixed_scan.score)
    np.testing.assert_array_equal(back.templates, mixed_scan.templates)
    np.testing.assert_array_equal(back.units, mixed_scan.units)
    d = back.to_dict()
    assert d["suggested_layer"] == "main.5" and d["settings"]["n_pairs"] == 8
    with np.load(path, allow_pickle=False) as f:
        assert "score" in f.files
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ResultFileError):
        ScanResult.load(tmp_path / "bad.npz")
    from cfmodules.plots import figure_to_png, plot_scan

    fig = plot_scan(back, title="scan")
    grid, heat, _ = fig.axes  # one axes of templates, the heatmap, its colorbar
    assert [t.get_text() for t in heat.get_yticklabels()] == [
        f"{la} ({c})" for la, c in zip(back.layers, back.channels)]
    n_k = [int(k) for k in back.layer_k]
    assert len(grid.images) == sum(n_k)  # each layer's K templates, nothing more
    frames = [p.get_edgecolor() for p in grid.patches]
    assert len(frames) == sum(n_k) and len({tuple(f) for f in frames}) == max(n_k)
    titles = [t.get_text() for t in grid.texts]
    assert titles == [f"{la} K={k}" for la, k in zip(back.layers, n_k)]
    best = [p for p in heat.patches if p.get_linewidth() == 3]
    assert len(best) == 1  # the suggested (layer, K), boxed in black
    assert figure_to_png(fig).startswith(b"\x89PNG")


def test_scan_shows_its_table_and_figure_in_a_notebook(mixed_scan):
    import base64
    import re

    html = mixed_scan._repr_html_()
    assert mixed_scan.to_text().splitlines()[0].strip().split()[0] in html
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) == 1 and len(base64.b64decode(pngs[0])) <= 200_000


def test_bad_inputs(mixed):
    with pytest.raises(LayerNotFoundError):
        scan_layers(mixed, ["main.55"], progress=False)
    with pytest.raises(ConfigError, match="Unknown scan setting"):
        scan_layers(mixed, n_pair=3, progress=False)
    with pytest.raises(ConfigError, match="ks"):
        ScanSettings(ks=(0, 2))
    with pytest.raises(ConfigError, match="target_stderr"):
        ScanSettings(target_stderr=-1.0)
    with pytest.raises(ConfigError, match="GeneratorAdapter"):
        scan_layers(object())


def test_large_layers_are_scanned_on_a_seeded_subset_of_units(mixed):
    kw = dict(ks=(2, 3), n_pairs=4, target_stderr=None, n_repeats=2, max_units=12,
              progress=False)
    one = scan_layers(mixed, ["main.5"], **kw)
    two = scan_layers(mixed, ["main.3", "main.5"], **kw)
    assert len(one.layer_units(0)) == 12 and one.channels.tolist() == [24]
    # the subset of a layer does not depend on the other layers scanned
    np.testing.assert_array_equal(one.layer_units(0), two.layer_units(1))
    assert two.units.shape == (2, 12) and len(set(two.layer_units(0))) == 12
    np.testing.assert_array_equal(one.score[0], two.score[1])
    assert "12/24" in one.to_text()
