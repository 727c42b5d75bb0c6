"""Benchmark: influence maps of the pretrained DCGAN faces, ours vs the naive method.

The naive method is how dissection tools (netdissect, baukit) compute counterfactual
effects: for every channel, one full generator forward on the 64 Original-1 latents with a
forward hook that replaces that channel by its value for Original 2 (batched over the
pairs). Ours is :func:`cfmodules.influence.influence_maps` with its defaults. Both run in
this process on the same pairs, alternately ``--repeats`` times; each is reported as its
best run (the machine may be shared, so the best is the least disturbed). ``gflops`` is the achieved
rate of our downstream work (floating-point operations of convolutions and matrix
products counted with ``torch.utils.flop_counter`` over one run, divided by its time);
``peak_gflops`` is this machine's own throughput on a large matrix product and a large
convolution, measured in the same run.

Run::

    PYTHONPATH=src python benchmarks/bench_influence.py [--device cuda] [--pairs 64]

Besides the pretrained DCGAN (``--models dcgan``), three generators whose forward
``torch.fx`` cannot trace as a whole: ``cond`` (:class:`ConditionalDCGAN`, a
class-conditional DCGAN of this file, at the ReLU three blocks before the output),
``biggan`` (the ``biggan-deep-random`` zoo entry at a small resolution, at a Gblock in
the middle; its adapter needs ``forward=`` for the truncation) and ``stylegan2``
(:class:`StyleGAN2Like`, at the first convolution of the 32x32 block; its grouped
convolutions make large batches slower, so the batch shape is chosen by timing).

It ends with one line per layer::

    RESULT layer=main.8 speedup=12.3x limit=8.1x max_rel_diff=2.1e-06 ours_s=... naive_s=... gflops=... peak_gflops=... model=... path=...

``limit`` is the FLOP ratio of one naive hybrid (a full forward) to one hybrid on the
path cfmodules takes (``explain(adapter, layer)``); ``load`` the machine's load average.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cfmodules import GeneratorAdapter
from cfmodules.engine import explain
from cfmodules.influence import influence_maps
from cfmodules.latents import pair_latents
from cfmodules.zoo.dcgan import load_dcgan_faces


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    """(seconds, result) of one call."""
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def best_time(fn, repeats: int, device: torch.device):
    """(best seconds, last result) over ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t, out = timed(fn, device)
        best = min(best, t)
    return best, out


def naive_maps(adapter, layer: str, n_pairs: int, seed: int = 0,
               channels: list[int] | None = None) -> torch.Tensor:
    """One full forward per channel with a hook replacing it, batched over the pairs.

    The forward is the adapter's own raw call (its ``forward=`` function, e.g. BigGAN's
    truncation) and output transform. A layer that runs several times per forward is
    named by its call, ``"path:k"``: the hook acts on call ``k`` only. Returns (C, H, W)
    for the ``channels`` (default: all): mean over pairs of |hybrid - Original 1|, averaged
    over colours.
    """
    gen = adapter.generator.eval()
    path, _, call = layer.partition(":")
    k = int(call) if call else 0
    module = adapter.submodule(path)
    z1, z2 = pair_latents(adapter, n_pairs, seed, 0)

    def run(z):
        return adapter.images(adapter._raw(z))

    def on_call(edit):
        """A forward hook that applies ``edit`` to call ``k`` of the module in each forward."""
        count = [0]

        def hook(m, i, o):
            count[0] += 1
            return edit(o) if count[0] == k + 1 else None
        return hook

    def hooked_run(z, edit):
        h = module.register_forward_hook(on_call(edit))
        try:
            return run(z)
        finally:
            h.remove()

    with torch.inference_mode():
        y = run(z1)
        donor = []
        hooked_run(z2, lambda o: donor.append(o.clone()))  # append returns None: no edit
        a2 = donor[0]
        maps = []
        for c in (range(a2.shape[1]) if channels is None else channels):
            def replace(o, c=c):
                o = o.clone()
                o[:, c] = a2[:, c]
                return o
            out = hooked_run(z1, replace)
            maps.append((out - y).abs().mean(1).mean(0))
        del gen
        return torch.stack(maps)


class ConditionalDCGAN(nn.Module):
    """A class-conditional DCGAN written the way published code writes its forward.

    ``forward(noise, labels)``: ``squeeze``, ``if noise.dim() == 1``, ``cat``, ``.view``,
    then an ``nn.Sequential`` of six ConvTranspose2d + BatchNorm + ReLU blocks (4x4 up to
    128x128), a Dropout and a 3x3 output convolution with Tanh. ``torch.fx`` cannot trace
    the forward; cfmodules captures ``main`` (a partial capture). Random weights (seed 0)
    and BatchNorm statistics of 64 random samples.
    """

    def __init__(self, nz: int = 100, n_classes: int = 8, ngf: int = 16):
        super().__init__()
        chans = [nz + n_classes, ngf * 16, ngf * 8, ngf * 4, ngf * 2, ngf, ngf // 2]
        layers: list[nn.Module] = []
        for i in range(6):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride, pad, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(True)]
        layers += [nn.Dropout(0.2), nn.Conv2d(chans[-1], 3, 3, 1, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                    fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else (
                        m.in_channels * 4 if m.stride == (2, 2) else m.in_channels * 16)
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                    m.momentum = None  # running statistics: the average over the batches
            self.train()
            for _ in range(4):  # statistics of real activations, as after training
                noise = torch.randn(16, nz, 1, 1, generator=g)
                labels = torch.eye(n_classes)[torch.randint(n_classes, (16,), generator=g)]
                self(noise, labels)
        self.eval()

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        noise = noise.squeeze()
        if noise.dim() == 1:
            noise = noise.unsqueeze(0)
        batch = noise.shape[0]
        x = torch.cat([noise, labels], 1)
        return self.main(x.view(batch, -1, 1, 1))


class ModConv(nn.Module):
    """StyleGAN2's modulated (and demodulated) convolution, written as its official code.

    The weight is scaled per sample by a style (an affine map of ``w``), normalised
    (demodulation), and the batch is folded into the channels for one convolution with
    ``groups=batch``. A fixed noise image (``noise_mode="const"``) and a bias follow, then
    a leaky ReLU. ``up``: bilinear upsampling by 2 first.
    """

    def __init__(self, cin, cout, w_dim, k=3, demod=True, up=False, act=True, res=None, g=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k, generator=g))
        self.affine = nn.Linear(w_dim, cin)
        with torch.no_grad():
            self.affine.weight.copy_(torch.randn(cin, w_dim, generator=g) / w_dim ** 0.5)
            self.affine.bias.fill_(1.0)
        self.bias = nn.Parameter(0.1 * torch.randn(cout, generator=g))
        self.demod, self.up, self.act, self.pad = demod, up, act, k // 2
        self.wgain = 1 / math.sqrt(cin * k * k)
        if res is not None:
            self.register_buffer("noise_const", torch.randn(1, 1, res, res, generator=g))
            self.noise_strength = nn.Parameter(torch.full((), 0.1))
        else:
            self.noise_const = None

    def forward(self, x, w):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        batch, cin, h, wd = x.shape
        styles = self.affine(w)
        weight = self.weight[None] * styles.reshape(batch, 1, -1, 1, 1)
        if self.demod:
            d = (weight.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
            weight = weight * d.reshape(batch, -1, 1, 1, 1)
        else:
            weight = weight * self.wgain
        x = x.reshape(1, -1, h, wd)
        out = F.conv2d(x, weight.reshape(-1, cin, *weight.shape[3:]), padding=self.pad, groups=batch)
        out = out.reshape(batch, -1, h, wd)
        if self.noise_const is not None:
            out = out + self.noise_const * self.noise_strength
        out = out + self.bias.reshape(1, -1, 1, 1)
        if self.act:
            out = F.leaky_relu(out, 0.2) * math.sqrt(2)
        return out

class Block(nn.Module):
    """One resolution: two modulated convs (the first upsamples), a toRGB skip."""

    def __init__(self, cin, cout, w_dim, res, g):
        super().__init__()
        self.conv0 = ModConv(cin, cout, w_dim, up=True, res=res, g=g)
        self.conv1 = ModConv(cout, cout, w_dim, res=res, g=g)
        self.torgb = ModConv(cout, 3, w_dim, k=1, demod=False, act=False, g=g)
    def forward(self, x, img, w):
        x = self.conv1(self.conv0(x, w), w)
        y = self.torgb(x, w)
        img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + y
        return x, img

class Mapping(nn.Module):
    """The mapping network: normalised z, then linear + leaky ReLU layers to w."""

    def __init__(self, z_dim, w_dim, n, g):
        super().__init__()
        layers = []
        for i in range(n):
            lin = nn.Linear(z_dim if i == 0 else w_dim, w_dim)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.zero_()
            layers += [lin, nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
    def forward(self, z):
        z = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        return self.net(z)

class Synthesis(nn.Module):
    """A learned 4x4 constant, then blocks up to 64x64, RGB summed over resolutions."""

    def __init__(self, w_dim, chans, g):
        super().__init__()
        c0 = chans[4]
        self.const = nn.Parameter(torch.randn(c0, 4, 4, generator=g))
        self.conv = ModConv(c0, c0, w_dim, res=4, g=g)
        self.torgb = ModConv(c0, 3, w_dim, k=1, demod=False, act=False, g=g)
        res = 8
        while res in chans:
            setattr(self, f"b{res}", Block(chans[res // 2], chans[res], w_dim, res, g))
            res *= 2
        self.resolutions = [r for r in chans if r > 4]
    def forward(self, w):
        x = self.const.unsqueeze(0).repeat(w.shape[0], 1, 1, 1)
        x = self.conv(x, w)
        img = self.torgb(x, w)
        for res in self.resolutions:
            x, img = getattr(self, f"b{res}")(x, img, w)
        return img

class StyleGAN2Like(nn.Module):
    """A StyleGAN2-like generator of this file (random weights, seed 0), 64x64.

    Mapping network (4 layers), modulated + demodulated 3x3 convolutions with
    ``groups=batch``, fixed per-layer noise, toRGB skips; 128 channels up to 16x16, 64 at
    32x32, 32 at 64x64. ``torch.fx`` cannot trace it (``batch, c, h, w = x.shape``), and
    large batches make its grouped convolutions slower per sample.
    """

    def __init__(self, z_dim=128, w_dim=128, chans=None, n_mapping=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = chans or {4: 128, 8: 128, 16: 128, 32: 64, 64: 32}
        self.mapping = Mapping(z_dim, w_dim, n_mapping, g)
        self.synthesis = Synthesis(w_dim, chans, g)
        self.eval()
    def forward(self, z):
        return self.synthesis(self.mapping(z))


def _one_hot_prior(n_classes: int):
    def prior(n: int, g: torch.Generator):
        noise = torch.randn(n, 100, 1, 1, generator=g)
        labels = torch.eye(n_classes)[torch.randint(n_classes, (n,), generator=g)]
        return noise, labels
    return prior


def conditional_dcgan(device: torch.device) -> GeneratorAdapter:
    """The benchmark's class-conditional DCGAN, wrapped."""
    return GeneratorAdapter(ConditionalDCGAN().to(device), ((100, 1, 1), (8,)),
                            prior=_one_hot_prior(8), device=device, name="cond-dcgan")


def peak_gflops(device: torch.device, repeats: int) -> float:
    """The machine's throughput on a large matmul and a large convolution (best of both)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n = 2048
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    x = torch.randn(16, 256, 32, 32, generator=g).to(device)
    w = torch.randn(256, 256, 3, 3, generator=g).to(device)
    with torch.inference_mode():
        t_mm, _ = best_time(lambda: a @ b, repeats + 1, device)
        t_conv, _ = best_time(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                              repeats + 1, device)
    mm = 2 * n ** 3 / t_mm
    conv = 2 * 16 * 256 * 256 * 9 * 32 * 32 / t_conv
    return max(mm, conv) / 1e9


def _cases(args, device: torch.device) -> list[tuple[str, object, str, int]]:
    """(model, adapter, layer, pairs) for every RESULT line asked for."""
    cases = []
    if "dcgan" in args.models:
        adapter = load_dcgan_faces(device=device)
        cases += [("dcgan-faces", adapter, layer, args.pairs) for layer in args.layers]
    if "cond" in args.models:
        # the ReLU three blocks before the output (blocks 4-6 and the output conv follow)
        cases.append(("cond-dcgan", conditional_dcgan(device), "main.8", args.cond_pairs))
    if "stylegan2" in args.models:
        adapter = GeneratorAdapter(StyleGAN2Like().to(device), (128,), device=device,
                                   name="stylegan2-like")
        cases.append(("stylegan2-like", adapter, "synthesis.b32.conv0", args.sg2_pairs))
    if "biggan" in args.models:
        from cfmodules.zoo.biggan import gblock_path, load_random

        adapter = load_random(device=device, resolution=args.biggan_resolution,
                              channel_width=args.biggan_width)
        n_blocks = sum(1 for m in adapter.generator.generator.layers
                       if type(m).__name__ == "GenBlock")
        layer = gblock_path(adapter.generator, (n_blocks + 1) // 2)  # a middle Gblock
        cases.append((f"biggan-deep-{args.biggan_resolution}-random", adapter, layer,
                      args.biggan_pairs))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dcgan", "cond", "biggan", "stylegan2"],
                    choices=["dcgan", "cond", "biggan", "stylegan2"])
    ap.add_argument("--layers", nargs="+", default=["main.8", "main.5"],
                    help="dcgan-faces layers")
    ap.add_argument("--pairs", type=int, default=64, help="pairs for dcgan-faces")
    ap.add_argument("--cond-pairs", type=int, default=16)
    ap.add_argument("--biggan-pairs", type=int, default=4)
    ap.add_argument("--sg2-pairs", type=int, default=8, help="pairs for stylegan2-like")
    ap.add_argument("--biggan-resolution", type=int, default=64)
    ap.add_argument("--biggan-width", type=int, default=16,
                    help="BigGAN channel_width (the real model has 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this run (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        cases = _cases(args, device)
    except Exception as e:  # a zoo package may be missing
        print(f"cannot load a benchmark model: {e}", file=sys.stderr)
        return 2
    print(f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"load={_load()}", flush=True)
    peak = peak_gflops(device, args.repeats)
    print(f"peak {peak:.1f} GFLOP/s", flush=True)
    lines = []
    for model, adapter, layer, pairs in cases:
        def ours(adapter=adapter, layer: str = layer, pairs: int = pairs):
            return influence_maps(adapter, layer, n_pairs=pairs, progress=False)

        def naive(adapter=adapter, layer: str = layer, pairs: int = pairs):
            return naive_maps(adapter, layer, pairs)

        ours()  # warm up: graph capture, layer shapes, allocator
        explanation = explain(adapter, layer)
        print(explanation, flush=True)
        ours_s = naive_s = float("inf")
        for r in range(args.repeats):  # interleaved, so both see the same machine load
            t_ours, res = timed(ours, device)
            t_naive, ref = timed(naive, device)
            ours_s, naive_s = min(ours_s, t_ours), min(naive_s, t_naive)
            print(f"  {model} {layer} repeat {r}: ours {t_ours:.3f}s naive {t_naive:.3f}s "
                  f"load={_load()}", flush=True)
        ref = ref.double().cpu()
        mine = torch.from_numpy(res.maps).double()
        rel = float((mine - ref).abs().max() / ref.abs().max())
        with FlopCounterMode(display=False) as counter:
            ours()
        flops = counter.get_total_flops()
        gflops = flops / ours_s / 1e9
        print(f"{model} {layer}: ours {ours_s:.3f}s naive {naive_s:.3f}s, "
              f"{flops / 1e9:.1f} GFLOP, paths {res.settings.get('paths')}", flush=True)
        lines.append(f"RESULT layer={layer} speedup={naive_s / ours_s:.1f}x "
                     f"limit={explanation.limit:.1f}x max_rel_diff={rel:.1e} "
                     f"ours_s={ours_s:.3f} naive_s={naive_s:.3f} gflops={gflops:.1f} "
                     f"peak_gflops={peak:.1f} model={model} path={explanation.path!r}"
                     f"{_batch_text(res.settings, layer)} load={_load()}")
    for line in lines:
        print(line)
    return 0


def _batch_text(settings: dict, layer: str) -> str:
    """`` batch=UxP/path`` where the batch shape was chosen by timing, else ``""``."""
    b = settings.get("batch", {}).get(layer)
    if not b or b.get("chosen_by") != "timing":
        return ""
    return f" batch={b['units']}x{b['pairs']}/{b['path'].replace(' ', '-')}"


def _load() -> str:
    """The machine's 1-minute load average (others' work shares the cores)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
