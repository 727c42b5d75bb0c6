"""The adapter's prefix/suffix split, with a faster suffix for hybrids.

Influence maps run the suffix of the generator on thousands of hybrids, so its speed is
what matters. Two things are changed, both exact up to float rounding:

- the suffix runs on tensors the caller owns (fresh hybrids), so it never copies them to
  protect them from in-place operations;
- on CPU, a ``ConvTranspose2d`` whose im2col matrix is no larger than its input
  (``out_channels * kh * kw <= in_channels``, e.g. DCGAN's last layer, 64 -> 3 channels)
  is computed as one matrix product plus a strided col2im, which is several times faster
  than PyTorch's CPU kernel for few output channels.

On the hook path (no capture works), the adapter's own split is used unchanged.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from cfmodules import latents as L
from cfmodules.engine.cut import engine_of, split
from cfmodules.engine.paths import SplitState, run_padded
from cfmodules.engine.workspace import Workspace

if TYPE_CHECKING:  # the adapter imports the engine; annotations only
    from cfmodules.adapter import GeneratorAdapter

__all__ = ["FastSplit", "GemmConvTranspose2d", "accelerate", "fold_batchnorm", "strip_leading_relu",
           "tanh_by_sigmoid_"]


class GemmConvTranspose2d(nn.Module):
    """A ``ConvTranspose2d`` (groups 1, zero padding) computed as GEMM + col2im.

    Shares the wrapped module's parameters; for inference inside influence computations
    (no gradient flows to the weight).
    """

    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        self.conv = conv
        self._cache: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None
        self.workspace = Workspace()

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
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, c.weight, c.bias)):
            return c(x)  # the out= arguments below cannot record gradients
        wm = self._matrix()  # (C_out*kh*kw, C_in)
        cols = self.workspace.get("cols", (n, wm.shape[0], h * w), x)  # reused buffer
        torch.matmul(wm, x.reshape(n, c_in, h * w), out=cols)
        size = ((h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1,
                (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1)
        if (dh, dw) == (1, 1):
            planes = self.workspace.get(
                "planes", _planes_shape(n, c.out_channels, (h, w), (kh, kw), (sh, sw)), x)
            return _col2im_phases(cols, planes, c.bias, (h, w), (kh, kw), (sh, sw), (ph, pw),
                                  size)
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


def _planes_shape(n: int, c_out: int, hw: tuple[int, int], k: tuple[int, int],
                  s: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the phase planes of :func:`_col2im_phases`: one spare row per tap."""
    th, tw = -(-k[0] // s[0]), -(-k[1] // s[1])  # taps per phase
    return (n, c_out, s[0], s[1], hw[0] + th, hw[1] + tw)


def _col2im_phases(cols: torch.Tensor, planes: torch.Tensor, bias: torch.Tensor | None,
                   hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
                   p: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """col2im of a transposed convolution (dilation 1) plus bias, batched over samples.

    ``cols`` is ``(N, C_out*kh*kw, H*W)``; ``planes`` scratch memory of
    :func:`_planes_shape` (overwritten). Uncropped output row ``y' = s*m + r`` collects tap
    ``ky = s*t + r`` of input row ``m - t``: phase ``r`` is a sum of shifted slices. When
    the kernel is a multiple of the stride, one operation adds shift ``t`` for all
    ``s*s`` phases at once and the first one writes (with the bias) instead of adding.
    The phases are then interleaved and cropped into a fresh contiguous output, one
    strided copy per output phase (``F.fold`` loops over samples and writes every tap).
    """
    n = cols.shape[0]
    (h, w), (kh, kw), (sh, sw) = hw, k, s
    c_out = cols.shape[1] // (kh * kw)
    th, tw = -(-kh // sh), -(-kw // sw)
    b = (bias.view(1, -1, 1, 1, 1, 1) if bias is not None
         else cols.new_zeros(()).view(1, 1, 1, 1, 1, 1))
    if kh % sh == 0 and kw % sw == 0:
        c = cols.view(n, c_out, th, sh, tw, sw, h, w)  # ky = sh*ty + ry, kx = sw*tx + rx
        planes[..., h:, :].copy_(b.expand_as(planes[..., h:, :]))  # rows no t=0 tap reaches
        planes[..., :h, w:].copy_(b.expand_as(planes[..., :h, w:]))
        for ty in range(th):
            for tx in range(tw):
                src = c[:, :, ty, :, tx, :]  # (N, C, sh, sw, H, W)
                dst = planes[..., ty:ty + h, tx:tx + w]
                if ty == 0 and tx == 0:
                    torch.add(src, b, out=dst)
                else:
                    dst.add_(src)
    else:
        planes.copy_(b.expand_as(planes))
        c = cols.view(n, c_out, kh, kw, h, w)
        for ky in range(kh):
            for kx in range(kw):
                ty, tx = ky // sh, kx // sw
                planes[:, :, ky % sh, kx % sw, ty:ty + h, tx:tx + w] += c[:, :, ky, kx]
    out = cols.new_empty(n, c_out, *size)
    for qy in range(min(sh, size[0])):  # output row sh*j + qy is uncropped row sh*j + qy + p
        ry, my = (qy + p[0]) % sh, (qy + p[0]) // sh
        for qx in range(min(sw, size[1])):
            rx, mx = (qx + p[1]) % sw, (qx + p[1]) // sw
            dst = out[:, :, qy::sh, qx::sw]
            dst.copy_(planes[:, :, ry, rx, my:my + dst.shape[2], mx:mx + dst.shape[3]])
    return out


def _gemm_is_faster(m: nn.Module, device: torch.device) -> bool:
    if type(m) is not nn.ConvTranspose2d or device.type != "cpu":
        return False
    kh, kw = m.kernel_size
    return (m.groups == 1 and m.padding_mode == "zeros"
            and m.out_channels * kh * kw <= m.in_channels)


_IN_PLACE = {nn.Tanh: "tanh_", nn.Sigmoid: "sigmoid_", nn.ReLU: "relu_"}
"""Pointwise modules run in place on the fresh output of a GEMM transposed convolution."""


def tanh_by_sigmoid_(x: torch.Tensor) -> torch.Tensor:
    """``tanh`` in place as ``2 * sigmoid(2x) - 1`` (the same function).

    On CPU PyTorch's ``tanh`` kernel is ~10x slower than its ``sigmoid`` (8 ms vs 0.6 ms
    for 1.6M floats on the benchmark machine); the products by 2 are exact, so the result
    differs from ``torch.tanh`` by float32 rounding of values in [-1, 1] (at most 2e-7
    absolute, measured over [-20, 20]), not by a relative error of small values.
    """
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


def _graph_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule over a copy of ``gm``'s graph, and the map from old to new nodes.

    Edit ``new.graph`` through the map, then ``new.recompile()``; ``gm`` is not changed.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    return fx.GraphModule(gm, graph), env


def _bn_to_fold(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    """The eval-mode BatchNorm that alone reads conv ``node``'s output, when it can fold."""
    if node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
        return None
    conv = gm.get_submodule(node.target)
    if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d) or (
            type(conv) is nn.ConvTranspose2d and conv.groups != 1):
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    bn = gm.get_submodule(user.target)
    if (type(bn) is not nn.BatchNorm2d or not bn.track_running_stats
            or bn.running_mean is None or bn.running_var is None):
        return None
    return bn


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` where each Conv2d / ConvTranspose2d + eval BatchNorm2d is one conv.

    For the eval mode the adapter runs generators in: the BatchNorm's running statistics
    and affine map are folded into a copy of the convolution's weight and bias (the user's
    modules are not changed), saving a pass over the output. Returns ``gm`` itself when
    there is nothing to fold.
    """
    pairs = [(n, bn) for n in gm.graph.nodes if (bn := _bn_to_fold(gm, n)) is not None]
    if not pairs:
        return gm
    new, env = _graph_copy(gm)
    for i, (node, bn) in enumerate(pairs):
        conv = gm.get_submodule(node.target)
        fused = copy.deepcopy(conv)
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(
                conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                bn.running_mean, bn.running_var, bn.eps,
                None if bn.weight is None else bn.weight.detach(),
                None if bn.bias is None else bn.bias.detach(),
                transpose=type(conv) is nn.ConvTranspose2d)
        fused.weight, fused.bias = w, b
        fused.requires_grad_(False)
        for hooks in (fused._forward_hooks, fused._forward_pre_hooks):
            hooks.clear()  # the user's hooks belong to the unfolded conv
        name = f"_cfmodules_conv_bn_{i}"
        new.add_submodule(name, fused)
        conv_node, (bn_node,) = env[node], env[node].users
        conv_node.target = name
        bn_node.replace_all_uses_with(conv_node)
        new.graph.erase_node(bn_node)
    new.recompile()
    return new


def accelerate(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``gm`` whose eligible ``ConvTranspose2d`` calls use :class:`GemmConvTranspose2d`.

    A Tanh, Sigmoid or ReLU module that is the only reader of such a call's output (a
    fresh tensor) runs in place on it. Returns ``gm`` itself when nothing is eligible.
    Eval-mode BatchNorms are folded first (:func:`fold_batchnorm`).
    """
    gm = fold_batchnorm(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and len(n.args) == 1
             and not n.kwargs and _gemm_is_faster(gm.get_submodule(n.target), device)]
    if not nodes:
        return gm
    new, env = _graph_copy(gm)
    for i, node in enumerate(nodes):
        name = f"_cfmodules_gemm_{i}"
        new.add_submodule(name, GemmConvTranspose2d(gm.get_submodule(node.target)))
        env[node].target = name
        if len(node.users) == 1:
            (user,) = node.users
            kind = type(gm.get_submodule(user.target)) if user.op == "call_module" else None
            method = _IN_PLACE.get(kind)
            if method is not None and user.args == (node,) and not user.kwargs:
                if kind is nn.Tanh:  # on CPU, where the GEMM path runs
                    env[user].op, env[user].target = "call_function", tanh_by_sigmoid_
                else:
                    env[user].op, env[user].target = "call_method", method
    new.recompile()
    return new


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a plain ReLU of its single argument (module or function)."""
    if len(node.args) != 1:
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU and not node.kwargs
    if node.op == "call_function":
        return (node.target in (torch.relu, torch.relu_, F.relu)
                and set(node.kwargs) <= {"inplace"})
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def strip_leading_relu(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of ``gm`` without the ReLU that is the only reader of its first input.

    ``stripped(relu(x), *rest) == gm(x, *rest)``; None when ``gm`` does not start so.
    Lets a caller fuse that ReLU into the operation that makes ``x``.
    """
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if first is None or len(first.users) != 1:
        return None
    (relu,) = first.users
    if not _is_relu(gm, relu) or relu.args[0] is not first:
        return None
    new, env = _graph_copy(gm)
    env[relu].replace_all_uses_with(env[first])
    new.graph.erase_node(env[relu])
    new.recompile()
    return new


class FastSplit:
    """``split(adapter, layer)`` whose suffix runs the accelerated graph on owned tensors.

    Parameters
    ----------
    adapter : GeneratorAdapter
    layer : str

    The accelerated graph holds copies made from the weights (folded BatchNorm); it is
    made again when the engine sees a weight change (:meth:`follow`) or another capture.
    """

    def __init__(self, adapter: GeneratorAdapter, layer: str):
        self.adapter = adapter
        self.base = split(adapter, layer)
        self.suffix_module: fx.GraphModule | None = None
        self.suffix_after_relu: fx.GraphModule | None = None
        self.suffix_layers: list[str] = []
        self._built: tuple = ()
        self.follow()

    def follow(self, state: SplitState | None = None) -> None:
        """Rebuild the accelerated suffix if the weights or the capture changed."""
        engine = engine_of(self.adapter)
        plain_split = self.base.graph_split(state)
        key = (engine.generation, engine.weights_generation, id(plain_split))
        if key == self._built:
            return
        self._built = key
        self._plain = plain_split
        if plain_split is None:
            self.suffix_module = self.suffix_after_relu = None
            self.suffix_layers = []
            return
        plain = plain_split.suffix_module
        self.suffix_layers = [
            str(n.target) for n in plain.graph.nodes if n.op == "call_module"
            and not getattr(plain.get_submodule(n.target), "inplace", False)
        ]
        self.suffix_module = accelerate(plain, self.adapter.device)
        self.suffix_after_relu = strip_leading_relu(self.suffix_module)

    @property
    def plain_suffix(self) -> fx.GraphModule | None:
        """The suffix graph before acceleration (None on the hook path)."""
        return None if self._plain is None else self._plain.suffix_module

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
        """As ``split(adapter, layer).prefix`` (and :meth:`follow` the generator)."""
        state = self.base.prefix(z)
        self.follow(state)
        return state

    @property
    def runs_native_conv2d(self) -> bool:
        """Whether the suffix runs a PyTorch ``Conv2d`` / ``ConvTranspose2d`` (not a GEMM one)."""
        return self.suffix_module is not None and any(
            n.op == "call_module"
            and type(self.suffix_module.get_submodule(n.target)) in (nn.Conv2d, nn.ConvTranspose2d)
            for n in self.suffix_module.graph.nodes)

    @property
    def starts_with_relu(self) -> bool:
        """Whether the suffix's first operation is a ReLU of the layer's output alone."""
        return self.suffix_after_relu is not None

    def suffix(self, state: SplitState, activation: torch.Tensor, owned: bool,
               rectified: bool = False) -> torch.Tensor:
        """Images from ``activation`` at the layer and the rest of ``state``.

        ``owned``: the caller gives up ``activation`` and ``state.frontier`` (they may be
        modified in place); otherwise they are copied first. ``rectified``: the caller
        has already applied the suffix's leading ReLU (only when
        :attr:`starts_with_relu`), so it is skipped.
        """
        if self.suffix_module is None:
            return self.base.suffix(state, activation)
        if self.base.graph_split(state) is not self._plain:
            self.follow(state)
        module = self.suffix_module
        if rectified:
            if self.suffix_after_relu is None:
                raise ValueError("rectified=True needs a suffix that starts with a ReLU.")
            module = self.suffix_after_relu
        frontier = state.frontier
        if not owned:
            activation = activation.clone()
            frontier = tuple(f.clone() for f in frontier)
        with self.adapter.eval_mode():
            raw = run_padded(module, (activation, *frontier), self._plain.min_batch,
                             self._plain.max_batch)
        return self.adapter.images(raw, activation.shape[0])
