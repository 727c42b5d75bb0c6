"""Benchmark: influence maps of one BigGAN-deep conv on CPU, and the paper's setting projected.

The paper's BigGAN experiments (Besserve et al. 2020, sec. 4.2 and Fig. 5) intervene in
the 7th Gblock of BigGAN-deep-256 (channel width 128). This script builds that
architecture with random weights (``zoo.biggan.load_random``: the same layers and FLOPs
as the pretrained model, nothing downloaded), computes real influence maps of a few
channels of the Gblock's first 3x3 convolution (``conv_1``) on the path the engine takes
for it (the split path: prefix once per block, the suffix per hybrid), and prints:

- ``hybrids_per_s``: hybrids per second of wall time on this machine: ``--channels`` x
  ``--pairs`` hybrids, timed as the difference between a run of ``1 + --channels``
  channels and one of 1 channel on the same pairs (after a warm-up run), so the prefix
  and the first call's costs cancel;
- ``projected_cpu_h``: the paper's setting, every channel of that layer x 64 pairs, at
  that rate;
- ``projected_h200_min``: the same work from its FLOPs (``explain``: the FLOPs of one
  hybrid, counted by ``torch.utils.flop_counter`` on the suffix) at ``--h200-tflops``
  achievable float32 TFLOP/s on one H200 (default 30: about 45% of its 67 TFLOP/s float32
  peak, which large convolutions in float32 reach; TF32 tensor cores would be faster but
  change the numbers beyond float32 rounding).

Run::

    PYTHONPATH=src python benchmarks/bench_biggan.py [--resolution 256] [--channels 2] [--pairs 2]

It ends with one line::

    RESULT model=biggan-deep-256-random layer=generator.layers.6.conv_1 channels=... hybrids_per_s=... projected_cpu_h=... gflop_per_hybrid=... projected_h200_min=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from cfmodules.engine import explain
from cfmodules.influence import influence_maps
from cfmodules.zoo.biggan import gblock_path, load_random


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--width", type=int, default=128, help="channel width (the real model: 128)")
    ap.add_argument("--block", type=int, default=7, help="Gblock, counted from 1 (paper: 7)")
    ap.add_argument("--conv", default="conv_1")
    ap.add_argument("--channels", type=int, default=2, help="channels measured here")
    ap.add_argument("--pairs", type=int, default=2, help="pairs measured here")
    ap.add_argument("--paper-pairs", type=int, default=64)
    ap.add_argument("--h200-tflops", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    adapter = load_random(resolution=args.resolution, channel_width=args.width)
    layer = f"{gblock_path(adapter.generator, args.block)}.{args.conv}"
    n_channels = adapter.layer_channels(layer)
    n_params = sum(p.numel() for p in adapter.generator.parameters())
    print(f"loaded {adapter.name} ({n_params / 1e6:.1f}M "
          f"parameters) in {time.perf_counter() - t:.1f} s; {layer}: "
          f"{adapter.layer_shape(layer)}", flush=True)
    def run(n: int):
        t = time.perf_counter()
        res = influence_maps(adapter, layer, channels=list(range(n)), n_pairs=args.pairs,
                             progress=False)
        return time.perf_counter() - t, res

    run(1)  # warm-up: the capture, the layer shapes
    one, _ = run(1)  # the prefix, Original 1 and one channel's hybrids
    many, res = run(1 + args.channels)
    hybrids = args.channels * args.pairs
    rate = hybrids / max(many - one, 1e-9)  # the hybrids alone: the difference of the runs
    path = res.settings["paths"][layer]
    print(f"{args.pairs} pairs: 1 channel {one:.1f} s, {1 + args.channels} channels {many:.1f} s: "
          f"{hybrids} hybrids on the {path} path in {many - one:.1f} s, "
          f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f}", flush=True)
    e = explain(adapter, layer)
    flop = e.flops_hybrid
    work = n_channels * args.paper_pairs
    cpu_h = work / rate / 3600
    h200_min = work * flop / (args.h200_tflops * 1e12) / 60
    print(e, flush=True)
    print(f"RESULT model={adapter.name} layer={layer} channels={n_channels} path={path} "
          f"hybrids_per_s={rate:.3f} projected_cpu_h={cpu_h:.1f} "
          f"gflop_per_hybrid={flop / 1e9:.1f} gflop_per_forward={e.flops_full / 1e9:.1f} "
          f"projected_h200_min={h200_min:.1f} h200_tflops={args.h200_tflops:g} "
          f"load={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
