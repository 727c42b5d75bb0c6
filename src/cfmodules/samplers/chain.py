"""A generator whose forward is a sampling chain: :class:`DiffusionAdapter`.

A diffusion model is not one forward from a latent to an image but a chain of ``S``
denoising steps, ``x_0 = z``, ``x_{k+1} = step(denoiser, k, x_k, noise_k)``, the image
being ``x_S``. The adapter's generator is the *denoiser* (a layer such as
``"down_blocks.2"`` is a layer of the denoiser, run once per step); its forward is the
whole chain. The latent of a sample is its initial noise ``x_0`` and, for a stochastic
sampler, every step's noise ``(S, *sample_shape)``: both are drawn from the sample's seed
(:mod:`cfmodules.latents`), so sample ``i`` depends on ``(seed, i)`` only, whatever the
batch, and a hybrid sees exactly Original 1's noise.

A *window* is the set of steps at which a hybrid swaps channels
(:mod:`cfmodules.samplers.window`): ``"all"``, the thirds ``"early"``, ``"middle"`` and
``"late"``, or a list of step indices (0 = the first, noisiest step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from cfmodules import checks
from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError
from cfmodules.layers import LayerInfo
from cfmodules.samplers.schedules import StepFn, diffusers_schedule

__all__ = ["DiffusionAdapter", "WINDOWS", "window_steps", "window_label", "is_diffusion",
           "from_diffusers", "windowed"]

WINDOWS = ("all", "early", "middle", "late")
"""Named windows: every step, and the first, middle and last third of the steps."""


def window_steps(window: Any, n_steps: int) -> tuple[int, ...]:
    """The step indices of ``window`` in a chain of ``n_steps`` steps, sorted.

    ``None`` or ``"all"``: every step; ``"early"``, ``"middle"``, ``"late"``: the thirds
    (``numpy.array_split`` of the steps: the first thirds get the extra step); a list or
    range of step indices in ``[0, n_steps)``.

    Raises
    ------
    ConfigError
        An unknown name, an empty window, a step outside the schedule, a repeated step.
    """
    if window is None or (isinstance(window, str) and window == "all"):
        return tuple(range(n_steps))
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ConfigError(f"Unknown window {window!r}: use one of {WINDOWS} or a list of "
                              f"step indices in 0..{n_steps - 1}.")
        part = np.array_split(np.arange(n_steps), 3)[WINDOWS.index(window) - 1]
        if len(part) == 0:
            raise ConfigError(f"The window {window!r} of a {n_steps}-step chain is empty; "
                              "use at least 3 steps or list the steps.")
        return tuple(int(k) for k in part)
    if isinstance(window, torch.Tensor):
        window = window.tolist()
    if not isinstance(window, Iterable):
        raise ConfigError(f"A window is 'all', 'early', 'middle', 'late' or a list of step "
                          f"indices, got {window!r}.")
    steps = list(window)
    if not steps:
        raise ConfigError("The window is empty: give at least one step index (or 'all').")
    out = []
    for k in steps:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise ConfigError(f"Window steps are integers, got {k!r}.")
        if not 0 <= int(k) < n_steps:
            raise ConfigError(
                f"Step {int(k)} is outside the schedule: this sampler runs {n_steps} steps, "
                f"numbered 0 (the first, noisiest) to {n_steps - 1}.")
        out.append(int(k))
    if len(set(out)) != len(out):
        raise ConfigError(f"The window lists a step more than once: {steps}.")
    return tuple(sorted(out))


def window_label(steps: Sequence[int], n_steps: int) -> str:
    """``"all"``, ``"early"``, ``"middle"``, ``"late"`` or ``"steps 3-5,9"`` for display."""
    for name in WINDOWS:
        try:
            if tuple(steps) == window_steps(name, n_steps):
                return name
        except ConfigError:
            continue
    runs: list[str] = []
    start = prev = steps[0]
    for k in [*steps[1:], None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return "steps " + ",".join(runs)


def is_diffusion(adapter: object) -> bool:
    """Whether ``adapter`` is a :class:`DiffusionAdapter` (its hybrids are window hybrids)."""
    return isinstance(adapter, DiffusionAdapter)


def windowed(adapter: GeneratorAdapter, window: Any) -> GeneratorAdapter:
    """``adapter.with_window(window)``; ``adapter`` itself for ``window=None``.

    Raises
    ------
    ConfigError
        A window for a generator that is not a :class:`DiffusionAdapter`, or a bad window.
    """
    if window is None:
        return adapter
    if not is_diffusion(adapter):
        raise ConfigError(
            f"step_window= is for diffusion models (a DiffusionAdapter, whose forward is a "
            f"sampling chain); {adapter.name} runs in one forward. Leave step_window out.")
    return adapter.with_window(window)  # type: ignore[attr-defined]


class DiffusionAdapter(GeneratorAdapter):
    """A generator whose forward is a sampling loop around a denoiser.

    Parameters
    ----------
    denoiser : nn.Module
        The network called at every step (e.g. a diffusers ``UNet2DModel``); its layers
        are the ones analysed.
    sample_shape : tuple of int
        Per-sample shape of ``x``, e.g. ``(1, 32, 32)``.
    step : callable
        ``step(denoiser, k, x, noise) -> x_next`` (:data:`~cfmodules.samplers.schedules.StepFn`),
        the body of your sampling loop at step ``k``; must be a function of its arguments
        (no random draws: the noise is given). :func:`from_diffusers` makes one from a
        diffusers scheduler.
    n_steps : int
        Steps of the chain.
    stochastic : bool, default False
        Whether ``step`` uses noise; the latent is then ``(x_0, noises)`` with
        ``noises (N, n_steps, *sample_shape)``, else just ``x_0``.
    window : "all", "early", "middle", "late" or list of int, default "all"
        The steps at which hybrids swap channels (see :meth:`with_window`).
    sampler_settings : dict, optional
        A JSON-able description of the sampler (scheduler, timesteps, eta...), recorded in
        results and in checkpoint identities; give one for your own ``step``.
    output_transform, output_range, device, name
        As for :class:`~cfmodules.GeneratorAdapter`; ``output_range`` defaults to (-1, 1).
    """

    def __init__(self, denoiser: nn.Module, sample_shape: Sequence[int], step: StepFn,
                 n_steps: int, *, stochastic: bool = False, window: Any = "all",
                 sampler_settings: dict[str, Any] | None = None,
                 output_transform: Callable[[Any], torch.Tensor] | None = None,
                 output_range: tuple[float, float] = (-1.0, 1.0),
                 device: str | torch.device | None = None, name: str | None = None):
        n_steps = checks.positive_int(n_steps, "n_steps")
        shape = L.latent_shapes(sample_shape)
        if len(shape) != 1:
            raise ConfigError(f"sample_shape is the shape of one x, e.g. (1, 32, 32); got "
                              f"{sample_shape!r}.")
        if not callable(step):
            raise ConfigError(f"step must be a callable step(denoiser, k, x, noise), got "
                              f"{type(step).__name__}.")
        self.sample_shape = shape[0]
        self.n_steps = n_steps
        self.stochastic = bool(stochastic)
        self.step = step
        self.sampler_settings = dict(sampler_settings or {"step": getattr(
            step, "__qualname__", type(step).__name__), "n_steps": n_steps})
        latent = (self.sample_shape, (n_steps, *self.sample_shape)) if stochastic \
            else self.sample_shape
        super().__init__(denoiser, latent, prior="normal", output_transform=output_transform,
                         output_range=output_range, device=device, name=name)
        self.window = window_steps(window, n_steps)

    # ------------------------------------------------------------------ the window
    @property
    def window_name(self) -> str:
        """The window for display: ``"all"``, ``"late"``, ``"steps 3-5"``..."""
        return window_label(self.window, self.n_steps)

    def with_window(self, window: Any) -> DiffusionAdapter:
        """This adapter with another window (same denoiser, sampler and caches).

        Hybrids, influence maps and analyses of the returned adapter swap channels at the
        window's steps only; images of single samples do not depend on the window.
        """
        steps = window_steps(window, self.n_steps)
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._sessions = []
        other.window = steps
        return other

    def identity(self) -> dict[str, Any]:
        """The sampler's settings and the window, for results and checkpoint identities."""
        return {**self.sampler_settings, "stochastic": self.stochastic,
                "window": list(self.window)}

    # ------------------------------------------------------------------ the chain
    def initial(self, z: L.Latent) -> torch.Tensor:
        """``x_0`` of a latent batch."""
        return z[0] if isinstance(z, tuple) else z

    def noise_at(self, z: L.Latent, k: int) -> torch.Tensor | None:
        """Step ``k``'s noise of a latent batch (None for a deterministic sampler)."""
        return z[1][:, k] if isinstance(z, tuple) else None

    def run_steps(self, z: L.Latent, x: torch.Tensor, start: int = 0, stop: int | None = None,
                  around: Callable[[int], AbstractContextManager[Any]] | None = None) -> torch.Tensor:
        """Run steps ``start .. stop - 1`` from ``x`` (``x_start``), each inside ``around(k)``."""
        stop = self.n_steps if stop is None else stop
        for k in range(start, stop):
            with around(k) if around is not None else nullcontext():
                x = self.step(self.generator, k, x, self.noise_at(z, k))
        return x

    def forward_fn(self, generator: nn.Module, z: L.Latent) -> torch.Tensor:  # type: ignore[override]
        """The whole chain from ``x_0``: the raw output is ``x_S``."""
        return self.run_steps(z, self.initial(z))

    def layers(self) -> list[LayerInfo]:
        """The denoiser's layers, as one forward (the whole chain) sees them, per step.

        ``calls`` counts the calls of one step where a layer runs the same number of times
        at every step (1 for a layer a window hybrid can swap); else the chain's total.
        """
        per_chain = super().layers()
        out = []
        for info in per_chain:
            if info.calls % self.n_steps == 0:
                per_step = info.calls // self.n_steps
                info = dataclasses.replace(info, calls=per_step,
                                           call_shapes=info.call_shapes[:per_step])
            out.append(info)
        return out

    def __repr__(self) -> str:
        return (f"DiffusionAdapter({self.name}, {self.n_steps} steps, sample_shape="
                f"{self.sample_shape}, stochastic={self.stochastic}, window={self.window_name}, "
                f"device={self.device})")


def from_diffusers(unet: nn.Module, scheduler: Any, num_inference_steps: int = 25, *,
                   eta: float | None = None, window: Any = "all", name: str | None = None,
                   device: str | torch.device | None = None) -> DiffusionAdapter:
    """A :class:`DiffusionAdapter` around a diffusers ``UNet2DModel`` and scheduler.

    Parameters
    ----------
    unet : diffusers.UNet2DModel (or any ``denoiser(x, t)`` returning ``.sample`` or a tensor)
    scheduler : diffusers.DDIMScheduler or diffusers.DDPMScheduler
        Copied, then set to ``num_inference_steps``.
    num_inference_steps : int, default 25
    eta : float, optional
        DDIM's noise (default 0: deterministic, the latent is ``x_0`` alone); with
        ``eta > 0`` or DDPM every step's noise is part of the latent.
    window, name, device
        See :class:`DiffusionAdapter`.
    """
    sched = diffusers_schedule(scheduler, num_inference_steps, eta)
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(cfg, "in_channels") or not hasattr(cfg, "sample_size"):
        raise ConfigError(f"from_diffusers takes a diffusers UNet2DModel (with config."
                          f"in_channels and config.sample_size), got {type(unet).__name__}.")
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusionAdapter(unet, (cfg.in_channels, *size), sched, sched.n_steps,
                            stochastic=sched.stochastic, window=window,
                            sampler_settings=sched.settings(), device=device,
                            name=name or type(unet).__name__)
