"""Window hybrids of a diffusion model: the shared chain against the naive chain per channel.

For each window (all, early, middle, late) the influence maps of ``--units`` channels of
the ddpm-faces UNet over ``--pairs`` pairs are computed twice in this process:

- naive (``algorithm="hook"``): for every channel, Original 2's whole chain with a
  recording hook, then Original 1's whole chain with a replacing hook
  (:func:`cfmodules.samplers.naive_window_hybrids`);
- ours (``algorithm="auto"``, :class:`cfmodules.samplers.WindowSwaps`): per block of pairs
  Original 1's chain once (its state at the window's first step shared by every hybrid)
  and Original 2's once; each hybrid runs only the steps from the window's first step,
  all channels x pairs in one batch.

``limit`` is the ratio of UNet evaluations (per sample) of the two: naive
``S (1 + 2U)`` against ours ``2 S + U (S - k0)`` for ``S`` steps, ``U`` channels and the
window's first step ``k0``: the speedup at equal cost per evaluation. Ours also batches
``U x P`` hybrids per call where the naive way runs ``P``, and replays part of the first
swapped step, so the measured speedup can exceed it.
``max_rel_diff`` is ``max |ours - naive| / max |naive|`` over the maps. Times are medians
of ``--repeats`` runs, alternating the two.

    PYTHONPATH=src python benchmarks/bench_diffusion.py

Uses the shipped ddpm-faces weights when present, else the same architecture with random
weights (the cost does not depend on the weights; it says which).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cfmodules.errors import ModelNotAvailableError
from cfmodules.influence import influence_maps
from cfmodules.samplers import from_diffusers, window_steps
from cfmodules.zoo import ddpm_faces


def adapter(steps: int):
    try:
        return ddpm_faces.load(steps=steps), "ddpm-faces (trained weights)"
    except ModelNotAvailableError:
        from diffusers import DDIMScheduler

        torch.manual_seed(0)
        unet = ddpm_faces.build_unet().eval()
        return (from_diffusers(unet, DDIMScheduler(**ddpm_faces.SCHEDULER_CONFIG), steps),
                "ddpm-faces architecture, random weights")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=ddpm_faces.DEFAULT_STEPS)
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer", default=ddpm_faces.DEFAULT_LAYER)
    p.add_argument("--windows", default="all,early,middle,late")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ad, what = adapter(args.steps)
    print(f"# {what}; layer {args.layer}; DDIM {args.steps} steps; {args.units} channels x "
          f"{args.pairs} pairs; {args.threads} thread(s); medians of {args.repeats}")
    ad.generate(ad.sample_latents(2))  # first-use check and warm-up outside the timings
    s, u = args.steps, args.units
    kw = dict(n_pairs=args.pairs, pairs_per_block=args.pairs, progress=False)
    for window in args.windows.split(","):
        k0 = window_steps(window, s)[0]
        times: dict[str, list[float]] = {"hook": [], "auto": []}
        maps: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for algorithm in ("hook", "auto"):
                t = time.perf_counter()
                res = influence_maps(ad, args.layer, range(u), step_window=window,
                                     algorithm=algorithm, **kw)
                times[algorithm].append(time.perf_counter() - t)
                maps[algorithm] = res.maps
        naive, ours = (statistics.median(times[a]) for a in ("hook", "auto"))
        limit = s * (1 + 2 * u) / (2 * s + u * (s - k0))
        rel = float(np.abs(maps["auto"] - maps["hook"]).max() / np.abs(maps["hook"]).max())
        print(f"# {window}: swaps at steps {list(window_steps(window, s))}, hybrids run steps "
              f"{k0}..{s - 1}; naive {naive:.2f} s, ours {ours:.2f} s")
        print(f"RESULT case={window} speedup={naive / ours:.2f}x limit={limit:.2f}x "
              f"max_rel_diff={rel:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
