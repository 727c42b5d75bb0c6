"""Cut a generator at a layer and run what follows.

Files, by concern:

- :mod:`~cfmodules.engine.capture`: capture a forward as a ``torch.fx`` graph (the whole
  forward, or a submodule whose output is the generator's), or with ``torch.export``;
- :mod:`~cfmodules.engine.exported`: the ``torch.export`` capture, its ATen nodes lifted
  back into the standard modules' calls;
- :mod:`~cfmodules.engine.paths`: cut a graph into prefix and suffix (:class:`FxSplit`),
  or replace a layer's output with a hook (:class:`HookSplit`); :class:`SplitState`;
- :mod:`~cfmodules.engine.cut`: the :class:`Engine` of an adapter: chooses the path,
  checks a capture against the generator before use, ``explain()``; :class:`Cut`;
- :mod:`~cfmodules.engine.fast`: a faster suffix (BatchNorm folding, GEMM transposed
  convolutions, in-place tail);
- :mod:`~cfmodules.engine.linear`: the linear shortcut (hybrids start after a linear module);
- :mod:`~cfmodules.engine.tail`: the DCGAN tail after the linear shortcut as one fused C
  kernel (``fused_tail.c``, built by :mod:`cfmodules.native`) that returns the maps' sums
  without materialising hybrids;
- :mod:`~cfmodules.engine.swaps`: batches of channel-swap hybrids for influence maps;
- :mod:`~cfmodules.engine.batching`: how many hybrids per call, timed where batching can
  hurt (convolutions whose groups grow with the batch);
- :mod:`~cfmodules.engine.workspace`: reused scratch buffers.

Influence maps, hybrids, evaluation and the CLI use it through :func:`split` (a
:class:`Cut`), :func:`explain` and :func:`plan_swaps`. The engine reads an adapter; the
adapter does not know the engine (its one :class:`Engine`, :func:`engine_of`, is cached on
the adapter, which only ever drops it).
"""

from cfmodules.engine.batching import (
    BatchChoice,
    BatchShape,
    batch_dependent_ops,
    candidate_shapes,
    default_shape,
    time_shapes,
    unit_candidates,
)
from cfmodules.engine.cut import (
    Cut,
    Engine,
    Explanation,
    engine_of,
    explain,
    refresh,
    split,
    whole_graph,
)
from cfmodules.engine.paths import SplitState
from cfmodules.engine.swaps import HookSwaps, Swaps, plan_swaps

__all__ = ["BatchChoice", "BatchShape", "Cut", "Engine", "Explanation", "HookSwaps",
           "SplitState", "Swaps", "batch_dependent_ops", "candidate_shapes", "default_shape",
           "engine_of", "explain", "plan_swaps", "refresh", "split", "time_shapes",
           "unit_candidates", "whole_graph"]
