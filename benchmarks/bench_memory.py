"""Benchmark: does ``max_memory`` hold? Peak memory of influence runs against their budget.

Every case runs in a fresh Python process (so no memory freed by an earlier run is
reused): it loads the model, computes its layer shapes and one image (so the weights and
what any use of the model costs are in the baseline), resets the kernel's high-water mark
of the process's resident memory (``/proc/self/clear_refs``), runs ``influence_maps`` with
the budget, and reports ``VmHWM - baseline``: the peak resident memory the run added,
sampled by the kernel itself (``tracemalloc`` does not see torch's allocations). The
maps are compared with the same run without a budget (its own fresh process, default
``max_memory``: half of the available memory).

Cases: the pretrained DCGAN faces at ``main.8`` (64 pairs) and BigGAN-deep with random
weights at 128 px (``biggan-deep-random``, the zoo's channel width 4) at
``generator.layers.3`` and ``generator.layers.6`` (8 pairs), each at 256 MB and 1 GB
(powers of 1000). It ends with one line per case::

    RESULT model=dcgan-faces layer=main.8 budget_mb=256 peak_mb=83.1 unbounded_peak_mb=... weights_mb=14.2 ok=True max_abs_diff=0.0e+00 rows=... pairs_per_prefix=... seconds=...

``ok``: ``peak_mb <= 1.1 x budget_mb`` (the budget excludes the model's weights, which
are loaded before the baseline). Linux only (``/proc``).

Run::

    PYTHONPATH=src python benchmarks/bench_memory.py [--threads 1] [--budgets 256MB 1GB]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

CASES = [("dcgan-faces", "main.8", 64), ("biggan-deep-random", "generator.layers.3", 8),
         ("biggan-deep-random", "generator.layers.6", 8)]


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, bytes."""
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def child(model: str, layer: str, pairs: int, budget: str | None, out: str) -> None:
    """One case in this (fresh) process: writes the maps and the figures to ``out``."""
    import numpy as np
    import torch

    from cfmodules import zoo
    from cfmodules.influence import influence_maps

    adapter = zoo.load(model)
    weights = sum(t.numel() * t.element_size()
                  for t in [*adapter.generator.parameters(), *adapter.generator.buffers()])
    adapter.layers_cached()
    with torch.inference_mode():
        adapter.generate(adapter.sample_latents(1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status("VmRSS")
    t = time.perf_counter()
    res = influence_maps(adapter, layer, n_pairs=pairs, progress=False, max_memory=budget)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM") - base
    np.save(out + ".npy", res.maps)
    with open(out + ".json", "w") as f:
        json.dump({"peak": peak, "weights": weights, "seconds": seconds,
                   "memory": res.settings["memory"]}, f)


def _run_case(model: str, layer: str, pairs: int, budget: str | None, threads: int,
              tmp: str) -> tuple[dict, object]:
    import numpy as np

    out = os.path.join(tmp, f"{model}-{layer}-{budget}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", model, layer, str(pairs), budget or "none", out]
    subprocess.run(cmd, check=True, env=env)
    with open(out + ".json") as f:
        info = json.load(f)
    return info, np.load(out + ".npy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", nargs="+", default=["256MB", "1GB"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, layer, pairs, budget, out = args.child
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        child(model, layer, int(pairs), None if budget == "none" else budget, out)
        return 0
    from cfmodules.influence import parse_memory

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, layer, pairs in CASES:
            ref_info, ref = _run_case(model, layer, pairs, None, args.threads, tmp)
            print(f"{model} {layer}: unbounded peak {ref_info['peak'] / 1e6:.1f} MB "
                  f"({ref_info['memory']['rows_per_call']} hybrids per call), "
                  f"{ref_info['seconds']:.1f} s", flush=True)
            for budget in args.budgets:
                info, maps = _run_case(model, layer, pairs, budget, args.threads, tmp)
                budget_mb = parse_memory(budget) / 1e6
                peak_mb = info["peak"] / 1e6
                diff = float(abs(maps.astype("float64") - ref).max())
                m = info["memory"]
                line = (f"RESULT model={model} layer={layer} budget_mb={budget_mb:.0f} "
                        f"peak_mb={peak_mb:.1f} unbounded_peak_mb={ref_info['peak'] / 1e6:.1f} "
                        f"weights_mb={info['weights'] / 1e6:.1f} "
                        f"ok={peak_mb <= 1.1 * budget_mb} max_abs_diff={diff:.1e} "
                        f"rows={m['rows_per_call']} pairs_per_prefix={m['pairs_per_prefix']} "
                        f"estimate_mb={m['estimate_bytes'] / 1e6:.1f} "
                        f"seconds={info['seconds']:.1f} load={os.getloadavg()[0]:.1f}")
                print(line, flush=True)
                lines.append(line)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
