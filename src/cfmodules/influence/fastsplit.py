"""The adapter's prefix/suffix split, with a faster suffix for hybrids.

Influence maps run the suffix of the generator on thousands of hybrids, so its speed is
what matters. Two things are changed, both exact up to float rounding:

- the suffix runs on tensors the caller owns (fresh hybrids), so it never copies them to
  protect them from in-place operations;
- on CPU, a ``ConvTranspose2d`` whose im2col matrix is no larger than its input
  (``out_channels * kh * kw <= in_channels``, e.g. DCGAN's last layer, 64 -> 3 channels)
  is computed as one matrix product plus a strided col2im, which is several times faster
  than PyTorch's CPU kernel for few output channels.

Without a ``torch.fx`` graph (dynamic control flow, custom forward), the adapter's own
split is used unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from cfmodules import latents as L
from cfmodules.hooks import resolve_layer
from cfmodules.split import SplitState, fx_split

__all__ = ["FastSplit", "GemmConvTranspose2d", "accelerate"]


class GemmConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d`` (groups 1, zero padding) computed as GEMM + col2im.

    Shares the wrapped module's parameters; used only inside influence computations.
    """

    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        self.conv = conv
        self._cache: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None

    def _matrix(self) -> torch.Tensor:
        """The weight as ``(C_out*kh*kw, C_in)``, recomputed only when the weight changes."""
        w = self.conv.weight
        if w.is_inference():  # made under inference_mode: no version counter to key on
            return w.detach().reshape(w.shape[0], -1).t().contiguous()
        key = (w._version, w.data_ptr(), w.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, w.detach().reshape(w.shape[0], -1).t().contiguous())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H_out, W_out), as ``self.conv(x)``."""
        c = self.conv
        n, c_in, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = c.kernel_size, c.stride, c.padding
        (dh, dw), (oh, ow) = c.dilation, c.output_padding
        wm = self._matrix()  # (C_out*kh*kw, C_in)
        cols = torch.matmul(wm, x.reshape(n, c_in, h * w))  # (N, C_out*kh*kw, H*W)
        size = ((h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1,
                (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1)
        if oh < sh and ow < sw:  # fold's padding crops both sides, output_padding fits
            out = F.fold(cols, size, (kh, kw), dilation=(dh, dw), padding=(ph, pw),
                         stride=(sh, sw))
        else:  # the uncropped output, then crop p above and p - output_padding below
            full = ((h - 1) * sh + dh * (kh - 1) + 1, (w - 1) * sw + dw * (kw - 1) + 1)
            out = F.fold(cols, full, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
            out = F.pad(out, (0, max(0, ow - pw), 0, max(0, oh - ph)))
            out = out[:, :, ph:ph + size[0], pw:pw + size[1]].contiguous()
        if c.bias is not None:
            out = out.add_(c.bias.view(1, -1, 1, 1))
        return out


def _gemm_is_faster(m: nn.Module, device: torch.device) -> bool:
    if type(m) is not nn.ConvTranspose2d or device.type != "cpu":
        return False
    kh, kw = m.kernel_size
    return (m.groups == 1 and m.padding_mode == "zeros"
            and m.out_channels * kh * kw <= m.in_channels)


def accelerate(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``gm`` whose eligible ``ConvTranspose2d`` calls use :class:`GemmConvTranspose2d`.

    Returns ``gm`` itself when nothing is eligible.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and len(n.args) == 1
             and not n.kwargs and _gemm_is_faster(gm.get_submodule(n.target), device)]
    if not nodes:
        return gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    for i, node in enumerate(nodes):
        name = f"_cfmodules_gemm_{i}"
        new.add_submodule(name, GemmConvTranspose2d(gm.get_submodule(node.target)))
        env[node].target = name
    new.recompile()
    return new


class FastSplit:
    """``adapter.split(layer)`` whose suffix runs the accelerated graph on owned tensors.

    Parameters
    ----------
    adapter : GeneratorAdapter
    layer : str
    """

    def __init__(self, adapter, layer: str):  # noqa: ANN001 - GeneratorAdapter (no cycle)
        self.adapter = adapter
        self.base = adapter.split(layer)
        self.suffix_module: fx.GraphModule | None = None
        gm = adapter.graph()
        if getattr(self.base, "exact_graph", False) and gm is not None:
            self.suffix_module = accelerate(
                fx_split(gm, resolve_layer(adapter.generator, layer)).suffix_module,
                adapter.device,
            )

    @property
    def needs_latent(self) -> bool:
        """Whether :meth:`suffix` re-runs from ``state.latent`` (the hook split)."""
        return self.suffix_module is None

    @property
    def n_frontier(self) -> int | None:
        """How many values besides the activation the suffix reads (None: unknown)."""
        if self.suffix_module is None:
            return None
        return sum(1 for n in self.suffix_module.graph.nodes if n.op == "placeholder") - 1

    def prefix(self, z: L.Latent) -> SplitState:
        """As ``adapter.split(layer).prefix``."""
        return self.base.prefix(z)

    def suffix(self, state: SplitState, activation: torch.Tensor, owned: bool) -> torch.Tensor:
        """Images from ``activation`` at the layer and the rest of ``state``.

        ``owned``: the caller gives up ``activation`` and ``state.frontier`` (they may be
        modified in place); otherwise they are copied first.
        """
        if self.suffix_module is None:
            return self.base.suffix(state, activation)
        frontier = state.frontier
        if not owned:
            activation = activation.clone()
            frontier = tuple(f.clone() for f in frontier)
        with self.adapter._eval_mode():
            raw = self.suffix_module(activation, *frontier)
        return self.adapter.images(raw, activation.shape[0])
