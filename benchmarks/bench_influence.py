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

It ends with one line per layer::

    RESULT layer=main.8 speedup=12.3x max_rel_diff=2.1e-06 ours_s=... naive_s=... gflops=... peak_gflops=...
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def naive_maps(adapter, layer: str, n_pairs: int, seed: int = 0) -> torch.Tensor:
    """One full forward per channel with a hook replacing it, batched over the pairs.

    Returns (C, H, W): mean over pairs of |hybrid - Original 1|, averaged over colours.
    """
    gen = adapter.generator.eval()
    module = adapter.submodule(layer)
    z1, z2 = pair_latents(adapter, n_pairs, seed, 0)
    with torch.inference_mode():
        y = gen(z1)
        donor = {}
        h = module.register_forward_hook(lambda m, i, o: donor.setdefault("a", o.clone()))
        try:
            gen(z2)
        finally:
            h.remove()
        a2 = donor["a"]
        maps = []
        for c in range(a2.shape[1]):
            def replace(m, i, o, c=c):
                o = o.clone()
                o[:, c] = a2[:, c]
                return o
            h = module.register_forward_hook(replace)
            try:
                out = gen(z1)
            finally:
                h.remove()
            maps.append((out - y).abs().mean(1).mean(0))
        return torch.stack(maps)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="+", default=["main.8", "main.5"])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this run (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        adapter = load_dcgan_faces(device=device)
    except Exception as e:  # the zoo package may be missing
        print(f"cannot load dcgan-faces: {e}", file=sys.stderr)
        return 2
    print(f"device={device} threads={torch.get_num_threads()} pairs={args.pairs} "
          f"repeats={args.repeats}", flush=True)
    peak = peak_gflops(device, args.repeats)
    print(f"peak {peak:.1f} GFLOP/s", flush=True)
    lines = []
    for layer in args.layers:
        def ours(layer: str = layer):
            return influence_maps(adapter, layer, n_pairs=args.pairs, progress=False)

        def naive(layer: str = layer):
            return naive_maps(adapter, layer, args.pairs)

        ours()  # warm up: graph tracing, layer shapes, allocator
        ours_s = naive_s = float("inf")
        for r in range(args.repeats):  # interleaved, so both see the same machine load
            t_ours, res = timed(ours, device)
            t_naive, ref = timed(naive, device)
            ours_s, naive_s = min(ours_s, t_ours), min(naive_s, t_naive)
            print(f"  {layer} repeat {r}: ours {t_ours:.3f}s naive {t_naive:.3f}s", flush=True)
        ref = ref.double().cpu()
        mine = torch.from_numpy(res.maps).double()
        rel = float((mine - ref).abs().max() / ref.abs().max())
        with FlopCounterMode(display=False) as counter:
            ours()
        flops = counter.get_total_flops()
        gflops = flops / ours_s / 1e9
        shortcut = res.settings.get("linear_shortcut", {})
        print(f"{layer}: ours {ours_s:.3f}s naive {naive_s:.3f}s, {flops / 1e9:.1f} GFLOP, "
              f"shortcut {shortcut or 'none'}", flush=True)
        lines.append(f"RESULT layer={layer} speedup={naive_s / ours_s:.1f}x "
                     f"max_rel_diff={rel:.1e} ours_s={ours_s:.3f} naive_s={naive_s:.3f} "
                     f"gflops={gflops:.1f} peak_gflops={peak:.1f}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
