"""The layers of a generator as one dry forward sees them: names, kinds, output shapes, calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cfmodules.errors import LayerCallError, LayerNotFoundError
from cfmodules.hooks import LayerRef

__all__ = ["LayerInfo", "call_shape", "record_layers"]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of the generator, as seen in one dry forward of a single sample.

    Attributes
    ----------
    name : str
        Dotted name, usable in every cfmodules call.
    kind : str
        The module's class name.
    shape : tuple of int or None
        Output shape of one sample (``(C, H, W)`` for a conv layer), None if not a tensor.
    channels : int or None
        ``shape[0]``, the number of units that can be intervened on.
    calls : int
        How many times the module ran in one forward (more than 1 needs a ``:k`` suffix).
    call_shapes : tuple
        The output shape of each call (``call_shapes[k]`` is that of ``name:k``).
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    channels: int | None
    calls: int = 1
    call_shapes: tuple[tuple[int, ...] | None, ...] = ()

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape else "-"
        calls = f"  (runs {self.calls}x: use '{self.name}:k')" if self.calls > 1 else ""
        return f"{self.name:<24} {self.kind:<18} {shape:<14} {self.channels or '-'}{calls}"


def record_layers(generator: nn.Module, run: Callable[[], Any]) -> list[LayerInfo]:
    """Every named submodule of ``generator`` that runs in ``run()`` (one forward), in order.

    A forward hook on every submodule records the per-sample shape of each call's output;
    the hooks are removed afterwards, also after an error.
    """
    names = [n for n, _ in generator.named_modules() if n]
    shapes: dict[str, list[tuple[int, ...] | None]] = {}
    modules = dict(generator.named_modules())
    handles = []

    def make(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            shapes.setdefault(name, []).append(
                tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None)
        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make(n)))
        run()
    finally:
        for h in handles:
            h.remove()
    return [
        LayerInfo(n, type(modules[n]).__name__, shapes[n][0],
                  (shapes[n][0][0] if shapes[n][0] else None), len(shapes[n]),
                  tuple(shapes[n]))
        for n in names if n in shapes
    ]


def call_shape(infos: list[LayerInfo], ref: LayerRef, layer: str, model: str
               ) -> tuple[int, ...]:
    """The per-sample output shape of the call of ``layer`` that ``ref`` names.

    Raises LayerCallError for a call index the layer does not reach, LayerNotFoundError
    for a layer that does not run (or outputs no tensor) in a forward of ``model``.
    """
    found = {i.name: i for i in infos}.get(ref.path)
    k = ref.call or 0
    if found is not None and k >= found.calls:
        raise LayerCallError(
            f"Layer '{layer}' names call {k}, but '{ref.path}' ran {found.calls} time(s) "
            f"in a forward; use a call index below {found.calls}."
        )
    shape = found.call_shapes[k] if found is not None else None
    if not shape:
        raise LayerNotFoundError(
            f"Layer '{layer}' does not run in a forward of {model} or does not output "
            "a tensor; choose one of adapter.layers()."
        )
    return shape
