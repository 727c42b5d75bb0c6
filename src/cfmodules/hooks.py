"""The one place that registers and removes forward hooks.

Layers are named by their dotted path in ``generator.named_modules()`` (``"main.8"``).
A module that runs more than once per forward (BigGAN's shared ``relu``) is ambiguous:
name one of its calls with a ``:k`` suffix (``"layers.3.relu:1"`` is the second call,
counting from 0). A hook on an ambiguous name without the suffix raises
:class:`~cfmodules.errors.LayerCallError` instead of silently acting on every call.

Every name is validated before any hook is registered, hooks are registered inside
``try`` and removed in ``finally``, so no hook survives an exception in the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from cfmodules.errors import LayerCallError, LayerNotFoundError, did_you_mean

__all__ = ["Edit", "LayerRef", "resolve_layer", "resolve_layers", "hooked", "HookSession"]


class Edit(Protocol):
    """The hook contract: receives a layer's output, returns its replacement or ``None``.

    ``None`` keeps the output as it is (a recording hook). The returned tensor must have
    the output's shape.
    """

    def __call__(self, output: torch.Tensor) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class LayerRef:
    """A validated layer name: the module, and which of its calls in one forward (or all)."""

    name: str
    path: str
    module: nn.Module
    call: int | None = None

    def __str__(self) -> str:
        return self.name


def _layer_names(root: nn.Module) -> list[str]:
    return [n for n, _ in root.named_modules() if n]


def resolve_layer(root: nn.Module, name: str) -> LayerRef:
    """Return the :class:`LayerRef` for ``name`` (``"path"`` or ``"path:k"``).

    Raises
    ------
    LayerNotFoundError
        With the closest existing names when ``name`` is not a submodule of ``root``.
    """
    if not isinstance(name, str) or not name:
        raise LayerNotFoundError(
            f"A layer is named by a non-empty string such as 'main.8', got {name!r}."
        )
    path, call = name, None
    if ":" in name:
        path, _, suffix = name.rpartition(":")
        if not suffix.isdigit():
            raise LayerNotFoundError(
                f"Layer '{name}': the part after ':' names a call of the layer and must be "
                f"a non-negative integer, as in '{path}:0'."
            )
        call = int(suffix)
    modules = dict(root.named_modules())
    if path not in modules or path == "":
        names = _layer_names(root)
        raise LayerNotFoundError(
            f"Layer '{path}' not found in {type(root).__name__}.{did_you_mean(path, names)} "
            f"List the layers with adapter.layers() (or `cfmodules layers MODEL`)."
        )
    return LayerRef(name=name, path=path, module=modules[path], call=call)


def resolve_layers(root: nn.Module, names: str | list[str] | tuple[str, ...]) -> list[LayerRef]:
    """Validate every name (all of them, before anything is registered)."""
    if isinstance(names, str):
        names = [names]
    refs = [resolve_layer(root, n) for n in names]
    seen: set[str] = set()
    for r in refs:
        if r.name in seen:
            raise LayerNotFoundError(f"Layer '{r.name}' is listed twice; list each layer once.")
        seen.add(r.name)
    return refs


class HookSession:
    """Hooks of one ``with hooked(...)`` block; counts calls of each layer per forward."""

    def __init__(self, refs: list[LayerRef]):
        self.refs = refs
        self._calls: dict[int, int] = {}

    def reset(self) -> None:
        """Start a new forward: forget the call counts."""
        self._calls.clear()

    def check_complete(self) -> None:
        """After a forward: every ``:k`` layer must have run at least ``k + 1`` times."""
        for r in self.refs:
            if r.call is None:
                continue
            n = self._calls.get(id(r.module), 0)
            if n <= r.call:
                raise LayerCallError(
                    f"Layer '{r.name}' names call {r.call} of '{r.path}', but that module "
                    f"ran {n} time(s) in this forward. Use a call index below {max(n, 1)}."
                )

    def _count(self, module: nn.Module) -> int:
        k = self._calls.get(id(module), 0)
        self._calls[id(module)] = k + 1
        return k


def _make_hook(
    session: HookSession, refs: list[LayerRef], edits: list[Edit]
) -> Callable[[nn.Module, tuple, object], object]:
    """One hook per module: several refs may point at different calls of the same module."""

    def hook(module: nn.Module, inputs: tuple, output: object) -> object:
        k = session._count(module)
        result = output
        for ref, edit in zip(refs, edits):
            if ref.call is None and k > 0:
                raise LayerCallError(
                    f"Layer '{ref.path}' runs more than once per forward, so '{ref.path}' "
                    f"is ambiguous. Name one call: '{ref.path}:0', '{ref.path}:1', ..."
                )
            if ref.call is not None and ref.call != k:
                continue
            if not isinstance(result, torch.Tensor):
                raise LayerCallError(
                    f"Layer '{ref.name}' returns {type(result).__name__}, not a tensor; "
                    f"choose a layer whose output is a tensor (see adapter.layers())."
                )
            new = edit(result)
            if new is not None:
                result = new
        return None if result is output else result

    return hook


@contextmanager
def hooked(root: nn.Module, edits: Mapping[str, Edit]) -> Iterator[HookSession]:
    """Register ``edits`` (layer name -> :class:`Edit`) as forward hooks for a block.

    All names are validated first; hooks are removed on exit, also on an exception.
    The returned :class:`HookSession` should be ``reset()`` before each forward; a
    pre-hook on ``root`` does it too when ``root`` itself is called.
    """
    refs = resolve_layers(root, list(edits))
    session = HookSession(refs)
    by_module: dict[int, tuple[nn.Module, list[LayerRef], list[Edit]]] = {}
    for r in refs:
        entry = by_module.setdefault(id(r.module), (r.module, [], []))
        entry[1].append(r)
        entry[2].append(edits[r.name])
    handles = []
    try:
        handles.append(root.register_forward_pre_hook(lambda m, i: session.reset()))
        for module, mrefs, medits in by_module.values():
            handles.append(module.register_forward_hook(_make_hook(session, mrefs, medits)))
        yield session
    finally:
        for h in handles:
            h.remove()
