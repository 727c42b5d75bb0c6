"""The engine: cut a generator at a layer, choose how, and follow the generator as it changes.

One :class:`Engine` per adapter (:func:`engine_of`, kept on the adapter as its cache; the
adapter never calls it). :func:`split` (``engine.cut(layer)``) returns a
:class:`Cut`: ``prefix(z)`` once per batch, ``suffix(state, activation)`` per edit, run
the adapter's way (device, eval mode, no gradients, ``output_transform``). Which *path*
runs behind it:

``split``
    The whole forward captured as a graph (:mod:`cfmodules.engine.capture`), cut at the
    layer; the suffix runs only what follows it.
``partial``
    The forward runs up to a submodule whose output is the generator's output, that
    submodule's graph does the rest (e.g. the ``nn.Sequential`` of a DCGAN whose
    ``forward`` has Python control flow on ``dim()``).
``hook``
    One full forward per batch of edits with a hook that replaces the layer's output:
    exact for any forward, as slow as a naive rerun.

:func:`explain` (``engine.explain(layer)``) says which path runs (and, for influence maps, whether the
linear shortcut of :mod:`cfmodules.engine.linear` applies), why the others do not, and
the FLOPs of one hybrid against one full forward.

A captured graph follows the generator. Before each prefix the engine compares a cheap
fingerprint of the generator with the one the graphs were captured under: the plain
Python attributes of every module (which a graph bakes in as constants), the modules and
tensors a graph refers to (a replaced submodule or tensor attribute), the shapes, dtypes
and devices of parameters and buffers, and the adapter's ``forward`` function. Any change
drops the captures, which are made again at the next use. Weight *values* do not need a
new capture (graphs call the live modules); copies made from them for speed (folded
BatchNorm, GEMM weight matrices, the linear shortcut's weights) are made anew for each
influence run and again, within a run, when a parameter's version counter moves (an
optimizer step, ``p.copy_()``). In-place edits through ``p.data`` bypass that counter;
they are seen by the next call, not within a running one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.engine.batching import BatchChoice, batch_dependent_ops
from cfmodules.engine.capture import (
    CAPTURES,
    Attempt,
    Capture,
    _getattr_path,
    _trace,
    _WholeForward,
    capture_layer,
    count_flops,
    export_graph,
    frozen_key,
    partial_inputs,
    record_call,
    trace_partial,
)
from cfmodules.engine.paths import FxSplit, HookSplit, Split, SplitState
from cfmodules.engine.tail import kernel_note
from cfmodules.errors import ConfigError, ShapeError
from cfmodules.hooks import LayerRef, resolve_layer

__all__ = ["Engine", "Cut", "PartialSplit", "Explanation", "engine_of", "explain", "fingerprint",
           "refresh", "split", "whole_graph"]

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}
_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _simple(v: Any) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(_simple(x) for x in v))


def _fn_identity(fn: Any) -> tuple[int, int]:
    return id(getattr(fn, "__func__", fn)), id(getattr(fn, "__self__", None))


def fingerprint(adapter) -> tuple[tuple, tuple]:
    """``(structure, weights)`` of the adapter's generator, cheap enough to take per batch.

    ``structure`` changes when a captured graph may be stale: a plain Python attribute of
    a module (number, string, tuple of those), a module added, removed or replaced, a
    parameter or buffer replaced or changing shape, dtype or device, or another
    ``forward`` function. ``weights`` also changes when a parameter's or buffer's values
    change in place (its version counter) or its storage is swapped.
    """
    structure: list[Any] = [("forward", _fn_identity(adapter.forward_fn))]
    weights: list[Any] = []
    for name, m in adapter.generator.named_modules():
        structure.append((name, id(m), type(m)))
        for k, v in m.__dict__.items():
            if k not in _MODULE_INTERNALS and _simple(v):
                structure.append((k, v))
        for kind in (m._parameters, m._buffers):
            for k, t in kind.items():
                if t is None:
                    structure.append((k, None))
                    continue
                structure.append((k, id(t), tuple(t.shape), t.dtype, t.device))
                weights.append((id(t), t._version if not t.is_inference() else -1,
                                t.data_ptr() if t.device.type != "meta" else 0))
    return tuple(structure), tuple(weights)


def graph_refs(gm: fx.GraphModule) -> tuple[tuple[str, str, Any], ...]:
    """The generator's modules and attributes ``gm`` refers to: ``(op, target, object)``."""
    refs = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op in ("call_module", "get_attr") and not target.startswith("_cfmodules_"):
            refs[(node.op, target)] = (gm.get_submodule(target) if node.op == "call_module"
                                       else _getattr_path(gm, target))
    return tuple((op, t, obj) for (op, t), obj in refs.items())


def _refs_alive(gen: nn.Module, refs: tuple[tuple[str, str, Any], ...],
                modules: dict[str, nn.Module]) -> bool:
    """Whether every module and attribute in ``refs`` is still the generator's."""
    for op, target, obj in refs:
        if op == "call_module":
            now = modules.get(target)
        else:
            owner, _, attr = target.rpartition(".")
            now = getattr(modules.get(owner), attr, None)
        if now is not obj:
            return False
    return True


class PartialSplit(Split):
    """Run the forward up to submodule ``M``, then ``M``'s graph cut at the layer.

    ``M``'s non-tensor arguments (e.g. BigGAN's float truncation) are frozen in its graph:
    a call with other values gets its own capture, kept by their values.
    """

    exact_graph = True

    def __init__(self, adapter, ref: LayerRef, capture: Capture):
        self.adapter, self.ref, self.layer = adapter, ref, ref.name
        self.where = capture.where
        self.captures: dict[tuple, Capture] = {capture.frozen: capture}
        self.current = capture.frozen

    def graph_split(self, key: object = None) -> FxSplit:
        """The graph split of the capture with frozen arguments ``key`` (default: latest)."""
        return self.captures[self.current if key is None else key].split  # type: ignore[index]

    def prefix(self, z: L.Latent) -> SplitState:
        args, kwargs = record_call(self.adapter, self.where, z)
        module = self.adapter.generator.get_submodule(self.where)
        _, tensors, frozen, _ = partial_inputs(module, args, kwargs)
        key = frozen_key(frozen)
        if key not in self.captures:
            self.captures[key], _ = trace_partial(self.adapter, self.ref, self.where, args,
                                                  kwargs)
        self.current = key
        state = self.captures[key].split.prefix(tuple(tensors) if len(tensors) > 1
                                                else tensors[0])
        state.latent, state.graph_key = z, key
        return state

    def suffix(self, state: SplitState, activation: torch.Tensor) -> object:
        return self.graph_split(state.graph_key).suffix(state, activation)


@dataclass(frozen=True)
class Explanation:
    """How counterfactuals at one layer are computed (:func:`explain`).

    Attributes
    ----------
    layer : str
    path : str
        ``"linear shortcut"``, ``"split"``, ``"partial"`` or ``"hook"``.
    capture : str or None
        The capture behind the path (``"graph of the forward"``, ``"torch.export graph of
        the forward"``, ``"partial at 'main'"``), None on the hook path.
    reason : str
        Why this path (for ``hook``: why nothing faster is exact).
    attempts : tuple of Attempt
        Every capture tried for this layer and its error (None: it works).
    linear_cut : str or None
        With the linear shortcut: the layer after which hybrids start.
    flops_full : float
        FLOPs of one full forward (one sample; convolutions and matrix products).
    flops_hybrid : float
        FLOPs of one hybrid on this path (per channel swap and pair).
    batching : str
        How influence maps choose the hybrids per call at this layer: by the memory budget
        (its units per call timed), or by timing whole shapes on the first block (with the
        operations that make batching hurt), and the shape the latest run chose.
    kernel : str
        With the linear shortcut at a DCGAN tail: whether the fused C kernel
        (:mod:`cfmodules.engine.tail`) computes the maps here, and why not; else "".
    """

    layer: str
    path: str
    capture: str | None
    reason: str
    attempts: tuple[Attempt, ...]
    linear_cut: str | None
    flops_full: float
    flops_hybrid: float
    batching: str = ""
    kernel: str = ""

    @property
    def limit(self) -> float:
        """``flops_full / flops_hybrid``: the most this path can gain over a naive rerun."""
        return self.flops_full / self.flops_hybrid if self.flops_hybrid > 0 else float("inf")

    def __str__(self) -> str:
        lines = [f"layer {self.layer}: path {self.path}"
                 + (f" (cut after {self.linear_cut})" if self.linear_cut else "")
                 + (f", {self.capture}" if self.capture else ""),
                 f"  why: {self.reason}",
                 f"  one hybrid {self.flops_hybrid / 1e6:.3g} MFLOP, one forward "
                 f"{self.flops_full / 1e6:.3g} MFLOP: at most {self.limit:.2f}x a naive rerun"]
        if self.kernel:
            lines.append(f"  kernel: {self.kernel}")
        if self.batching:
            lines.append(f"  batch shape: {self.batching}")
        lines += [f"  tried {a}" for a in self.attempts]
        return "\n".join(lines)


@dataclass
class _Entry:
    split: Split
    path: str
    capture: Capture | None
    attempts: tuple[Attempt, ...]
    reason: str
    refs: list[tuple] = field(default_factory=list)  # graph_refs of its captures


class Engine:
    """Cuts of one adapter's generator, captured once and checked before each use."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._entries: dict[str, _Entry] = {}
        self._structure: tuple | None = None
        self._weights: tuple | None = None
        self.weights_generation = 0
        """Moves whenever a weight value changes (copies made from weights are stale)."""
        self.generation = 0
        """Moves whenever the captures are dropped."""
        self._warned: set[str] = set()
        self._batch_ops: tuple[object, str | None] | None = None
        self._export: tuple[object, Any, float, BaseException | None] | None = None
        self._captures: tuple[str, ...] = CAPTURES
        self.batch_choices: dict[str, BatchChoice] = {}
        """The batch shape the latest influence run used per layer (``"modules"``: modules
        over several layers)."""

    # ------------------------------------------------------------------ freshness
    def refresh(self) -> None:
        """Drop every capture and copy; the next use captures again (always safe)."""
        self._entries.clear()
        self._structure = self._weights = None
        self.generation += 1
        self.weights_generation += 1

    def check(self) -> None:
        """Drop captures the generator no longer matches; note weight changes."""
        structure, weights = fingerprint(self.adapter)
        stale = structure != self._structure
        if not stale and self._entries:
            modules = dict(self.adapter.generator.named_modules())
            stale = any(not _refs_alive(self.adapter.generator, r, modules)
                        for e in self._entries.values() for r in e.refs)
        if stale:
            if self._entries:
                self.generation += 1
            self._entries.clear()
            self._structure = structure
        if weights != self._weights:
            self._weights = weights
            self.weights_generation += 1

    # ------------------------------------------------------------------ captures
    @property
    def captures(self) -> tuple[str, ...]:
        """The captures tried per layer, in order: ``"graph"`` (``torch.fx``, the whole
        forward), ``"partial"`` (``torch.fx``, a submodule), ``"export"`` (``torch.export``,
        the whole forward; tried after a working capture only when listed first).
        Setting it drops the captures made so far."""
        return self._captures

    @captures.setter
    def captures(self, kinds: tuple[str, ...]) -> None:
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in CAPTURES]
        if bad or not kinds:
            raise ConfigError(f"captures must be a non-empty tuple of {CAPTURES}, got {kinds!r}.")
        self._captures = kinds
        self._entries.clear()
        self.generation += 1

    def exported(self, n_inputs: int, inputs: tuple) -> tuple[fx.GraphModule, float]:
        """``(graph, seconds)`` of the whole forward by ``torch.export``, made once per
        structure of the generator (a failure too: it raises the same error again)."""
        self.check()
        if self._export is None or self._export[0] is not self._structure:
            t0 = time.perf_counter()
            try:
                gm, seconds = export_graph(self.adapter, n_inputs, inputs)
                self._export = (self._structure, gm, seconds, None)
            except Exception as e:  # torch.export raises many types; kept as the reason
                self._export = (self._structure, None, time.perf_counter() - t0, e)
        _, gm, seconds, error = self._export
        if error is not None:
            raise error
        return gm, seconds

    @property
    def export_seconds(self) -> float | None:
        """How long the latest ``torch.export`` of the forward took (None: not tried)."""
        return None if self._export is None else self._export[2]

    # ------------------------------------------------------------------ batch shape
    def batch_dependent_ops(self) -> str | None:
        """Operations that batching may slow down (convolutions whose groups grow with
        the batch), or None; probed once per captured structure of the generator."""
        self.check()
        if self._batch_ops is None or self._batch_ops[0] is not self._structure:
            self._batch_ops = (self._structure, batch_dependent_ops(self.adapter))
        return self._batch_ops[1]

    def record_batch(self, layer: str, choice: BatchChoice) -> None:
        """Keep the batch shape an influence run chose for ``layer`` (for :meth:`explain`)."""
        self.batch_choices[layer] = choice

    # ------------------------------------------------------------------ choosing a path
    def _hook_reason(self) -> str | None:
        """Why no capture may be used for this adapter (None: captures may be tried)."""
        ad = self.adapter
        if getattr(ad, "noise", None) is not None:
            return ("the adapter holds the forward's own noise fixed per sample "
                    f"(noise={ad.noise!r}); a cut would change the position of the draws after "
                    "the layer, so every hybrid is a full forward")
        cls = type(ad)
        if cls.generate is not GeneratorAdapter.generate:
            return (f"{cls.__name__} overrides generate(); every counterfactual runs through "
                    "it (a graph cannot see what it does)")
        for name in ("_raw", "_call"):
            if getattr(cls, name) is not getattr(GeneratorAdapter, name):
                return (f"{cls.__name__} overrides {name}(); every counterfactual runs "
                        "through it")
        return None

    def _entry(self, layer: str) -> _Entry:
        if layer in self._entries:
            return self._entries[layer]
        ref = resolve_layer(self.adapter.generator, layer)
        if ref.name in self._entries:
            return self._entries[ref.name]
        ad = self.adapter
        reason = self._hook_reason()
        capture, attempts = ((None, []) if reason is not None
                             else capture_layer(self, ref, self._captures))
        if capture is None:
            if generate_is_overridden(ad):
                split: Split = HookSplit(ad.generator, _generate_run(ad), ref.name)
                split.returns_images = True  # type: ignore[attr-defined]
            else:
                split = HookSplit(ad.generator, ad._raw, ref.name)
            if reason is None:
                reason = ("no capture of the forward can be cut at this layer (see the "
                          "attempts); a full forward with a replacing hook is exact for any "
                          "forward")
            entry = _Entry(split, "hook", None, tuple(attempts), reason)
        elif capture.kind in ("graph", "export"):
            entry = _Entry(capture.split, "split", capture, tuple(attempts),
                           f"the whole forward is captured as a graph"
                           f"{' by torch.export' if capture.kind == 'export' else ''}; only "
                           "what follows the layer runs per hybrid", [graph_refs(capture.graph)])
        else:
            entry = _Entry(PartialSplit(ad, ref, capture), "partial", capture, tuple(attempts),
                           f"the forward runs up to '{capture.where or 'the generator'}' "
                           "(whose output is the generator's) once per batch; its graph runs "
                           "what follows the layer per hybrid", [graph_refs(capture.graph)])
        self._entries[ref.name] = entry
        return entry

    def inner(self, layer: str) -> Split:
        """The split that currently runs ``layer``'s counterfactuals (captured on demand)."""
        return self._entry(layer).split

    def path(self, layer: str) -> str:
        """``"split"``, ``"partial"`` or ``"hook"``."""
        self.check()
        return self._entry(layer).path

    def cut(self, layer: str) -> Cut:
        """The adapter-level cut of ``layer`` (see :class:`Cut`)."""
        ref = resolve_layer(self.adapter.generator, layer)
        self.check()
        self._entry(ref.name)  # capture now: errors (e.g. a layer call) surface here
        return Cut(self, ref.name)

    def graph(self, layer: str) -> fx.GraphModule | None:
        """The uncut graph captured for ``layer`` (None on the hook path)."""
        self.check()
        cap = self._entry(layer).capture
        return None if cap is None else cap.graph

    def whole_graph(self) -> fx.GraphModule | None:
        """The whole forward traced by ``torch.fx`` in eval mode (None when it cannot be)."""
        ad = self.adapter
        if self._hook_reason() is not None:
            return None
        n = len(ad.latent_shapes)
        try:
            with ad.eval_mode():
                return _trace(_WholeForward(ad.generator, ad.forward_fn, n), "", n)
        except Exception:  # fx raises many types; None means "not traceable"
            return None

    def linear_plan(self, layer: str):
        """The linear shortcut for ``layer``, or None where it is not exact."""
        from cfmodules.engine.linear import find_linear_plan

        self.check()
        return find_linear_plan(self, layer)

    def warn_hook(self, layer: str, what: str) -> None:
        """Warn once per layer that ``what`` runs full forwards, with the reason and cost."""
        entry = self._entry(layer)
        if entry.path != "hook" or layer in self._warned:
            return
        self._warned.add(layer)
        tried = "; ".join(str(a) for a in entry.attempts) or "none"
        warnings.warn(
            f"{what} at layer '{layer}' of {self.adapter.name} runs one full forward of the "
            f"generator per hybrid (no faster path is exact): {entry.reason}. Captures "
            f"tried: {tried}. cfmodules.explain(adapter, '{layer}') shows the FLOPs.",
            UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ explain
    def explain(self, layer: str, algorithm: str = "auto") -> Explanation:
        """Which path counterfactuals at ``layer`` take, why, and what one hybrid costs.

        Parameters
        ----------
        layer : str
        algorithm : {"auto", "split", "hook"}
            As for influence maps: ``"auto"`` may use the linear shortcut.
        """
        ad = self.adapter
        ref = resolve_layer(ad.generator, layer)
        self.check()
        entry = self._entry(ref.name)
        z = ad.sample_latents(2, seed=0)
        with ad.eval_mode():
            full = count_flops(lambda: ad._raw(z))[0] / 2
        path, capture, reason = entry.path, None, entry.reason
        if entry.capture is not None:
            capture = ("graph of the forward" if entry.capture.kind == "graph"
                       else "torch.export graph of the forward" if entry.capture.kind == "export"
                       else f"partial at '{entry.capture.where}'" if entry.capture.where
                       else "partial at the generator (called by forward=)")
        linear_cut, kernel, fused = None, "", False
        if algorithm == "hook" or entry.path == "hook":
            hybrid = full
            if algorithm == "hook" and entry.path != "hook":
                path, reason = "hook", "algorithm='hook' asked for full forwards"
        else:
            plan = self.linear_plan(ref.name) if algorithm == "auto" else None
            if plan is not None:
                cut = self.cut(plan.cut)
                state = cut.prefix(z)
                a = self.cut(ref.name).prefix(z).activation
                with ad.eval_mode():
                    after = count_flops(lambda: cut.suffix(state, state.activation))[0]
                    op = count_flops(lambda: plan.pre_activation(a))[0]
                hybrid = (after + op / max(a.shape[1], 1)) / 2
                path, linear_cut = "linear shortcut", plan.cut
                plain = cut.graph_split(state)
                kernel, fused = kernel_note(plan, None if plain is None else plain.suffix_module,
                                            ad)
                reason = (f"'{ref.name}' feeds only '{plan.op_name}' (a linear module"
                          f"{' + BatchNorm' if plan.bn is not None else ''}): a hybrid adds one "
                          f"channel's contribution and runs what follows '{plan.cut}'; "
                          + entry.reason)
            else:
                cut = self.cut(ref.name)
                state = cut.prefix(z)
                with ad.eval_mode():
                    hybrid = count_flops(lambda: cut.suffix(state, state.activation))[0] / 2
        return Explanation(ref.name, path, capture, reason, entry.attempts, linear_cut,
                           float(full), float(hybrid), self._batching(ref.name, fused), kernel)

    def _batching(self, layer: str, fused: bool = False) -> str:
        why = self.batch_dependent_ops()
        text = ("timed on the first block of each influence run (" + why + ")" if why
                else "all the block's pairs per call, a few units per thread: the fused kernel "
                "makes one hybrid at a time, so no number depends on it" if fused
                else "set by the memory budget (no operation grows with the batch), its "
                "units per call timed on the first block when enough units allow it")
        last = self.batch_choices.get(layer)
        if last is not None:
            text += f"; the latest run used {last if last.timed else last.shape_text()}"
        return text


def generate_is_overridden(adapter) -> bool:
    return type(adapter).generate is not GeneratorAdapter.generate


def _generate_run(adapter) -> Callable[[L.Latent], torch.Tensor]:
    """A raw run through the subclass's own ``generate`` (its images)."""
    def run(z: L.Latent) -> torch.Tensor:
        return adapter.generate(z)
    return run


class Cut:
    """``prefix(z)`` once, ``suffix(state, activation)`` often: the adapter's way.

    Latents are checked and moved to the adapter's device, the generator runs in eval
    mode without gradients, and the suffix returns images (after ``output_transform``).
    The engine checks before each prefix that its capture still matches the generator.
    """

    def __init__(self, engine: Engine, layer: str):
        self.engine, self.layer = engine, layer

    @property
    def inner(self) -> Split:
        """The split behind this cut now (FxSplit, PartialSplit or HookSplit)."""
        return self.engine.inner(self.layer)

    @property
    def path(self) -> str:
        """``"split"``, ``"partial"`` or ``"hook"``."""
        return self.engine.path(self.layer)

    @property
    def exact_graph(self) -> bool:
        """Whether a captured graph runs the suffix (not a full forward)."""
        return bool(getattr(self.inner, "exact_graph", False))

    def graph_split(self, state: SplitState | None = None) -> FxSplit | None:
        """The graph split the suffix of ``state`` runs (None on the hook path)."""
        inner = self.inner
        if isinstance(inner, FxSplit):
            return inner
        if isinstance(inner, PartialSplit):
            return inner.graph_split(None if state is None else state.graph_key)
        return None

    def prefix(self, z: L.Latent) -> SplitState:
        """The layer's output and what the suffix needs, for the latent batch ``z``."""
        ad = self.engine.adapter
        z = ad.as_latent(z)
        self.engine.check()
        with ad.eval_mode(), ad._one_forward():
            return self.inner.prefix(z)

    def suffix(self, state: SplitState, activation: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) from ``activation`` at the layer and the rest of ``state``."""
        n = activation.shape[0]
        if activation.shape[1:] != state.activation.shape[1:] or n != state.activation.shape[0]:
            raise ShapeError(
                f"The new activation of layer '{self.layer}' has shape {tuple(activation.shape)};"
                f" expected {tuple(state.activation.shape)} (one row per sample of the state)."
            )
        ad = self.engine.adapter
        inner = self.inner
        with ad.eval_mode(), ad._one_forward():
            raw = inner.suffix(state, activation)
            if getattr(inner, "returns_images", False):
                return raw  # type: ignore[return-value]
            return ad.images(raw, n)



# ---------------------------------------------------------------------- the engine's verbs
def engine_of(adapter: GeneratorAdapter) -> Engine:
    """The :class:`Engine` that cuts ``adapter``'s generator, made at first use.

    It is kept on the adapter (its ``_engine`` slot, which the adapter only ever clears,
    on :meth:`~cfmodules.adapter.GeneratorAdapter.to` or a change of ``noise``), so the
    captures live as long as the adapter and every caller shares them.
    """
    if not isinstance(adapter, GeneratorAdapter):
        raise ConfigError(f"The engine works on a GeneratorAdapter, got {type(adapter).__name__}; "
                          "wrap the generator first: GeneratorAdapter(generator, latent_shape).")
    engine = adapter._engine
    if engine is None:
        engine = adapter._engine = Engine(adapter)
    return engine


def split(adapter: GeneratorAdapter, layer: str) -> Cut:
    """Cut the generator at ``layer``: ``prefix(z)`` once, ``suffix(state, act)`` often.

    The engine picks the fastest exact path (a captured graph of the forward, a captured
    submodule, or a full forward with a replacing hook); all give the same numbers up to
    float rounding. The suffix returns images (after ``output_transform``). :func:`explain`
    says which path runs.
    """
    return engine_of(adapter).cut(layer)


def explain(adapter: GeneratorAdapter, layer: str, algorithm: str = "auto") -> Explanation:
    """Which path counterfactuals at ``layer`` take, why, and the FLOPs of one hybrid.

    Parameters
    ----------
    adapter : GeneratorAdapter
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
    return engine_of(adapter).explain(layer, algorithm)


def whole_graph(adapter: GeneratorAdapter) -> fx.GraphModule | None:
    """The whole forward (with ``forward``) traced by ``torch.fx`` in eval mode, or None."""
    return engine_of(adapter).whole_graph()


def refresh(adapter: GeneratorAdapter) -> None:
    """Forget every captured graph and weight copy of ``adapter`` (the next use captures again).

    Changes are detected without this (see :mod:`cfmodules.engine.cut`); call it after
    editing weights through ``.data`` while a callback runs inside an influence run.
    """
    engine_of(adapter).refresh()
