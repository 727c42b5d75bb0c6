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
units and pairs; within its first step, the denoiser's submodules that finish before the
swapped layer starts are replayed from Original 1's step, not re-run (the in-step cut).
:func:`naive_window_hybrids` is the plain reference: for every module,
Original 2's whole chain recorded and Original 1's whole chain re-run with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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


def _tile_output(out: Any, n_rows: int, times: int) -> Any:
    """A fresh copy of a module's output with every tensor's rows tiled ``times`` times.

    Raises ValueError for an output that is not a tensor (or tuple/list of tensors and
    plain values) with ``n_rows`` rows.
    """
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != n_rows:
            raise ValueError("not a batch")
        return out.repeat(times, *([1] * (out.dim() - 1)))
    if isinstance(out, (tuple, list)):
        return type(out)(_tile_output(o, n_rows, times) for o in out)
    if out is None or isinstance(out, (int, float, bool, str)):
        return out
    raise ValueError("not a tensor")


class _PrefixCache:
    """The in-step cut: at the window's first step, what runs before the swapped layers.

    At step ``k0`` every hybrid of a pair starts from the same state ``x_k0`` (Original 1's),
    so each submodule of the denoiser that finishes before the first swapped layer starts
    computes the same output for all of them. While Original 1's step ``k0`` runs, the
    outputs of the largest such submodules (children of the swapped layers' ancestors, seen
    through ``ModuleList``/``ModuleDict``) are kept; the hybrids' step ``k0`` replays them,
    tiled over the units, instead of running them. A submodule that also runs after the
    layer, or whose output is not a batch of the pairs, is run as usual. Only with two or
    more pairs (a one-row output cannot be told from a broadcast one).
    """

    def __init__(self, denoiser: nn.Module, layers: Sequence[str]):
        named = dict(denoiser.named_modules())
        paths = [la.split(":")[0] for la in layers]
        ancestors = {""} | {".".join(p.split(".")[:i]) for p in paths
                            for i in range(1, len(p.split(".")) + 1)}
        self.candidates: dict[str, nn.Module] = {}
        for name, mod in named.items():
            if not name or name in ancestors:
                continue
            parent = name.rpartition(".")[0]
            while parent and isinstance(named[parent], (nn.ModuleList, nn.ModuleDict)):
                parent = parent.rpartition(".")[0]
            if parent in ancestors:
                self.candidates[name] = mod
        self.layer_modules = [named[p] for p in paths]
        self.outputs: dict[str, list[Any]] = {}

    @contextmanager
    def record(self, n_rows: int) -> Iterator[None]:
        """Keep the candidates' outputs of one denoiser step run on ``n_rows`` pairs."""
        started = [False]
        outputs: dict[str, list[Any]] = {}
        late: set[str] = set()

        def on_layer(module: nn.Module, inputs: Any) -> None:
            started[0] = True

        def keep(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if started[0]:
                    late.add(name)
                elif name not in late:
                    outputs.setdefault(name, []).append(output)
            return hook

        handles = [m.register_forward_pre_hook(on_layer) for m in self.layer_modules]
        try:
            handles += [m.register_forward_hook(keep(n)) for n, m in self.candidates.items()]
            yield
        finally:
            for h in handles:
                h.remove()
        self.outputs = {}
        for name, outs in outputs.items():
            if name in late or n_rows < 2:
                continue
            try:
                for o in outs:
                    _tile_output(o, n_rows, 1)
            except ValueError:
                continue
            self.outputs[name] = outs
        self.n_rows = n_rows

    @contextmanager
    def replay(self, pairs: slice, times: int) -> Iterator[None]:
        """Replace the recorded submodules' forwards by their outputs for ``pairs``, tiled."""
        patched = []
        try:
            for name, outs in self.outputs.items():
                mod = self.candidates[name]
                calls = iter([_select_rows(o, pairs) for o in outs])

                def forward(*args: Any, _calls: Iterator[Any] = calls, _name: str = name,
                            **kwargs: Any) -> Any:
                    try:
                        out = next(_calls)
                    except StopIteration:
                        raise LayerCallError(
                            f"Submodule '{_name}' of the denoiser ran more often in a hybrid's "
                            "step than in Original 1's; the in-step cut cannot replay it.") from None
                    return _tile_output(out, _rows_of(out), times)

                mod.forward = forward  # type: ignore[method-assign]
                patched.append(mod)
            yield
        finally:
            for mod in patched:
                del mod.forward


def _select_rows(out: Any, rows: slice) -> Any:
    if isinstance(out, torch.Tensor):
        return out[rows]
    if isinstance(out, (tuple, list)):
        return type(out)(_select_rows(o, rows) for o in out)
    return out


def _rows_of(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return int(out.shape[0])
    for o in out if isinstance(out, (tuple, list)) else ():
        n = _rows_of(o)
        if n >= 0:
            return n
    return -1


class WindowSwaps(Swaps):
    """Window hybrids of ``groups`` (each: layer -> channel indices) for blocks of pairs.

    ``begin_block`` runs Original 1 (once, keeping its state at the window's first step)
    and Original 2 (once, recording the layers at the window's steps); ``hybrids`` runs
    the steps from the window's first step on, for units x pairs at once. At that first
    step, the denoiser's submodules that run before the swapped layers are not run again
    but replayed from Original 1's step (:class:`_PrefixCache`; ``in_step_cut=False``: run them).
    """

    path = "window"

    def __init__(self, adapter: DiffusionAdapter, groups: Sequence[Group],
                 in_step_cut: bool = True):
        self.adapter, self.groups = adapter, list(groups)
        self.in_step_cut = in_step_cut
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
        cache = _PrefixCache(ad.generator, self.layers) if self.in_step_cut else None
        with ad.eval_mode():
            x = ad.run_steps(z1, ad.initial(z1), 0, self.first)
            self.x_first = x
            if cache is not None:
                with cache.record(L.batch_size(z1)):
                    x = ad.run_steps(z1, x, self.first, self.first + 1)
                x = ad.run_steps(z1, x, self.first + 1)
            else:
                x = ad.run_steps(z1, x, self.first)
            y1 = ad.images(x, L.batch_size(z1))
            with steps.hooks():
                ad.run_steps(z2, ad.initial(z2), around=steps.step)
        self.z1, self.donors, self.cache = z1, donors, cache
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
        cache = self.cache

        @contextmanager
        def around(k: int) -> Iterator[None]:
            with steps.step(k):
                if k == self.first and cache is not None:
                    with cache.replay(pairs, n_u):
                        yield
                else:
                    yield

        with ad.eval_mode(), steps.hooks():
            out = ad.run_steps(z, x, self.first, around=around)
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
