"""The faster suffix: GEMM transposed convolutions and the accelerated fx graph."""

from __future__ import annotations

import itertools
import operator

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.engine import engine_of
from cfmodules.engine import linear as linear_mod
from cfmodules.engine import swaps as swaps_mod
from cfmodules.engine.fast import (
    FastSplit,
    GemmConvTranspose2d,
    accelerate,
    fold_batchnorm,
    strip_leading_relu,
    tanh_by_sigmoid_,
)
from cfmodules.engine.linear import add_base_, find_linear_plan, fused_add_relu_is_exact
from cfmodules.errors import GeneratorOutputError
from cfmodules.influence import influence_maps
from cfmodules.influence import maps as maps_mod
from influence_helpers import _init, naive_maps, wide_convt_adapter

pytestmark = pytest.mark.numerics  # compares results across chunkings and code paths


def test_gemm_conv_transpose_equals_module():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    checked = 0
    # kernels that are and are not multiples of the stride take different col2im paths
    for k, s, p, d, op, bias in itertools.product([1, 2, 3, 4, 6], [1, 2, 3], [0, 1, 2],
                                                  [1, 2], [0, 1, 2], [True, False]):
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
    assert checked > 250
    for k, s, p, op in [((4, 3), (2, 3), (1, 0), (1, 2)), ((2, 6), (2, 3), (0, 2), (0, 1))]:
        conv = nn.ConvTranspose2d(16, 3, k, s, p, op)  # non-square
        with torch.inference_mode():
            torch.testing.assert_close(GemmConvTranspose2d(conv)(x), conv(x), rtol=1e-5,
                                       atol=1e-5)


def test_gemm_conv_transpose_reuses_its_buffers_safely():
    """Results of earlier calls survive later calls (only scratch memory is reused)."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(16, 3, 4, 2, 1).requires_grad_(False)
    gemm = GemmConvTranspose2d(conv)
    xs = [torch.randn(n, 16, 5, 6) for n in (4, 2, 4)]
    outs = [gemm(x) for x in xs]
    for x, out in zip(xs, outs):
        assert out.is_contiguous()
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)


def test_gemm_conv_transpose_keeps_gradients():
    conv = nn.ConvTranspose2d(16, 3, 4, 2, 1)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    GemmConvTranspose2d(conv)(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_accelerate_replaces_only_narrow_transposed_convs():
    model = nn.Sequential(nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
                          nn.ConvTranspose2d(32, 2, 4, 2, 1), nn.Tanh()).eval()
    gm = torch.fx.symbolic_trace(model)
    fast = accelerate(gm, torch.device("cpu"))
    kinds = [type(fast.get_submodule(n.target)).__name__ if n.op == "call_module" else
             getattr(n.target, "__name__", n.target)
             for n in fast.graph.nodes if n.op in ("call_module", "call_method", "call_function")]
    # the Tanh reads only the GEMM's fresh output, so it runs in place (by sigmoid: faster)
    assert kinds == ["ConvTranspose2d", "ReLU", "GemmConvTranspose2d", "tanh_by_sigmoid_"]
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    assert accelerate(gm, torch.device("meta")) is gm  # only on CPU


def test_accelerate_keeps_tanh_out_of_place_when_the_gemm_output_is_read_twice():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(32, 2, 4, 2, 1)
            self.act = nn.Tanh()

        def forward(self, x):
            y = self.up(x)
            return self.act(y) + y

    model = Skip().eval()
    fast = accelerate(torch.fx.symbolic_trace(model), torch.device("cpu"))
    assert not any(n.op in ("call_method", "call_function") for n in fast.graph.nodes
                   if n.target is not operator.add)
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


def test_tanh_by_sigmoid_is_tanh_to_float_rounding():
    x = torch.linspace(-20, 20, 400_001)
    want = torch.tanh(x.double())
    got = tanh_by_sigmoid_(x.clone())
    assert float((got.double() - want).abs().max()) < 3e-7  # absolute: images are in [-1, 1]
    assert float((torch.tanh(x).double() - want).abs().max()) < 1e-7
    assert torch.equal(tanh_by_sigmoid_(torch.tensor([0.0, float("inf"), -float("inf")])),
                       torch.tensor([0.0, 1.0, -1.0]))
    assert tanh_by_sigmoid_(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("relu", [nn.ReLU(), nn.ReLU(inplace=True), torch.relu, "method"])
def test_strip_leading_relu(relu):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = relu if isinstance(relu, nn.Module) else None
            self.conv = nn.Conv2d(4, 2, 1)

        def forward(self, x, other):
            if self.relu is not None:
                r = self.relu(x)
            else:
                r = x.relu() if relu == "method" else relu(x)
            return self.conv(r) + other

    model = M().eval()
    gm = torch.fx.symbolic_trace(model)
    stripped = strip_leading_relu(gm)
    assert stripped is not None
    x, other = torch.randn(3, 4, 5, 5), torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(stripped(torch.relu(x), other), model(x, other))


def test_strip_leading_relu_refuses_other_starts():
    twice = torch.fx.symbolic_trace(lambda x: torch.relu(x) + x)  # x is read twice
    assert strip_leading_relu(twice) is None
    tanh = torch.fx.symbolic_trace(nn.Sequential(nn.Tanh(), nn.ReLU()))
    assert strip_leading_relu(tanh) is None
    leaky = torch.fx.symbolic_trace(nn.Sequential(nn.LeakyReLU(), nn.Conv2d(2, 2, 1)))
    assert strip_leading_relu(leaky) is None


def test_add_base_with_relu_equals_reference():
    torch.manual_seed(0)
    hyb, base = torch.randn(3, 4, 5, 6, 6), torch.randn(1, 4, 5, 6, 6)
    ref = torch.relu(hyb + base)
    torch.testing.assert_close(add_base_(hyb.clone(), base, relu=True), ref, rtol=0, atol=0)
    torch.testing.assert_close(add_base_(hyb.clone(), base), hyb + base, rtol=0, atol=0)


def test_fused_add_relu_guard():
    w, d, b = torch.ones(2, 3, 4), torch.ones(5, 2, 3, 3), torch.ones(5, 3, 6, 6)
    assert fused_add_relu_is_exact(w, d, b)
    assert not fused_add_relu_is_exact(w, d, b * float("nan"))
    assert not fused_add_relu_is_exact(w, d * float("inf"), b)
    assert not fused_add_relu_is_exact(w * 1e36, d * 10, b)  # 4 taps * 1e36 * 10 may overflow


class _Cancelling(nn.Module):
    """Originals are 0 before the ReLU; swapping one channel overflows to +-inf there."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()
        self.op = nn.Conv2d(2, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(2, 3, 1, bias=False)
        with torch.no_grad():
            self.op.weight.zero_()
            self.op.weight[:, 0] = 3e38
            self.op.weight[:, 1] = -3e38
            self.out.weight.zero_()
            self.out.weight[:, 0] = 1e-30  # a clamped 3.4e38 would come out finite

    def forward(self, z):
        return self.out(self.act(self.op(self.layer(z))))


def _twin(n, g):  # channel 1 equals channel 0, in [-1, 1] so that 3e38 * z is finite
    return (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1).expand(-1, 2, -1, -1).clone()


def test_overflowing_hybrid_is_reported_even_where_add_and_relu_are_fused(monkeypatch):
    ad = GeneratorAdapter(_Cancelling().eval(), (2, 4, 4), prior=_twin, name="cancel")
    assert FastSplit(ad, find_linear_plan(engine_of(ad), "layer").cut).starts_with_relu
    with pytest.raises(GeneratorOutputError, match="contains NaN or inf"):
        influence_maps(ad, "layer", channels=[1], n_pairs=4, progress=False)
    # the guard is what reports it: the fused kernel alone would clamp inf to a finite value
    monkeypatch.setattr(swaps_mod, "fused_add_relu_is_exact", lambda *a: True)
    res = influence_maps(ad, "layer", channels=[1], n_pairs=4, progress=False)
    assert np.isfinite(res.maps).all()


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
    plan = find_linear_plan(engine_of(ad), layer)
    assert plan is not None
    # after "2" the cut (BatchNorm "4") feeds a ReLU: the fused add+ReLU path
    assert FastSplit(ad, plan.cut).starts_with_relu == (layer == "2")
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
    b = influence_maps(ad, "1", n_pairs=3, progress=False, algorithm="hook")
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-6)  # rounding, image units


def test_cpu_batches_keep_hybrids_and_fresh_suffix_tensors_small():
    """Rows per batch: hybrids at the cut <= 32 MiB, new suffix tensors <= 16 MiB."""
    ad = wide_convt_adapter()
    for layer in ("2", "5"):
        units = maps_mod._layer_units(ad, layer, None)[1]
        runners = maps_mod._runners(ad, units, "auto")
        shapes = {i.name: i.shape for i in ad.layers_cached()}
        rows = maps_mod._speed_rows(ad, runners, 4, 2**40)  # no memory limit
        (runner, _), = runners
        cut = int(np.prod(shapes[runner.swaps.cut])) * 4
        fresh = max(int(np.prod(shapes[name])) * 4 for name in runner.swaps.suffix_layers)
        assert rows == min(maps_mod._HYBRID_BATCH_BYTES // cut,
                           maps_mod._FRESH_TENSOR_BYTES // fresh)
        assert rows * cut <= maps_mod._HYBRID_BATCH_BYTES


def _with_stats(model: nn.Module) -> nn.Module:
    return _init(model, 3)  # random weights and running statistics, eval mode


def test_fold_batchnorm_equals_conv_then_bn_and_leaves_the_model_alone():
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1, bias=False),
                                      nn.BatchNorm2d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.fx.symbolic_trace(model)
    folded = fold_batchnorm(gm)
    kinds = [type(folded.get_submodule(n.target)).__name__ for n in folded.graph.nodes
             if n.op == "call_module"]
    assert kinds == ["Conv2d", "ReLU", "ConvTranspose2d"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_fold_batchnorm_keeps_what_it_cannot_fold():
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    gm = torch.fx.symbolic_trace(no_stats.eval())
    assert fold_batchnorm(gm) is gm  # batch statistics even in eval mode

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = torch.fx.symbolic_trace(TwoReaders().eval())
    assert fold_batchnorm(gm) is gm
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.BatchNorm2d(4))
    gm = torch.fx.symbolic_trace(grouped.eval())
    assert fold_batchnorm(gm) is gm


def _dcgan_like() -> GeneratorAdapter:
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(True),
        nn.ConvTranspose2d(16, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True),
        nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True),
        nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Tanh())
    return GeneratorAdapter(_with_stats(model), (4, 1, 1), name="dcgan-like")


def test_channels_last_hybrids_equal_the_naive_maps():
    """After the cut a PyTorch convolution runs: contributions are made channels last."""
    ad = _dcgan_like()
    units = maps_mod._layer_units(ad, "2", None)[1]
    (runner, _), = maps_mod._runners(ad, units, "auto")
    assert runner.swaps.channels_last and runner.swaps.cut_split.starts_with_relu
    res = influence_maps(ad, "2", n_pairs=5, pairs_per_block=3, progress=False)
    ref = naive_maps(ad, [{"2": [c]} for c in range(16)], 5)
    assert float(np.abs(res.maps - ref).max() / np.abs(ref).max()) < 1e-5


def test_channels_last_contributions_equal_the_plain_layout():
    ad = _dcgan_like()
    plan = find_linear_plan(engine_of(ad), "2")
    prepared = linear_mod.prepare_weight(plan, plan.weight())
    delta = torch.randn(3, 16, 4, 4)
    ch = torch.tensor([0, 5, 15])
    plain = linear_mod.single_channel_contributions(plan, prepared, delta, ch)
    last = linear_mod.single_channel_contributions(plan, prepared, delta, ch,
                                                   channels_last=True)
    assert last.permute(0, 1, 3, 4, 2).is_contiguous()
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-6)
