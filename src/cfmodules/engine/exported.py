"""Capture a forward with ``torch.export``, as a graph the rest of the engine can cut.

``torch.export`` (``strict=False``, eval mode, the batch dimension symbolic) runs the
real Python forward and records the tensor operations: control flow on ``dim()`` or
``shape`` is specialised, ``batch, c, h, w = x.shape`` and ``squeeze`` / ``cat`` /
``view`` of inputs are fine, where ``torch.fx`` symbolic tracing fails. Its graph is made
of ATen operations, so three things turn it into the engine's kind of graph:

- *re-rooting*: parameters and buffers are read from the live generator (``get_attr``
  of its own names, so a weight update is seen and the freshness check applies), export's
  guard call is dropped, and the output is rebuilt in the forward's own structure
  (tensor, tuple or dict);
- *lifting*: each run of ATen nodes that is one call of a standard leaf module (Conv*,
  ConvTranspose*, BatchNorm*, Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Dropout) with one
  tensor input and one output becomes a ``call_module`` node again, so BatchNorm folding,
  GEMM transposed convolutions and the linear shortcut apply unchanged; anything else
  stays as ATen nodes and runs as is;
- *the layer's output* is found from the nodes' ``nn_module_stack``: the value of one
  call of the layer that is read outside that call.

The graph holds for batches of 2 or more (the batch is exported as a symbol with that
lower bound, so that ``squeeze()`` is not specialised away); a smaller batch is run
padded with copies of its first sample (:func:`cfmodules.engine.paths.run_padded`).
Some forwards hold only for a bounded batch (a diffusers ``UNet2DModel``'s attention
guards ``batch <= 63``): export then fails with a suggested fix (``Dim('batch',
max=63)``), and the export is retried once with the bound it suggests. The graph keeps
the bound (:func:`batch_bound`) and larger batches run in chunks. Every capture is still
checked against a real forward before use.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["export_forward", "layer_calls", "batch_bound", "LIFTED_TYPES", "MIN_BATCH"]

MIN_BATCH = 2
"""The smallest batch an exported graph is valid for (smaller ones are padded)."""

LIFTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Dropout)
"""Modules (exact types) whose ATen nodes are lifted back into one ``call_module``."""

_PREFIX = "gen."  # the wrapper's attribute holding the generator


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(key, module path)]`` of ``node``'s module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else value
        out.append((str(key), str(path)))
    return out


def _inner_path(path: str) -> str | None:
    """A stack path (``gen.main.8``) as a generator path (``main.8``), or None."""
    if path == _PREFIX[:-1]:
        return ""
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else None


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def export_forward(wrapper: nn.Module, gen: nn.Module, inputs: tuple[torch.Tensor, ...]
                   ) -> tuple[fx.GraphModule, float]:
    """Export ``wrapper(*inputs)`` (attribute ``gen`` is the generator); ``(graph, seconds)``.

    The graph's ``call_module`` / ``get_attr`` targets are the generator's own names;
    standard leaf modules are lifted back into ``call_module`` nodes (module docstring).

    Raises
    ------
    Exception
        Whatever ``torch.export`` raises (the caller records it as the attempt's error).
    """
    from torch.export import Dim, export

    shapes: Any = tuple({0: Dim("batch", min=MIN_BATCH)} for _ in inputs)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        try:
            ep = export(wrapper, tuple(inputs), dynamic_shapes=shapes, strict=False)
        except Exception as error:  # export raises many types; a bound may fix it
            shapes = _bounded_batch(error, shapes)
            if shapes is None:
                raise
            ep = export(wrapper, tuple(inputs), dynamic_shapes=shapes, strict=False)
        exported = ep.module()
    seconds = time.perf_counter() - t0
    bound = _batch_max(shapes)
    graph, constants = _reroot(exported, gen)
    _lift(graph, gen)
    for node in reversed(list(graph.nodes)):  # tensors only lifted calls read
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    owners: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            owners[node.target] = gen.get_submodule(node.target)
        elif node.op == "get_attr":
            target = str(node.target)
            owners[target] = constants[target] if target in constants else _getattr(gen, target)
    gm = fx.GraphModule(owners, graph)
    gm.meta[_BOUND_KEY] = bound
    return gm, seconds


_BOUND_KEY = "cfmodules_max_batch"


def batch_bound(gm: fx.GraphModule) -> int | None:
    """The largest batch an exported graph holds for (None: no bound)."""
    return gm.meta.get(_BOUND_KEY)


def _bounded_batch(error: BaseException, shapes: Any) -> Any:
    """The dynamic shapes with the batch bound export's error suggests, or None.

    Only a fix that keeps the batch a symbol holding for ``MIN_BATCH`` samples and more,
    up to a bound, is taken (a graph specialised to one batch size could not run the
    hybrids); the lower bound stays ``MIN_BATCH``.
    """
    from torch.export import Dim
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    text = getattr(error, "msg", None)
    if not isinstance(text, str) or "Suggested fixes" not in text:
        return None
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes(text, shapes)
    except Exception:  # a fix this torch cannot parse or apply: no retry
        return None
    highs = _batch_max(refined)
    if highs is None or highs < MIN_BATCH or len(refined) != len(shapes):
        return None
    lows = [getattr(s.get(0), "min", None) if isinstance(s, dict) else None for s in refined]
    if any(low is None or low > MIN_BATCH for low in lows):
        return None  # specialised (an int), or a larger lower bound: the probe would fail
    batch = Dim("batch", min=MIN_BATCH, max=highs)
    return tuple({0: batch} for _ in shapes)


def _batch_max(shapes: Any) -> int | None:
    """The batch's upper bound in export's dynamic shapes (None: unbounded)."""
    highs = [s[0].max for s in shapes if isinstance(s, dict) and hasattr(s.get(0), "max")]
    highs = [int(h) for h in highs if h is not None and h < sys.maxsize - 1 and h != float("inf")]
    return min(highs) if highs else None


class _ThisThreadQuiet(logging.Filter):
    """Drops torch's records below ERROR that the exporting threads log; other threads'
    records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.thread not in _quiet_depth


class _QuietStderr:
    """Stands in for ``sys.stderr`` while some thread exports: the exporting threads'
    writes are dropped, every other thread's go to the stream that was there."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if threading.get_ident() in _quiet_depth:
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, encoding, isatty, ...
        return getattr(self.stream, name)


_QUIET_FILTER = _ThisThreadQuiet()
_quiet_lock = threading.Lock()
_quiet_depth: dict[int, int] = {}
"""Exporting thread -> how many exports it is in (nested ones included)."""


def _torch_loggers() -> list[logging.Logger]:
    return [logging.getLogger(n) for n in logging.root.manager.loggerDict
            if n == "torch" or n.startswith("torch.")]


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep this thread's export quiet: a failed export logs warnings and prints the
    partial graph it had traced to ``sys.stderr``; the attempt's error says why, in one
    line (``explain``).

    Only the calling thread is silenced: ``sys.stderr`` is wrapped (not replaced by a
    buffer) and torch's loggers get a filter on the thread, so what other threads print
    or log meanwhile (a notebook's, a training loop's) still appears. Nested and
    concurrent exports share one wrapper; the last to finish restores ``sys.stderr``,
    unless something else replaced it meanwhile.
    """
    me = threading.get_ident()
    with _quiet_lock:
        if not _quiet_depth:  # the first export: install the filter and the wrapper
            for lg in _torch_loggers():
                lg.addFilter(_QUIET_FILTER)
            sys.stderr = _QuietStderr(sys.stderr)
        _quiet_depth[me] = _quiet_depth.get(me, 0) + 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth[me] -= 1
            if not _quiet_depth[me]:
                del _quiet_depth[me]
            if not _quiet_depth:  # the last export: undo both
                for lg in _torch_loggers():
                    lg.removeFilter(_QUIET_FILTER)
                if isinstance(sys.stderr, _QuietStderr):
                    sys.stderr = sys.stderr.stream


def _out_spec(gm: fx.GraphModule) -> Any:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return None if info is None else info.out_spec


def _reroot(exported: fx.GraphModule, gen: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """``exported``'s graph with the generator's own names, and the constants export made.

    ``get_attr`` targets become the generator's paths (``main.0.weight``); constants
    (lifted tensors, submodules of control-flow operators, wherever export attached
    them) ``_cfmodules_constant_i``.
    """
    spec = _out_spec(exported)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants: dict[str, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module":  # export's input guards (batch >= 2, ...): dropped
            if node.users:
                raise RuntimeError(f"the exported graph calls a submodule {node.target!r}")
            continue
        if node.op == "output":
            flat = node.args[0]
            flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
            out = pytree.tree_unflatten([env[a] if isinstance(a, fx.Node) else a for a in flat],
                                        spec) if spec is not None else flat
            graph.output(out)
            continue
        copy = graph.node_copy(node, lambda a: env[a])
        if node.op == "get_attr":
            target = str(node.target)
            inner = _inner_path(target)
            if not inner or not _has_path(gen, inner):
                name = f"_cfmodules_constant_{len(constants)}"
                constants[name] = _getattr(exported, target)
                inner = name
            copy.target = inner
        env[node] = copy
    return graph, constants


def _has_path(root: Any, path: str) -> bool:
    try:
        _getattr(root, path)
    except AttributeError:
        return False
    return True


def _getattr(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _runs(graph: fx.Graph) -> list[tuple[str, str, list[fx.Node]]]:
    """``(stack key, generator path, nodes)`` of consecutive nodes of one module call.

    Only ``call_function`` nodes carry a call; a run ends where the innermost stack key
    changes.
    """
    runs: list[tuple[str, str, list[fx.Node]]] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        stack = _stack(node)
        if not stack:
            continue
        key, path = stack[-1]
        inner = _inner_path(path)
        if inner is None or not inner:
            continue
        if runs and runs[-1][0] == key and runs[-1][2][-1].next is node:
            runs[-1][2].append(node)
        else:
            runs.append((key, inner, [node]))
    return runs


def _lift(graph: fx.Graph, gen: nn.Module) -> None:
    """Replace each liftable run of ATen nodes by a ``call_module`` of the module (in place)."""
    for _, path, nodes in _runs(graph):
        try:
            module = gen.get_submodule(path)
        except AttributeError:
            continue
        if type(module) not in LIFTED_TYPES:
            continue
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes
                  if a not in inside and a.op != "get_attr" and _is_tensor(a)}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        scalars = [a for n in nodes for a in n.all_input_nodes
                   if a not in inside and a.op != "get_attr" and not _is_tensor(a)]
        if len(inputs) != 1 or len(outputs) != 1 or scalars or not _is_tensor(outputs[0]):
            continue
        (x,) = inputs
        out = outputs[0]
        with graph.inserting_before(nodes[0]):
            new = graph.call_module(path, (x,))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)


def layer_calls(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The output node of each call of generator module ``path`` in an exported graph.

    A lifted call is its ``call_module`` node; otherwise, of the nodes run inside the
    call, the one read outside it (the last such when there are several).
    """
    calls: list[fx.Node] = []
    current: list[fx.Node] = []
    key = None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        keys = [k for k, p in _stack(node) if _inner_path(p) == path]
        if node.op == "call_module" and node.target == path and not keys:
            keys = [f"lifted-{node.name}"]
        if keys and keys[-1] == key:
            current.append(node)
            continue
        if current:
            calls.append(_call_output(current))
        current, key = ([node], keys[-1]) if keys else ([], None)
    if current:
        calls.append(_call_output(current))
    return calls


def _call_output(nodes: list[fx.Node]) -> fx.Node:
    inside = set(nodes)
    read = [n for n in nodes if any(u not in inside for u in n.users) or not n.users]
    return read[-1] if read else nodes[-1]
