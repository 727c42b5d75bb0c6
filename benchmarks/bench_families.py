"""Benchmark: influence maps of published generator families, ours vs the naive rerun.

Families: StyleGAN2 (``stylegan2-pytorch``'s mapping and synthesis networks, random
weights, 64x64, the zoo entry ``stylegan2``) at an early and a late layer of its middle
block, and a diffusers ``UNet2DModel`` as a one-step denoiser (the zoo entry ``unet``,
32x32) at a down block, the mid block and an up block.

Ours is :func:`cfmodules.influence.influence_maps`; the naive method is
``bench_influence.naive_maps``: one full forward per channel with a hook replacing it
(batched over the pairs), the same pairs, seeds, threads and channels (StyleGAN2: the first ``--sg2-channels`` (32) of the
layer, as the ratio is per channel and all 128 channels make the naive side take many
minutes on 2 cores; the UNet: all; with few channels the prefix, run once per pair, weighs
more), in this process,
interleaved ``--repeats`` times (best of each). Few pairs make the naive side's batches
small, which favours ours beyond the FLOP limit; 8 pairs keep that effect moderate. ``limit`` is the FLOP limit: the FLOPs of
one full forward over the FLOPs of what follows the layer (``torch.utils.flop_counter``,
as ``cfmodules.explain`` counts them on the path that runs); ``path`` is that path.

Run (needs ``pip install 'cfmodules[families]'`` and stylegan2-pytorch, see README)::

    PYTHONPATH=src python benchmarks/bench_families.py [--pairs 8] [--threads 1] [--repeats 3]

It ends with one line per case::

    RESULT model=stylegan2 layer=G.blocks.2.conv1 path=split speedup=2.0x limit=2.2x max_rel_diff=3.1e-07 ...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_influence import _load, naive_maps, timed  # noqa: E402

from cfmodules.engine import explain  # noqa: E402
from cfmodules.influence import influence_maps  # noqa: E402


def _cases(args) -> list[tuple[str, object, str]]:
    from cfmodules import zoo
    from cfmodules.zoo.stylegan2 import block_layers
    from cfmodules.zoo.unet import block_layers as unet_blocks

    cases = []
    if "stylegan2" in args.models:
        sg = zoo.load("stylegan2", image_size=args.sg2_size,
                      network_capacity=args.sg2_capacity)
        mid = sg.generator.num_layers // 2
        conv1, _, _, act1 = block_layers(sg.generator, mid)
        cases += [("stylegan2", sg, conv1), ("stylegan2", sg, act1)]
    if "unet" in args.models:
        un = zoo.load("unet", sample_size=args.unet_size)
        blocks = unet_blocks(un.generator)
        down = f"down_blocks.{len(un.generator.down_blocks) - 1}"
        cases += [("unet", un, blocks[down]), ("unet", un, blocks["mid_block"]),
                  ("unet", un, blocks["up_blocks.1"])]
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["stylegan2", "unet"],
                    choices=["stylegan2", "unet"])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--sg2-channels", type=int, default=32,
                    help="StyleGAN2: the first N channels of each layer, both methods (0: all)")
    ap.add_argument("--unet-channels", type=int, default=0,
                    help="UNet: the first N channels of each layer, both methods (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sg2-size", type=int, default=64)
    ap.add_argument("--sg2-capacity", type=int, default=16)
    ap.add_argument("--unet-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cases = _cases(args)
    except Exception as e:  # an optional package may be missing
        print(f"cannot load a benchmark model: {e}", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    print(f"threads={torch.get_num_threads()} pairs={args.pairs} repeats={args.repeats} "
          f"load={_load()}", flush=True)
    lines = []
    for model, adapter, layer in cases:
        n = adapter.layer_channels(layer)
        limit = args.sg2_channels if model == "stylegan2" else args.unet_channels
        chans = list(range(min(limit, n) if limit else n))

        def ours(adapter=adapter, layer=layer, chans=chans):
            return influence_maps(adapter, layer, chans, n_pairs=args.pairs, progress=False)

        def naive(adapter=adapter, layer=layer, chans=chans):
            return naive_maps(adapter, layer, args.pairs, channels=chans)

        ours()  # warm up: capture, layer shapes, batch-shape timing
        ex = explain(adapter, layer)
        print(ex, flush=True)
        ours_s = naive_s = float("inf")
        for r in range(args.repeats):
            t_ours, res = timed(ours, device)
            t_naive, ref = timed(naive, device)
            ours_s, naive_s = min(ours_s, t_ours), min(naive_s, t_naive)
            print(f"  {model} {layer} repeat {r}: ours {t_ours:.3f}s naive {t_naive:.3f}s "
                  f"load={_load()}", flush=True)
        ref = ref.double()
        mine = torch.from_numpy(res.maps).double()
        rel = float((mine - ref).abs().max() / ref.abs().max())
        lines.append(f"RESULT model={model} layer={layer} path={ex.path.replace(' ', '-')} "
                     f"speedup={naive_s / ours_s:.2f}x limit={ex.limit:.2f}x "
                     f"max_rel_diff={rel:.1e} ours_s={ours_s:.3f} naive_s={naive_s:.3f} "
                     f"channels={mine.shape[0]}/{n} pairs={args.pairs} load={_load()}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
