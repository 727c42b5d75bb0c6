"""Window hybrids: the paper's counterfactual, applied at every step of a window.

Original 1 and Original 2 are two chains, from latents ``z1`` and ``z2``. The hybrid of a
module ``E`` (channels of a layer of the denoiser) over a window ``W`` of steps is Original
1's chain in which, at every step ``k`` in ``W``, the channels of ``E`` take the values
they have in **Original 2's own chain** at step ``k``; every other value, and every step
outside ``W``, is computed as usual from the hybrid's own state. Before the first step of
``W`` the hybrid *is* Original 1; from there on it drifts, and it keeps drifting after the
window, since ``x`` carries the change forward. See ``docs/diffusion.md`` for why this,
and not Original 2's channels recomputed on Original 1's trajectory.

Cost (:class:`WindowSwaps`): per block of pairs, Original 1's chain runs once, up to the
window's first step ``k0`` (its state ``x_k0`` is shared by every hybrid) and on to the
end (the image the hybrids are compared with); Original 2's chain runs once, recording the
layer at the window's steps. A hybrid then runs only steps ``k0 .. S-1``, batched over
units and pairs. :func:`naive_window_hybrids` is the plain reference: for every module,
Original 2's whole chain recorded and Original 1's whole chain re-run with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from cfmodules import latents as L
from cfmodules.engine import Swaps
from cfmodules.errors import LayerCallError
from cfmodules.hooks import hooked, resolve_layers
from cfmodules.samplers.chain import DiffusionAdapter

__all__ = ["WindowSwaps", "NaiveWindowSwaps", "window_hybrids", "naive_window_hybrids",
           "plan_window_swaps"]

Group = Mapping[str, torch.Tensor]


class _Steps:
    """Hooks on the window's layers for one chain: which step it is, and one call per step.

    ``edit(layer, k, out)`` is called with the layer's output at window steps; it returns
    the replacement (or None to keep it).
    """

    def __init__(self, adapter: DiffusionAdapter, layers: Sequence[str],
                 edit: Callable[[str, int, torch.Tensor], torch.Tensor | None]):
        self.adapter, self.layers, self.edit = adapter, list(layers), edit
        self.window = frozenset(adapter.window)
        self.k = -1
        self.calls: dict[str, int] = {}

    def _hook(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(out: torch.Tensor) -> torch.Tensor | None:
            self.calls[layer] = self.calls.get(layer, 0) + 1
            if self.k in self.window and self.calls[layer] == 1:
                return self.edit(layer, self.k, out)
            return None
        return hook

    @contextmanager
    def step(self, k: int) -> Iterator[None]:
        self.k, self.calls = k, {}
        yield
        if k in self.window:
            for layer in self.layers:
                n = self.calls.get(layer, 0)
                if n != 1:
                    raise LayerCallError(
                        f"Layer '{layer}' ran {n} time(s) at step {k} of the sampling chain of "
                        f"{self.adapter.name}; a window hybrid swaps a layer that runs exactly "
                        "once per denoising step. Choose another layer (adapter.layers() "
                        "lists them; one whose 'calls' is the number of steps).")

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with hooked(self.adapter.generator, {la: self._hook(la) for la in self.layers}):
            yield


def _layers(adapter: DiffusionAdapter, groups: Sequence[Group]) -> list[str]:
    names = sorted({la for g in groups for la in g})
    return [r.name for r in resolve_layers(adapter.generator, names)]


def _tile(z: L.Latent, times: int) -> L.Latent:
    """Rows ``u * P + p`` = row ``p`` of ``z``, for ``u < times``."""
    return L.concat([z] * times) if times > 1 else z


class WindowSwaps(Swaps):
    """Window hybrids of ``groups`` (each: layer -> channel indices) for blocks of pairs.

    ``begin_block`` runs Original 1 (once, keeping its state at the window's first step)
    and Original 2 (once, recording the layers at the window's steps); ``hybrids`` runs
    the steps from the window's first step on, for units x pairs at once.
    """

    path = "window"

    def __init__(self, adapter: DiffusionAdapter, groups: Sequence[Group]):
        self.adapter, self.groups = adapter, list(groups)
        self.layers = _layers(adapter, self.groups)
        self.first = adapter.window[0]
        self.masks: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            c = adapter.layer_channels(layer)
            m = torch.zeros(len(self.groups), c, dtype=torch.bool)
            for u, g in enumerate(self.groups):
                if layer in g:
                    m[u, g[layer].cpu()] = True
            self.masks[layer] = m.to(adapter.device)

    @property
    def layer(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else "modules"

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        ad = self.adapter
        donors: dict[str, dict[int, torch.Tensor]] = {la: {} for la in self.layers}

        def record(layer: str, k: int, out: torch.Tensor) -> None:
            donors[layer][k] = out.detach().clone()

        steps = _Steps(ad, self.layers, record)
        with ad.eval_mode():
            x = ad.run_steps(z1, ad.initial(z1), 0, self.first)
            self.x_first = x
            y1 = ad.images(ad.run_steps(z1, x, self.first), L.batch_size(z1))
            with steps.hooks():
                ad.run_steps(z2, ad.initial(z2), around=steps.step)
        self.z1, self.donors = z1, donors
        return y1

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        ad = self.adapter
        n_u = len(range(len(self.groups))[units])
        n_p = len(range(L.batch_size(self.z1))[pairs])
        masks = {la: m[units].repeat_interleave(n_p, 0)[:, :, None, None]
                 for la, m in self.masks.items()}

        def swap(layer: str, k: int, out: torch.Tensor) -> torch.Tensor:
            donor = _tile(self.donors[layer][k][pairs], n_u)
            mask = masks[layer].view(out.shape[0], out.shape[1], *([1] * (out.dim() - 2)))
            return torch.where(mask, donor, out)

        steps = _Steps(ad, self.layers, swap)
        z = _tile(L.select(self.z1, pairs), n_u)
        x = _tile(self.x_first[pairs], n_u)
        with ad.eval_mode(), steps.hooks():
            out = ad.run_steps(z, x, self.first, around=steps.step)
        return ad.images(out, n_u * n_p)


def naive_window_hybrids(adapter: DiffusionAdapter, z1: L.Latent, z2: L.Latent,
                         group: Group) -> torch.Tensor:
    """The reference window hybrid of one module, by the adapter's public hooks only.

    Original 2's whole chain runs with ``adapter.trace`` (the layer's output at every
    step, concatenated); Original 1's whole chain runs with ``adapter.intervene``, a
    callable counting the steps and putting Original 2's channels in at the window's.
    Two full chains per module: what :class:`WindowSwaps` is measured against.
    """
    layers = _layers(adapter, [group])
    n = L.batch_size(z1)
    with adapter.trace(layers) as rec:
        adapter.generate(z2)
    window = frozenset(adapter.window)
    calls = {la: 0 for la in layers}
    for la in layers:
        if rec[la].shape[0] != n * adapter.n_steps:
            raise LayerCallError(
                f"Layer '{la}' ran {rec[la].shape[0] // n} time(s) in a chain of "
                f"{adapter.n_steps} steps; a window hybrid swaps a layer that runs exactly "
                "once per denoising step.")

    def make(la: str) -> Callable[[torch.Tensor], torch.Tensor]:
        idx = group[la].to(adapter.device)

        def edit(out: torch.Tensor) -> torch.Tensor:
            k = calls[la]
            calls[la] += 1
            if k not in window:
                return out
            new = out.clone()
            new[:, idx] = rec[la][k * n:(k + 1) * n][:, idx]
            return new
        return edit

    with adapter.intervene({la: make(la) for la in layers}):
        return adapter.generate(z1)


class NaiveWindowSwaps(Swaps):
    """``algorithm="hook"`` for a diffusion adapter: :func:`naive_window_hybrids` per unit."""

    path = "hook"

    def __init__(self, adapter: DiffusionAdapter, groups: Sequence[Group]):
        self.adapter, self.groups = adapter, list(groups)
        _layers(adapter, self.groups)

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        self.z1, self.z2 = z1, z2
        return self.adapter.generate(z1)

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        z1, z2 = L.select(self.z1, pairs), L.select(self.z2, pairs)
        return torch.cat([naive_window_hybrids(self.adapter, z1, z2, g)
                          for g in self.groups[units]])


def window_hybrids(adapter: DiffusionAdapter, z1: L.Latent, z2: L.Latent,
                   group: Group) -> torch.Tensor:
    """Window hybrids of one module for a batch of pairs (``hybridize`` of a diffusion adapter)."""
    swaps = WindowSwaps(adapter, [group])
    swaps.begin_block(z1, z2)
    return swaps.hybrids(slice(0, 1), slice(0, L.batch_size(z1)))


def plan_window_swaps(adapter: DiffusionAdapter, groups: Sequence[Group], algorithm: str
                      ) -> list[tuple[Swaps, list[int]]]:
    """The window counterpart of :func:`cfmodules.engine.plan_swaps`: one plan for all groups."""
    cls: Any = NaiveWindowSwaps if algorithm == "hook" else WindowSwaps
    return [(cls(adapter, groups), list(range(len(groups))))]
