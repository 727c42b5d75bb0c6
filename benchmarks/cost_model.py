"""Cost model of an influence-map analysis, measured here, and a projection to BigGAN-deep.

    time ~= channels x pairs x downstream_FLOPs / (ranks x throughput)

``downstream_FLOPs`` is the work of one hybrid after the intervened layer (counted with
``torch.utils.flop_counter`` from the moment the layer has run to the output);
``throughput`` is the rate the influence computation actually achieves (GFLOP/s), measured
on the DCGAN faces with the prefix/suffix split (``algorithm="split"``: no linear shortcut, so
the counted downstream work is the work done). The script then builds BigGAN-deep-256 at
full width (random weights, no download), counts the downstream FLOPs of Gblock 7's
``conv_1`` (the paper's Fig. 5 setting), times a few hybrids of it here, and projects
the cost of all its channels for a number of pairs and ranks.

Run::

    PYTHONPATH=src python benchmarks/cost_model.py [--device cuda] [--pairs 64]

It prints ``COST`` lines (one per measured layer) and ``PROJECTION`` lines.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfmodules.hooks import resolve_layer
from cfmodules.influence import influence_maps


def downstream_flops(adapter, layer: str, z) -> float:
    """FLOPs of one forward of ``z`` counted from the end of ``layer`` to the output."""
    module = resolve_layer(adapter.generator, layer).module
    counter = FlopCounterMode(display=False)
    state = {"on": False}

    def start(m, i, o):
        if not state["on"]:
            counter.__enter__()
            state["on"] = True

    h = module.register_forward_hook(start)
    try:
        adapter.generate(z)
    finally:
        h.remove()
        if state["on"]:
            counter.__exit__(None, None, None)
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_dcgan(device: torch.device, pairs: int) -> list[float]:
    from cfmodules.zoo.dcgan import load_dcgan_faces

    ad = load_dcgan_faces(device=device)
    rates = []
    for layer in ("main.5", "main.8"):
        c = ad.layer_channels(layer)
        f = downstream_flops(ad, layer, ad.sample_latents(1))
        influence_maps(ad, layer, n_pairs=4, algorithm="split", progress=False)  # warm-up
        _sync(device)
        t = time.perf_counter()
        influence_maps(ad, layer, n_pairs=pairs, algorithm="split", progress=False)
        _sync(device)
        s = time.perf_counter() - t
        rate = c * pairs * f / s / 1e9
        rates.append(rate)
        print(f"COST model=dcgan-faces layer={layer} channels={c} pairs={pairs} "
              f"downstream_gflop={f / 1e9:.4f} seconds={s:.2f} throughput_gflops={rate:.1f}",
              flush=True)
    return rates


def project_biggan(device: torch.device, pairs: int, throughput: float,
                   ranks: list[int], timed_hybrids: int) -> None:
    from cfmodules.zoo.biggan import biggan_adapter, gblock_layers, random_biggan

    model = random_biggan(256, channel_width=128, device=device)
    ad = biggan_adapter(model, 0.4, None, device, name="biggan-deep-256-random")
    layer, _ = gblock_layers(model, 7)
    c = ad.layer_channels(layer)
    z = ad.sample_latents(1)
    f = downstream_flops(ad, layer, z)
    zb = ad.sample_latents(timed_hybrids, seed=1)
    ad.generate(ad.sample_latents(1, seed=2))  # warm-up
    _sync(device)
    t = time.perf_counter()
    ad.generate(zb)  # a full forward per hybrid is an upper bound of the suffix's time
    _sync(device)
    per_hybrid = (time.perf_counter() - t) / timed_hybrids
    here = f / per_hybrid / 1e9
    print(f"COST model=biggan-deep-256 layer={layer} channels={c} "
          f"downstream_gflop={f / 1e9:.2f} full_forward_s_per_hybrid={per_hybrid:.2f} "
          f"throughput_gflops>={here:.1f}", flush=True)
    for r in ranks:
        hours = c * pairs * f / (r * max(throughput, here) * 1e9) / 3600
        print(f"PROJECTION model=biggan-deep-256 layer={layer} channels={c} pairs={pairs} "
              f"ranks={r} throughput_gflops_per_rank={max(throughput, here):.1f} "
              f"hours={hours:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--ranks", default="1,8,64")
    ap.add_argument("--timed-hybrids", type=int, default=2)
    ap.add_argument("--skip-biggan", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()}", flush=True)
    with torch.inference_mode():
        rates = measure_dcgan(device, args.pairs)
        if not args.skip_biggan:
            project_biggan(device, args.pairs, max(rates),
                           [int(r) for r in args.ranks.split(",")], args.timed_hybrids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
