"""Batches of channel-swap hybrids, the unit of work of influence maps.

For a block of pairs ``(z1, z2)`` and a list of *groups* (each a dict layer -> channel
indices), :meth:`Swaps.hybrids` returns the hybrids ``Y_{E <- z2}(z1)`` for a slice of
groups and a slice of pairs: row ``u * P + p`` is group ``u`` with pair ``p``. Three
ways, all exact up to float rounding, chosen by :func:`plan_swaps`:

- :class:`LinearSwaps`: the layer feeds only a linear module (the linear shortcut of
  :mod:`cfmodules.engine.linear`); hybrids start after that module;
- :class:`SplitSwaps`: prefix once per block, the (accelerated) suffix per hybrid;
- :class:`HookSwaps`: one full forward per batch of hybrids with replacing hooks (groups
  over several layers, ``algorithm="hook"``, or no capture of the forward can be cut).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from cfmodules import latents as L
from cfmodules.engine.cut import engine_of, split
from cfmodules.engine.fast import FastSplit
from cfmodules.engine.linear import (
    LinearPlan,
    add_base_,
    channels_last_supported,
    fused_add_relu_is_exact,
    group_contributions,
    prepare_weight,
    single_channel_contributions,
)
from cfmodules.engine.paths import SplitState
from cfmodules.engine.tail import FusedTail
from cfmodules.engine.workspace import Workspace

__all__ = ["Swaps", "SplitSwaps", "LinearSwaps", "HookSwaps", "plan_swaps"]

Group = Mapping[str, torch.Tensor]
"""Channels swapped together: layer -> LongTensor of channel indices."""


def _rows(n_units: int, pairs: slice, device: torch.device) -> torch.Tensor:
    return torch.arange(pairs.start, pairs.stop, device=device).repeat(n_units)


class Swaps:
    """Hybrids of ``groups`` for the current block of pairs.

    Attributes
    ----------
    groups : list of dict
    path : str
        ``"linear shortcut"``, ``"split"``, ``"partial"`` or ``"hook"``.
    cut : str or None
        The layer where hybrids start (batch sizing reads its output size).
    suffix_layers : list of str or None
        The generator's layers that run per hybrid (None: all of them).
    """

    groups: list[Group]
    path: str
    cut: str | None = None

    @property
    def suffix_layers(self) -> list[str] | None:
        return None

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        """Start a block of pairs; returns Original 1's images ``(P, C, H, W)``."""
        raise NotImplementedError

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        """Images ``(u * p, C, H, W)`` of groups ``units`` and pairs ``pairs`` (caller's own)."""
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        """Whether :meth:`sums` comes from a fused kernel for the current block."""
        return False

    def sums(self, units: slice, pairs: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Sum and sum of squares over ``pairs`` of the maps of ``units`` (float64
        ``(u, H, W)``) straight from a fused kernel, or None: use :meth:`hybrids`."""
        return None


def _state_rows(split: FastSplit, state: SplitState, n_units: int, pairs: slice,
                activation: torch.Tensor) -> SplitState:
    """State of rows ``u * P + p`` (pair ``p`` of ``pairs``) with a row-expanded activation."""
    need_latent = split.needs_latent and state.latent is not None
    if not state.frontier and not need_latent:
        return SplitState(activation=activation, graph_key=state.graph_key)
    rows = _rows(n_units, pairs, activation.device)
    return SplitState(
        activation=activation,
        frontier=tuple(f.index_select(0, rows.to(f.device)) for f in state.frontier),
        latent=L.select(state.latent, rows) if need_latent else None,
        graph_key=state.graph_key,
    )


class SplitSwaps(Swaps):
    """Groups on one layer: prefix once per block, suffix on channel-swapped activations."""

    def __init__(self, adapter, layer: str, groups: list[Group]):
        self.adapter, self.layer, self.groups, self.cut = adapter, layer, groups, layer
        self.split = FastSplit(adapter, layer)
        self.path = self.split.base.path
        self.idx = [g[layer].to(adapter.device) for g in groups]
        self.single = all(i.numel() == 1 for i in self.idx)
        if self.single:
            self.channels = torch.cat(self.idx)

    @property
    def suffix_layers(self) -> list[str] | None:
        return self.split.suffix_layers if self.split.suffix_module is not None else None

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        self.state = self.split.prefix(z1)
        self.a2 = self.split.prefix(z2).activation
        self.y = self.split.suffix(self.state, self.state.activation, owned=False)
        return self.y

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.groups))[units]
        n_p = pairs.stop - pairs.start
        rows = _rows(len(ids), pairs, self.state.activation.device)
        act = self.state.activation.index_select(0, rows)
        a2 = self.a2[pairs]
        if self.single:  # one indexing op: act[u, :, c_u] = a2[:, c_u]
            ch = self.channels[units]
            view = act.view(len(ids), n_p, *act.shape[1:])
            view[torch.arange(len(ids), device=act.device), :, ch] = a2[:, ch].transpose(0, 1)
        else:
            for k, u in enumerate(ids):
                idx = self.idx[u]
                act[k * n_p:(k + 1) * n_p, idx] = a2[:, idx]
        return self.split.suffix(_state_rows(self.split, self.state, len(ids), pairs, act), act,
                                 owned=True)


class LinearSwaps(Swaps):
    """Groups on one layer feeding a linear module: start the hybrid after that module."""

    path = "linear shortcut"

    def __init__(self, adapter, plan: LinearPlan, groups: list[Group]):
        self.adapter, self.plan, self.groups = adapter, plan, groups
        self.layer, self.cut = plan.layer, plan.cut
        self.layer_split = split(adapter, plan.layer)
        self.cut_split = FastSplit(adapter, plan.cut)
        self.idx = [g[plan.layer].to(adapter.device) for g in groups]
        self.single = all(i.numel() == 1 for i in self.idx)
        if self.single:
            self.channels = torch.cat(self.idx) if self.idx else torch.zeros(0, dtype=torch.long)
        self.workspace = Workspace()
        # PyTorch's CPU convolutions after the cut run faster on channels-last input, which
        # the contributions can be written in at no cost (the same values, another layout)
        self.channels_last = (self.single and adapter.device.type == "cpu"
                              and channels_last_supported(plan)
                              and self.cut_split.runs_native_conv2d)
        self._weights_at = -1
        self._follow()
        self.tail: FusedTail | None = None  # the DCGAN tail kernel, when it applies
        self._tail_for: object = False  # the suffix graph it was matched against
        self.tail_active = False

    def _follow(self) -> None:
        """(Re)make the weight copies when the engine saw the weights change."""
        now = engine_of(self.adapter).weights_generation
        if now == self._weights_at:
            return
        self._weights_at = now
        self.weight = self.plan.weight().to(self.adapter.device)
        if self.single:
            self.prepared = prepare_weight(self.plan, self.weight)

    @property
    def suffix_layers(self) -> list[str] | None:
        return self.cut_split.suffix_layers if self.cut_split.suffix_module is not None else None

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        n = L.batch_size(z1)
        a = self.layer_split.prefix(L.concat([z1, z2])).activation
        self.plan = self.plan.refreshed()
        self._follow()
        self.delta = a[n:] - a[:n]
        if self.cut_split.n_frontier == 0:  # the cut's value is op(+BN) of the layer's
            with self.adapter.eval_mode():
                self.state = SplitState(self.plan.pre_activation(a[:n]), (), z1)
        else:
            self.state = self.cut_split.prefix(z1)
        self.cut_split.follow(self.state)
        if self.channels_last and self.state.activation.dim() == 4:
            self.state.activation = self.state.activation.contiguous(
                memory_format=torch.channels_last)  # Y in the hybrids' layout
        self.y = self.cut_split.suffix(self.state, self.state.activation, owned=False)
        self.fuse_relu = (self.cut_split.starts_with_relu and self.single
                          and fused_add_relu_is_exact(self.prepared, self.delta,
                                                      self.state.activation))
        self.tail_active = False
        if self.fuse_relu and self.delta.dtype == torch.float32:
            plain = self.cut_split.plain_suffix
            if plain is not self._tail_for:
                self._tail_for = plain
                self.tail = FusedTail.match(self.plan, plain, self.adapter)
            if self.tail is not None:
                self.tail.begin_block(self.weight, self.delta, self.state.activation)
                self.tail_active = True
        return self.y

    @property
    def fused(self) -> bool:
        return self.tail_active

    def sums(self, units: slice, pairs: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.tail_active:
            return None
        return self.tail.sums(self.channels[units], pairs)  # type: ignore[union-attr]

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.groups))[units]
        delta = self.delta[pairs]
        pre = self.state.activation[pairs]
        if self.single:
            hyb = single_channel_contributions(self.plan, self.prepared, delta,
                                               self.channels[units], workspace=self.workspace,
                                               channels_last=self.channels_last)
        else:
            hyb = group_contributions(self.plan, self.weight, delta, [self.idx[u] for u in ids])
        add_base_(hyb, pre.unsqueeze(0), relu=self.fuse_relu)
        hyb = hyb.reshape(-1, *pre.shape[1:])
        state = _state_rows(self.cut_split, self.state, len(ids), pairs, hyb)
        return self.cut_split.suffix(state, hyb, owned=True, rectified=self.fuse_relu)


class HookSwaps(Swaps):
    """Any groups (several layers too): one full forward per batch with replacing hooks."""

    path = "hook"

    def __init__(self, adapter, groups: list[Group]):
        self.adapter, self.groups = adapter, groups
        self.layers = sorted({layer for g in groups for layer in g})
        self.idx = [{k: v.to(adapter.device) for k, v in g.items()} for g in groups]

    def begin_block(self, z1: L.Latent, z2: L.Latent) -> torch.Tensor:
        self.z1 = z1
        self.y = self.adapter.generate(z1)
        with self.adapter.trace(self.layers) as acts:
            self.adapter.generate(z2)
        self.a2 = dict(acts)
        return self.y

    def hybrids(self, units: slice, pairs: slice) -> torch.Tensor:
        ids = range(len(self.groups))[units]
        n_p = pairs.stop - pairs.start
        rows = _rows(len(ids), pairs, torch.device("cpu"))

        def make(layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
            src = self.a2[layer][pairs]

            def edit(out: torch.Tensor) -> torch.Tensor:
                new = out.clone()
                for k, u in enumerate(ids):
                    idx = self.idx[u].get(layer)
                    if idx is not None:
                        new[k * n_p:(k + 1) * n_p, idx] = src[:, idx].to(out.dtype)
                return new
            return edit

        with self.adapter.intervene({layer: make(layer) for layer in self.layers}):
            return self.adapter.generate(L.select(self.z1, rows))


def plan_swaps(adapter, groups: list[Group], algorithm: str,
               what: str = "influence_maps") -> list[tuple[Swaps, list[int]]]:
    """Group ``groups`` by how their hybrids are computed; returns (swaps, group indices).

    Single-layer groups share a :class:`LinearSwaps` (``algorithm="auto"`` where the
    shortcut is exact) or :class:`SplitSwaps` per layer; the rest (and everything with
    ``algorithm="hook"``) one :class:`HookSwaps`. A layer that can only be run by full
    forwards warns once (``what`` names the caller).
    """
    by_layer: dict[str, list[int]] = {}
    multi: list[int] = []
    for i, g in enumerate(groups):
        if algorithm != "hook" and len(g) == 1:
            by_layer.setdefault(next(iter(g)), []).append(i)
        else:
            multi.append(i)
    out: list[tuple[Swaps, list[int]]] = []
    engine = engine_of(adapter)
    for layer, rows in by_layer.items():
        group = [groups[i] for i in rows]
        if engine.path(layer) == "hook":
            engine.warn_hook(layer, what)
            out.append((HookSwaps(adapter, group), rows))
            continue
        plan = engine.linear_plan(layer) if algorithm == "auto" else None
        swaps: Swaps = (LinearSwaps(adapter, plan, group) if plan is not None
                        else SplitSwaps(adapter, layer, group))
        out.append((swaps, rows))
    if multi:
        out.append((HookSwaps(adapter, [groups[i] for i in multi]), multi))
    return out
