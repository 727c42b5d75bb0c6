"""Capture a generator's forward as a ``torch.fx`` graph, so it can be cut at a layer.

Published generator code is often not traceable as a whole: Python control flow on
``dim()`` or ``shape``, a ``forward=`` function that reads a float out of a tensor
(BigGAN's truncation), ``squeeze`` / ``view`` of inputs. The cut only needs the part of
the forward *after* the layer, so several captures are tried for each layer:

``graph``
    The whole forward (the generator and the adapter's ``forward=`` function, wrapped
    together in one module) traced by ``torch.fx``.
``partial``
    A submodule ``M`` that contains the layer and whose output *is* the generator's
    output (the same tensor object; checked in a probe forward), traced alone with the
    non-tensor arguments it received (e.g. a float truncation) frozen as constants. The
    prefix runs the real forward up to ``M``'s call, records ``M``'s inputs and stops;
    the rest is ``M``'s graph. An ``nn.Sequential`` (DCGAN's ``main``) is the usual ``M``.
``export``
    The whole forward captured by ``torch.export`` (:mod:`cfmodules.engine.exported`),
    tried when neither of the others works (it takes seconds; every capture's suffix is
    what follows the layer, so none runs less than another that works).

With ``torch.fx`` the layer itself is kept as one node of the graph (a custom block is
not traced through), so any submodule that runs once in a forward can be cut; in an
exported graph the layer's output is found from the nodes' module stacks. A value the
suffix reads whose first dimension is not the batch is recomputed in the suffix
(:func:`cut_per_sample`). Each capture is checked on a probe batch: its output, the
layer's value and the per-sample layout of every value the suffix reads must agree with
the real forward, else the capture is refused with the reason (a forward that draws random numbers or reads state the graph froze). When no
capture works, the hook path (a full forward with a replacing hook) is exact for any
forward.

Graphs are traced in eval mode (cfmodules runs generators in eval mode), so
``F.dropout(x, training=self.training)`` is baked in as the identity it is at run time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from cfmodules import latents as L
from cfmodules.engine.exported import MIN_BATCH, batch_bound, export_forward, layer_calls
from cfmodules.engine.paths import FxSplit, fx_split
from cfmodules.errors import CfModulesError, LayerCallError
from cfmodules.hooks import LayerRef

__all__ = ["Attempt", "Capture", "capture_layer", "StopForward", "outputs_agree"]

_MAX_INPUTS = 8
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


class StopForward(Exception):
    """Raised by a hook to end a forward early, once what is needed was recorded."""


@dataclass(frozen=True)
class Attempt:
    """One capture that was tried for a layer.

    Attributes
    ----------
    kind : str
        ``"export"`` (the whole forward by ``torch.export``), ``"graph"`` (the whole
        forward by ``torch.fx``) or ``"partial"`` (a submodule by ``torch.fx``).
    where : str
        ``"forward"`` or the submodule's name.
    error : str or None
        Why it cannot be used (None: it works).
    seconds : float or None
        How long the capture took, where it may take seconds (``torch.export``).
    """

    kind: str
    where: str
    error: str | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        what = f"{self.kind} capture of {self.where!r}"
        took = f" ({self.seconds:.2g} s)" if self.seconds is not None else ""
        return f"{what}: ok{took}" if self.error is None else f"{what}: {self.error}{took}"


@dataclass
class Capture:
    """A working capture of the forward for one layer.

    Attributes
    ----------
    kind : str
        ``"export"``, ``"graph"`` or ``"partial"``.
    where : str
        ``"forward"`` or the path of the captured submodule ``M``.
    split : FxSplit
        The captured graph cut at the layer (targets are the generator's module names).
    graph : fx.GraphModule
        The uncut graph.
    frozen : tuple
        For ``partial``: the non-tensor arguments ``M`` was traced with, as
        ``((name, value), ...)``; a call with other values needs another capture.
    tensor_args : tuple of str
        For ``partial``: the names of ``M``'s tensor arguments, in the graph's input order.
    """

    kind: str
    where: str
    split: FxSplit
    graph: fx.GraphModule
    frozen: tuple = ()
    tensor_args: tuple[str, ...] = ()


class _LeafTracer(fx.Tracer):
    """The default tracer, with the layer kept as one ``call_module`` node."""

    def __init__(self, leaf: str):
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(
            m, module_qualified_name)


class _WholeForward(nn.Module):
    """The adapter's forward (``forward=`` function or plain call) as one module."""

    def __init__(self, gen: nn.Module, fn: Callable | None, n_inputs: int):
        super().__init__()
        self.gen = gen
        self.fn = fn
        self.n = n_inputs

    def forward(self, z0, z1=None, z2=None, z3=None, z4=None, z5=None, z6=None, z7=None):
        z = (z0, z1, z2, z3, z4, z5, z6, z7)[:self.n]
        latent = z if self.n > 1 else z[0]
        if self.fn is not None:
            return self.fn(self.gen, latent)
        return self.gen(*z)


class _Call(nn.Module):
    """``M(**args)`` with the tensor arguments as inputs and the others frozen."""

    def __init__(self, gen: nn.Module, names: tuple[str, ...], frozen: dict[str, Any],
                 var_positional: str | None):
        super().__init__()
        self.gen = gen
        self.names, self.frozen, self.var = names, frozen, var_positional

    def forward(self, z0, z1=None, z2=None, z3=None, z4=None, z5=None, z6=None, z7=None):
        values = dict(zip(self.names, (z0, z1, z2, z3, z4, z5, z6, z7)))
        values.update(self.frozen)
        args = [values.pop(self.var)] if self.var is not None else []
        return self.gen(*args, **values) if args else self.gen(**values)


def _trace(wrapper: nn.Module, leaf: str, n_inputs: int) -> fx.GraphModule:
    """Trace ``wrapper`` (root attribute ``gen``) and re-root the graph on ``gen``'s names.

    The returned graph's ``call_module`` / ``get_attr`` targets are relative to ``gen``
    (e.g. ``main.8``), it has one placeholder per input, and the same module objects.
    """
    if n_inputs > _MAX_INPUTS:
        raise CaptureFailed(f"more than {_MAX_INPUTS} tensor inputs")
    tracer = _LeafTracer(leaf)
    concrete = {f"z{i}": None for i in range(n_inputs, _MAX_INPUTS)}
    graph = tracer.trace(wrapper, concrete_args=concrete)
    env: dict[fx.Node, fx.Node] = {}
    new = fx.Graph()
    owners: dict[str, Any] = {}
    n_const = 0
    inputs = [n for n in graph.nodes if n.op == "placeholder"][:n_inputs]
    for node in graph.nodes:
        if node.op == "placeholder":
            if node in inputs:
                env[node] = new.placeholder(f"input_{inputs.index(node)}")
            continue
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            continue
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            obj = (wrapper.get_submodule(target) if node.op == "call_module"
                   else _getattr_path(wrapper, target))
            if target == "gen" or target.startswith("gen."):
                name = target[4:]
                if not name:
                    raise CaptureFailed("the captured module calls itself")
            else:  # a constant the tracer stored on the wrapper
                name = f"_cfmodules_constant_{n_const}"
                n_const += 1
            owners[name] = obj
            copy = new.node_copy(node, lambda a: env[a])
            copy.target = name
            env[node] = copy
            continue
        env[node] = new.node_copy(node, lambda a: env[a])
    gm = fx.GraphModule(owners, new)
    return gm


def _getattr_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class CaptureFailed(CfModulesError, RuntimeError):
    """A capture cannot be used (internal: becomes an :class:`Attempt` with the reason)."""


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if not isinstance(e, CaptureFailed) else text


def outputs_agree(a: Any, b: Any, rtol: float = 1e-4) -> float | None:
    """Largest difference between two raw outputs relative to their scale (None: unlike).

    Tensors, tuples, lists and dicts of tensors are compared leaf by leaf.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return None
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        scale = max(float(b.detach().abs().max()) if b.numel() else 0.0, 1e-6)
        diff = (a.detach() - b.detach()).abs()
        return float(diff.max()) / scale if diff.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        parts = [outputs_agree(x, y, rtol) for x, y in zip(a, b)]
        return None if any(p is None for p in parts) else max(parts, default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        parts = [outputs_agree(a[k], b[k], rtol) for k in a]
        return None if any(p is None for p in parts) else max(parts, default=0.0)
    return 0.0 if a == b else None


@dataclass
class _Probe:
    """What one real forward of two probe samples showed."""

    latent: L.Latent
    raw: Any
    activation: torch.Tensor
    calls: dict[str, list[tuple[tuple, dict, Any]]]  # container -> [(args, kwargs, output)]


def _probe(adapter, ref: LayerRef, containers: list[str]) -> _Probe:
    """One forward of two samples recording the layer's output and the containers' calls."""
    gen = adapter.generator
    z = adapter.sample_latents(2, seed=0)
    calls: dict[str, list] = {c: [] for c in containers}
    got: list[torch.Tensor] = []
    handles = []

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            calls[name].append((args, dict(kwargs), out))
        return hook

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        got.append(out.detach().clone() if isinstance(out, torch.Tensor) else out)

    with adapter.eval_mode():  # the adapter's first-use checks run before any hook
        try:
            for c in containers:
                handles.append(gen.get_submodule(c).register_forward_hook(make(c),
                                                                          with_kwargs=True))
            handles.append(gen.get_submodule(ref.path).register_forward_hook(record))
            raw = adapter._raw(z)
        finally:
            for h in handles:
                h.remove()
    k = ref.call or 0
    if ref.call is None and len(got) > 1:
        raise LayerCallError(
            f"Layer '{ref.path}' runs more than once per forward ({len(got)} times); name "
            f"one call, e.g. '{ref.path}:0'."
        )
    if k >= len(got) or not isinstance(got[k], torch.Tensor):
        raise CaptureFailed(f"layer '{ref.name}' does not output a tensor in a forward")
    return _Probe(z, raw, got[k], calls)


def cut_per_sample(adapter, gm: fx.GraphModule, ref: LayerRef, inputs: tuple,
                   calls: list[fx.Node] | None = None, min_batch: int = 1,
                   max_batch: int | None = None) -> FxSplit:
    """``fx_split`` of ``gm`` at ``ref`` whose prefix passes per-sample values only.

    A value the suffix reads whose first dimension is not the batch (StyleGAN2's
    modulated weights, or an input with the batch folded into the channels for a
    convolution with ``groups=N``) cannot follow its sample into the hybrids' rows: it is
    computed in the suffix instead, from the values it is made of, until every value
    passed is per-sample (checked on ``inputs``, two samples).
    """
    force: frozenset[fx.Node] = frozenset()
    if inputs[0].shape[0] < 2:  # one sample cannot tell a batch dimension from a 1
        inputs = tuple(torch.cat([x, x[:1].expand(2 - x.shape[0], *x.shape[1:])]) for x in inputs)
    n = inputs[0].shape[0]
    for _ in range(len(gm.graph.nodes) + 1):
        split = fx_split(gm, ref, calls, min_batch, force, max_batch)
        with adapter.eval_mode():
            values = split.prefix_module(*inputs)
        bad = {node for node, v in zip(split.frontier_nodes[1:], values[1:])
               if not (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n)}
        if not bad:
            return split
        force = force | bad
    return split


def _check(adapter, split: FxSplit, inputs: tuple, probe: _Probe) -> None:
    """Refuse a capture whose numbers differ from the probe forward."""
    with adapter.eval_mode():
        state = split.prefix(inputs if len(inputs) > 1 else inputs[0])
        for name, v in (("layer", state.activation), *(("input", f) for f in state.frontier)):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != 2:
                raise CaptureFailed(
                    f"a value the rest of the forward reads is not per-sample ({name} of "
                    f"shape {tuple(getattr(v, 'shape', ()))} for 2 samples)")
        d = outputs_agree(state.activation, probe.activation)
        if d is None or d > 1e-4:
            raise CaptureFailed(f"the graph's value of the layer differs from a forward's "
                                f"(relative {d})")
        swap = torch.tensor([1, 0])
        back = state.select(swap)
        raw = split.suffix(back, back.activation)
    want = _select_raw(probe.raw, swap)
    d = outputs_agree(raw, want)
    if d is None or d > 1e-4:
        raise CaptureFailed(
            f"the graph's output differs from a forward's (relative {d}): the forward may "
            "draw random numbers or depend on state the graph froze")


def _select_raw(raw: Any, idx: torch.Tensor) -> Any:
    if isinstance(raw, torch.Tensor):
        return raw.index_select(0, idx.to(raw.device))
    if isinstance(raw, (tuple, list)):
        return type(raw)(_select_raw(r, idx) for r in raw)
    if isinstance(raw, dict):
        return {k: _select_raw(v, idx) for k, v in raw.items()}
    return raw


def _bind(module: nn.Module, args: tuple, kwargs: dict
          ) -> tuple[tuple[str, ...], list[torch.Tensor], dict[str, Any], str | None]:
    """Split a call's arguments into tensor inputs (by parameter name) and frozen values."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    names, tensors, frozen, var = [], [], {}, None
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            raise CaptureFailed("it takes **kwargs")
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if not all(isinstance(v, torch.Tensor) for v in value):
                raise CaptureFailed("it takes *args that are not all tensors")
            if len(value) != 1:
                raise CaptureFailed("it takes several *args")
            var = name
            names.append(name)
            tensors.append(value[0])
            continue
        if isinstance(value, torch.Tensor):
            names.append(name)
            tensors.append(value)
        elif _frozen_ok(value):
            frozen[name] = value
        else:
            raise CaptureFailed(
                f"its argument {name!r} is a {type(value).__name__}, not a tensor or a number")
    return tuple(names), tensors, frozen, var


def _frozen_ok(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    return isinstance(value, tuple) and all(_frozen_ok(v) for v in value)


def frozen_key(frozen: dict[str, Any]) -> tuple:
    """A hashable key of frozen arguments (floats by their exact bits)."""
    return tuple(sorted((k, repr(v)) for k, v in frozen.items()))


def partial_inputs(module: nn.Module, args: tuple, kwargs: dict
                   ) -> tuple[tuple[str, ...], list[torch.Tensor], dict[str, Any], str | None]:
    """The tensor inputs and frozen arguments of one recorded call of ``M``."""
    return _bind(module, args, kwargs)


def trace_partial(adapter, ref: LayerRef, where: str, args: tuple, kwargs: dict
                  ) -> tuple[Capture, list[torch.Tensor]]:
    """Capture submodule ``where`` called with ``args, kwargs`` (the layer kept whole)."""
    module = adapter.generator.get_submodule(where)
    names, tensors, frozen, var = _bind(module, args, kwargs)
    if not tensors:
        raise CaptureFailed("it takes no tensor input")
    leaf = "gen." + (ref.path[len(where) + 1:] if where else ref.path)
    with adapter.eval_mode():
        gm = _trace(_Call(module, tuple(names), frozen, var), leaf, len(tensors))
    gm = _reroot(gm, where)
    split = cut_per_sample(adapter, gm, ref, tuple(tensors))
    return Capture("partial", where, split, gm, frozen_key(frozen), tuple(names)), tensors


def _reroot(gm: fx.GraphModule, where: str) -> fx.GraphModule:
    """``gm`` with targets relative to the generator (``where`` prepended)."""
    if not where:
        return gm
    owners: dict[str, Any] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        copy = graph.node_copy(node, lambda a: env[a])
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            obj = (gm.get_submodule(target) if node.op == "call_module"
                   else _getattr_path(gm, target))
            name = target if target.startswith("_cfmodules_constant_") else f"{where}.{target}"
            owners[name] = obj
            copy.target = name
        env[node] = copy
    return fx.GraphModule(owners, graph)


def _containers(ref: LayerRef) -> list[str]:
    """The layer's ancestors (not the root), outermost first."""
    parts = ref.path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


CAPTURES = ("graph", "partial", "export")
"""The captures tried, in this order (``Engine.captures`` may change it)."""


def capture_layer(engine, ref: LayerRef, kinds: tuple[str, ...] = CAPTURES
                  ) -> tuple[Capture | None, list[Attempt]]:
    """Every capture of the ``engine``'s adapter's forward that can be cut at ``ref``; the
    chosen one first.

    Returns the working capture with the fewest suffix FLOPs per hybrid (the first one
    tried on a tie), and the attempts in the order they were tried. Every capture's
    suffix runs what follows the layer up to the generator's output, so once one works
    the others cannot run less: submodules are not tried once the whole forward is
    captured, and ``torch.export`` (seconds, where ``torch.fx`` takes milliseconds) only
    when no ``torch.fx`` capture works (or when ``kinds`` puts it first).

    Raises
    ------
    LayerCallError
        If the layer runs several times per forward and ``ref`` does not name one call.
    """
    adapter = engine.adapter
    attempts: list[Attempt] = []
    found: list[Capture] = []
    containers = _containers(ref)
    if adapter.forward_fn is not None:
        containers = [""] + containers  # the generator itself, called by the function
    try:
        probe = _probe(adapter, ref, containers)
    except (LayerCallError, KeyboardInterrupt):
        raise
    except Exception as e:  # the hook path reports the forward's own error
        return None, [Attempt("graph", "forward", _error_text(e))]
    n_inputs = len(probe.latent) if isinstance(probe.latent, tuple) else 1
    inputs = probe.latent if isinstance(probe.latent, tuple) else (probe.latent,)
    for kind in kinds:
        if kind == "graph":
            _try_graph(adapter, ref, n_inputs, inputs, probe, found, attempts)
        elif kind == "export":
            if found:
                attempts.append(Attempt("export", "forward", "not tried: a torch.fx capture "
                                        "works and this one's suffix would be the same"))
                continue
            _try_export(engine, ref, n_inputs, inputs, probe, found, attempts)
        elif kind == "partial":
            _try_partials(adapter, ref, containers, probe, found, attempts)
    if not found:
        return None, attempts
    if len(found) == 1:
        return found[0], attempts
    best = min(found, key=lambda c: suffix_flops(adapter, c.split, probe.latent, c))
    return best, attempts


def _try_graph(adapter, ref: LayerRef, n_inputs: int, inputs: tuple, probe: _Probe,
               found: list[Capture], attempts: list[Attempt]) -> None:
    """The whole forward traced by ``torch.fx``."""
    try:
        with adapter.eval_mode():
            gm = _trace(_WholeForward(adapter.generator, adapter.forward_fn, n_inputs),
                        "gen." + ref.path, n_inputs)
        split = cut_per_sample(adapter, gm, ref, inputs)
        _check(adapter, split, inputs, probe)
        found.append(Capture("graph", "forward", split, gm))
        attempts.append(Attempt("graph", "forward"))
    except (KeyboardInterrupt, LayerCallError):
        raise
    except Exception as e:  # fx raises many types; other captures or hooks are exact
        attempts.append(Attempt("graph", "forward", _error_text(e)))


def _try_export(engine, ref: LayerRef, n_inputs: int, inputs: tuple, probe: _Probe,
                found: list[Capture], attempts: list[Attempt]) -> None:
    """The whole forward by ``torch.export`` (made once per generator structure)."""
    adapter = engine.adapter
    seconds = None
    try:
        gm, seconds = engine.exported(n_inputs, inputs)
        split = cut_per_sample(adapter, gm, ref, inputs, layer_calls(gm, ref.path), MIN_BATCH,
                               batch_bound(gm))
        _check(adapter, split, inputs, probe)
        found.append(Capture("export", "forward", split, gm))
        attempts.append(Attempt("export", "forward", None, seconds))
    except (KeyboardInterrupt, LayerCallError):
        raise
    except Exception as e:  # export raises many types; other captures or hooks are exact
        attempts.append(Attempt("export", "forward", _error_text(e),
                                engine.export_seconds))


def export_graph(adapter, n_inputs: int, inputs: tuple) -> tuple[fx.GraphModule, float]:
    """``(graph, seconds)``: the adapter's whole forward by ``torch.export`` (eval mode)."""
    wrapper = _WholeForward(adapter.generator, adapter.forward_fn, n_inputs)
    with adapter.eval_mode():
        return export_forward(wrapper, adapter.generator, inputs)


def _try_partials(adapter, ref: LayerRef, containers: list[str], probe: _Probe,
                  found: list[Capture], attempts: list[Attempt]) -> None:
    """Submodules whose output is the generator's, traced by ``torch.fx``."""
    for where in containers:
        label = where or "(the generator)"
        calls = probe.calls[where]
        if found:  # M's output is the output: its suffix is the outer capture's
            attempts.append(Attempt("partial", label, "not tried: an outer capture works "
                                    "and this one's suffix would be the same"))
            continue
        try:
            if len(calls) != 1:
                raise CaptureFailed(f"it runs {len(calls)} times in a forward, not once")
            args, kwargs, out = calls[0]
            if out is not probe.raw:
                raise CaptureFailed("its output is not the generator's output (the forward "
                                    "computes more after it)")
            cap, tensors = trace_partial(adapter, ref, where, args, kwargs)
            _check(adapter, cap.split, tuple(tensors), probe)
            found.append(cap)
            attempts.append(Attempt("partial", label))
        except (KeyboardInterrupt, LayerCallError):
            raise
        except Exception as e:
            attempts.append(Attempt("partial", label, _error_text(e)))


def suffix_flops(adapter, split: FxSplit, latent: L.Latent, cap: Capture | None = None
                 ) -> float:
    """FLOPs of the suffix for one sample (convolutions and matrix products)."""
    state = prefix_state(adapter, split, latent, cap)
    with adapter.eval_mode():
        flops, _ = count_flops(lambda: split.suffix(state, state.activation))
    return flops / max(state.activation.shape[0], 1)


def prefix_state(adapter, split: FxSplit, latent: L.Latent, cap: Capture | None):
    """The split's state for ``latent``, running the forward up to ``M`` for a partial."""
    if cap is None or cap.kind in ("graph", "export"):
        with adapter.eval_mode():
            return split.prefix(latent)
    args = record_call(adapter, cap.where, latent)
    module = adapter.generator.get_submodule(cap.where)
    _, tensors, _, _ = _bind(module, *args)
    with adapter.eval_mode():
        return split.prefix(tuple(tensors) if len(tensors) > 1 else tensors[0])


def record_call(adapter, where: str, latent: L.Latent) -> tuple[tuple, dict]:
    """Run the forward until submodule ``where`` is called; return its ``(args, kwargs)``."""
    module = adapter.generator.get_submodule(where)
    got: list[tuple[tuple, dict]] = []

    def stop(m: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, dict(kwargs)))
        raise StopForward

    with adapter.eval_mode():  # the adapter's first-use checks run before the hook
        h = module.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            adapter._raw(latent)
        except StopForward:
            pass
        finally:
            h.remove()
    if not got:
        raise CaptureFailed(f"submodule '{where}' did not run in the forward")
    return got[0]


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(FLOPs, result)`` of ``fn()``: convolutions and matrix products, as counted by
    ``torch.utils.flop_counter`` (without its module tracker, which refuses some
    no-grad views of parameters)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Count(TorchDispatchMode):
        total = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:
                self.total += rule(*args, **kwargs, out_val=out)
            return out

    with _Count() as counter:
        result = fn()
    return counter.total, result
