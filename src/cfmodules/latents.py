"""Latent batches: a tensor, or a tuple of per-sample tensors that travel together.

A conditional generator takes several per-sample inputs (noise, class vector,
truncation). cfmodules keeps them as a tuple whose members all have the batch on axis 0,
so that selecting, concatenating or moving a batch moves every input of each sample.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union

import numpy as np
import torch

from cfmodules import checks
from cfmodules.errors import ConfigError, LatentError

__all__ = [
    "Latent",
    "Prior",
    "batch_size",
    "select",
    "concat",
    "to_device",
    "check_latent",
    "sample",
    "sample_seed",
    "pair_latents",
    "latent_shapes",
    "loses_precision",
    "LatentSource",
]

Latent = Union[torch.Tensor, tuple[torch.Tensor, ...]]
"""A latent batch: ``Tensor (N, *shape)`` or ``tuple`` of such tensors sharing ``N``."""

Prior = Union[str, Callable[[int, torch.Generator], Latent]]
"""``"normal"``, ``"uniform"`` (on [-1, 1]) or ``callable(n, generator) -> Latent``."""


def _parts(z: Latent) -> tuple[torch.Tensor, ...]:
    return z if isinstance(z, tuple) else (z,)


def _rebuild(like: Latent, parts: Sequence[torch.Tensor]) -> Latent:
    return tuple(parts) if isinstance(like, tuple) else parts[0]


def _pack(parts: Sequence[torch.Tensor]) -> Latent:
    return tuple(parts) if len(parts) > 1 else parts[0]


def batch_size(z: Latent) -> int:
    """Number of samples in a latent batch."""
    return int(_parts(z)[0].shape[0])


def select(z: Latent, index: torch.Tensor | slice) -> Latent:
    """Samples ``index`` (a slice or a LongTensor of batch positions) of every input."""
    if isinstance(index, slice):
        return _rebuild(z, [p[index] for p in _parts(z)])
    return _rebuild(z, [p.index_select(0, index.to(p.device)) for p in _parts(z)])


def concat(zs: Sequence[Latent]) -> Latent:
    """Concatenate latent batches along the batch axis."""
    first = zs[0]
    n_parts = len(_parts(first))
    return _rebuild(first, [torch.cat([_parts(z)[i] for z in zs]) for i in range(n_parts)])


def to_device(z: Latent, device: torch.device, dtype: torch.dtype | None = None) -> Latent:
    """Move every input of the batch to ``device`` (and its floating inputs to ``dtype``)."""
    return _rebuild(z, [p.to(device, dtype) if dtype is not None and p.is_floating_point()
                        else p.to(device) for p in _parts(z)])


def check_latent(z: object, shapes: Sequence[tuple[int, ...]], what: str = "latent") -> int:
    """Validate a latent batch against the per-sample ``shapes``; return its batch size.

    Raises
    ------
    LatentError
        When ``z`` is not a tensor / tuple of tensors, has the wrong number of inputs,
        a wrong per-sample shape, or inputs with different batch sizes.
    """
    multi = len(shapes) > 1
    if multi:
        if not isinstance(z, tuple) or not all(isinstance(p, torch.Tensor) for p in z):
            raise LatentError(
                f"This generator takes {len(shapes)} inputs per sample; pass the {what} as a "
                f"tuple of {len(shapes)} tensors, got {type(z).__name__}."
            )
        if len(z) != len(shapes):
            raise LatentError(
                f"The {what} has {len(z)} inputs but the generator takes {len(shapes)} "
                f"(shapes {list(shapes)})."
            )
    elif not isinstance(z, torch.Tensor):
        raise LatentError(
            f"The {what} must be a tensor of shape (N, {', '.join(map(str, shapes[0]))}), "
            f"got {type(z).__name__}."
        )
    parts = _parts(z)  # type: ignore[arg-type]
    sizes = set()
    for i, (p, shape) in enumerate(zip(parts, shapes)):
        which = f" input {i}" if multi else ""
        if not p.is_floating_point():
            raise LatentError(
                f"The {what}{which} has dtype {p.dtype}; latents are floating-point tensors "
                "(float32, or float64/float16, which are cast to the generator's dtype). "
                "Pass class labels and other integers as float one-hot vectors, or convert "
                "them in a forward=... function."
            )
        if p.is_meta:
            raise LatentError(
                f"The {what}{which} is a meta tensor (a shape without values); pass a latent "
                "with values, e.g. adapter.sample_latents(n)."
            )
        if p.dim() != len(shape) + 1 or tuple(p.shape[1:]) != tuple(shape):
            raise LatentError(
                f"The {what}{which} has shape {tuple(p.shape)}; expected (N, "
                f"{', '.join(map(str, shape))}) with the batch first."
                + (" Add a batch axis with z.unsqueeze(0)." if tuple(p.shape) == tuple(shape) else "")
            )
        sizes.add(int(p.shape[0]))
    if len(sizes) != 1:
        raise LatentError(
            f"The inputs of the {what} have different batch sizes {sorted(sizes)}; every "
            f"per-sample input must have one row per sample."
        )
    n = sizes.pop()
    if n < 1:
        raise LatentError(f"The {what} is empty (batch size 0).")
    return n


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of the stream ``seed`` (independent streams).

    ``seed`` is in ``[0, 2**32)`` and ``index`` >= 0 (:func:`sample` checks both): no two
    streams share a seed.
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def sample(
    prior: Prior, shapes: Sequence[tuple[int, ...]], n: int, seed: int, start: int = 0
) -> Latent:
    """Draw samples ``start .. start+n-1`` of the stream ``seed`` from ``prior``.

    Each sample has its own generator seeded from ``(seed, index)``, so sample ``i`` is the
    same whatever ``n``, ``start`` or batch size it is drawn with. ``n``, ``seed`` and
    ``start`` may be Python or numpy integers; ``seed`` is in ``[0, 2**32)``.
    """
    n = checks.positive_int(n, "The number of samples")
    seed = checks.seed(seed)  # 2**32 would silently be seed 0, 1.5 seed 1
    start = checks.integer(start, "start", low=0)
    if isinstance(prior, str) and prior not in ("normal", "uniform"):
        raise ConfigError(
            f"Unknown prior {prior!r}: use 'normal', 'uniform' or a callable(n, generator)."
        )
    draws = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(sample_seed(seed, i))
        if prior == "normal":
            one: Latent = _pack([torch.randn((1, *s), generator=g) for s in shapes])
        elif prior == "uniform":
            one = _pack([torch.rand((1, *s), generator=g) * 2 - 1 for s in shapes])
        else:
            one = prior(1, g)  # type: ignore[operator]
            check_latent(one, shapes, what="latent returned by the prior")
        draws.append(one)
    return concat(draws)


class LatentSource(Protocol):
    """Anything that draws latents like :meth:`cfmodules.GeneratorAdapter.sample_latents`."""

    def sample_latents(self, n: int, seed: int = 0, start: int = 0) -> Latent: ...


def pair_latents(source: LatentSource, n: int, seed: int = 0, start: int = 0
                 ) -> tuple[Latent, Latent]:
    """Latents of pairs ``start .. start+n-1``: pair ``p`` is (sample ``2p``, sample ``2p+1``).

    The one pairing of Original 1 with Original 2 in cfmodules: influence maps, module
    hybrids, classifier robustness, Fréchet distances and the figures all draw their pairs
    here, so pair ``p`` of stream ``seed`` is the same two images everywhere, whatever the
    batch size. The arguments are those of ``sample_latents(n, seed, start)``, counted in
    pairs.

    Parameters
    ----------
    source : GeneratorAdapter (or any object with ``sample_latents(n, seed=, start=)``)
    n : int
        Number of pairs.
    seed : int, default 0
        Latent stream.
    start : int, default 0
        First pair.

    Returns
    -------
    z1, z2 : Latent
        Original 1 and Original 2 of each pair: ``(n, *latent_shape)`` each (tuples of such
        tensors for multi-input generators), on the source's device.
    """
    n = checks.positive_int(n, "The number of pairs")
    start = checks.integer(start, "start", low=0)
    z = source.sample_latents(2 * n, seed=seed, start=2 * start)
    even = torch.arange(0, 2 * n, 2)
    return select(z, even), select(z, even + 1)


def latent_shapes(latent_shape: object) -> list[tuple[int, ...]]:
    """``latent_shape`` as a list of per-sample shapes, one per input (raises ConfigError).

    ``100``, ``(100, 1, 1)`` and ``((100,), (10,))`` (two inputs) are accepted; numpy
    integers too, bools and non-positive sizes are not.
    """
    def is_dim(d: object) -> bool:  # numpy integers too, bools not
        return isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0

    def is_shape(s: object) -> bool:
        return isinstance(s, (tuple, list, torch.Size)) and all(is_dim(d) for d in s)

    def shape(s: Any) -> tuple[int, ...]:
        return (int(s),) if is_dim(s) else tuple(int(d) for d in s)

    if is_dim(latent_shape):
        return [shape(latent_shape)]
    if is_shape(latent_shape) and len(latent_shape) > 0:  # type: ignore[arg-type]
        return [shape(latent_shape)]
    if isinstance(latent_shape, (tuple, list)) and latent_shape and all(
        is_shape(s) and len(s) > 0 or is_dim(s) for s in latent_shape
    ):
        return [shape(s) for s in latent_shape]
    raise ConfigError(
        f"latent_shape must be a per-sample shape such as (100, 1, 1), or a tuple of shapes "
        f"for a generator with several inputs, got {latent_shape!r}."
    )


def loses_precision(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting floating ``src`` to ``dst`` can change a value."""
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.bits < a.bits or b.eps > a.eps or b.max < a.max
