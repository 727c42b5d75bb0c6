"""Counterfactual hybrids (sec. 3.2, Fig. 3a of Besserve et al., 2020).

Two latent samples ``z1`` and ``z2`` generate Original 1 and Original 2. The hybrid is
the output of the generator run on ``z1`` with the channels of a module taking the values
they had when generating Original 2. Every per-sample input of ``z1`` (class vector,
truncation) stays with the hybrid: only the module's channel values come from ``z2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cfmodules import checks
from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.channels import ChannelSpec, channel_index
from cfmodules.engine import split
from cfmodules.errors import ChannelError, LatentError, ModuleError

__all__ = ["hybridize", "module_channels", "Module"]

Module = Mapping[str, ChannelSpec]
"""A module: layer name -> channel indices of that layer (one or several layers).

Not to be confused with ``torch.nn.Module``: a layer of the generator is a submodule
(``adapter.submodule("main.8")``); a *module* in cfmodules is the paper's group of channels.
"""


def module_channels(adapter: GeneratorAdapter, module: Module, name: str = "module", *,
                    allow_empty: bool = True) -> dict[str, torch.Tensor]:
    """Check a module against the generator; return ``{layer: LongTensor of channels}``.

    Every layer name is checked before any work (a typo gets "did you mean"), then every
    channel index against its layer's width.

    Raises
    ------
    ModuleError
        A malformed module (:func:`cfmodules.checks.module`) or a channel out of range.
    LayerNotFoundError
        A layer name that is not a submodule of the generator.
    """
    from cfmodules.hooks import resolve_layers

    lists = checks.module(module, name, allow_empty=allow_empty)
    refs = resolve_layers(adapter.generator, list(lists))
    out = {}
    for ref, chans in zip(refs, lists.values()):
        try:
            out[ref.name] = channel_index(chans, adapter.layer_channels(ref.name), ref.name)
        except ChannelError as e:
            raise ModuleError(f"{name[:1].upper()}{name[1:]}: {e}") from e
    return out


def hybridize(
    adapter: GeneratorAdapter,
    z1: L.Latent,
    z2: L.Latent,
    module: Module,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Generate hybrids: Original 1 (``z1``) with ``module``'s channels from Original 2 (``z2``).

    Parameters
    ----------
    adapter : GeneratorAdapter
    z1, z2 : Latent
        Latent batches of the same size N (pair i is ``z1[i], z2[i]``).
    module : dict
        Layer name -> channel indices. Several layers (the paper's "two successive layers")
        are intervened on together; each takes Original 2's values from the unintervened
        run on ``z2``.
    batch_size : int, optional
        Pairs per forward; the result does not depend on it.

    Returns
    -------
    Tensor (N, C, H, W)
        The hybrids, on the adapter's device. With no channel in the module they equal
        Original 1; with every channel of a layer they equal Original 2 downstream of it.
        For a :class:`~cfmodules.samplers.DiffusionAdapter` the module's channels take
        Original 2's values at every step of the adapter's window
        (:mod:`cfmodules.samplers.window`; ``adapter.with_window("late")``).
    """
    z1 = adapter.as_latent(z1, "latent z1")
    z2 = adapter.as_latent(z2, "latent z2")
    n1, n2 = L.batch_size(z1), L.batch_size(z2)
    if n1 != n2:
        raise LatentError(
            f"z1 and z2 must have the same batch size (pair i is z1[i], z2[i]); got {n1} and {n2}."
        )
    step = n1 if batch_size is None else checks.positive_int(batch_size, "batch_size")
    channels = module_channels(adapter, module)
    out = []
    for s in range(0, n1, step):
        sl = slice(s, s + step)
        out.append(_hybrid_batch(adapter, L.select(z1, sl), L.select(z2, sl), channels))
    return torch.cat(out) if len(out) > 1 else out[0]


def _hybrid_batch(
    adapter: GeneratorAdapter, z1: L.Latent, z2: L.Latent, channels: dict[str, torch.Tensor]
) -> torch.Tensor:
    from cfmodules.samplers import is_diffusion, window_hybrids

    if is_diffusion(adapter):  # a sampling chain: the swap at every step of its window
        return window_hybrids(adapter, z1, z2, channels)  # type: ignore[arg-type]
    if len(channels) == 1:
        (layer, idx), = channels.items()
        cut = split(adapter, layer)
        state = cut.prefix(z1)
        donor = cut.prefix(z2).activation
        act = state.activation.clone()
        act[:, idx.to(act.device)] = donor[:, idx.to(act.device)]
        return cut.suffix(state, act)
    with adapter.trace(list(channels)) as acts:
        adapter.generate(z2)
    values = {layer: (idx, acts[layer][:, idx.to(acts[layer].device)])
              for layer, idx in channels.items()}
    with adapter.intervene(values):
        return adapter.generate(z1)
