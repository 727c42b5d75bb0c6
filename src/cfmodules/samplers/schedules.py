"""One denoising step of a diffusers scheduler, with the step's noise given, not drawn.

A counterfactual chain must be a function of its latent: the initial noise and, for a
stochastic sampler, every step's noise, all drawn from the sample's seed. diffusers'
``DDIMScheduler.step`` takes that noise (``variance_noise``); ``DDPMScheduler.step`` draws
it itself, so its update is written out here, line for line as in diffusers (tested
against it). Only schedulers whose ``step`` is a function of ``(t, x_t, model output)``
alone are accepted: a multistep solver (DPM-Solver, PNDM) keeps earlier outputs in its
state, so a chain restarted at step ``k`` would not be the same chain.

``diffusers`` is imported only by the caller that hands a scheduler in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cfmodules import checks
from cfmodules.errors import ConfigError

__all__ = ["StepFn", "DiffusersSchedule", "diffusers_schedule"]

StepFn = Callable[[nn.Module, int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``step(denoiser, k, x, noise) -> x_next``: step ``k`` (0 = the first, noisiest) of a
sampling chain. ``noise`` is that step's noise ``(N, *sample_shape)`` for a stochastic
sampler, else None."""

_KINDS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}


@dataclass(frozen=True)
class DiffusersSchedule:
    """A diffusers scheduler set to ``num_inference_steps``, as a :data:`StepFn`.

    Attributes
    ----------
    kind : {"ddim", "ddpm"}
    timesteps : tuple of int
        The model's timestep at each sampling step, in sampling order.
    eta : float
        DDIM's noise weight (0: deterministic); 1 for DDPM (ancestral sampling).
    config : dict
        The scheduler's config (``beta_schedule``, ``prediction_type``, ``clip_sample``...).
    """

    kind: str
    timesteps: tuple[int, ...]
    eta: float
    config: dict[str, Any]
    scheduler: Any

    @property
    def stochastic(self) -> bool:
        """Whether each step adds noise (which is then part of the latent)."""
        return self.eta > 0

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    def settings(self) -> dict[str, Any]:
        """JSON-able description: kind, steps, timesteps, eta and the scheduler's config."""
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()
               if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple,
                                                           type(None)))}
        return {"scheduler": self.kind, "n_steps": self.n_steps,
                "timesteps": list(self.timesteps), "eta": self.eta, "config": cfg}

    def __call__(self, denoiser: nn.Module, k: int, x: torch.Tensor,
                 noise: torch.Tensor | None) -> torch.Tensor:
        t = self.timesteps[k]
        out = denoiser(x, t)
        out = getattr(out, "sample", out)  # diffusers' UNet2DOutput, or a plain tensor
        if self.kind == "ddim":
            return self.scheduler.step(out, t, x, eta=self.eta,
                                       variance_noise=noise if self.eta > 0 else None).prev_sample
        return _ddpm_step(self.scheduler, out, t, x, noise)


def _ddpm_step(sched: Any, out: torch.Tensor, t: int, x: torch.Tensor,
               noise: torch.Tensor | None) -> torch.Tensor:
    """``DDPMScheduler.step`` with the noise given (diffusers 0.3x, same order of operations)."""
    prev_t = int(sched.previous_timestep(t))
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_a = a_t / a_prev
    cur_b = 1 - cur_a
    pt = sched.config.prediction_type
    if pt == "epsilon":
        x0 = (x - b_t ** 0.5 * out) / a_t ** 0.5
    elif pt == "sample":
        x0 = out
    else:  # v_prediction (checked when the schedule is made)
        x0 = (a_t ** 0.5) * x - (b_t ** 0.5) * out
    if sched.config.thresholding:
        x0 = sched._threshold_sample(x0)
    elif sched.config.clip_sample:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    mean = (a_prev ** 0.5 * cur_b) / b_t * x0 + cur_a ** 0.5 * b_prev / b_t * x
    if t > 0:
        assert noise is not None
        mean = mean + (sched._get_variance(t) ** 0.5) * noise
    return mean


def diffusers_schedule(scheduler: Any, num_inference_steps: int, eta: float | None = None
                       ) -> DiffusersSchedule:
    """A :class:`DiffusersSchedule` from a diffusers ``DDIMScheduler`` or ``DDPMScheduler``.

    The scheduler is copied (yours is not changed) and set to ``num_inference_steps``.

    Parameters
    ----------
    scheduler : diffusers.DDIMScheduler or diffusers.DDPMScheduler
    num_inference_steps : int
    eta : float, optional
        DDIM only: 0 (default) is deterministic; ``eta > 0`` adds noise at every step.
        DDPM is always stochastic (eta 1).

    Raises
    ------
    ConfigError
        Another scheduler (a multistep solver keeps state between steps), a variance type
        other than ``fixed_small``/``fixed_large``, or a bad step count or eta.
    """
    name = type(scheduler).__name__
    if name not in _KINDS:
        raise ConfigError(
            f"{name} is not supported: a window hybrid restarts the chain at any step, so each "
            "step must depend only on (t, x_t, model output). Use DDIMScheduler (eta 0: "
            "deterministic) or DDPMScheduler with the same config, or write the step "
            "yourself (DiffusionAdapter(step=...)).")
    kind = _KINDS[name]
    n = checks.positive_int(num_inference_steps, "num_inference_steps")
    cfg = dict(scheduler.config)
    if n > cfg["num_train_timesteps"]:
        raise ConfigError(f"num_inference_steps={n} is more than the scheduler's "
                          f"num_train_timesteps={cfg['num_train_timesteps']}.")
    if kind == "ddpm":
        if eta not in (None, 1, 1.0):
            raise ConfigError(f"DDPMScheduler samples with eta 1; got eta={eta}. Use "
                              "DDIMScheduler for another eta.")
        if cfg.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_large"):
            raise ConfigError(f"DDPMScheduler variance_type={cfg['variance_type']!r} is not "
                              "supported; use 'fixed_small' or 'fixed_large'.")
        eta = 1.0
    else:
        eta = 0.0 if eta is None else checks.real(eta, "eta", low=0)
        if eta > 1:
            raise ConfigError(f"eta must be in [0, 1], got {eta}.")
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise ConfigError(f"prediction_type={cfg['prediction_type']!r} is not supported.")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(n)
    timesteps = tuple(int(t) for t in sched.timesteps)
    return DiffusersSchedule(kind=kind, timesteps=timesteps, eta=float(eta), config=cfg,
                             scheduler=sched)
