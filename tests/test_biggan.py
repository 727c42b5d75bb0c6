"""BigGAN-deep (pytorch-pretrained-biggan's architecture) with random weights.

Needs ``pip install --no-deps pytorch-pretrained-biggan==0.1.1``; skipped without it.
The model is the real 128x128 BigGAN-deep layout at channel width 4 (~0.75M parameters):
a forward of 8 samples takes ~0.2 s on one core.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from cfmodules import hybridize
from cfmodules.errors import (
    ChannelError,
    CheckpointError,
    ConfigError,
    LatentError,
    LayerCallError,
    ModelNotAvailableError,
    ShapeError,
)
from families_helpers import run_doc_blocks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_pretrained_biggan") is None,
    reason="needs pip install --no-deps pytorch-pretrained-biggan==0.1.1",
)

from cfmodules.zoo import biggan  # noqa: E402 - importing it needs no package

BLOCK = "generator.layers.3"  # an up-sampling Gblock: 64 -> 32 channels, 8x8 -> 16x16


@pytest.fixture(scope="module")
def ad():
    return biggan.load_random()


@pytest.fixture(scope="module")
def z(ad):
    return ad.sample_latents(4, seed=0)


def _hooked_output(model, z, layer_edits):
    """Naive reference: plain register_forward_hook edits, one call per module."""
    handles = [
        dict(model.named_modules())[name].register_forward_hook(lambda m, i, o, f=f: f(o))
        for name, f in layer_edits.items()
    ]
    try:
        with torch.no_grad():
            return model(z[0], z[1], float(z[2][0]))
    finally:
        for h in handles:
            h.remove()


def test_biggan_architecture_runs_without_importing_the_package(ad, z) -> None:
    assert "pytorch_pretrained_biggan" not in sys.modules  # its __init__ needs boto3
    assert "boto3" not in sys.modules
    x = ad.generate(z)
    assert x.shape == (4, 3, 128, 128)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std(0).mean() > 0.02  # samples differ
    assert type(ad.generator).__name__ == "BigGAN"
    assert len([m for m in ad.generator.generator.layers if type(m).__name__ == "GenBlock"]) == 10


def test_biggan_random_weights_are_deterministic_and_leave_the_rng_alone(z) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = biggan.random_biggan(seed=3)
    after = torch.rand(1)
    b = biggan.random_biggan(seed=3)
    assert torch.equal(before, after)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = biggan.random_biggan(seed=4)
    assert not torch.equal(sa["generator.gen_z.weight_orig"], c.state_dict()["generator.gen_z.weight_orig"])


def test_biggan_batch_independence_and_latent_layout(ad, z) -> None:
    noise, one_hot, trunc = z
    assert noise.shape == (4, 128) and one_hot.shape == (4, 1000) and trunc.shape == (4, 1)
    assert torch.equal(one_hot.sum(1), torch.ones(4)) and torch.all(trunc == 0.4)
    assert noise.abs().max() <= 0.4 * 2  # truncated normal in [-2, 2], times truncation
    x = ad.generate(z)
    assert torch.allclose(ad.generate(z, batch_size=1), x, atol=1e-5)
    z_again = ad.sample_latents(2, seed=0, start=2)
    assert all(torch.equal(a, b[2:]) for a, b in zip(z_again, z))


def test_biggan_truncation_must_be_one_valid_value_per_batch(ad, z) -> None:
    mixed = (z[0], z[1], torch.tensor([[0.4], [0.4], [0.5], [0.4]]))
    with pytest.raises(LatentError, match="one truncation per forward"):
        ad.generate(mixed)
    with pytest.raises(LatentError, match=r"\(0, 1\]"):
        ad.generate((z[0], z[1], torch.zeros(4, 1)))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        biggan.biggan_adapter(ad.generator, truncation=1.5)


def test_biggan_prior_restricted_to_classes(ad) -> None:
    two = biggan.biggan_adapter(ad.generator, classes=[biggan.KOALA, biggan.TEDDY])
    _, one_hot, _ = two.sample_latents(32, seed=0)
    assert set(one_hot.argmax(1).tolist()) == {biggan.KOALA, biggan.TEDDY}
    with pytest.raises(ConfigError, match="bad: \\[1000\\]"):
        biggan.biggan_adapter(ad.generator, classes=[1000])


# ------------------------------------------------------------ the shared relu module
def test_biggan_shared_relu_is_listed_with_its_calls(ad) -> None:
    info = {i.name: i for i in ad.layers()}
    assert info[f"{BLOCK}.relu"].calls == 4
    assert info[f"{BLOCK}.conv_1"].calls == 1
    assert "relu:k" in str(info[f"{BLOCK}.relu"])


def test_biggan_shared_relu_without_call_index_is_an_error(ad, z) -> None:
    with pytest.raises(LayerCallError, match=r"relu:0"):
        with ad.trace(f"{BLOCK}.relu"):
            ad.generate(z)
    with pytest.raises(LayerCallError, match="more than once"):
        hybridize(ad, z, ad.sample_latents(4, seed=1), {f"{BLOCK}.relu": [0, 1]})
    with pytest.raises(LayerCallError, match="ran 4 time"):
        with ad.trace(f"{BLOCK}.relu:4"):
            ad.generate(z)
    assert all(not m._forward_hooks for m in ad.generator.modules())


def test_biggan_relu_call_index_traces_that_call(ad, z) -> None:
    # Call 1 of the block's relu is relu(bn_1(...)), 16 channels at 8x8 (before upsampling);
    # call 2 is relu(bn_2(...)) at 16x16. bn_1 and bn_2 run once each: the reference.
    with ad.trace([f"{BLOCK}.relu:1", f"{BLOCK}.relu:2", f"{BLOCK}.bn_1", f"{BLOCK}.bn_2"]) as acts:
        ad.generate(z)
    assert acts[f"{BLOCK}.relu:1"].shape == (4, 16, 8, 8)
    assert torch.equal(acts[f"{BLOCK}.relu:1"], acts[f"{BLOCK}.bn_1"].relu())
    assert torch.equal(acts[f"{BLOCK}.relu:2"], acts[f"{BLOCK}.bn_2"].relu())


def test_biggan_relu_call_index_intervenes_on_that_call_only(ad, z) -> None:
    channels = [0, 3, 7]
    with ad.intervene({f"{BLOCK}.relu:1": (channels, torch.zeros(4, 3, 8, 8))}):
        ours = ad.generate(z)

    def kill(out):  # relu of a very negative value is exactly 0: the same edit, upstream
        out = out.clone()
        out[:, channels] = -1e4
        return out

    ref = _hooked_output(ad.generator, z, {f"{BLOCK}.bn_1": kill})
    assert torch.equal(ours, ref)  # exact: the same zeros enter the same ops on the same batch
    assert (ours - ad.generate(z)).abs().max() > 1e-4  # the edit did something


def test_biggan_relu_call_index_has_that_calls_channels(ad, z) -> None:
    # call 0 is relu(bn_0(x)) with the block's 64 input channels, call 1 has 16
    assert ad.layer_channels(f"{BLOCK}.relu:0") == 64
    assert ad.layer_channels(f"{BLOCK}.relu:1") == 16
    with pytest.raises(ChannelError, match="16 channels"):
        with ad.intervene({f"{BLOCK}.relu:1": ([20], torch.zeros(4, 1, 8, 8))}):
            ad.generate(z)


# ------------------------------------------------------------ two successive layers
def test_biggan_gblock_numbering_follows_the_paper(ad) -> None:
    g = ad.generator
    assert biggan.gblock_path(g, 1) == "generator.layers.0"
    assert biggan.gblock_path(g, 8) == "generator.layers.7"
    assert biggan.gblock_path(g, 9) == "generator.layers.9"  # attention is layers.8
    assert biggan.gblock_layers(g, 4) == (f"{BLOCK}.conv_1", f"{BLOCK}.conv_2")
    with pytest.raises(ConfigError, match="Gblocks 1..10"):
        biggan.gblock_path(g, 11)
    with pytest.raises(ConfigError):
        biggan.gblock_path(g, 0)
    assert biggan.two_layer_module(g, 4, [1, 2]) == {
        f"{BLOCK}.conv_1": [1, 2], f"{BLOCK}.conv_2": [1, 2]
    }


def test_biggan_two_layer_hybrid_matches_a_naive_reference(ad, z) -> None:
    z2 = ad.sample_latents(4, seed=1)
    module = biggan.two_layer_module(ad.generator, 4, [0, 5, 9], [2, 5])
    ours = hybridize(ad, z, z2, module)

    donor = {}

    def keep(name):
        def f(out):
            donor[name] = out.clone()
        return f

    _hooked_output(ad.generator, z2, {n: keep(n) for n in module})

    def swap(name):
        def f(out):
            out = out.clone()
            out[:, module[name]] = donor[name][:, module[name]]
            return out
        return f

    ref = _hooked_output(ad.generator, z, {n: swap(n) for n in module})
    assert torch.allclose(ours, ref, atol=1e-6)
    one_layer = hybridize(ad, z, z2, {f"{BLOCK}.conv_1": [0, 5, 9]})
    assert (ours - one_layer).abs().max() > 1e-4  # the second layer's channels matter


def test_biggan_hybrids_across_classes(ad) -> None:
    koala = biggan.class_latents(ad, biggan.KOALA, 4, seed=0)
    teddy = biggan.class_latents(ad, biggan.TEDDY, 4, seed=1)
    assert torch.all(koala[1].argmax(1) == biggan.KOALA)
    same_noise = biggan.class_latents(ad, biggan.TEDDY, 4, seed=0)
    assert torch.equal(same_noise[0], koala[0])  # classes differ, noise shared
    o1, o2 = ad.generate(koala), ad.generate(teddy)
    h = hybridize(ad, koala, teddy, biggan.two_layer_module(ad.generator, 7, range(4)))
    assert (h - o1).abs().mean() > 1e-4 and (h - o2).abs().mean() > 1e-4
    with pytest.raises(ConfigError, match="class_index"):
        biggan.class_latents(ad, 1000, 2)


# ------------------------------------------------------------ weights from a folder
def test_biggan_from_pretrained_dir_round_trip(tmp_path, z) -> None:
    model = biggan.random_biggan(seed=5)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = biggan.from_pretrained_dir(tmp_path)
    a = biggan.biggan_adapter(model).generate(z)
    b = biggan.biggan_adapter(loaded).generate(z)
    assert torch.equal(a, b)


def test_biggan_from_pretrained_dir_errors(tmp_path) -> None:
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        biggan.from_pretrained_dir(tmp_path)
    model = biggan.random_biggan()
    config = json.loads(model.config.to_json_string())
    config["channel_width"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not fit"):
        biggan.from_pretrained_dir(tmp_path)


def test_biggan_never_downloads(ad) -> None:
    _, model_mod = biggan._package_modules()
    with pytest.raises(ModelNotAvailableError, match="never downloads"):
        model_mod.BigGAN.from_pretrained("biggan-deep-256")


def test_biggan_missing_package_names_the_install_command(monkeypatch) -> None:
    for name in [m for m in sys.modules if m.startswith(biggan._PRIVATE)]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "pytorch_pretrained_biggan" else real(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match="pytorch-pretrained-biggan==0.1.1"):
        biggan.random_biggan()


def test_biggan_config_checks() -> None:
    with pytest.raises(ConfigError, match="32, 64, 128, 256, 512"):
        biggan.biggan_config(resolution=96)
    with pytest.raises(ConfigError, match="channel_width"):
        biggan.biggan_config(channel_width=2)
    assert len(biggan.biggan_config(256).layers) == 12  # the paper's BigGAN-deep-256


@pytest.mark.parametrize("resolution", [32, 64])
def test_biggan_small_test_layouts_run(resolution) -> None:
    ad = biggan.load_random(resolution=resolution)
    x = ad.generate(ad.sample_latents(2))
    assert x.shape == (2, 3, resolution, resolution) and torch.isfinite(x).all()


def test_biggan_two_layer_modules_from_joint_labels(ad) -> None:
    g = ad.generator
    conv_1, conv_2 = biggan.gblock_layers(g, 4)  # 16 channels each
    labels = [0] * 8 + [1] * 8 + [1] * 4 + [0] * 12
    from cfmodules.modules import modules_from_labels

    mods = modules_from_labels(labels, {conv_1: 16, conv_2: 16})
    assert mods == [
        {conv_1: list(range(8)), conv_2: list(range(4, 16))},
        {conv_1: list(range(8, 16)), conv_2: list(range(4))},
    ]
    one_layer = modules_from_labels([0] * 16 + [1] * 16, {conv_1: 16, conv_2: 16})
    assert one_layer == [{conv_1: list(range(16))}, {conv_2: list(range(16))}]
    with pytest.raises(ShapeError, match="31 labels but 32 units"):
        modules_from_labels(labels[:-1], {conv_1: 16, conv_2: 16})


def test_biggan_docs_example_runs() -> None:
    namespace = run_doc_blocks("families.md", containing="biggan.load_random()")
    assert namespace["hybrids"].shape == (4, 3, 128, 128)
