"""Random draws inside a generator's forward: find them, and hold them fixed per sample.

StyleGAN-style generators add ``torch.randn(...)`` noise inside ``forward``. Then two
forwards of the same latent differ, a hybrid with nothing swapped differs from Original 1,
and every influence map sits on a noise floor. This module sees every random draw of a
forward at the level of PyTorch's operators (a ``TorchDispatchMode``), so ``torch.randn``,
``randn_like``, ``rand``, ``randint``, ``Tensor.normal_``/``uniform_``/``bernoulli_``,
``torch.empty(...).normal_()``, ``torch.bernoulli``, ``torch.normal`` and train-mode
dropout are all seen, wherever in the forward they happen.

:class:`DrawRecorder` lists the draws of a forward; :func:`check_forward` is the adapter's
first-use check (same images for the same latents, in any order and batch?).

:class:`PerSampleNoise` replaces every draw by one that is fixed per sample:

- A draw whose first dimension is the batch size (``torch.randn(n, C, H, W)``) is made
  row by row. Row ``r`` comes from a ``torch.Generator`` seeded from a hash of sample
  ``r``'s latent (the bytes of every input of that row) and the draw's *ordinal*, its
  position among the draws of the forward. So the noise a sample gets depends only on its
  latent: not on the batch it is in, its position there, or which channels a hybrid swaps.
  The hybrid of pair ``p`` runs on Original 1's latent and so sees Original 1's noise.
- Any other draw (``torch.randn(1, C, H, W)`` broadcast over the batch, a scalar) is
  shared by the batch and is seeded from its ordinal alone. In a forward of one sample a
  draw of first dimension 1 is ambiguous; the adapter learns at first use (a forward of two
  samples) which ordinals are shared.

Draws with an explicit ``generator=`` are replaced too. Randomness outside PyTorch's
operators (``numpy.random``, Python's ``random``) cannot be seen; the adapter's first-use
check still finds it and refuses.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cfmodules import latents as L
from cfmodules.errors import NondeterministicForwardError

__all__ = ["NOISE_MODES", "Draw", "DrawRecorder", "PerSampleNoise", "check_forward", "is_random",
           "row_keys"]

NOISE_MODES = ("per-sample",)
"""Values of ``GeneratorAdapter(noise=...)`` besides ``None``."""

_aten = torch.ops.aten
_FACTORY_FILL = {  # factory op -> (in-place op that draws the same distribution, its params)
    "randn": "normal", "rand": "uniform", "randint": "random",
}
_LIKE_FILL = {"randn_like": "normal", "rand_like": "uniform", "randint_like": "random"}
_INPLACE = {"normal_", "uniform_", "bernoulli_", "exponential_", "cauchy_", "log_normal_",
            "geometric_", "random_"}
_FUNCTIONAL = {"bernoulli", "normal", "multinomial", "poisson", "binomial", "_standard_gamma",
               "_sample_dirichlet"}
_DROPOUT = {"native_dropout"}
_SHARED_ONLY = {"randperm"}
_KNOWN = (set(_FACTORY_FILL) | set(_LIKE_FILL) | _INPLACE | _FUNCTIONAL | _DROPOUT
          | _SHARED_ONLY)


def _packet(func: Any) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def is_random(func: Any) -> bool:
    """Whether the aten operator ``func`` draws random numbers."""
    if _packet(func) in _KNOWN:
        return True
    schema = getattr(func, "_schema", None)
    return schema is not None and any(a.name == "generator" for a in schema.arguments)


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _first_tensor(bound: dict[str, Any]) -> torch.Tensor | None:
    return next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)


def _leading(func: Any, bound: dict[str, Any]) -> int | None:
    """The first dimension of what the draw fills (None for a 0-d draw)."""
    name = _packet(func)
    if name in _FACTORY_FILL or (name == "normal" and "size" in bound):
        size = list(bound.get("size") or ())
        return int(size[0]) if size else None
    t = bound.get("self", _first_tensor(bound))
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        return int(t.shape[0])
    return None


@dataclass(frozen=True)
class Draw:
    """One random draw of a forward: the operator, what it fills, whether it had a generator."""

    op: str
    leading: int | None
    explicit_generator: bool


class DrawRecorder(TorchDispatchMode):
    """Record every random draw of the forwards run inside the block (changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if is_random(func):
            bound = _bind(func, args, kwargs)
            self.draws.append(Draw(str(func), _leading(func, bound),
                                   bound.get("generator") is not None))
        return func(*args, **kwargs)


def row_keys(z: L.Latent) -> np.ndarray:
    """A 64-bit key per sample: a hash of the bytes of every input of that row, ``(N,)``."""
    parts = z if isinstance(z, tuple) else (z,)
    n = L.batch_size(z)
    flat = [p.detach().to("cpu").contiguous().reshape(n, -1).view(torch.uint8).numpy()
            for p in parts]
    rows = np.concatenate(flat, axis=1) if len(flat) > 1 else flat[0]
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(),
                                    "little") for r in rows], dtype=np.uint64)


def _seed(key: int | None, ordinal: int) -> int:
    """The seed of one draw: from the sample's key (None: a draw shared by the batch)."""
    data = (b"shared" if key is None else struct.pack("<Q", int(key))) + struct.pack("<Q", ordinal)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class PerSampleNoise(TorchDispatchMode):
    """Make every random draw of one forward a function of the sample's latent and its ordinal.

    Parameters
    ----------
    keys : ndarray (N,) of uint64
        :func:`row_keys` of the forward's latent batch.
    shared : collection of int
        Ordinals of draws known to be shared by the batch (used when ``N == 1``).
    """

    def __init__(self, keys: np.ndarray, shared: Sequence[int] | frozenset[int] = frozenset()):
        super().__init__()
        self.n = int(len(keys))
        self.keys = [int(k) for k in keys]
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.unique = [int(k) for k in uniq]
        self.inverse = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
        self.shared = frozenset(shared)
        self.ordinal = 0

    # -- helpers
    def _gen(self, device: torch.device, key: int | None, ordinal: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(_seed(key, ordinal))

    def _per_row(self, leading: int | None, ordinal: int) -> bool:
        if leading is None or leading != self.n:
            return False
        return not (self.n == 1 and ordinal in self.shared)

    def _fill(self, out: torch.Tensor, fill: Callable[[torch.Tensor, torch.Generator], Any],
              per_row: bool, ordinal: int) -> torch.Tensor:
        """Fill ``out`` in place: row r by ``fill(row, generator(key_r))``, or all at once."""
        if not per_row:
            fill(out, self._gen(out.device, None, ordinal))
            return out
        rows = []
        for key in self.unique:  # each distinct sample once, then copied to its rows
            t = torch.empty((1, *out.shape[1:]), dtype=out.dtype, device=out.device)
            fill(t, self._gen(out.device, key, ordinal))
            rows.append(t)
        out.copy_(torch.cat(rows).index_select(0, self.inverse.to(out.device)))
        return out

    def _refuse(self, func: Any, why: str) -> NondeterministicForwardError:
        return NondeterministicForwardError(
            f"noise='per-sample' cannot hold the draw {func} fixed per sample ({why}). Make "
            "the noise an input of the generator (a per-sample latent input, see "
            "latent_shape) or draw it with a per-sample torch.Generator."
        )

    # -- the mode
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not is_random(func):
            return func(*args, **kwargs)
        o = self.ordinal
        self.ordinal += 1
        name = _packet(func)
        b = _bind(func, args, kwargs)
        per_row = self._per_row(_leading(func, b), o)

        if name in _FACTORY_FILL or (name == "normal" and "size" in b):
            dtype = b.get("dtype") or (torch.int64 if name == "randint" else
                                       torch.get_default_dtype())
            out = torch.empty(list(b["size"]), dtype=dtype, device=b.get("device"),
                              layout=b.get("layout") or torch.strided)
            fill = _fill_fn("normal" if name == "normal" else _FACTORY_FILL[name], b)
            return self._fill(out, fill, per_row, o)
        if name in _LIKE_FILL:
            out = torch.empty_like(b["self"], dtype=b.get("dtype"), device=b.get("device"),
                                   memory_format=b.get("memory_format")
                                   or torch.preserve_format)
            return self._fill(out, _fill_fn(_LIKE_FILL[name], b), per_row, o)
        if name in _INPLACE:
            self_t = b["self"]
            params = {k: v for k, v in b.items() if k not in ("self", "generator")}
            if any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in params.values()):
                return self._rowwise_inplace(func, self_t, params, per_row, o)

            def fill(t: torch.Tensor, g: torch.Generator) -> None:
                func(t, **params, generator=g)
            if not per_row:
                fill(self_t, self._gen(self_t.device, None, o))
                return self_t
            return self._fill(self_t, fill, True, o)
        if name in _DROPOUT:
            x, p, train = b["input"], float(b["p"]), b.get("train")
            if train is False:
                return func(*args, **kwargs)
            mask = torch.empty_like(x)
            self._fill(mask, lambda t, g: t.bernoulli_(1 - p, generator=g), per_row, o)
            out = x * mask * (1.0 / (1 - p)) if p < 1 else x * 0
            return out, mask.bool()
        if name in _SHARED_ONLY:  # randperm(n): a permutation, never split by sample
            device = torch.device(b.get("device") or "cpu")
            return torch.randperm(int(b["n"]), generator=self._gen(device, None, o),
                                  dtype=b.get("dtype") or torch.int64, device=device)
        if name in _FUNCTIONAL and "generator" in [a.name for a in func._schema.arguments]:
            return self._rowwise_functional(func, b, per_row, o)
        raise self._refuse(func, "an operator cfmodules does not know how to split by sample")

    def _rowwise_inplace(self, func: Any, self_t: torch.Tensor, params: dict[str, Any],
                         per_row: bool, o: int) -> torch.Tensor:
        """An in-place draw with tensor parameters (e.g. ``bernoulli_(p_tensor)``), row by row."""
        if not per_row:
            func(self_t, **params, generator=self._gen(self_t.device, None, o))
            return self_t
        for r in range(self.n):
            row = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) and v.dim() == self_t.dim()
                       and v.shape[0] == self.n else v) for k, v in params.items()}
            t = torch.empty_like(self_t[r:r + 1])
            func(t, **row, generator=self._gen(self_t.device, self.keys[r], o))
            self_t[r:r + 1].copy_(t)
        return self_t

    def _rowwise_functional(self, func: Any, b: dict[str, Any], per_row: bool, o: int) -> Any:
        """A draw computed from tensors (``torch.bernoulli(p)``, ``torch.normal(mean)``...)."""
        first = _first_tensor(b)
        device = first.device if first is not None else torch.device("cpu")
        if not per_row:
            return func(**{**b, "generator": self._gen(device, None, o)})
        outs = []
        for r in range(self.n):
            row = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) and v.dim() > 0
                       and v.shape[0] == self.n else v) for k, v in b.items()}
            row["generator"] = self._gen(device, self.keys[r], o)
            outs.append(func(**row))
        return torch.cat(outs)


def _fill_fn(kind: str, b: dict[str, Any]) -> Callable[[torch.Tensor, torch.Generator], Any]:
    """The in-place draw that gives a factory's distribution."""
    if kind == "normal":
        mean, std = float(b.get("mean", 0.0)), float(b.get("std", 1.0))
        return lambda t, g: t.normal_(mean, std, generator=g)
    if kind == "uniform":
        return lambda t, g: t.uniform_(0.0, 1.0, generator=g)
    low = int(b.get("low", 0) or 0)
    high = int(b["high"])
    return lambda t, g: t.random_(low, high, generator=g)


# ---------------------------------------------------------------------- the first-use check
def check_forward(adapter: Any) -> frozenset[int] | None:
    """The adapter's first-use check: does the forward give the same images for the same
    latents?

    Runs two samples three times (inside ``eval_mode``, no hooks open, the global random
    state forked so that the user's stream is untouched); only when the images differ,
    or with ``noise="per-sample"``, once more to name the random draws. Raises
    NondeterministicForwardError when the images change between runs or with the
    samples' order in the batch (unless ``noise="per-sample"`` holds them fixed). A
    generator that fails on this probe is left to fail on the real call instead.

    Returns
    -------
    frozenset of int or None
        Once the forward passed: the ordinals of its draws that the batch shares (see
        :class:`PerSampleNoise`; empty when the forward needs no dispatch mode). None when
        the probe itself failed.
    """
    devices = [adapter.device] if adapter.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=adapter.device.type
                                   if devices else "cuda"):
            z = adapter.sample_latents(2, seed=0)
            swapped = L.select(z, torch.tensor([1, 0]))
            y1 = adapter.images(adapter._call(z), 2)
            y2 = adapter.images(adapter._call(z), 2)
            y3 = adapter.images(adapter._call(swapped), 2).flip(0)
            problem = nondeterminism(y1, y2, y3)
            if problem is None and adapter.noise is None:
                return frozenset()  # the common case: no dispatch mode needed
            # name the draws (and learn which are shared by the batch): a dispatch mode,
            # whose first use in a process costs an import of a few seconds
            rec = DrawRecorder()
            with rec:
                adapter._call(z)
            shared = frozenset(i for i, d in enumerate(rec.draws) if d.leading != 2)
            if adapter.noise is None:
                raise NondeterministicForwardError(
                    noise_message(adapter.name, problem, rec.draws))  # type: ignore[arg-type]
            if problem is None and not rec.draws:
                warnings.warn(
                    f"{adapter.name} draws no random numbers in its forward; "
                    "noise='per-sample' changes nothing but makes every hybrid a "
                    "full forward. Pass noise=None.", UserWarning, stacklevel=6)
            _check_per_sample(adapter, z, swapped, shared)
    except NondeterministicForwardError:
        raise
    except Exception:  # the real call will raise the generator's own error
        return None
    return shared


def _check_per_sample(adapter: Any, z: L.Latent, swapped: L.Latent,
                      shared: frozenset[int]) -> None:
    """With ``noise="per-sample"``: the held noise must not depend on run, order or batch."""
    def run(x: L.Latent) -> torch.Tensor:
        with PerSampleNoise(row_keys(x), shared):
            return adapter.images(adapter._call(x), L.batch_size(x))

    y1, y2, y3 = run(z), run(z), run(swapped).flip(0)
    y4 = torch.cat([run(L.select(z, slice(i, i + 1))) for i in range(2)])
    problem = nondeterminism(y1, y2, y3) or nondeterminism(y1, y1, y4, "batch size")
    if problem is not None:
        raise NondeterministicForwardError(
            f"{adapter.name}'s forward is not deterministic even with noise='per-sample': "
            f"{problem}. cfmodules holds fixed the random draws of torch operators; "
            "randomness from numpy, Python's random module or state kept between "
            "calls cannot be held. Make the forward deterministic, or pass the noise as "
            "a per-sample input (latent_shape with one shape per input)."
        )


def nondeterminism(y1: torch.Tensor, y2: torch.Tensor, y3: torch.Tensor,
                    what: str = "order in the batch") -> str | None:
    """Why three images of the same two samples disagree (None: they agree).

    ``y1``, ``y2``: the same batch twice (must agree bitwise). ``y3``: the same samples run
    another way (must agree to float rounding).
    """
    same = (y1 == y2) | (y1.isnan() & y2.isnan())
    if not bool(same.all()):
        diff = float((y1 - y2).abs().nan_to_num(0).max())
        return f"two forwards of the same latents differ by up to {diff:.3g}"
    scale = float(y1.abs().nan_to_num(0).max()) or 1.0
    diff = float((y1 - y3).abs().nan_to_num(0).max())
    if diff > 1e-4 * scale + 1e-6:
        return f"a sample's image changes by up to {diff:.3g} with its {what}"
    return None


def noise_message(name: str, problem: str, draws: Sequence[Draw]) -> str:
    ops = sorted({d.op for d in draws})
    seen = (f"It calls {', '.join(ops)} ({len(draws)} random draw(s) per forward). "
            if ops else "No torch random operator was seen, so the randomness comes from "
            "elsewhere (numpy, Python's random module, state kept between calls)"
            + (", or the forward mixes the samples of a batch. " if "order" in problem
               else ". "))
    fix = ("Pass GeneratorAdapter(..., noise='per-sample') to hold every draw fixed per "
           "sample (same latent, same noise, in any batch; hybrids keep Original 1's noise), "
           "or make the noise an input of the generator (a per-sample latent input)."
           if ops else "Make the forward deterministic or pass the noise as a per-sample "
           "latent input.")
    return (f"{name}'s forward is not deterministic: {problem}. {seen}Hybrids and influence "
            f"maps would sit on a noise floor, so cfmodules refuses. {fix}")
