"""Bad and unusual inputs to GeneratorAdapter, generate and hybridize: the library's errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter, hybridize
from cfmodules import latents as L
from cfmodules.engine import engine_of, split
from cfmodules.errors import ConfigError, LatentError
from conftest import no_hooks_left, tiny_sequential


def adapter(**kw) -> GeneratorAdapter:
    return GeneratorAdapter(tiny_sequential(), (2, 1, 1), **kw)


def assert_clean(ad: GeneratorAdapter, train: bool = True) -> None:
    assert no_hooks_left(ad.generator)
    assert all(m.training == train for m in ad.generator.modules())


# ---------------------------------------------------------------------- latents
def test_float64_latents_are_cast_with_one_warning():
    ad = adapter()
    z = ad.sample_latents(3)
    y = ad.generate(z)
    with pytest.warns(UserWarning, match="float64.*casts it to torch.float32"):
        y64 = ad.generate(z.double())
    torch.testing.assert_close(y64, y, rtol=0, atol=0)  # float32 -> float64 -> float32 is exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per adapter and dtype
        ad.generate(z.double())
        y16 = ad.generate(z.half())  # float16 -> float32 loses nothing: no warning
    torch.testing.assert_close(y16, ad.generate(z.half().float()), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="float64"):
        h = hybridize(adapter(), z.double(), z.flip(0).double(), {"act": [1]})
    torch.testing.assert_close(h, hybridize(ad, z, z.flip(0), {"act": [1]}), rtol=0, atol=0)
    assert ad.dtype == torch.float32


def test_a_float64_generator_gets_float64_latents():
    ad = GeneratorAdapter(tiny_sequential().double(), (2, 1, 1))
    assert ad.dtype == torch.float64 and ad.sample_latents(2).dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ad.generate(ad.sample_latents(2).float())  # cast up, silently
    assert y.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8,
                                   torch.complex64])
def test_integer_bool_and_complex_latents_are_refused(dtype):
    ad = adapter()
    ad.generator.train()
    z = torch.ones(3, 2, 1, 1, dtype=dtype)
    for call in (lambda: ad.generate(z), lambda: hybridize(ad, ad.sample_latents(3), z, {"act": [0]}),
                 lambda: split(ad, "act").prefix(z)):
        with pytest.raises(LatentError, match=f"dtype {dtype}.*floating-point") as e:
            call()
        assert isinstance(e.value, ValueError)
        assert_clean(ad)


def test_meta_latents_and_generators_and_devices_are_refused():
    ad = adapter()
    ad.generator.train()
    with pytest.raises(LatentError, match="meta tensor"):
        ad.generate(torch.empty(2, 2, 1, 1, device="meta"))
    with pytest.raises(LatentError, match="meta tensor"):
        with ad.trace("act"):
            hybridize(ad, torch.empty(2, 2, 1, 1, device="meta"), ad.sample_latents(2),
                      {"act": [0]})
    assert_clean(ad)
    with torch.device("meta"):
        gen = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ConfigError, match="meta device.*to_empty"):
        GeneratorAdapter(gen, 3)
    with pytest.raises(ConfigError, match="'meta' has no values.*'cpu'"):
        adapter(device="meta")


@pytest.mark.parametrize("device", ["gpu", "cuda:3", "tpu", 3.5])
def test_unknown_or_absent_devices_say_what_is_available(device):
    if torch.cuda.device_count() > 3 and device == "cuda:3":
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(ConfigError, match="Devices available here: 'cpu'"):
        adapter(device=device)


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad", [(0,), None, ("a", 1), (1, 0), (0, float("inf")), (0, 1, 2),
                                 (True, 2), 5])
def test_output_range_must_be_two_increasing_numbers(bad):
    with pytest.raises(ConfigError, match="output_range must be \\(low, high\\)"):
        adapter(output_range=bad)


def test_output_range_accepts_numpy_numbers():
    assert adapter(output_range=(np.float32(0), np.int64(1))).output_range == (0.0, 1.0)
    assert adapter(output_range=np.array([0, 255])).output_range == (0.0, 255.0)
    assert adapter(output_range=torch.tensor([-1.0, 1.0])).output_range == (-1.0, 1.0)
    with pytest.raises(ConfigError, match="output_range"):
        adapter(output_range=np.array([[0, 1]]))


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "2", np.float64(2.0)])
def test_batch_size_must_be_a_positive_integer(bad):
    ad = adapter()
    ad.generator.train()
    z = ad.sample_latents(4)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        ad.generate(z, batch_size=bad)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        hybridize(ad, z, z.flip(0), {"act": [0]}, batch_size=bad)
    assert_clean(ad)


def test_batch_size_accepts_numpy_integers():
    ad = adapter()
    z = ad.sample_latents(5)
    torch.testing.assert_close(ad.generate(z, batch_size=np.int64(2)), ad.generate(z))
    torch.testing.assert_close(hybridize(ad, z, z.flip(0), {"act": [0]}, batch_size=np.int32(3)),
                               hybridize(ad, z, z.flip(0), {"act": [0]}))


@pytest.mark.parametrize("bad", [(True,), (2, True), (0,), (2.0,), (), ((),), "2", (-1, 3)])
def test_latent_shape_is_checked(bad):
    with pytest.raises(ConfigError, match="latent_shape must be"):
        GeneratorAdapter(tiny_sequential(), bad)


def test_latent_shape_accepts_numpy_integers():
    ad = GeneratorAdapter(tiny_sequential(), (np.int64(2), np.int32(1), 1))
    assert ad.latent_shape == (2, 1, 1) and all(type(d) is int for d in ad.latent_shape)


# ---------------------------------------------------------------------- counts and seeds
def test_numpy_integers_are_accepted_as_counts_and_seeds():
    ad = adapter()
    a = ad.sample_latents(np.int64(3), seed=np.int32(5), start=np.uint8(1))
    torch.testing.assert_close(a, ad.sample_latents(3, seed=5, start=1), rtol=0, atol=0)
    torch.testing.assert_close(ad.sample_latents(1, seed=2**32 - 1),
                               ad.sample_latents(1, seed=np.uint32(2**32 - 1)), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [2**32, -1, 1.5, True, "1", np.float64(1.0)])
def test_seeds_outside_the_stream_range_are_refused(seed):
    with pytest.raises(ConfigError, match="seed must be an integer"):
        adapter().sample_latents(2, seed=seed)


def test_seeds_do_not_alias():
    ad = adapter()
    assert not torch.equal(ad.sample_latents(2, seed=2**32 - 1), ad.sample_latents(2, seed=0))
    with pytest.raises(ConfigError):
        L.sample("normal", [(2,)], 2, seed=2**32)


@pytest.mark.parametrize("n", [0, -2, 2.5, True, "3"])
def test_sample_counts_are_checked(n):
    with pytest.raises(ConfigError, match="number of samples must be a positive integer"):
        adapter().sample_latents(n)
    with pytest.raises(ConfigError, match="start must be an integer"):
        adapter().sample_latents(2, start=-1)


# ---------------------------------------------------------------------- to(device)
def test_to_moves_the_generator_and_returns_the_adapter():
    ad = adapter()
    z = ad.sample_latents(3)
    y = hybridize(ad, z, z.flip(0), {"act": [2]})
    assert engine_of(ad)._entries
    assert ad.to("cpu") is ad and ad.device == torch.device("cpu")
    assert not engine_of(ad)._entries  # captures are rebuilt on the new device
    torch.testing.assert_close(hybridize(ad, z, z.flip(0), {"act": [2]}), y)
    assert ad.to(torch.device("cpu")) is ad


def test_to_an_absent_device_changes_nothing():
    ad = adapter()
    with pytest.raises(ConfigError, match="Devices available here"):
        ad.to("gpu")
    assert ad.device == torch.device("cpu")
    assert next(ad.generator.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_everything():  # pragma: no cover - run on a GPU machine
    ad = adapter()
    z = ad.sample_latents(3)
    y = ad.generate(z)
    ad.to("cuda")
    assert next(ad.generator.parameters()).is_cuda and ad.device.type == "cuda"
    torch.testing.assert_close(ad.generate(z).cpu(), y, rtol=1e-5, atol=1e-6)
    assert hybridize(ad, z, z.flip(0), {"act": [0]}).is_cuda
