"""Benchmark: one explorer request renders the 8 hybrids of the DCGAN faces (budget 150 ms).

The request is ``POST /api/hybrids`` through Flask's test client, so it includes the JSON
parsing, the checks, the suffix of the generator after the layer (the prefixes of the 8
pairs are cached after the first request of a pair block), the display conversion and
the 8 PNG encodings; only the network is left out. The selection is module 0 of the
analysis (about half the channels of ``main.8``). For each thread setting the request
runs ``--repeats`` times, alternating with the baseline, and the median and the best
are reported. The baseline, in the same process: :func:`cfmodules.hybridize` of the same
pairs (two full forwards plus one hybrid forward, PyTorch's own layers), i.e. what a
server without the cached prefix and the engine's fast suffix would do.

Besides wall-clock time (``median_ms``), the CPU time of the process per request
(``cpu_median_ms``, ``time.process_time``) is reported: on a shared machine whose load is
far above its core count the wall time measures the other processes, while the CPU time
of a one-thread request is what it takes on an otherwise idle core.

Run (under the benchmark lock, as every timing on the shared machine)::

    flock /tmp/cfmodules-bench.lock env PYTHONPATH=src python benchmarks/bench_explorer.py \
        [--results out/results.npz] [--repeats 30]

Without ``--results`` a small analysis of ``dcgan-faces`` (8 pairs) is made first. Ends with::

    RESULT explorer_hybrids threads=1 median_ms=... best_ms=... cold_ms=... budget_ms=150 ...
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfmodules.analysis import AnalysisResult, analyze
from cfmodules.explorer import Explorer, create_app
from cfmodules.hybrid import hybridize
from cfmodules.latents import pair_latents
from cfmodules.zoo.dcgan import load_dcgan_faces

BUDGET_MS = 150.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", help="results.npz of cfmodules analyze on dcgan-faces")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", default="1,2", help="thread settings of the request (1,2)")
    args = p.parse_args()
    torch.set_num_threads(2)  # the budget is for 2 CPU cores
    adapter = load_dcgan_faces(device="cpu")
    if args.results:
        result = AnalysisResult.load(args.results)
    else:
        result = analyze(adapter, n_pairs=8, stability_ks=(), n_init=1, n_hybrids=1,
                         n_samples=1, progress=False)
    selection = result.modules[0]
    n_sel = sum(len(c) for c in selection.values())
    z1, z2 = pair_latents(adapter, 8, result.settings.seed + 1, 0)

    def baseline() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hybridize(adapter, z1, z2, selection)
        return 1000 * (time.perf_counter() - t)

    lines = []
    for threads in (int(t) for t in args.threads.split(",")):
        explorer = Explorer(result, adapter, threads=threads)
        client = create_app(explorer).test_client()
        body = {"selection": selection, "start": 0}

        cpu: list[float] = []

        def request(client=client, body=body, cpu=cpu) -> float:  # noqa: ANN001
            t, c = time.perf_counter(), time.process_time()
            resp = client.post("/api/hybrids", json=body)
            ms = 1000 * (time.perf_counter() - t)
            cpu.append(1000 * (time.process_time() - c))
            assert resp.status_code == 200 and len(resp.get_json()["hybrids"]) == 8
            return ms

        cold = request()  # first request of the pair block: prefixes and originals
        cpu.clear()
        ours, base = [], []
        for _ in range(args.repeats):
            ours.append(request())
            base.append(baseline())
        med, best = statistics.median(ours), min(ours)
        lines.append(
            f"RESULT explorer_hybrids threads={threads} median_ms={med:.1f} best_ms={best:.1f} "
            f"cpu_median_ms={statistics.median(cpu):.1f} "
            f"cold_ms={cold:.1f} budget_ms={BUDGET_MS:.0f} within_budget={med <= BUDGET_MS} "
            f"hybridize_median_ms={statistics.median(base):.1f} "
            f"speedup={statistics.median(base) / med:.1f}x pairs=8 channels={n_sel} "
            f"layer={','.join(result.layers)}")
        print(lines[-1], flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"(load average {load} on {len(__import__('os').sched_getaffinity(0))} cores)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
