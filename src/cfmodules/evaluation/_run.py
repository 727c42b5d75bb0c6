"""Run a user network (feature extractor, classifier) on image batches: eval mode, no_grad, device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["EvalNoGrad", "call_on"]


def _owner(fn: Callable[..., Any]) -> nn.Module | None:
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class EvalNoGrad:
    """Context: run ``fn`` under ``torch.no_grad``, its nn.Module (if any) in eval mode.

    Train/eval flags are restored on exit, also after an error.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.owner = _owner(fn)
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> EvalNoGrad:
        if self.owner is not None:
            self.modes = [(m, m.training) for m in self.owner.modules()]
            self.owner.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._grad.__exit__(*exc)
        for m, t in self.modes:
            m.training = t


def call_on(fn: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Any:
    """``fn(images)`` with the images moved to ``fn``'s parameters' device, as float."""
    owner = _owner(fn)
    p = next(iter(owner.parameters()), None) if owner is not None else None
    if p is not None:
        images = images.to(p.device)
    return fn(images.float())
