"""A diffusers UNet2DModel as a one-step generator (cfmodules.zoo.unet).

Needs ``pip install diffusers`` (the ``families`` extra); skipped without it. The model is
a 16x16 UNet2DModel with 8/16/16 channels (attention in the lowest block and the mid
block): a forward takes milliseconds; its torch.export capture a few seconds, once.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from cfmodules import hybridize
from cfmodules.engine import explain
from cfmodules.errors import CheckpointError, ConfigError, ModelNotAvailableError
from engine_helpers import assert_paths_agree

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="needs pip install diffusers (cfmodules[families])")

from cfmodules.zoo import unet  # noqa: E402 - importing it needs no package

TINY = dict(block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="module")
def model():
    return unet.random_unet(16, seed=0, **TINY)


@pytest.fixture(scope="module")
def ad(model):
    return unet.unet_adapter(model, timestep=300)


def test_the_adapter_is_one_denoising_step(ad, model):
    x = ad.sample_latents(3, seed=0)
    assert x.shape == (3, 3, 16, 16)
    with torch.no_grad():
        want = model(x, 300).sample
    assert torch.equal(ad.generate(x), want)
    x0 = unet.unet_adapter(model, timestep=300, output="x0")
    from diffusers import DDPMScheduler

    a = float(DDPMScheduler().alphas_cumprod[300])
    torch.testing.assert_close(x0.generate(x), (x - (1 - a) ** 0.5 * want) / a ** 0.5)


def test_block_layers_are_layers(ad):
    names = {i.name: i for i in ad.layers()}
    blocks = unet.block_layers(ad.generator)
    assert list(blocks) == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                            "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    for layer in blocks.values():
        assert names[layer].shape is not None and len(names[layer].shape) == 3


@pytest.mark.numerics
def test_off_the_hook_path_with_a_true_limit(ad):
    """torch.export with the batch bound it suggests: a split, and explain's limit is the
    FLOP ratio of the forward to what follows the layer."""
    for layer in ("down_blocks.2.resnets.0", "mid_block", "up_blocks.1"):
        ex = explain(ad, layer)
        assert ex.path == "split" and "torch.export" in ex.capture, str(ex)
        assert ex.flops_hybrid < ex.flops_full and ex.limit > 1.0
    assert explain(ad, "up_blocks.1").limit > explain(ad, "mid_block").limit


@pytest.mark.numerics
def test_batches_beyond_the_export_bound_run_in_chunks(ad):
    """The attention's export guard bounds the batch (<= 63): 70 hybrids at once agree with
    hooks."""
    layer = "mid_block"
    z1, z2 = ad.sample_latents(70, seed=1), ad.sample_latents(70, seed=2)
    fast = hybridize(ad, z1, z2, {layer: [0, 5]})
    with ad.trace(layer) as acts:
        ad.generate(z2)
    with ad.intervene({layer: ([0, 5], acts[layer][:, [0, 5]])}):
        ref = ad.generate(z1)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("layer", ["down_blocks.1.resnets.0", "mid_block", "up_blocks.1"])
def test_the_engine_is_exact_against_hooks(ad, layer):
    assert_paths_agree(ad, layer, channels=[0, 3, 7])


@pytest.mark.numerics
def test_no_channel_or_all_give_the_originals(ad):
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    y1, y2 = ad.generate(z1), ad.generate(z2)
    last = "up_blocks.2"  # only the output convolution follows: Original 2 downstream
    torch.testing.assert_close(hybridize(ad, z1, z2, {last: []}), y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hybridize(ad, z1, z2, {last: range(8)}), y2, rtol=1e-5,
                               atol=1e-6)
    mid = hybridize(ad, z1, z2, {"mid_block": range(16)})  # the skips stay Original 1's
    assert (mid - y2).abs().max() > 1e-3


def test_a_saved_folder_loads_from_disk(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    ad = unet.load(folder=tmp_path / "m", timestep=300)
    x = ad.sample_latents(2, seed=0)
    with torch.no_grad():
        assert torch.equal(ad.generate(x), model(x, 300).sample)
    pipe = tmp_path / "pipe"
    model.save_pretrained(pipe / "unet")  # a pipeline folder: unet/ and scheduler/
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
         "prediction_type": "epsilon"}))
    assert unet.load(folder=pipe, output="x0").name == "unet-pipe"


def test_bad_folders_are_refused(tmp_path, model):
    with pytest.raises(ModelNotAvailableError, match="not a folder"):
        unet.load(folder=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        unet.load(folder=tmp_path / "empty")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["block_out_channels"] = [8, 16, 32]  # the weights no longer fit
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        unet.load(folder=tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="not a UNet2DModel"):
        unet.load(folder=tmp_path / "m")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_weights_are_refused_and_nothing_runs(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "m"
    model.save_pretrained(folder, safe_serialization=False)
    weights = folder / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, weights)
    with pytest.raises(CheckpointError):
        unet.load(folder=folder)
    assert not (tmp_path / "pwned").exists()


def test_bad_arguments(model):
    with pytest.raises(ConfigError, match="timestep"):
        unet.unet_adapter(model, timestep=1000)
    with pytest.raises(ConfigError, match="output"):
        unet.unet_adapter(model, output="eps")
    with pytest.raises(ConfigError, match="UNet2DModel"):
        unet.unet_adapter(torch.nn.Conv2d(3, 3, 1))
