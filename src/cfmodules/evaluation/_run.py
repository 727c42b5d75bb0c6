"""Run a user network (feature extractor, classifier) on image batches: eval mode, no_grad, device."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cfmodules.errors import ConfigError

__all__ = ["EvalNoGrad", "call_on", "named_modules", "module_as_lists"]


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


def named_modules(modules: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
                  ) -> dict[str, Mapping[str, Any]]:
    """``{name: module}`` from a dict, or from a list (named ``C0``, ``C1``, ...)."""
    if isinstance(modules, Mapping):
        named = dict(modules)
    elif isinstance(modules, Sequence) and not isinstance(modules, str):
        named = {f"C{k}": m for k, m in enumerate(modules)}
    else:
        named = {}
    if not named or not all(isinstance(m, Mapping) and m for m in named.values()):
        raise ConfigError(
            "modules must be a dict name -> module or a list of modules, each module a dict "
            "layer -> channel indices, e.g. {'C0': {'main.8': [0, 3]}, 'C1': {'main.8': [1, 2]}}."
        )
    return named


def module_as_lists(module: Mapping[str, Any]) -> dict[str, list[int]]:
    """A module with its channel indices as plain lists (for JSON)."""
    out = {}
    for layer, ch in module.items():
        if isinstance(ch, torch.Tensor):
            ch = ch.tolist()
        out[layer] = [int(c) for c in np.atleast_1d(np.asarray(ch))]
    return out
