"""Reusable scratch buffers for the large intermediates of an influence run.

A fresh multi-megabyte tensor per batch costs page faults on every use (the CPU allocator
hands large blocks back to the operating system); reusing a few buffers keeps large batches
as fast as small ones. A :class:`Workspace` lives for one run.
"""

from __future__ import annotations

import torch

__all__ = ["Workspace"]


class Workspace:
    """Named buffers, grown when a request does not fit and reused otherwise."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

        The same ``name`` returns the same memory (so a caller must be done with the
        previous result before asking again).
        """
        n = 1
        for s in shape:
            n *= s
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)
