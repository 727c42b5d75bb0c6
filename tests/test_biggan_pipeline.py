"""End to end on BigGAN-deep (real architecture, random weights): maps of two successive
layers of a Gblock -> joint modules -> koala/teddy hybrids -> module influence.

Needs ``pip install --no-deps pytorch-pretrained-biggan==0.1.1``; skipped without it.
Runs the 64x64 layout (8 Gblocks, channel width 8: Gblock 7's conv_1 and conv_2 have 4
channels each) so that it takes seconds.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cfmodules import hybridize
from cfmodules.errors import LayerCallError
from cfmodules.influence import influence_maps, module_influence_maps
from cfmodules.modules import ModuleClustering, modules_from_labels
from cfmodules.zoo import biggan
from families_helpers import run_doc_blocks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_pretrained_biggan") is None,
    reason="needs pip install --no-deps pytorch-pretrained-biggan==0.1.1",
)

BLOCK = 7  # the paper shows Gblock 7


@pytest.fixture(scope="module")
def run():
    adapter = biggan.load_random(resolution=64, channel_width=8,
                                 classes=[biggan.KOALA, biggan.TEDDY])
    g = adapter.generator
    layer_a, layer_b = biggan.gblock_layers(g, BLOCK)
    maps_a = influence_maps(adapter, layer_a, n_pairs=4, seed=0, progress=False)
    maps_b = influence_maps(adapter, layer_b, n_pairs=4, seed=0, progress=False)
    joint = np.concatenate([maps_a.maps, maps_b.maps])  # conv_1's channels first
    clustering = ModuleClustering(n_modules=2, method="nmf", random_state=0).fit(joint)
    modules = modules_from_labels(clustering.labels_, {layer_a: len(maps_a), layer_b: len(maps_b)})
    koala = biggan.class_latents(adapter, biggan.KOALA, 3, seed=0)
    teddy = biggan.class_latents(adapter, biggan.TEDDY, 3, seed=1)
    hybrids = [hybridize(adapter, koala, teddy, m) for m in modules]
    return {"adapter": adapter, "layers": (layer_a, layer_b), "maps": (maps_a, maps_b),
            "clustering": clustering, "modules": modules, "koala": koala, "teddy": teddy,
            "hybrids": hybrids}


def test_biggan_pipeline_maps_of_both_layers(run) -> None:
    maps_a, maps_b = run["maps"]
    c = run["adapter"].submodule(run["layers"][0]).out_channels
    assert maps_a.maps.shape == maps_b.maps.shape == (c, 64, 64)
    assert np.isfinite(maps_a.maps).all() and (maps_b.maps >= 0).all()
    assert maps_a.influence.max() > 0 and maps_b.influence.max() > 0


def test_biggan_pipeline_two_layer_modules_cover_both_layers(run) -> None:
    layer_a, layer_b = run["layers"]
    c = run["adapter"].submodule(layer_a).out_channels
    modules = run["modules"]
    assert len(modules) == 2 and all(set(m) <= {layer_a, layer_b} and m for m in modules)
    for layer in (layer_a, layer_b):
        assert sorted(ch for m in modules for ch in m.get(layer, [])) == list(range(c))


def test_biggan_pipeline_hybrids_across_classes(run) -> None:
    adapter = run["adapter"]
    o1, o2 = adapter.generate(run["koala"]), adapter.generate(run["teddy"])
    for h in run["hybrids"]:
        assert h.shape == (3, 3, 64, 64) and torch.isfinite(h).all()
        assert h.min() >= -1 and h.max() <= 1
        assert (h - o1).abs().max() > 0  # some change from Original 1 ...
        assert (h - o2).abs().mean() > (h - o1).abs().mean()  # ... still closer to it


def test_biggan_pipeline_module_influence_of_two_layer_modules(run) -> None:
    result = module_influence_maps(run["adapter"], run["modules"], n_pairs=2, seed=1, progress=False)
    assert result.maps.shape == (2, 64, 64) and (result.influence > 0).all()


def test_biggan_pipeline_refuses_the_shared_relu_without_a_call(run) -> None:
    adapter = run["adapter"]
    block = biggan.gblock_path(adapter.generator, BLOCK)
    with pytest.raises(LayerCallError, match="relu:0"):
        influence_maps(adapter, f"{block}.relu", n_pairs=1, progress=False)


def test_biggan_pipeline_maps_of_one_call_of_the_shared_relu(run) -> None:
    adapter = run["adapter"]
    block = biggan.gblock_path(adapter.generator, BLOCK)
    # call 2 is relu(bn_2(conv_1)): conv_1's channels, not the block's input channels
    maps = influence_maps(adapter, f"{block}.relu:2", n_pairs=1, progress=False)
    assert maps.maps.shape[0] == adapter.submodule(f"{block}.conv_1").out_channels


@pytest.mark.filterwarnings("ignore:.*all-zero map")
def test_biggan_pipeline_docs_whole_analysis_with_weights_from_a_folder(tmp_path, monkeypatch) -> None:
    # A random 64x64 model saved as a user would save the downloaded weights.
    model = biggan.random_biggan(resolution=64, channel_width=8, seed=1)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    namespace = run_doc_blocks(
        "families.md", containing="from_pretrained_dir(folder",
        preset={"folder": str(folder), "device": "cpu", "n_pairs": 2},
        replace={", 8, seed=": ", 2, seed="},
    )
    assert all(img.shape == (2, 3, 64, 64) for img in namespace["images"])
    assert (tmp_path / "g7_conv1_maps.npz").is_file() and (tmp_path / "g7_conv1.ckpt").exists()


@pytest.mark.filterwarnings("ignore:.*all-zero map")
def test_biggan_pipeline_analyze_two_layers_and_report(tmp_path) -> None:
    from cfmodules.analysis import analyze
    from cfmodules.report import write_report

    adapter = biggan.load_random(resolution=64, channel_width=8,
                                 classes=[biggan.KOALA, biggan.TEDDY])
    layers = list(biggan.gblock_layers(adapter.generator, BLOCK))
    result = analyze(adapter, layers, n_pairs=2, n_modules=2, stability_ks=(),
                     n_samples=2, n_hybrids=2, progress=False)
    assert result.layers == layers and len(result.maps) == 8  # 4 + 4 channels, jointly
    assert result.hybrids.shape == (2, 2, 3, 64, 64)
    html = write_report(result, tmp_path / "report").read_text("utf-8")
    assert "biggan-deep-64-random" in html and "generator.layers.7.conv_2" in html
