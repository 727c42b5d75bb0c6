"""GeneratorAdapter: one object that knows how to sample, run, trace and intervene on a generator.

It wraps any ``nn.Module`` generator. The generator runs in eval mode under ``no_grad``
(a train-mode BatchNorm would make a counterfactual depend on the rest of the batch);
the user's mode is restored afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from cfmodules import checks
from cfmodules import latents as L
from cfmodules import noise as N
from cfmodules.channels import Replacement, channel_index, replace_channels
from cfmodules.errors import ConfigError, GeneratorOutputError, ShapeError
from cfmodules.hooks import HookSession, hooked, resolve_layer, resolve_layers
from cfmodules.layers import LayerInfo, call_shape, record_layers

__all__ = ["GeneratorAdapter"]


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
      ``cfmodules.explain`` says so).
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
        Use :meth:`to` to move the generator and the adapter together later.
    name : str, optional
        A name for reports and result files.
    noise : None or "per-sample", default None
        What to do with random numbers the generator draws inside its forward (StyleGAN's
        per-layer noise, ``torch.randn`` in ``forward``, hard-coded train-mode dropout).
        ``None``: such a forward is refused at first use with a
        :class:`~cfmodules.errors.NondeterministicForwardError`, since hybrids and influence
        maps would sit on a noise floor. ``"per-sample"``: every draw is held fixed per
        sample (a function of the sample's latent and the draw's position in the forward,
        see :mod:`cfmodules.noise`), so the same latent always gives the same image, in any
        batch, and a hybrid sees Original 1's noise. Every forward then runs in full (the
        generator is not cut into a prefix and a suffix) and pays for a dispatch mode: see
        ``docs/own_generator.md`` for the measured cost.

    Notes
    -----
    At first use (the first forward it runs, or the first ``trace``/``intervene`` block) the
    adapter runs the generator on two samples three times (the same batch twice, then in
    swapped order) and compares the images: a forward whose output changes with the run or
    with the sample's position in the batch draws its own noise. Latents are validated
    (integer and bool latents are refused) and floating ones cast to the generator's
    parameter dtype (:attr:`dtype`), with a warning when the cast loses precision.
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
        noise: str | None = None,
    ):
        if not isinstance(generator, nn.Module):
            raise ConfigError(
                f"GeneratorAdapter wraps a torch.nn.Module, got {type(generator).__name__}."
            )
        shapes = L.latent_shapes(latent_shape)
        if isinstance(prior, str) and prior not in ("normal", "uniform"):
            raise ConfigError(
                f"Unknown prior {prior!r}: use 'normal', 'uniform' or a callable(n, generator)."
            )
        self.generator = generator
        self.latent_shapes = shapes
        self.prior = prior
        if forward is not None:  # a subclass may define forward_fn as a method instead
            self.forward_fn = forward
        self.output_transform = output_transform
        self.output_range = checks.output_range(output_range)
        self.encoder = encoder
        self.name = name or type(generator).__name__
        self.device = _resolve_device(device, generator)
        self._noise: str | None = None
        self._noise_checked = False
        self._shared_draws: frozenset[int] = frozenset()
        self.noise = noise
        self._warned_train = False
        # the engine's cache (cfmodules.engine.engine_of fills it); the adapter only drops it
        self._engine: Any = None
        self._warned_cast: set[torch.dtype] = set()
        self._sessions: list[HookSession] = []  # open trace/intervene blocks

    # ------------------------------------------------------------------ latents
    @property
    def latent_shape(self) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The per-sample latent shape (a tuple of shapes for multi-input generators)."""
        return self.latent_shapes[0] if len(self.latent_shapes) == 1 else tuple(self.latent_shapes)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the generator's first floating parameter or buffer (None: it has none).

        Floating latents are cast to it before every forward.
        """
        for t in (*self.generator.parameters(), *self.generator.buffers()):
            if t.is_floating_point():
                return t.dtype
        return None

    @property
    def noise(self) -> str | None:
        """How random draws inside the forward are handled: None (refused) or "per-sample".

        The engine reads it: with ``"per-sample"`` every hybrid is a full forward.
        Setting it drops captured graphs and repeats the first-use check.
        """
        return self._noise

    @noise.setter
    def noise(self, value: str | None) -> None:
        if value is not None:
            checks.one_of(value, "noise", N.NOISE_MODES)
        self._noise = value
        self._noise_checked = False
        self._drop_captures()

    def sample_latents(self, n: int, seed: int = 0, start: int = 0) -> L.Latent:
        """Draw ``n`` latents from the prior, on the adapter's device and :attr:`dtype`.

        Sample ``i`` depends only on ``(seed, start + i)``: the same whatever the batch size.
        ``n``, ``seed`` (in ``[0, 2**32)``) and ``start`` may be Python or numpy integers.

        Returns
        -------
        Tensor (n, *latent_shape), or a tuple of such tensors for multi-input generators.
        """
        z = L.sample(self.prior, self.latent_shapes, n, seed, start)
        return L.to_device(z, self.device, self.dtype)

    def check_latent(self, z: object, what: str = "latent") -> int:
        """Validate a latent batch; return its batch size (raises LatentError)."""
        return L.check_latent(z, self.latent_shapes, what)

    def as_latent(self, z: object, what: str = "latent") -> L.Latent:
        """Validate a latent batch and put it on the adapter's device and :attr:`dtype`.

        float64 or float16 latents are cast to the generator's dtype; a cast that loses
        precision (float64 -> float32) warns once per adapter and source dtype. Integer,
        bool, complex and meta tensors raise :class:`~cfmodules.errors.LatentError`.
        """
        self.check_latent(z, what)
        dtype = self.dtype
        if dtype is not None:
            for p in (z if isinstance(z, tuple) else (z,)):  # type: ignore[union-attr]
                if (p.dtype != dtype and L.loses_precision(p.dtype, dtype)
                        and p.dtype not in self._warned_cast):
                    self._warned_cast.add(p.dtype)
                    warnings.warn(
                        f"The {what} has dtype {p.dtype}; cfmodules casts it to {dtype}, the "
                        f"dtype of {self.name}'s parameters, so its values are rounded to "
                        f"{dtype} precision (the generator computes in {dtype} anyway).",
                        UserWarning, stacklevel=3)
        return L.to_device(z, self.device, dtype)  # type: ignore[arg-type]

    def to(self, device: str | torch.device) -> GeneratorAdapter:
        """Move the generator to ``device`` and make it the adapter's device; returns ``self``.

        Captured graphs and splits are dropped (they are rebuilt on the new device at next
        use). Latents given later are moved to ``device`` automatically.
        """
        dev = _resolve_device(device, self.generator, check_generator=False)
        self.generator.to(dev)
        self.device = dev
        self._drop_captures()
        return self

    def _drop_captures(self) -> None:
        """Forget everything derived from the generator's code path (graphs, splits)."""
        engine = getattr(self, "_engine", None)  # the noise setter runs in __init__ too
        if engine is not None:
            engine.refresh()

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
                if not self._noise_checked and not self._sessions:
                    self._check_noise()
                yield
        finally:
            for m, t in modes:
                m.training = t

    @contextmanager
    def _train_mode_expected(self) -> Iterator[None]:
        """No train-mode warning from :meth:`eval_mode` inside the block.

        For the training monitor, whose generator is in train mode by design and whose
        documentation says each check runs in eval mode; outside the block the adapter
        warns as before (once, if it has not yet).
        """
        warned, self._warned_train = self._warned_train, True
        try:
            yield
        finally:
            self._warned_train = warned

    def _call(self, z: L.Latent) -> Any:
        """The generator's forward on ``z``, as the user defined it (nothing else)."""
        if self.forward_fn is not None:
            return self.forward_fn(self.generator, z)
        return self.generator(*z) if isinstance(z, tuple) else self.generator(z)

    def _raw(self, z: L.Latent) -> Any:
        """One forward of the generator, with the call counts of open hook blocks reset.

        With ``noise="per-sample"`` the forward's random draws are held fixed per sample.
        """
        with self._one_forward(), self._noise_scope(z):
            return self._call(z)

    def _noise_scope(self, z: L.Latent) -> Any:
        if self._noise is None:
            return nullcontext()
        return N.PerSampleNoise(N.row_keys(z), self._shared_draws)

    def _check_noise(self) -> None:
        """The first-use check (:func:`cfmodules.noise.check_forward`): does the forward
        give the same images for the same latents? Raises NondeterministicForwardError."""
        shared = N.check_forward(self)
        if shared is not None:
            self._shared_draws = shared
            self._noise_checked = True

    @contextmanager
    def _one_forward(self) -> Iterator[None]:
        for s in self._sessions:
            s.reset()
        yield
        for s in self._sessions:
            s.check_complete()

    @contextmanager
    def _session(self, edits: Mapping[str, Any]) -> Iterator[HookSession]:
        if not self._noise_checked and not self._sessions:
            with self.eval_mode():  # the first-use check runs before any hook is registered
                pass
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
        z = self.as_latent(z)
        n = L.batch_size(z)
        step = n if batch_size is None else checks.positive_int(batch_size, "batch_size")
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

    def layers(self) -> list[LayerInfo]:
        """Every named submodule with its output shape and channel count (one dry forward)."""
        z = self.sample_latents(1, seed=0)
        shape: list[tuple[int, ...]] = []

        def run() -> torch.Tensor:
            images = self.images(self._raw(z), 1)
            shape.append(tuple(images.shape[1:]))
            return images

        with self.eval_mode():  # entered first: its first-use check runs without the hooks
            infos = record_layers(self.generator, run)
        self._image_shape = shape[0]
        return infos

    def image_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the images, ``(C, H, W)``: from :meth:`layers_cached`' forward."""
        self.layers_cached()
        if getattr(self, "_image_shape", None) is None:  # the cache was made another way
            self._layers_cache = self.layers()
        return self._image_shape

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-sample output shape of ``layer`` (of call ``k`` for ``"path:k"``)."""
        return call_shape(self.layers_cached(), resolve_layer(self.generator, layer), layer,
                          self.name)

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
            edits[r.name] = replace_channels(r.name, idx, values)
        with self._session(edits):
            yield

    def __repr__(self) -> str:
        shape = self.latent_shape
        return (f"GeneratorAdapter({self.name}, latent_shape={shape}, prior="
                f"{self.prior if isinstance(self.prior, str) else 'callable'}, device={self.device})")


_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def _resolve_device(device: object, generator: nn.Module,
                    check_generator: bool = True) -> torch.device:
    """The adapter's device: ``device`` checked to exist here, or the generator's own."""
    tensors = [*generator.parameters(), *generator.buffers()]
    if check_generator and any(t.is_meta for t in tensors):
        raise ConfigError(
            f"{type(generator).__name__}'s parameters are on the meta device (shapes without "
            "values), so it cannot run. Materialise it first, e.g. "
            "generator.to_empty(device='cpu') then generator.load_state_dict(weights)."
        )
    if device is None:
        return tensors[0].device if tensors else torch.device("cpu")
    return checks.device(device)
