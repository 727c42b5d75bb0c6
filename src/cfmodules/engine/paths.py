"""Prefix once, suffix many times: cut a generator at a layer.

A counterfactual changes a layer's output and re-runs only what comes after it. Where
the forward was captured as a ``torch.fx`` graph (:mod:`cfmodules.engine.capture`), the graph is cut into a *prefix* that computes the
layer's output and every other value the rest of the network needs (skip connections,
per-sample conditioning inputs), and a *suffix* that takes those values and the layer's
(possibly edited) output and finishes the forward. Where no capture works,
:class:`HookSplit` gives the same numbers with a full forward and a hook that replaces the
layer's output. :mod:`cfmodules.engine.cut` chooses between them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from cfmodules import latents as L
from cfmodules.errors import LayerCallError, LayerNotFoundError
from cfmodules.hooks import LayerRef, hooked

__all__ = ["SplitState", "Split", "FxSplit", "HookSplit", "fx_split"]


@dataclass
class SplitState:
    """What the suffix needs for a batch of samples.

    Attributes
    ----------
    activation : Tensor (N, C, ...)
        The layer's output for each sample.
    frontier : tuple of Tensor
        Other per-sample values the suffix reads (empty on the hook path).
    latent : Latent
        The samples' latent batch (the hook path re-runs from it; the fx path keeps it so
        that per-sample inputs travel with their sample).
    graph_key : object
        Which capture made the state, when a split keeps several (a partial capture per
        value of its frozen arguments); None otherwise.
    """

    activation: torch.Tensor
    frontier: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    latent: L.Latent | None = None
    graph_key: object = None

    def select(self, index: torch.Tensor) -> SplitState:
        """The state of samples ``index`` (LongTensor of batch positions, repeats allowed)."""
        idx = index.to(self.activation.device)
        return SplitState(
            activation=self.activation.index_select(0, idx),
            frontier=tuple(f.index_select(0, idx) for f in self.frontier),
            latent=None if self.latent is None else L.select(self.latent, idx),
            graph_key=self.graph_key,
        )


class Split:
    """Base of the two ways to cut a generator at ``layer``."""

    layer: str
    exact_graph: bool = False

    def prefix(self, z: L.Latent) -> SplitState:  # pragma: no cover - interface
        raise NotImplementedError

    def suffix(self, state: SplitState, activation: torch.Tensor) -> object:  # pragma: no cover
        raise NotImplementedError


class HookSplit(Split):
    """Full forward with a hook; works for any generator and forward function."""

    returns_images = False
    """Whether ``run`` returns images already (a subclass's own ``generate``)."""

    def __init__(self, root: nn.Module, run: Callable[[L.Latent], object], layer: str):
        self.root, self.run, self.layer = root, run, layer

    def prefix(self, z: L.Latent) -> SplitState:
        got: list[torch.Tensor] = []

        def record(out: torch.Tensor) -> None:
            got.append(out.detach().clone())

        with hooked(self.root, {self.layer: record}) as session:
            session.reset()
            self.run(z)
            session.check_complete()
        return SplitState(activation=got[0], latent=z)

    def suffix(self, state: SplitState, activation: torch.Tensor) -> object:
        def replace(out: torch.Tensor) -> torch.Tensor:
            return activation

        with hooked(self.root, {self.layer: replace}) as session:
            session.reset()
            raw = self.run(state.latent)  # type: ignore[arg-type]
            session.check_complete()
        return raw


def _has_inplace(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    for n in nodes:
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "inplace", False):
            return True
        if n.op == "call_method" and str(n.target).endswith("_"):
            return True
        if n.op == "call_function" and n.kwargs.get("inplace", False):
            return True
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and (
                n.target._schema.is_mutable):  # an exported graph's ATen relu_, add_, ...
            return True
    return False


def run_padded(fn: Callable[..., object], args: tuple[torch.Tensor, ...], min_batch: int,
               max_batch: int | None = None) -> object:
    """``fn(*args)`` on a graph that holds for batches of ``min_batch`` to ``max_batch``.

    A smaller batch is padded with copies of its first sample; a larger one runs in
    chunks of at most ``max_batch`` (the last chunk padded if needed). Every argument is
    per-sample (batch first); the output (tensor, tuple, list or dict of tensors, batch
    first) is cut back to / joined into the real batch. Exact, as samples do not mix.
    """
    n = args[0].shape[0]
    if max_batch is not None and n > max_batch:
        parts = [run_padded(fn, tuple(a[i:i + max_batch] for a in args), min_batch)
                 for i in range(0, n, max_batch)]
        return _join(parts)
    if n >= min_batch:
        return fn(*args)
    pad = torch.zeros(min_batch - n, dtype=torch.long)
    idx = torch.cat([torch.arange(n), pad])
    out = fn(*(a.index_select(0, idx.to(a.device)) for a in args))
    return _rows(out, n)


def _join(parts: list[object]) -> object:
    """The outputs of consecutive chunks of a batch, joined along the batch."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    if isinstance(first, (tuple, list)):
        return type(first)(_join([p[i] for p in parts]) for i in range(len(first)))  # type: ignore[index]
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return first


def _rows(out: object, n: int) -> object:
    if isinstance(out, torch.Tensor):
        return out[:n]
    if isinstance(out, (tuple, list)):
        return type(out)(_rows(o, n) for o in out)
    if isinstance(out, dict):
        return {k: _rows(v, n) for k, v in out.items()}
    return out


class FxSplit(Split):
    """The traced graph cut into a prefix GraphModule and a suffix GraphModule."""

    exact_graph = True

    def __init__(self, prefix: fx.GraphModule, suffix: fx.GraphModule, layer: str,
                 clone_frontier: bool, min_batch: int = 1, max_batch: int | None = None):
        self.prefix_module, self.suffix_module, self.layer = prefix, suffix, layer
        self._clone = clone_frontier
        self.min_batch = min_batch
        """The smallest batch the graphs hold for (an exported graph: 2); smaller ones
        are run padded (:func:`run_padded`)."""
        self.max_batch = max_batch
        """The largest batch the graphs hold for (None: any); larger ones run in chunks
        (an exported graph whose forward guards the batch, e.g. ``batch <= 63``)."""
        self.frontier_nodes: tuple[fx.Node, ...] = ()
        """The nodes of the uncut graph whose values the prefix passes (the layer first)."""

    def prefix(self, z: L.Latent) -> SplitState:
        args = z if isinstance(z, tuple) else (z,)
        values = run_padded(self.prefix_module, args, self.min_batch, self.max_batch)
        if self._clone:
            values = tuple(v.clone() for v in values)
        return SplitState(activation=values[0], frontier=tuple(values[1:]), latent=z)

    def suffix(self, state: SplitState, activation: torch.Tensor) -> object:
        frontier = state.frontier
        if self._clone:
            activation = activation.clone()
            frontier = tuple(f.clone() for f in frontier)
        return run_padded(self.suffix_module, (activation, *frontier), self.min_batch,
                          self.max_batch)


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement"})
_SHAPE_OPS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                        torch.ops.aten.sym_stride.int, torch.ops.aten.sym_storage_offset.default})
"""Shape reads of an exported graph."""
_ARITH = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv,
                    operator.truediv, operator.mod, operator.neg, operator.getitem, len})


def _is_shape(node: fx.Node) -> bool:
    """Whether ``node`` is a shape value (``x.shape``, ``x.size(0)``, arithmetic on them).

    A shape read before the cut is recomputed in the suffix from the tensor it describes:
    passed from the prefix, a batch size would be the prefix's, not the hybrids'.
    """
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_OPS:
        return True
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
    if node.target in _ARITH:
        inputs = node.all_input_nodes
        return bool(inputs) and all(_is_shape(a) for a in inputs)
    return False


def fx_split(gm: fx.GraphModule, ref: LayerRef, calls: list[fx.Node] | None = None,
             min_batch: int = 1, force: frozenset[fx.Node] = frozenset(),
             max_batch: int | None = None) -> FxSplit:
    """Cut the traced graph ``gm`` at the output of ``ref``.

    ``calls``: the output node of each call of the layer, when they are not
    ``call_module`` nodes of its name (an exported graph; see
    :func:`cfmodules.engine.exported.layer_calls`). ``min_batch``, ``max_batch``: the
    batches the graph holds for (None: no largest). ``force``: nodes computed in the suffix although they do not
    depend on the layer (values whose first dimension is not the batch, e.g. a
    convolution's batch folded into its channels, cannot be passed per sample).

    Raises
    ------
    LayerNotFoundError
        If the layer is not a node of the traced graph (it runs inside a leaf module).
    LayerCallError
        If the layer is called several times and ``ref`` does not name one call.
    """
    nodes = list(gm.graph.nodes)
    if calls is None:
        calls = [n for n in nodes if n.op == "call_module" and n.target == ref.path]
    if not calls:
        raise LayerNotFoundError(f"Layer '{ref.path}' is not a node of the traced graph.")
    if ref.call is None and len(calls) > 1:
        raise LayerCallError(
            f"Layer '{ref.path}' runs {len(calls)} times per forward; name one call, "
            f"e.g. '{ref.path}:0'."
        )
    k = ref.call or 0
    if k >= len(calls):
        raise LayerCallError(
            f"Layer '{ref.name}' names call {k}, but '{ref.path}' runs {len(calls)} time(s)."
        )
    cut = calls[k]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")

    dynamic: set[fx.Node] = set()  # values that depend on the inputs
    for n in nodes:
        if n.op == "placeholder" or any(a in dynamic for a in n.all_input_nodes):
            dynamic.add(n)
    after = {cut}  # the cut and everything computed from it
    for n in nodes:
        if n is not cut and any(a in after for a in n.all_input_nodes):
            after.add(n)
    if output not in after:
        raise LayerNotFoundError(f"Layer '{ref.name}' does not influence the generator's output.")

    suffix_nodes = set(after) - {cut}
    stack = [a for n in suffix_nodes for a in n.all_input_nodes]
    for f in force - {cut} - suffix_nodes:
        suffix_nodes.add(f)
        stack.extend(f.all_input_nodes)
    while stack:  # constants and shapes the suffix needs are recomputed there
        a = stack.pop()
        if a not in suffix_nodes and (a not in dynamic or _is_shape(a)):
            suffix_nodes.add(a)
            stack.extend(a.all_input_nodes)
    frontier = [cut]
    for n in nodes:
        if n in suffix_nodes:
            for a in n.all_input_nodes:
                if a not in suffix_nodes and a not in frontier:
                    frontier.append(a)

    needed: set[fx.Node] = set(placeholders)
    stack = list(frontier)
    while stack:
        a = stack.pop()
        if a not in needed:
            needed.add(a)
            stack.extend(a.all_input_nodes)
    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    prefix_nodes = [n for n in nodes if n in needed]
    for n in prefix_nodes:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(tuple(env[f] for f in frontier))

    sg = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    for i, f in enumerate(frontier):
        senv[f] = sg.placeholder("activation" if i == 0 else f"frontier_{i}")
    ordered_suffix = [n for n in nodes if n in suffix_nodes]
    for n in ordered_suffix:
        if n.op == "output":
            sg.output(fx.map_arg(n.args[0], lambda a: senv[a]))
        else:
            senv[n] = sg.node_copy(n, lambda a: senv[a])
    prefix = fx.GraphModule(gm, pg)
    suffix = fx.GraphModule(gm, sg)
    clone = _has_inplace(gm, prefix_nodes) or _has_inplace(gm, ordered_suffix)
    split = FxSplit(prefix, suffix, ref.name, clone, min_batch, max_batch)
    split.frontier_nodes = tuple(frontier)
    return split
