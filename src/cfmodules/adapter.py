"""GeneratorAdapter: one object that knows how to sample, run, trace and intervene on a generator.

It wraps any ``nn.Module`` generator. The generator runs in eval mode under ``no_grad``
(a train-mode BatchNorm would make a counterfactual depend on the rest of the batch);
the user's mode is restored afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import fx, nn

from cfmodules import latents as L
from cfmodules._deprecation import warn_renamed
from cfmodules.engine.cut import Cut, Engine, Explanation
from cfmodules.errors import (
    ChannelError,
    ConfigError,
    GeneratorOutputError,
    LayerCallError,
    LayerNotFoundError,
    ShapeError,
)
from cfmodules.hooks import HookSession, hooked, resolve_layer, resolve_layers

__all__ = ["GeneratorAdapter", "LayerInfo", "ChannelSpec", "channel_index"]

ChannelSpec = Union[Sequence[int], torch.Tensor, range]
"""Channel indices of one layer: a list, range, 1-d integer tensor or array."""

Replacement = Union[tuple[ChannelSpec, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


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


class GeneratorAdapter:
    """Wrap a generator for counterfactual interventions on its hidden channels.

    Subclasses may override these (docs/own_generator.md), and every cfmodules path
    honours them:

    - ``forward_fn(self, generator, latent)`` (a method instead of ``forward=``): the raw
      call. Captured graphs trace through it together with the generator.
    - ``images(self, raw, n)``: raw output -> images; applied after every path.
    - ``generate(self, z, batch_size=None)``: if overridden, every counterfactual
      (hybrids, influence maps, evaluation) runs full forwards through it with a hook
      at the layer, so e.g. a mirrored output is mirrored in hybrids too (slower:
      ``explain()`` says so).
    - ``sample_latents``, ``encode``, ``to_unit``: as documented.

    Parameters
    ----------
    generator : nn.Module
        Any generator. Its forward maps a latent batch to images.
    latent_shape : tuple of int, or tuple of such tuples
        Per-sample shape of the latent, e.g. ``(100, 1, 1)``; for a generator with several
        per-sample inputs (noise, class vector, truncation) a tuple of shapes, one per input.
    prior : "normal", "uniform" or callable, default "normal"
        Distribution of the latent: standard normal, uniform on [-1, 1], or
        ``callable(n, generator) -> Latent`` drawing ``n`` samples with a ``torch.Generator``.
    forward : callable, optional
        ``forward(generator, latent) -> raw output`` for generators with unusual signatures.
        Default: ``generator(latent)`` or ``generator(*latent)`` for a tuple.
    output_transform : callable, optional
        ``output_transform(raw) -> images (N, C, H, W)``, for generators that return tuples,
        dicts or images to be post-processed (e.g. logits -> sigmoid).
    output_range : (float, float), default (-1, 1)
        Value range of the images after ``output_transform``; used only for display.
    encoder : callable, optional
        ``encoder(images) -> Latent``, e.g. a VAE's posterior mean, so hybrids can be made
        of real images.
    device : str or torch.device, optional
        Where latents and computations go. Default: the device of the generator's parameters.
    name : str, optional
        A name for reports and result files.
    """

    forward_fn: Callable[[nn.Module, L.Latent], Any] | None = None
    """The raw call ``forward_fn(generator, latent)`` (None: ``generator(latent)``)."""

    def __init__(
        self,
        generator: nn.Module,
        latent_shape: Sequence[int] | Sequence[Sequence[int]],
        *,
        prior: L.Prior = "normal",
        forward: Callable[[nn.Module, L.Latent], Any] | None = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
        encoder: Callable[[torch.Tensor], L.Latent] | None = None,
        device: str | torch.device | None = None,
        name: str | None = None,
    ):
        if not isinstance(generator, nn.Module):
            raise ConfigError(
                f"GeneratorAdapter wraps a torch.nn.Module, got {type(generator).__name__}."
            )
        shapes = _latent_shapes(latent_shape)
        if isinstance(prior, str) and prior not in ("normal", "uniform"):
            raise ConfigError(
                f"Unknown prior {prior!r}: use 'normal', 'uniform' or a callable(n, generator)."
            )
        lo, hi = output_range
        if not hi > lo:
            raise ConfigError(f"output_range must be (low, high) with low < high, got {output_range}.")
        self.generator = generator
        self.latent_shapes = shapes
        self.prior = prior
        if forward is not None:  # a subclass may define forward_fn as a method instead
            self.forward_fn = forward
        self.output_transform = output_transform
        self.output_range = (float(lo), float(hi))
        self.encoder = encoder
        self.name = name or type(generator).__name__
        if device is None:
            p = next(iter(generator.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self._warned_train = False
        self._engine: Engine | None = None
        self._sessions: list[HookSession] = []  # open trace/intervene blocks

    # ------------------------------------------------------------------ latents
    @property
    def latent_shape(self) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The per-sample latent shape (a tuple of shapes for multi-input generators)."""
        return self.latent_shapes[0] if len(self.latent_shapes) == 1 else tuple(self.latent_shapes)

    def sample_latents(self, n: int, seed: int = 0, start: int = 0) -> L.Latent:
        """Draw ``n`` latents from the prior, on the adapter's device.

        Sample ``i`` depends only on ``(seed, start + i)``: the same whatever the batch size.

        Returns
        -------
        Tensor (n, *latent_shape), or a tuple of such tensors for multi-input generators.
        """
        return L.to_device(L.sample(self.prior, self.latent_shapes, n, seed, start), self.device)

    def check_latent(self, z: object, what: str = "latent") -> int:
        """Validate a latent batch; return its batch size (raises LatentError)."""
        return L.check_latent(z, self.latent_shapes, what)

    # ------------------------------------------------------------------ running
    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the block with the generator in eval mode and without gradients.

        Every module's ``training`` flag is restored afterwards, also after an error. A
        generator left in train mode with BatchNorm or Dropout gets one warning per adapter
        (in train mode they would make a counterfactual depend on the rest of the batch).
        Everything cfmodules runs on the generator runs inside this; use it for your own
        forward passes on the adapter's modules too.
        """
        modes = [(m, m.training) for m in self.generator.modules()]
        if any(t for _, t in modes):
            if not self._warned_train and any(t and isinstance(m, _MODE_DEPENDENT) for m, t in modes):
                warnings.warn(
                    f"{self.name} is in train mode; cfmodules runs it in eval mode (BatchNorm "
                    "and Dropout in train mode would make a counterfactual depend on the rest "
                    "of the batch) and restores train mode afterwards.",
                    UserWarning,
                    stacklevel=4,
                )
                self._warned_train = True
            self.generator.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, t in modes:
                m.training = t

    def _raw(self, z: L.Latent) -> Any:
        """One forward of the generator, with the call counts of open hook blocks reset."""
        with self._one_forward():
            if self.forward_fn is not None:
                return self.forward_fn(self.generator, z)
            return self.generator(*z) if isinstance(z, tuple) else self.generator(z)

    @contextmanager
    def _one_forward(self) -> Iterator[None]:
        for s in self._sessions:
            s.reset()
        yield
        for s in self._sessions:
            s.check_complete()

    @contextmanager
    def _session(self, edits: Mapping[str, Any]) -> Iterator[HookSession]:
        with hooked(self.generator, edits) as session:
            self._sessions.append(session)
            try:
                yield session
            finally:
                self._sessions.remove(session)

    def images(self, raw: Any, n: int | None = None) -> torch.Tensor:
        """Apply ``output_transform`` to a raw output and check it is an image batch."""
        out = self.output_transform(raw) if self.output_transform is not None else raw
        if not isinstance(out, torch.Tensor):
            raise GeneratorOutputError(
                f"{self.name} returned {type(out).__name__}, not a tensor. Pass "
                "output_transform=... to GeneratorAdapter to pick the images, e.g. "
                "lambda out: out[0] for a tuple or lambda out: out['image'] for a dict."
            )
        if out.dim() < 2 or (n is not None and out.shape[0] != n):
            raise GeneratorOutputError(
                f"{self.name} returned a tensor of shape {tuple(out.shape)}; expected a batch "
                f"of {n} images (N, C, H, W). Check forward/output_transform."
            )
        if not out.is_floating_point():
            out = out.float()
        return out

    def generate(self, z: L.Latent, batch_size: int | None = None) -> torch.Tensor:
        """Run the generator on a latent batch.

        Parameters
        ----------
        z : Latent
            ``(N, *latent_shape)`` tensor or tuple of per-sample tensors.
        batch_size : int, optional
            Run in chunks of this many samples (the result does not depend on it).

        Returns
        -------
        Tensor (N, C, H, W)
            Images after ``output_transform``, on the adapter's device.
        """
        n = self.check_latent(z)
        z = L.to_device(z, self.device)
        step = batch_size or n
        outs = []
        with self.eval_mode():
            for s in range(0, n, step):
                zi = L.select(z, slice(s, s + step))
                outs.append(self.images(self._raw(zi), L.batch_size(zi)))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def encode(self, images: torch.Tensor) -> L.Latent:
        """Map real images to latents with the adapter's ``encoder`` (e.g. a VAE's mean)."""
        if self.encoder is None:
            raise ConfigError(
                f"{self.name} has no encoder; pass encoder=... to GeneratorAdapter to make "
                "hybrids of real images."
            )
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ShapeError(
                f"encode() takes images of shape (N, C, H, W), got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}."
            )
        enc = self.encoder
        mods = [(m, m.training) for m in enc.modules()] if isinstance(enc, nn.Module) else []
        try:
            for m, _ in mods:
                m.eval()
            with torch.no_grad():
                z = enc(images.to(self.device))
        finally:
            for m, t in mods:
                m.training = t
        self.check_latent(z, what="latent returned by the encoder")
        return z

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Map images from ``output_range`` to [0, 1] for display (clamped)."""
        lo, hi = self.output_range
        return ((images - lo) / (hi - lo)).clamp(0, 1)

    # ------------------------------------------------------------------ layers
    def submodule(self, layer: str) -> nn.Module:
        """The ``nn.Module`` of the layer ``layer`` (a typo raises LayerNotFoundError with
        suggestions). Not a *module* in the paper's sense (a group of channels, see
        :data:`cfmodules.hybrid.Module`)."""
        return resolve_layer(self.generator, layer).module

    def module(self, layer: str) -> nn.Module:
        """Deprecated alias of :meth:`submodule`."""
        warn_renamed("GeneratorAdapter.module(layer)", "GeneratorAdapter.submodule(layer)")
        return self.submodule(layer)

    def layers(self) -> list[LayerInfo]:
        """Every named submodule with its output shape and channel count (one dry forward)."""
        names = [n for n, _ in self.generator.named_modules() if n]
        shapes: dict[str, list[tuple[int, ...] | None]] = {}
        modules = dict(self.generator.named_modules())
        handles = []

        def make(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                shapes.setdefault(name, []).append(
                    tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None)
            return hook

        z = self.sample_latents(1, seed=0)
        try:
            for n in names:
                handles.append(modules[n].register_forward_hook(make(n)))
            with self.eval_mode():
                self.images(self._raw(z), 1)
        finally:
            for h in handles:
                h.remove()
        return [
            LayerInfo(n, type(modules[n]).__name__, shapes[n][0],
                      (shapes[n][0][0] if shapes[n][0] else None), len(shapes[n]),
                      tuple(shapes[n]))
            for n in names if n in shapes
        ]

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-sample output shape of ``layer`` (of call ``k`` for ``"path:k"``)."""
        info = {i.name: i for i in self.layers_cached()}
        ref = resolve_layer(self.generator, layer)
        found = info.get(ref.path)
        k = ref.call or 0
        if found is not None and k >= found.calls:
            raise LayerCallError(
                f"Layer '{layer}' names call {k}, but '{ref.path}' ran {found.calls} time(s) "
                f"in a forward; use a call index below {found.calls}."
            )
        shape = found.call_shapes[k] if found is not None else None
        if not shape:
            raise LayerNotFoundError(
                f"Layer '{layer}' does not run in a forward of {self.name} or does not output "
                "a tensor; choose one of adapter.layers()."
            )
        return shape

    def layer_channels(self, layer: str) -> int:
        """Number of channels of ``layer``'s output (dimension 1), as in :meth:`layer_shape`."""
        return self.layer_shape(layer)[0]

    def layers_cached(self) -> list[LayerInfo]:
        """:meth:`layers`, computed once per adapter."""
        if not hasattr(self, "_layers_cache"):
            self._layers_cache = self.layers()
        return self._layers_cache

    # ------------------------------------------------------------------ trace / intervene
    @contextmanager
    def trace(self, layers: str | Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Record the output of ``layers`` during :meth:`generate` calls in the block.

        Yields a dict ``layer -> Tensor (N, C, ...)``, filled as the generator runs (the
        batches of several calls are concatenated).
        """
        refs = resolve_layers(self.generator, layers)
        record: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable[[torch.Tensor], None]:
            def edit(out: torch.Tensor) -> None:
                v = out.detach().clone()
                record[name] = torch.cat([record[name], v]) if name in record else v
            return edit

        with self._session({r.name: make(r.name) for r in refs}):
            yield record

    @contextmanager
    def intervene(self, replacements: Mapping[str, Replacement]) -> Iterator[None]:
        """Replace channels of one or several layers during :meth:`generate` calls.

        Parameters
        ----------
        replacements : dict
            ``layer -> (channels, values)`` with ``values`` of shape
            ``(N, len(channels), *spatial)`` for the batch being generated, or
            ``layer -> callable(output) -> new output``.
        """
        refs = resolve_layers(self.generator, list(replacements))
        edits = {}
        for r in refs:
            rep = replacements[r.name]
            if callable(rep) and not isinstance(rep, tuple):
                edits[r.name] = rep
                continue
            if not (isinstance(rep, tuple) and len(rep) == 2):
                raise ConfigError(
                    f"intervene() takes layer -> (channels, values) or layer -> callable; got "
                    f"{type(rep).__name__} for '{r.name}'."
                )
            channels, values = rep
            idx = channel_index(channels, self.layer_channels(r.name), r.name)
            edits[r.name] = _replace_channels(r.name, idx, values)
        with self._session(edits):
            yield

    # ------------------------------------------------------------------ prefix / suffix
    @property
    def engine(self) -> Engine:
        """The :class:`~cfmodules.engine.Engine` that cuts this generator at layers."""
        if self._engine is None:
            self._engine = Engine(self)
        return self._engine

    def graph(self) -> fx.GraphModule | None:
        """The whole forward (with ``forward``) traced by ``torch.fx`` in eval mode, or None."""
        return self.engine.whole_graph()

    def split(self, layer: str) -> Cut:
        """Cut the generator at ``layer``: ``prefix(z)`` once, ``suffix(state, act)`` often.

        The engine picks the fastest exact path (a captured graph of the forward, a
        captured submodule, or a full forward with a replacing hook); all give the same
        numbers up to float rounding. The suffix returns images (after
        ``output_transform``). :meth:`explain` says which path runs.
        """
        return self.engine.cut(layer)

    def explain(self, layer: str, algorithm: str = "auto") -> Explanation:
        """Which path counterfactuals at ``layer`` take, why, and the FLOPs of one hybrid.

        Parameters
        ----------
        layer : str
        algorithm : {"auto", "split", "hook"}
            As for :func:`cfmodules.influence_maps` (``"auto"`` may use the linear shortcut).

        Returns
        -------
        Explanation
            ``path`` ("linear shortcut", "split", "partial" or "hook"), the reason, every
            capture tried with its error, ``flops_hybrid`` / ``flops_full`` and ``limit``
            (their ratio). ``print()`` it for a summary.
        """
        return self.engine.explain(layer, algorithm)

    def refresh(self) -> None:
        """Forget every captured graph and weight copy (the next use captures again).

        Changes are detected without this (see :mod:`cfmodules.engine.cut`); call it after
        editing weights through ``.data`` while a callback runs inside an influence run.
        """
        self.engine.refresh()

    def __repr__(self) -> str:
        shape = self.latent_shape
        return (f"GeneratorAdapter({self.name}, latent_shape={shape}, prior="
                f"{self.prior if isinstance(self.prior, str) else 'callable'}, device={self.device})")


_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def _replace_channels(layer: str, idx: torch.Tensor, values: torch.Tensor) -> Callable:
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


def _latent_shapes(latent_shape: object) -> list[tuple[int, ...]]:
    def is_shape(s: object) -> bool:
        return isinstance(s, (tuple, list, torch.Size)) and all(
            isinstance(d, int) and d > 0 for d in s
        )

    if isinstance(latent_shape, int) and latent_shape > 0:
        return [(latent_shape,)]
    if is_shape(latent_shape) and len(latent_shape) > 0:  # type: ignore[arg-type]
        return [tuple(latent_shape)]  # type: ignore[arg-type]
    if isinstance(latent_shape, (tuple, list)) and latent_shape and all(
        is_shape(s) or (isinstance(s, int) and s > 0) for s in latent_shape
    ):
        return [tuple(s) if not isinstance(s, int) else (s,) for s in latent_shape]
    raise ConfigError(
        f"latent_shape must be a per-sample shape such as (100, 1, 1), or a tuple of shapes "
        f"for a generator with several inputs, got {latent_shape!r}."
    )
