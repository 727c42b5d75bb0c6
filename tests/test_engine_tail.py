"""The fused DCGAN-tail kernel (cfmodules.engine.tail, fused_tail.c) and its builder.

The kernel needs a C compiler; without one these tests skip, except in CI (``CI=true``),
where .ci/run installs one and they must run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter, native
from cfmodules.engine import explain
from cfmodules.engine import tail as tail_mod
from cfmodules.influence import influence_maps
from influence_helpers import _init, naive_maps

KW = {"progress": False}


@pytest.fixture(autouse=True)
def _compiler():
    if native._compiler() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the fused-kernel tests: no C compiler", pytrace=False)
        pytest.skip("no C compiler: the fused kernel cannot be built here")


def dcgan(c_in: int = 12, c_mid: int = 10, c_out: int = 3, size: int = 4, bias: bool = False,
          bn: bool = True, relu: type = nn.ReLU, out: nn.Module | str | None = None,
          k_last: int = 4, seed: int = 0, **adapter_kw) -> GeneratorAdapter:
    """A DCGAN whose layer "2" (c_in x size x size) has the tail the kernel fuses; ``out``
    the output module (default Tanh; ``"none"``: the last convolution's output)."""
    layers = [nn.ConvTranspose2d(5, c_in, size, 1, 0, bias=False), nn.BatchNorm2d(c_in),
              nn.ReLU(True),  # "2"
              nn.ConvTranspose2d(c_in, c_mid, 4, 2, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(c_mid))
    layers += [relu(), nn.ConvTranspose2d(c_mid, c_out, k_last, 2, (k_last - 2) // 2, bias=bias)]
    if out != "none":
        layers.append(out if out is not None else nn.Tanh())
    return GeneratorAdapter(_init(nn.Sequential(*layers), seed), (5, 1, 1), name="tail",
                            **adapter_kw)


def chosen(res) -> str:
    return res.settings["batch"]["2"]["chosen_by"]


def torch_path(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setenv("CFMODULES_NATIVE", "0")
        res = influence_maps(*args, **kw)
    assert chosen(res) != "fused kernel"
    return res


def fused_equals_naive_and_pytorch(monkeypatch, ad: GeneratorAdapter, n_pairs: int) -> None:
    """Layer "2"'s maps on the fused kernel equal the naive rerun's and the PyTorch path's."""
    got = influence_maps(ad, "2", n_pairs=n_pairs, **KW)
    assert chosen(got) == "fused kernel"
    want = naive_maps(ad, [{"2": [c]} for c in range(12)], n_pairs)
    np.testing.assert_allclose(got.maps, want, rtol=1e-5, atol=1e-6)
    ref = torch_path(monkeypatch, ad, "2", n_pairs=n_pairs, **KW)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.stderr, ref.stderr, rtol=1e-4, atol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("size,c_out,bias,bn", [
    (4, 3, False, True),    # the general code (4x4 is not a size compiled apart)
    (8, 3, True, True),     # a size compiled apart, a bias on the last convolution
    (8, 1, False, False),   # grey images, no BatchNorm
    (3, 2, True, True),     # odd sizes: rows shorter than a vector
])
def test_fused_maps_equal_the_naive_rerun_and_the_pytorch_path(monkeypatch, size, c_out, bias,
                                                               bn):
    fused_equals_naive_and_pytorch(monkeypatch, dcgan(size=size, c_out=c_out, bias=bias,
                                                      bn=bn), n_pairs=5)


@pytest.mark.numerics
@pytest.mark.parametrize("out,transform", [
    (nn.Sigmoid(), None), ("none", None), ("none", torch.sigmoid), ("none", torch.tanh),
], ids=["sigmoid", "no activation", "output_transform=sigmoid", "output_transform=tanh"])
def test_other_output_activations_are_fused(monkeypatch, out, transform):
    fused_equals_naive_and_pytorch(
        monkeypatch, dcgan(size=8, bias=True, out=out, output_transform=transform), n_pairs=4)


@pytest.mark.numerics
def test_the_pretrained_face_vae(monkeypatch):
    """The face VAE's decoder ends in a transposed convolution, its adapter applies
    torch.sigmoid: the same kernel, grey images."""
    from cfmodules import zoo

    ad = zoo.load("vae-faces")
    got = influence_maps(ad, "decoder.6", n_pairs=3, **KW)
    assert got.settings["batch"]["decoder.6"]["chosen_by"] == "fused kernel"
    with monkeypatch.context() as m:
        m.setenv("CFMODULES_NATIVE", "0")
        ref = influence_maps(ad, "decoder.6", n_pairs=3, **KW)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_the_pretrained_dcgan_main8(monkeypatch):
    from cfmodules import zoo

    ad = zoo.load("dcgan-faces")
    got = influence_maps(ad, "main.8", channels=range(20), n_pairs=3, **KW)
    assert got.settings["batch"]["main.8"]["chosen_by"] == "fused kernel"
    with monkeypatch.context() as m:
        m.setenv("CFMODULES_NATIVE", "0")
        ref = influence_maps(ad, "main.8", channels=range(20), n_pairs=3, **KW)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-6)


def test_a_pixel_no_swap_reaches_is_exactly_zero_as_in_the_naive_rerun():
    ad = dcgan(size=8)
    first = ad.generator[0]
    with torch.no_grad():
        first.weight[:, 3, :, :4] = 0  # channel 3 is 0 on the left half for every latent
        ad.generator[1].running_mean[3] = 0
        ad.generator[1].bias[3] = 0
        ad.generator[1].bias[7] = -1e3  # channel 7 is dead: it never changes anything
    got = influence_maps(ad, "2", channels=[3, 7], n_pairs=4, **KW)
    assert chosen(got) == "fused kernel"
    want = naive_maps(ad, [{"2": [3]}, {"2": [7]}], 4)
    assert (want[0] == 0).sum() > 0 and np.all(want[1] == 0)
    np.testing.assert_array_equal(got.maps[0] == 0, want[0] == 0)
    assert np.all(got.maps[1] == 0) and np.all(got.stderr[1] == 0)


@pytest.mark.numerics
def test_the_kernel_gives_the_same_bits_on_any_thread_count_and_unit_split():
    from cfmodules.engine import plan_swaps
    from cfmodules.latents import pair_latents

    ad = dcgan(size=8, c_in=9)
    ((swaps, _),) = plan_swaps(ad, [{"2": torch.tensor([c])} for c in range(9)], "auto")
    z1, z2 = pair_latents(ad, 6, 0, 0)
    swaps.begin_block(z1, z2)
    assert swaps.fused
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = swaps.sums(slice(0, 9), slice(0, 6))
        torch.set_num_threads(2)
        two = swaps.sums(slice(0, 9), slice(0, 6))
    finally:
        torch.set_num_threads(threads)
    singly = [swaps.sums(slice(u, u + 1), slice(0, 6)) for u in range(9)]
    for k in range(2):
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([s[k] for s in singly]), one[k], rtol=0, atol=0)


@pytest.mark.numerics
def test_units_per_call_change_no_bit_of_the_maps(monkeypatch):
    ad = dcgan(size=8, c_in=9)
    want = influence_maps(ad, "2", n_pairs=6, pairs_per_block=3, **KW)
    monkeypatch.setattr("cfmodules.influence.batch._FUSED_UNITS_PER_THREAD", 1)
    got = influence_maps(ad, "2", n_pairs=6, pairs_per_block=3, **KW)
    assert chosen(want) == chosen(got) == "fused kernel"
    assert got.settings["batch"]["2"]["units"] == torch.get_num_threads() < 9
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.stderr, want.stderr)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="instruction-set variants are x86 flags")
@pytest.mark.parametrize("flags", [["-march=x86-64-v3"], ["-march=x86-64"]],
                         ids=["avx2", "sse2"])
def test_other_instruction_sets_give_the_same_maps(monkeypatch, tmp_path, flags):
    """AVX2 (8-float vectors) and SSE2 (4-float vectors) builds agree with this CPU's build,
    to float rounding (with or without fused multiply-adds)."""
    ad = dcgan(size=8)
    want = influence_maps(ad, "2", n_pairs=4, **KW)
    monkeypatch.setenv("CFMODULES_CACHE_DIR", str(tmp_path))
    lib, why = native._build(tail_mod.KERNEL, flags)
    assert lib is not None, why
    monkeypatch.setitem(native._loaded, tail_mod.KERNEL, lib)
    monkeypatch.setitem(native._why, tail_mod.KERNEL, why)
    got = influence_maps(ad, "2", n_pairs=4, **KW)
    assert chosen(got) == "fused kernel"
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)


def test_kernels_off_use_the_pytorch_path_and_explain_says_so(monkeypatch):
    ad = dcgan(size=8)
    assert "kernel: fused DCGAN-tail kernel in use" in str(explain(ad, "2"))
    monkeypatch.setenv("CFMODULES_NATIVE", "0")
    text = str(explain(ad, "2"))
    assert "kernel: fused DCGAN-tail kernel off (CFMODULES_NATIVE=0)" in text
    assert "units per call timed" in text
    assert chosen(influence_maps(ad, "2", n_pairs=2, **KW)) != "fused kernel"


@pytest.mark.parametrize("cc", ["none", "false"])
def test_without_a_working_compiler_the_maps_still_come(monkeypatch, tmp_path, cc):
    ad = dcgan(size=8)
    want = influence_maps(ad, "2", n_pairs=3, **KW)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setenv("CFMODULES_CACHE_DIR", str(tmp_path))
    if cc == "none":
        monkeypatch.setattr(native, "_compiler", lambda: None)
        reason = "no C compiler found (set CC)"
    else:
        monkeypatch.setenv("CC", "false")  # runs, prints nothing, always fails
        reason = "compiling fused_tail.c failed"
    got = influence_maps(ad, "2", n_pairs=3, **KW)
    assert chosen(got) != "fused kernel"
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-5, atol=1e-6)
    assert reason in native.status(tail_mod.KERNEL)
    assert reason in str(explain(ad, "2"))
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_the_build_is_cached_once_and_leaves_no_temporary_files(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setenv("CFMODULES_CACHE_DIR", str(tmp_path))
    assert native.load(tail_mod.KERNEL) is not None
    assert "in use: built now with" in native.status(tail_mod.KERNEL)
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("fused_tail-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    code = ("from cfmodules import native; import sys; "
            "sys.exit(native.load('fused_tail') is None or 'built now' in native._why['fused_tail'])")
    env = {**os.environ, "CFMODULES_CACHE_DIR": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


class _HalvedConvT(nn.ConvTranspose2d):
    """A subclass with its own forward, as published code writes them. torch.fx traces
    into it (only torch.nn's own modules are leaves), so no graph pattern matches; the
    exact-type check in tail.py guards captures that keep such a module as one call."""

    def forward(self, x):  # noqa: D102
        return super().forward(x) * 0.5


@pytest.mark.parametrize("kind", ["leaky relu", "softplus out", "kernel 6", "output transform",
                                  "hooked last conv", "tanh twice", "subclassed last conv",
                                  "subclassed first conv"])
def test_other_tails_use_the_pytorch_path(kind):
    kw = {"leaky relu": {"relu": nn.LeakyReLU}, "softplus out": {"out": nn.Softplus()},
          "kernel 6": {"k_last": 6},
          "tanh twice": {"output_transform": torch.tanh}}.get(kind, {})
    ad = dcgan(size=8, **kw)
    if kind == "output transform":
        ad = GeneratorAdapter(ad.generator, (5, 1, 1), output_transform=lambda y: y * 0.5,
                              name="tail-transformed")
    if kind == "hooked last conv":  # e.g. old-style spectral norm recomputes the weight
        ad.generator[6].register_forward_hook(lambda m, i, o: o * 0.5)
    if kind.startswith("subclassed"):
        i = 6 if kind == "subclassed last conv" else 3
        old = ad.generator[i]
        new = _HalvedConvT(old.in_channels, old.out_channels, 4, 2, 1, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        ad.generator[i] = new.eval()
    res = influence_maps(ad, "2", n_pairs=2, **KW)
    assert chosen(res) != "fused kernel"
    assert "fused DCGAN-tail kernel" not in str(explain(ad, "2"))
    # and the maps are the generator's own (the subclass's forward, the hook, the transform)
    want = naive_maps(ad, [{"2": [c]} for c in range(12)], 2)
    np.testing.assert_allclose(res.maps, want, rtol=1e-5, atol=1e-6)


def test_out_of_memory_in_the_kernel_halves_the_calls_and_changes_no_bit(monkeypatch):
    ad = dcgan(size=8, c_in=9)
    want = influence_maps(ad, "2", n_pairs=6, **KW)
    real = tail_mod.FusedTail.sums
    calls: list[int] = []

    def sums(self, channels, pairs):
        rows = channels.numel() * (pairs.stop - pairs.start)
        calls.append(rows)
        if rows > 12:
            tail_mod._check(-1)  # the kernel's answer when malloc fails
        return real(self, channels, pairs)

    monkeypatch.setattr(tail_mod.FusedTail, "sums", sums)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = influence_maps(ad, "2", n_pairs=6, **KW)
    assert len([w for w in seen if "Out of memory" in str(w.message)]) == 1
    assert calls[0] > 12 and max(calls[calls.index(next(c for c in calls if c <= 12)):]) <= 12
    np.testing.assert_array_equal(got.maps, want.maps)
    np.testing.assert_array_equal(got.stderr, want.stderr)


def test_a_weight_change_between_runs_is_seen():
    ad = dcgan(size=8)
    before = influence_maps(ad, "2", n_pairs=3, **KW)
    with torch.no_grad():
        ad.generator[3].weight.mul_(2)  # the first convolution of the tail
        ad.generator[6].weight.add_(0.1)  # the last one
    after = influence_maps(ad, "2", n_pairs=3, **KW)
    assert chosen(after) == "fused kernel"
    want = naive_maps(ad, [{"2": [c]} for c in range(12)], 3)
    np.testing.assert_allclose(after.maps, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after.maps, before.maps)


def test_a_build_can_start_before_torch_loads(tmp_path):
    """The command line starts the first build beside torch's import: cfmodules.native
    must not import torch, and a load() after the thread finds the build made."""
    code = ("import sys; from cfmodules import native; "
            "t = native.build_in_background('fused_tail'); "
            "assert 'torch' not in sys.modules, 'native imported torch'; t.join(); "
            "assert 'built now' in native._why['fused_tail'], native._why['fused_tail']; "
            "assert native.build_in_background('fused_tail') is None; "
            "assert native.load('fused_tail') is not None")
    env = {**os.environ, "CFMODULES_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_cfmodules_analyze_builds_the_kernel_whatever_the_model(monkeypatch, tmp_path):
    """The command line starts the build before it knows the model (it does not wait for
    torch); on a model without a DCGAN tail the build is made, and the run is unchanged."""
    from cfmodules.cli import main

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setenv("CFMODULES_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["analyze", "--model", "planted-conv", "--out", str(tmp_path / "o"),
                 "--pairs", "2", "--no-stability"]) == 0
    import threading

    for t in threading.enumerate():  # the build may outlast this small run
        if t.name == f"cfmodules-build-{tail_mod.KERNEL}":
            t.join()
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]
    assert "built now" in native._why[tail_mod.KERNEL]
