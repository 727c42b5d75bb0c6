"""Diffusion models: a generator whose forward is a sampling chain, and window hybrids.

- :mod:`~cfmodules.samplers.chain`: :class:`DiffusionAdapter` (a denoiser and the body
  of a sampling loop; the latent is the initial noise and, for a stochastic sampler, every
  step's noise), :func:`from_diffusers`, windows of steps;
- :mod:`~cfmodules.samplers.schedules`: one step of a diffusers ``DDIMScheduler`` or
  ``DDPMScheduler`` with the step's noise given;
- :mod:`~cfmodules.samplers.window`: hybrids over a window of steps (the paper's
  counterfactual at every step of the window), the fast path and the naive reference.

``hybridize``, ``influence_maps`` and ``analyze`` use it for a :class:`DiffusionAdapter`;
see ``docs/diffusion.md``.
"""

from cfmodules.samplers.chain import (
    WINDOWS,
    DiffusionAdapter,
    from_diffusers,
    is_diffusion,
    window_label,
    window_steps,
    windowed,
)
from cfmodules.samplers.schedules import DiffusersSchedule, StepFn, diffusers_schedule
from cfmodules.samplers.window import (
    NaiveWindowSwaps,
    WindowSwaps,
    naive_window_hybrids,
    plan_window_swaps,
    window_hybrids,
)

__all__ = ["WINDOWS", "DiffusionAdapter", "DiffusersSchedule", "NaiveWindowSwaps", "StepFn",
           "WindowSwaps", "diffusers_schedule", "from_diffusers", "is_diffusion",
           "naive_window_hybrids", "plan_window_swaps", "window_hybrids", "window_label",
           "window_steps", "windowed"]
