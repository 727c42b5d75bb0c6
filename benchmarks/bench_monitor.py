"""Overhead of the ModularityMonitor on BEGAN training (issue 17: <= 5% at the default interval).

Trains the generator of ``examples/train_began_olivetti.py`` (same sizes, 32x32, batch 16)
and, in the same process, alternates rounds of training steps with monitor checks at the
default settings, so that both see the same machine load. The overhead of checking every
``every`` steps is ``check time / (every x step time)``; it is reported for the default
interval and for the example's denser one, from wall-clock times and from CPU times
(``time.process_time``, all threads; steadier on a shared machine).

    flock /tmp/cfmodules-bench.lock env PYTHONPATH=src python benchmarks/bench_monitor.py

Prints ``RESULT bench_monitor ...`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfmodules.monitor import ModularityMonitor, MonitorSettings
from cfmodules.zoo import began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="training steps per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer", default="block16.elu2")
    p.add_argument("--every", type=int, nargs="*", default=[MonitorSettings().every, 100])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = began.BEGANGenerator(latent_dim=64, n_filters=32, image_size=32)
    d = began.BEGANDiscriminator(latent_dim=64, n_filters=16, image_size=32)
    trainer = began.BEGANTrainer(g, d, lr=2e-4)
    monitor = ModularityMonitor(began.adapter(g), args.layer)  # default settings
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    trainer.step(real, torch.randn(16, 64))  # warm-up
    monitor.check(0)
    step_wall, step_cpu, check_wall, check_cpu = [], [], [], []
    for r in range(args.rounds):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer.step(real, torch.randn(16, 64))
        step_wall.append((time.perf_counter() - w) / args.steps)
        step_cpu.append((time.process_time() - c) / args.steps)
        w, c = time.perf_counter(), time.process_time()
        monitor.check(r + 1)
        check_wall.append(time.perf_counter() - w)
        check_cpu.append(time.process_time() - c)
    sw, sc = statistics.median(step_wall), statistics.median(step_cpu)
    cw, cc = statistics.median(check_wall), statistics.median(check_cpu)
    print(f"RESULT bench_monitor layer={args.layer} threads={args.threads} "
          f"step_wall_s={sw:.3f} step_cpu_s={sc:.3f} check_wall_s={cw:.2f} "
          f"check_cpu_s={cc:.2f} n_pairs={monitor.checks[-1].n_pairs}")
    for every in args.every:
        print(f"RESULT bench_monitor every={every} overhead_wall={100 * cw / (every * sw):.2f}% "
              f"overhead_cpu={100 * cc / (every * sc):.2f}%")


if __name__ == "__main__":
    main()
