"""Channels of a layer: how they are named in calls, checked, and replaced.

A *channel* is one unit of a layer's output (dimension 1), what counterfactuals swap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from cfmodules.errors import ChannelError, ConfigError, ShapeError

__all__ = ["ChannelSpec", "Replacement", "channel_index", "replace_channels"]

ChannelSpec = Union[Sequence[int], torch.Tensor, range]
"""Channel indices of one layer: a list, range, 1-d integer tensor or array."""

Replacement = Union[tuple[ChannelSpec, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def channel_index(spec: ChannelSpec, n_channels: int, layer: str,
                  allow_empty: bool = True) -> torch.Tensor:
    """Validate channel indices of ``layer`` and return them as a LongTensor.

    Raises
    ------
    ChannelError
        For non-integers, indices outside ``[0, n_channels)``, duplicates, or (unless
        ``allow_empty``) an empty selection.
    """
    try:
        idx = torch.as_tensor(list(spec) if not isinstance(spec, torch.Tensor) else spec)
    except (TypeError, ValueError) as e:
        raise ChannelError(f"Channels of layer '{layer}' must be integers, got {spec!r}.") from e
    if idx.numel() == 0:
        if not allow_empty:
            raise ChannelError(f"The module has no channels in layer '{layer}'; give at least one.")
        return torch.zeros(0, dtype=torch.long)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ChannelError(
            f"Channels of layer '{layer}' must be a flat list of integers, got {spec!r}."
        )
    idx = idx.long()
    bad = idx[(idx < 0) | (idx >= n_channels)]
    if bad.numel():
        raise ChannelError(
            f"Channel(s) {bad.tolist()[:5]} out of range for layer '{layer}', which has "
            f"{n_channels} channels (valid: 0..{n_channels - 1})."
        )
    if torch.unique(idx).numel() != idx.numel():
        dup = sorted({int(i) for i in idx if int((idx == i).sum()) > 1})
        raise ChannelError(f"Channel(s) {dup[:5]} of layer '{layer}' are listed more than once.")
    return idx


def replace_channels(layer: str, idx: torch.Tensor, values: torch.Tensor) -> Callable:
    """A hook edit that puts ``values`` (N, len(idx), *spatial) into channels ``idx``."""
    if not isinstance(values, torch.Tensor):
        raise ConfigError(f"Values for layer '{layer}' must be a tensor, got {type(values).__name__}.")

    def edit(out: torch.Tensor) -> torch.Tensor:
        want = (out.shape[0], idx.numel(), *out.shape[2:])
        if tuple(values.shape) != want:
            raise ShapeError(
                f"Replacement values for layer '{layer}' have shape {tuple(values.shape)}; "
                f"expected {want} (batch, channels given, spatial size of the layer)."
            )
        new = out.clone()
        new[:, idx.to(out.device)] = values.to(device=out.device, dtype=out.dtype)
        return new

    return edit
