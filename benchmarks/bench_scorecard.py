"""Time of the default module scorecard on the DCGAN faces (issue 24: <= 30 s on 2 cores).

The modules are the K=3 modules of the default ``cfmodules analyze`` (layer ``main.8``,
64 pairs; the stability sweep, which does not change the modules, is skipped), or those of
a ``results.npz`` given with ``--results``. The scorecard runs as ``cfmodules score`` runs it
by default (32 pairs, 100 random groups per module, 1000 bootstrap resamples, face part
masks from the landmark model when it is installed, no classifier; ``--fer`` adds the
expression classifier) ``--repeats`` times; the median is printed::

    RESULT model=dcgan-faces modules=3 null_groups=300 seconds=...

with ``null_groups`` the random groups evaluated (modules of the same size share theirs).
The process's CPU seconds and the machine's load average are printed too: on a shared
machine the wall time grows with the load, the CPU time much less. Also printed: the baseline of the
same hybrids computed one module at a time by :func:`cfmodules.hybridize` (the naive path),
timed on the first 10 null groups of each module and scaled, when ``--baseline`` is given.

    PYTHONPATH=src python benchmarks/bench_scorecard.py --threads 2 [--repeats 3] [--fer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=None, help="results.npz of cfmodules analyze")
    ap.add_argument("--fer", action="store_true", help="score the fer classifier's outputs too")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the naive path (hybridize per group) on a sample")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cfmodules import zoo
    from cfmodules.analysis import AnalysisResult, analyze
    from cfmodules.evaluation.scorecard import null_groups, scorecard

    adapter = zoo.load("dcgan-faces")
    if args.results:
        result = AnalysisResult.load(args.results)
    else:
        t = time.perf_counter()
        result = analyze(adapter, stability_ks=(), progress=False)
        print(f"analysis (no sweep): {time.perf_counter() - t:.1f} s")
    times, cpu = [], []
    for r in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        clf = None
        if args.fer:
            from cfmodules.evaluation.fer import load_fer_classifier

            clf = load_fer_classifier()
        sc = scorecard(result, adapter=adapter, masks="auto", classifier=clf)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        print(f"repeat {r}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU, load average "
              f"{os.getloadavg()[0]:.1f}")
    print(sc.to_text())
    n_groups = sc.info["null_groups"]  # distinct random groups (same-size modules share)
    if args.baseline:
        from cfmodules import latents as L
        from cfmodules.hybrid import hybridize

        groups = null_groups(adapter, dict(zip(sc.modules, result.modules)),
                             sc.n_null, sc.info["seed"])
        z1, z2 = L.pair_latents(adapter, sc.info["n_pairs"], sc.info["seed"], sc.info["start"])
        sample = [g for gs in groups.values() for g in gs[:10]]
        t = time.perf_counter()
        with torch.inference_mode():
            for g in sample:
                hybridize(adapter, z1, z2, g)
        naive = (time.perf_counter() - t) * (n_groups + len(sc.modules)) / len(sample)
        print(f"naive hybridize, scaled from {len(sample)} groups: {naive:.1f} s "
              f"(hybrids only; scorecard median {statistics.median(times):.1f} s, "
              f"ratio {naive / statistics.median(times):.2f}x)")
    print(f"masks: {sc.info['masks']}; CPU seconds (median) {statistics.median(cpu):.2f} on "
          f"{args.threads} thread(s); cores {os.cpu_count()}")
    print(f"RESULT model={adapter.name} modules={len(sc.modules)} null_groups={n_groups} "
          f"seconds={statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
