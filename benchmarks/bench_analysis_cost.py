"""Cost of an analysis: how its time grows with pairs, channels and resolution.

Measures, on this machine's CPU (or ``--device cuda``), the wall time of each step of
``cfmodules analyze``:

1. influence maps (EIMs) of the pretrained DCGAN faces, ``main.8``, for 8..64 pairs;
2. EIMs of three DCGAN layers (channels x spatial size of the layer differ);
3. EIMs of the planted conv generator, varying its channels at a fixed output resolution,
   then its output resolution at fixed channels (a controlled comparison);
4. the clustering (NMF, 10 restarts) and one repetition of the stability sweep over
   K = 2..6, for the maps of steps 2-3.

Each time is the best of several runs (the machine may be shared; a busy machine still
inflates single numbers, so compare rows of one table, measured together). Prints one
Markdown table per step, ready for docs/cost.md.

Then, side by side in this process, the whole default ``cfmodules analyze`` with the
reference clustering engine (``--backend sklearn --jobs 1``: scikit-learn in one process,
the implementation before the fast engine) and with the default one, each from scratch
(no checkpoint; imports warmed for both first, rounds alternating, best of ``--rounds``),
the sweep's statistics of both side by side, and ``cfmodules scan dcgan-faces`` over the
four conv stages. The output ends with::

    RESULT job=analyze speedup=...x ours_s=... reference_s=... same_k=True
    RESULT job=scan layers=4 scan_s=... reference_analyze_s=...

Run it alone on the machine (``flock /tmp/cfmodules-bench.lock ...``)::

    PYTHONPATH=src python benchmarks/bench_analysis_cost.py --threads 1 [--repeats 2] [--device cpu]
    PYTHONPATH=src python benchmarks/bench_analysis_cost.py --threads 1 --only-result
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from cfmodules import zoo
from cfmodules.influence import influence_maps
from cfmodules.modules import ModuleClustering, cluster_stability


def best(fn, repeats: int) -> tuple[float, object]:
    out, t_best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def eim(adapter, layer: str, pairs: int, repeats: int):
    return best(lambda: influence_maps(adapter, layer, n_pairs=pairs, seed=0, progress=False),
                repeats)


def clustering_cost(maps: np.ndarray, repeats: int) -> tuple[float, float]:
    # one BLAS thread, as cfmodules.analysis.analyze runs the clustering
    with threadpool_limits(limits=1, user_api="blas"):
        t_fit, _ = best(lambda: ModuleClustering(3, random_state=0).fit(maps), repeats)
        t_stab, _ = best(lambda: cluster_stability(maps, ks=range(2, 7), n_repeats=1), repeats)
    return t_fit, t_stab


def table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(flush=True)


def _analyze(out: Path, backend: str, extra: list[str]) -> float:
    from cfmodules import cli

    t = time.perf_counter()
    code = cli.main(["analyze", "--out", str(out), "--quiet", "--backend", backend, *extra])
    if code != 0:
        raise SystemExit(f"cfmodules analyze --backend {backend} failed ({code})")
    return time.perf_counter() - t


def _stop_workers() -> float:
    """Shut the clustering's worker processes down (a fresh ``cfmodules analyze`` starts
    them again); returns how long starting two of them and importing the engine takes."""
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    from cfmodules.modules import fits

    get_reusable_executor().shutdown(wait=True)
    t = time.perf_counter()
    Parallel(n_jobs=2, backend="loky")(delayed(fits.default_jobs)() for _ in range(2))
    start = time.perf_counter() - t
    get_reusable_executor().shutdown(wait=True)
    return start


def _compare_stability(ref, ours) -> float:
    """Print the sweep's statistics of both engines per method and K; the largest gap."""
    gap = 0.0
    print("stability, mean over splits: reference -> ours (difference)")
    for i, m in enumerate(ref.methods):
        for metric in ("consistency", "cosine"):
            a, b = ref.mean(metric)[i], ours.mean(metric)[i]
            gap = max(gap, float(np.abs(a - b).max()))
            cells = "  ".join(f"K={int(k)} {x:.3f}->{y:.3f} ({y - x:+.3f})"
                              for k, x, y in zip(ref.ks, a, b))
            print(f"  {m:6s} {metric:11s} {cells}")
    return gap


def side_by_side(rounds: int, threads: int | None) -> None:
    """The RESULT lines: default analyze, reference against ours; then the scan.

    Fair to both: every import and both engines are warmed by a tiny untimed analyze of
    each first; the engines then alternate, round by round, and each keeps its best time.
    The reference is today's engine as it ran before: scikit-learn, in one process
    (``--backend sklearn --jobs 1``). Ours is the default, whose clustering worker
    processes are shut down before each of its runs, so that it pays their start as a
    fresh ``cfmodules analyze`` would.
    """
    from cfmodules import cli
    from cfmodules.analysis import AnalysisResult

    extra = ["--threads", str(threads)] if threads is not None else []
    args = {"sklearn": ["--jobs", "1", *extra], "fast": extra}
    times: dict[str, list[float]] = {"sklearn": [], "fast": []}
    results: dict[str, AnalysisResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tiny = ["--pairs", "2", "--n-init", "2", "--stability-ks", "2-3", "--stability-repeats",
                "1", "--samples", "2", "--hybrids", "1"]
        for backend in ("sklearn", "fast"):
            _analyze(Path(tmp) / f"warm_{backend}", backend, [*tiny, *args[backend]])
        print(f"warm-up (imports, both engines): {time.perf_counter() - t:.1f} s", flush=True)
        for r in range(rounds):
            # alternate, so both engines see the same machine load
            for backend in ("sklearn", "fast") if r % 2 == 0 else ("fast", "sklearn"):
                if backend == "fast":
                    print(f"clustering workers: 2 start in {_stop_workers():.1f} s", flush=True)
                out = Path(tmp) / f"{backend}{r}"
                times[backend].append(_analyze(out, backend, args[backend]))
                results[backend] = AnalysisResult.load(out / "results.npz")
                steps = ", ".join(f"{k} {v:.1f}" for k, v in results[backend].timings.items())
                print(f"analyze --backend {backend}: {times[backend][-1]:.1f} s ({steps}), "
                      f"suggested K={results[backend].suggested_k()}, load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        gap = _compare_stability(results["sklearn"].stability, results["fast"].stability)
        print(f"largest difference of the sweep's statistics: {gap:.4f}")
        t = time.perf_counter()
        code = cli.main(["scan", "dcgan-faces", "--layers", "main.2,main.5,main.8,main.11",
                         "--out", str(Path(tmp) / "scan"), "--quiet", *extra])
        scan_s = time.perf_counter() - t
        if code != 0:
            raise SystemExit(f"cfmodules scan failed ({code})")
    ours, ref = min(times["fast"]), min(times["sklearn"])
    same_k = results["fast"].suggested_k() == results["sklearn"].suggested_k()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"RESULT job=analyze speedup={ref / ours:.1f}x ours_s={ours:.1f} "
          f"reference_s={ref:.1f} same_k={same_k}")
    print(f"RESULT job=scan layers=4 scan_s={scan_s:.1f} reference_analyze_s={ref:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="runs per DCGAN measurement")
    p.add_argument("--repeats-small", type=int, default=5,
                   help="runs per planted-conv measurement (they take under a second)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only-result", action="store_true",
                   help="skip the tables, measure only the RESULT lines")
    p.add_argument("--rounds", type=int, default=2,
                   help="analyze runs per engine for the RESULT line, alternating (best is "
                        "kept; default 2)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    if args.only_result:
        side_by_side(args.rounds, args.threads)
        return

    dcgan = zoo.load("dcgan-faces", device=args.device)
    rows = []
    for pairs in (8, 16, 32, 64):
        t, _ = eim(dcgan, "main.8", pairs, args.repeats)
        rows.append([str(pairs), f"{t:.1f}", f"{1000 * t / (pairs * 128):.2f}"])
    print("EIMs of dcgan-faces main.8 (128 channels, 16x16) against pairs")
    table(["pairs", "seconds", "ms per hybrid"], rows)

    rows, saved = [], {}
    for layer in ("main.5", "main.8", "main.11"):
        info = next(i for i in dcgan.layers() if i.name == layer)
        t, res = eim(dcgan, layer, 32, args.repeats)
        saved[layer] = res.maps
        tf, ts = clustering_cost(res.maps, 1)
        rows.append([layer, "x".join(map(str, info.shape)), f"{t:.1f}",
                     f"{1000 * t / (32 * info.channels):.2f}", f"{tf:.1f}", f"{ts:.1f}"])
    print("dcgan-faces layers, 32 pairs (maps at 64x64)")
    table(["layer", "C x H x W", "EIM s", "ms per hybrid", "NMF fit s", "stability s/repeat"],
          rows)

    rows = []
    for c in (8, 16, 32, 64):
        ad = zoo.load("planted-conv", device=args.device, channels_per_module=c,
                      image_size=32)
        t, res = eim(ad, ad.generator.layer, 16, args.repeats_small)
        tf, ts = clustering_cost(res.maps, args.repeats_small)
        rows.append([str(3 * c), f"{t:.2f}", f"{tf:.2f}", f"{ts:.2f}"])
    print("planted-conv, output 32x32, 16 pairs: channels of the layer")
    table(["channels", "EIM s", "NMF fit s", "stability s/repeat"], rows)

    rows = []
    for size in (16, 32, 64, 128):
        ad = zoo.load("planted-conv", device=args.device, channels_per_module=16,
                      image_size=size)
        t, res = eim(ad, ad.generator.layer, 16, args.repeats_small)
        tf, ts = clustering_cost(res.maps, 2)
        rows.append([f"{size}x{size}", f"{t:.2f}", f"{tf:.2f}", f"{ts:.2f}"])
    print("planted-conv, 48 channels of the last hidden layer, 16 pairs: output resolution")
    table(["output", "EIM s", "NMF fit s", "stability s/repeat"], rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    side_by_side(args.rounds, args.threads)


if __name__ == "__main__":
    main()
