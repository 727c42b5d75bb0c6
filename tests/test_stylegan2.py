"""StyleGAN2 through stylegan2-pytorch (lucidrains): import on CPU, the adapter, checkpoints.

Needs ``pip install --no-deps stylegan2-pytorch==1.9.0`` and the ``families`` extra; skipped
without them. The model is a 16x16 StyleGAN2 of capacity 2 (latent 16, mapping depth 2):
a forward takes milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfmodules import GeneratorAdapter, hybridize
from cfmodules.errors import CheckpointError, ModelNotAvailableError, NondeterministicForwardError
from engine_helpers import assert_paths_agree

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("stylegan2_pytorch") is None
    or importlib.util.find_spec("kornia") is None,
    reason="needs pip install --no-deps stylegan2-pytorch==1.9.0 and cfmodules[families]",
)

from cfmodules.zoo import stylegan2 as sg2  # noqa: E402 - importing it needs no package

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(image_size=16, network_capacity=2, latent_dim=16, style_depth=2)


@pytest.fixture(scope="module")
def ad():
    return sg2.load(**TINY)


def test_import_leaves_torch_as_it_was():
    """In a fresh process: the package imports on a CPU-only torch, and afterwards
    torch.cuda.is_available is the same function and no stand-in aim is left behind."""
    code = """
import sys, torch
before = torch.cuda.is_available
answer = torch.cuda.is_available()
from cfmodules.zoo import stylegan2
module = stylegan2.package()
assert module.Generator is not None
assert torch.cuda.is_available is before and torch.cuda.is_available() == answer
import importlib.util
if importlib.util.find_spec("aim") is None:
    assert "aim" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_a_failed_import_restores_torch_too(monkeypatch):
    before = torch.cuda.is_available
    monkeypatch.setattr(sg2, "_MODULE", "stylegan2_pytorch.no_such_module")
    with pytest.raises(ImportError):
        sg2.package()
    assert torch.cuda.is_available is before
    assert "aim" not in sys.modules or importlib.util.find_spec("aim") is not None


def test_import_cfmodules_imports_neither_family():
    code = ("import sys, cfmodules, cfmodules.zoo, cfmodules.zoo.stylegan2, cfmodules.zoo.unet;"
            "cfmodules.zoo.available();"
            "bad = {'diffusers', 'stylegan2_pytorch', 'kornia'} & set(sys.modules);"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_random_weights_are_the_seeds_and_leave_the_global_stream_alone():
    state = torch.random.get_rng_state()
    a, b = sg2.random_generator(**TINY, seed=3), sg2.random_generator(**TINY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for m, n in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(),
                                                      n.state_dict().values()))
    other = sg2.random_generator(**TINY, seed=4)[1]
    assert not torch.equal(other.blocks[0].conv1.weight, b[1].blocks[0].conv1.weight)
    assert b[1].blocks[0].to_noise1.weight.abs().sum() > 0  # the noise takes part


def test_the_noise_is_part_of_the_latent(ad):
    z, noise = ad.sample_latents(3, seed=0)
    assert z.shape == (3, 16) and noise.shape == (3, 16, 16, 1)
    assert 0 <= noise.min() and noise.max() <= 1  # the package's image_noise: U(0, 1)
    tail = ad.sample_latents(2, seed=0, start=1)
    assert all(torch.equal(p[1:], q) for p, q in zip((z, noise), tail))
    y = ad.generate((z, noise))
    assert y.shape == (3, 3, 16, 16) and torch.isfinite(y).all()
    assert torch.equal(ad.generate((z, noise)), y)
    other = ad.generate((z, torch.rand(noise.shape, generator=torch.Generator().manual_seed(1))))
    assert (other - y).abs().max() > 1e-3  # another noise, another image


def test_the_adapter_follows_the_package_sampling_code(ad):
    """w = S(z) broadcast to every block, then G(styles, noise): as Trainer/ModelLoader."""
    sg = sg2.package()
    z, noise = ad.sample_latents(2, seed=5)
    gen = ad.generator
    with torch.no_grad():
        styles = sg.styles_def_to_tensor([(gen.S(z), gen.num_layers)])
        want = gen.G(styles, noise)
    assert torch.equal(ad.generate((z, noise)), want)


def test_layers_name_every_block(ad):
    names = {i.name for i in ad.layers()}
    for b in range(len(ad.generator.G.blocks)):
        conv1, act0, conv2, act1 = sg2.block_layers(ad.generator, b)
        assert {conv1, conv2, f"G.blocks.{b}.to_rgb"} <= names
        assert ad.layer_shape(act0) == ad.layer_shape(conv1)
        assert ad.layer_shape(act1) == ad.layer_shape(conv2)
    assert ad.generator.layer == sg2.block_layers(ad.generator, 1)[3]


@pytest.mark.numerics
def test_hybrids_with_no_channel_or_all_are_the_originals(ad):
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    y1, y2 = ad.generate(z1), ad.generate(z2)
    layer = sg2.block_layers(ad.generator, 1)[3]
    torch.testing.assert_close(hybridize(ad, z1, z2, {layer: []}), y1, rtol=1e-5, atol=1e-6)
    # every channel of a middle layer: Original 2's features, but Original 1's noise and
    # styles after it: not Original 2 (the noise stays with the hybrid)
    mid = hybridize(ad, z1, z2, {layer: range(ad.layer_channels(layer))})
    assert (mid - y2).abs().max() > 1e-3
    # the last RGB output: everything after it is the same for both, so Original 2
    last = f"G.blocks.{len(ad.generator.G.blocks) - 1}.to_rgb"
    torch.testing.assert_close(hybridize(ad, z1, z2, {last: range(3)}), y2, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("which", [0, 3])
def test_the_engine_is_exact_against_hooks(ad, which):
    layer = sg2.block_layers(ad.generator, 1)[which]
    assert_paths_agree(ad, layer, channels=[0, 3, 5])
    assert ad._engine.path(layer) == "split"  # torch.export of the whole forward


def test_style_mixing_and_truncation():
    S, G = sg2.random_generator(**TINY)
    mixed = sg2.stylegan2_adapter(S, G, mix_at=1)
    z, z_mix, noise = mixed.sample_latents(2, seed=0)
    plain = sg2.stylegan2_adapter(S, G)
    y_same = mixed.generate((z, z, noise))
    torch.testing.assert_close(y_same, plain.generate((z, noise)), rtol=0, atol=0)
    assert (mixed.generate((z, z_mix, noise)) - y_same).abs().max() > 1e-4
    trunc = sg2.stylegan2_adapter(S, G, trunc_psi=0.5)
    assert trunc.generator.w_avg.abs().sum() > 0
    assert (trunc.generate((z, noise)) - plain.generate((z, noise))).abs().max() > 1e-4


def test_a_forward_that_draws_its_own_noise_is_refused_then_held():
    """The package's generator needs the noise passed; a forward that draws it (as its
    trainer's image_noise does) is caught by the first-use check and names the fix."""
    S, G = sg2.random_generator(**TINY)
    model = sg2.StyleGAN2Generator(S, G)

    def drawing(gen, z):
        noise = torch.FloatTensor(z.shape[0], 16, 16, 1).uniform_(0.0, 1.0)
        return gen(z, noise)

    ad = GeneratorAdapter(model, (16,), forward=drawing, output_range=(0, 1))
    with pytest.raises(NondeterministicForwardError, match="noise='per-sample'.*latent input"):
        ad.generate(ad.sample_latents(2))
    held = GeneratorAdapter(model, (16,), forward=drawing, noise="per-sample")
    z1, z2 = held.sample_latents(2, seed=1), held.sample_latents(2, seed=2)
    assert torch.equal(held.generate(z1), held.generate(z1))
    assert torch.equal(hybridize(held, z1, z2, {"G.blocks.1.conv1": []}), held.generate(z1))


# ---------------------------------------------------------------------------- checkpoints
def _trainer_checkpoint(folder: Path, S, G, image_size=16, capacity=2, n=3) -> Path:
    """A checkpoint laid out as Trainer.save writes it (the D weights left out: unused)."""
    state = {}
    for prefix, module in (("S.", S), ("G.", G), ("SE.", S), ("GE.", G)):
        state.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    path = folder / "models" / "default" / f"model_{n}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"GAN": state, "version": "1.9.0"}, path)
    (path.parent / ".config.json").write_text(json.dumps(
        {"image_size": image_size, "network_capacity": capacity, "lr_mlp": 0.1,
         "transparent": False, "fq_layers": [], "fq_dict_size": 256, "attn_layers": [],
         "no_const": False}))
    return path


def test_a_trainer_checkpoint_loads_exactly(tmp_path):
    S, G = sg2.random_generator(**TINY, seed=7)
    path = _trainer_checkpoint(tmp_path, S, G)
    ad = sg2.load(checkpoint=path)
    ref = sg2.stylegan2_adapter(S, G)
    z = ad.sample_latents(2, seed=0)
    assert torch.equal(ad.generate(z), ref.generate(z))
    assert ad.output_range == (0.0, 1.0) and ad.name == "stylegan2-model_3"


def test_bad_checkpoints_are_refused(tmp_path):
    S, G = sg2.random_generator(**TINY, seed=7)
    path = _trainer_checkpoint(tmp_path, S, G)
    with pytest.raises(ModelNotAvailableError, match="not found"):
        sg2.load(checkpoint=tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="network_capacity=2.*network_capacity=4"):
        sg2.load(checkpoint=path, network_capacity=4)
    (path.parent / ".config.json").unlink()  # then the arguments describe the model
    with pytest.raises(CheckpointError, match="does not fit a StyleGAN2 of image_size=32"):
        sg2.load(checkpoint=path, image_size=32, network_capacity=2)
    with pytest.raises(CheckpointError, match="does not fit"):
        sg2.load(checkpoint=path, image_size=16, network_capacity=4)
    with pytest.raises(CheckpointError, match="no .config.json"):
        sg2.load(checkpoint=path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'GAN'"):
        sg2.load(checkpoint=tmp_path / "other.pt", image_size=16)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"GAN": {}, "x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        sg2.load(checkpoint=tmp_path / "evil.pt", image_size=16)
    assert not (tmp_path / "pwned").exists()


def test_zoo_entry():
    from cfmodules import zoo

    assert "stylegan2" in zoo.available() and "unet" in zoo.available()
    ad = zoo.load("stylegan2", **TINY)
    lo, hi = ad.output_range
    assert lo < hi
