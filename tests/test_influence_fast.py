"""The faster suffix: GEMM transposed convolutions and the accelerated fx graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules.influence import influence_maps
from cfmodules.influence.fastsplit import FastSplit, GemmConvTranspose2d, accelerate
from cfmodules.influence.linear import find_linear_plan
from influence_helpers import naive_maps, wide_convt_adapter


def test_gemm_conv_transpose_equals_module():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    checked = 0
    for k, s, p, d, op, bias in itertools.product([1, 3, 4], [1, 2, 3], [0, 1, 2], [1, 2],
                                                  [0, 1, 2], [True, False]):
        if op >= max(s, d):
            continue
        conv = nn.ConvTranspose2d(16, 2, k, s, p, op, bias=bias, dilation=d)
        try:
            ref = conv(x)
        except RuntimeError:  # output size below 1
            continue
        out = GemmConvTranspose2d(conv)(x)
        assert out.shape == ref.shape, (k, s, p, d, op)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=str((k, s, p, d, op)))
        checked += 1
    assert checked > 150


def test_accelerate_replaces_only_narrow_transposed_convs():
    model = nn.Sequential(nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
                          nn.ConvTranspose2d(32, 2, 4, 2, 1), nn.Tanh()).eval()
    gm = torch.fx.symbolic_trace(model)
    fast = accelerate(gm, torch.device("cpu"))
    kinds = [type(fast.get_submodule(n.target)).__name__ for n in fast.graph.nodes
             if n.op == "call_module"]
    assert kinds == ["ConvTranspose2d", "ReLU", "GemmConvTranspose2d", "Tanh"]
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    assert accelerate(gm, torch.device("meta")) is gm  # only on CPU


def test_fast_split_does_not_modify_unowned_inputs():
    ad = wide_convt_adapter()
    split = FastSplit(ad, "2")
    z = ad.sample_latents(3)
    state = split.prefix(z)
    before = state.activation.clone()
    a = split.suffix(state, state.activation, owned=False)
    torch.testing.assert_close(state.activation, before, rtol=0, atol=0)
    torch.testing.assert_close(a, ad.generate(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["2", "5"])
def test_influence_with_gemm_suffix_equals_naive(layer):
    ad = wide_convt_adapter()
    assert find_linear_plan(ad, layer) is not None
    res = influence_maps(ad, layer, n_pairs=5, progress=False)
    ref = naive_maps(ad, [{layer: [c]} for c in range(32)], 5)
    assert float(np.abs(res.maps - ref).max() / np.abs(ref).max()) < 1e-5


def test_generator_built_under_inference_mode():
    """Weights made inside torch.inference_mode have no version counter; still works."""
    import numpy as np

    from cfmodules import GeneratorAdapter
    from cfmodules.influence import influence_maps

    with torch.inference_mode():
        # the last ConvTranspose2d (2*4*4 <= 32 inputs) takes the GEMM path
        g = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 32, 4, 2, 1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(32, 32, 3, 1, 1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(32, 2, 4, 2, 1), torch.nn.Tanh())
        ad = GeneratorAdapter(g, (3, 2, 2))
        a = influence_maps(ad, "1", n_pairs=3, progress=False)
    b = influence_maps(ad, "1", n_pairs=3, progress=False, method="hook")
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-7)
