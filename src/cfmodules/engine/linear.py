"""The linear shortcut: when a layer feeds only a Conv / ConvTranspose / Linear.

If the only user of a layer's output is a linear module ``op`` (optionally followed by an
eval-mode BatchNorm with running statistics, itself the only user of ``op``), then swapping
channel ``c`` of the layer between Original 1 and Original 2 changes the pre-activation
after ``op`` (or after the BatchNorm) by exactly

    op_without_bias(delta_c) * bn_scale,     delta_c = a_c(z2) - a_c(z1),

where ``delta_c`` is zero on every channel but ``c``. That costs ``1 / C_in`` of the
full ``op``; the hybrid is then finished from the cut after ``op`` (or its BatchNorm)
with the generator's own suffix. This module finds such layers in the ``torch.fx``
graph and computes the single-channel contributions for many channels and pairs at once.
Anything unusual (several users, keyword arguments, train-mode or batch-statistics
BatchNorm, ...) means no plan, and the general prefix/suffix path is used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from cfmodules.engine.workspace import Workspace
from cfmodules.hooks import resolve_layer

if TYPE_CHECKING:  # cut.py imports this file (lazily); annotations only
    from cfmodules.engine.cut import Engine

__all__ = ["LinearPlan", "find_linear_plan", "single_channel_contributions",
           "group_contribution", "group_contributions", "add_base_", "fused_add_relu_is_exact",
           "channels_last_supported"]

_FLOAT32_SAFE = 1e37  # well below float32's largest value (3.4e38)
_HAS_ADD_RELU = hasattr(torch.ops.aten, "_add_relu_")  # fused CPU kernel

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LinearPlan:
    """How to compute hybrids of ``layer`` through the linear module after it.

    Attributes
    ----------
    layer : str
        The layer whose channels are swapped.
    op : nn.Module
        The Conv / ConvTranspose / Linear module that reads the layer (and nothing else does).
    op_name : str
        Its dotted name.
    cut : str
        Layer name (``op`` or the BatchNorm after it, with ``:k`` when it runs several
        times) where the generator is cut: hybrids start from its output.
    scale : Tensor or None
        ``(C_out,)`` BatchNorm scale ``weight / sqrt(running_var + eps)``, or None.
    bn : nn.Module or None
        The BatchNorm after ``op`` (the cut), or None.
    """

    layer: str
    op: nn.Module
    op_name: str
    cut: str
    scale: torch.Tensor | None
    bn: nn.Module | None = None

    def pre_activation(self, a: torch.Tensor) -> torch.Tensor:
        """The value at the cut computed from the layer's output ``a``: ``bn(op(a))``."""
        out = self.op(a)
        return out if self.bn is None else self.bn(out)

    def refreshed(self) -> LinearPlan:
        """The plan with the BatchNorm scale computed from the current statistics."""
        return self if self.bn is None else replace(self, scale=_bn_scale(self.bn))

    def weight(self) -> torch.Tensor:
        """The op's weight with the BatchNorm scale folded into its output channels."""
        w = self.op.weight.detach()
        if self.scale is None:
            return w
        if isinstance(self.op, _CONVT):  # (C_in, C_out / groups, *k)
            groups = self.op.groups
            s = self.scale.view(groups, -1)  # output channels of each group
            c_in_g = w.shape[0] // groups
            s = s.repeat_interleave(c_in_g, dim=0)  # (C_in, C_out / groups)
            return w * s.view(*s.shape, *([1] * (w.dim() - 2)))
        return w * self.scale.view(-1, *([1] * (w.dim() - 1)))  # Conv (C_out, ...), Linear


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    w = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return w / torch.sqrt(bn.running_var.detach() + bn.eps)


def _call_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """Adapter layer name of a call_module node (``path`` or ``path:k``)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    return node.target if len(calls) == 1 else f"{node.target}:{calls.index(node)}"


def _single_input(node: fx.Node, src: fx.Node) -> bool:
    return node.op == "call_module" and node.args == (src,) and not node.kwargs


def _op_supported(op: nn.Module, ndim: int) -> bool:
    if isinstance(op, nn.Linear):
        return ndim == 2  # (N, features): channel c is input feature c
    if isinstance(op, (*_CONV, *_CONVT)):
        spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1,
                   nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[type(op)]
        return ndim == spatial + 2
    return False


def find_linear_plan(engine: Engine, layer: str) -> LinearPlan | None:
    """The :class:`LinearPlan` for ``layer``, or None when the shortcut is not exact.

    Parameters
    ----------
    engine : Engine
        The engine of the adapter (:func:`cfmodules.engine.engine_of`), whose graphs the
        shortcut reads; ``engine.linear_plan(layer)`` calls this.
    layer : str
        A layer name as accepted by the adapter (``path`` or ``path:k``).
    """
    adapter = engine.adapter
    gm = engine.graph(layer)
    if gm is None:
        return None
    ref = resolve_layer(adapter.generator, layer)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == ref.path]
    if not calls or (ref.call is None and len(calls) > 1) or (ref.call or 0) >= len(calls):
        return None
    node = calls[ref.call or 0]
    if len(node.users) != 1:
        return None
    (op_node,) = node.users
    if not _single_input(op_node, node):
        return None
    op = gm.get_submodule(op_node.target)
    if type(op) not in (nn.Linear, *_CONV, *_CONVT):  # exact types: subclasses may differ
        return None
    info = {i.name: i for i in adapter.layers_cached()}
    shape = info[ref.path].shape if ref.path in info else None
    if not shape or not _op_supported(op, len(shape) + 1):
        return None
    cut_node, scale, bn_module = op_node, None, None
    if len(op_node.users) == 1:
        (bn_node,) = op_node.users
        if _single_input(bn_node, op_node):
            bn = gm.get_submodule(bn_node.target)
            if (type(bn) in _BN and bn.track_running_stats and bn.running_var is not None
                    and bn.running_mean is not None):
                scale = _bn_scale(bn)
                cut_node, bn_module = bn_node, bn
    try:
        engine.cut(_call_name(gm, cut_node))
    except Exception:  # any failure to cut there: the general path is exact
        return None
    return LinearPlan(layer=layer, op=op, op_name=_call_name(gm, op_node),
                      cut=_call_name(gm, cut_node), scale=scale, bn=bn_module)


# ---------------------------------------------------------------------- contributions
def group_contribution(plan: LinearPlan, weight: torch.Tensor, delta: torch.Tensor,
                       idx: torch.Tensor) -> torch.Tensor:
    """The change of the pre-activation when channels ``idx`` change by ``delta``.

    Parameters
    ----------
    plan : LinearPlan
    weight : Tensor
        ``plan.weight()`` (BatchNorm scale folded in), on the computation device.
    delta : Tensor (P, C_in, ...)
        ``a(z2) - a(z1)`` at the layer; only channels ``idx`` are used.
    idx : LongTensor (k,)

    Returns
    -------
    Tensor (P, C_out, ...)
    """
    op = plan.op
    if getattr(op, "groups", 1) == 1 and idx.numel() > 0:
        # only the group's channels enter (the others' delta would be multiplied by zero):
        # the cost grows with the group's size, not with the layer's width
        x = delta.index_select(1, idx)
        weight = weight.index_select(0 if isinstance(op, _CONVT) else 1, idx)
    else:
        x = torch.zeros_like(delta)
        x[:, idx] = delta[:, idx]
    if isinstance(op, nn.Linear):
        return F.linear(x, weight)
    if isinstance(op, _CONVT):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
        return fn(x, weight, None, op.stride, op.padding, op.output_padding, op.groups,
                  op.dilation)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    if op.padding_mode != "zeros":
        x = F.pad(x, op._reversed_padding_repeated_twice, mode=op.padding_mode)
        return fn(x, weight, None, op.stride, 0, op.dilation, op.groups)
    return fn(x, weight, None, op.stride, op.padding, op.dilation, op.groups)


def group_contributions(plan: LinearPlan, weight: torch.Tensor, delta: torch.Tensor,
                        groups: list[torch.Tensor]) -> torch.Tensor:
    """:func:`group_contribution` of several groups, ``(U, P, C_out, ...)``.

    Consecutive groups of the same size run as one grouped convolution (group ``u`` of
    the call reads only its own channels, with its own rows of the weight): the same sums
    as one call per group, in one kernel (3x faster for 8 groups of 45 of DCGAN's 128
    channels at ``main.8``). Other ops and sizes: one :func:`group_contribution` each.
    """
    op = plan.op
    grouped = (isinstance(op, (*_CONV, *_CONVT)) and op.groups == 1
               and op.padding_mode == "zeros")
    parts = []
    i = 0
    while i < len(groups):
        j = i + 1
        while j < len(groups) and groups[j].numel() == groups[i].numel():
            j += 1
        run, size = groups[i:j], groups[i].numel()
        if grouped and size > 0 and len(run) > 1:
            cat = torch.cat(run).to(delta.device)
            x = delta.index_select(1, cat)
            u, c_out = len(run), (weight.shape[1] if isinstance(op, _CONVT) else weight.shape[0])
            spatial = x.dim() - 2
            if isinstance(op, _CONVT):  # weight (C_in, C_out, *k): the groups' rows, in order
                w = weight.index_select(0, cat)
                fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
                y = fn(x, w, None, op.stride, op.padding, op.output_padding, u, op.dilation)
            else:  # weight (C_out, C_in, *k) -> (U * C_out, size, *k)
                w = weight.index_select(1, cat).unflatten(1, (u, size)).transpose(0, 1)
                w = w.reshape(u * c_out, size, *weight.shape[2:])
                fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
                y = fn(x, w, None, op.stride, op.padding, op.dilation, u)
            parts.append(y.unflatten(1, (u, c_out)).transpose(0, 1))
        else:
            parts.append(torch.stack([group_contribution(plan, weight, delta, g) for g in run]))
        i = j
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def _fast_2d(op: nn.Module) -> bool:
    return (type(op) in (nn.Conv2d, nn.ConvTranspose2d) and op.groups == 1
            and not isinstance(op.padding, str) and op.padding_mode == "zeros")


def channels_last_supported(plan: LinearPlan) -> bool:
    """Whether :func:`single_channel_contributions` can write channels-last output."""
    return _fast_2d(plan.op)


def prepare_weight(plan: LinearPlan, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the layout :func:`single_channel_contributions` reads, once per run.

    For a 2-d (transposed) convolution with groups 1: ``(C_in, C_out, kh * kw)``, flipped
    for a transposed convolution; otherwise ``weight`` itself.
    """
    op = plan.op
    if not _fast_2d(op):
        return weight
    if isinstance(op, nn.ConvTranspose2d):  # (C_in, C_out, kh, kw)
        w = weight.flip(-1, -2)
    else:  # (C_out, C_in, kh, kw)
        w = weight.transpose(0, 1)
    return w.reshape(w.shape[0], w.shape[1], -1).contiguous()


def single_channel_contributions(plan: LinearPlan, weight: torch.Tensor, delta: torch.Tensor,
                                 channels: torch.Tensor, workspace: Workspace | None = None,
                                 channels_last: bool = False) -> torch.Tensor:
    """Contributions of single channels, for many channels and pairs at once.

    Parameters
    ----------
    plan : LinearPlan
    weight : Tensor
        ``prepare_weight(plan, plan.weight())`` on the computation device.
    delta : Tensor (P, C_in, ...)
        ``a(z2) - a(z1)`` at the layer.
    channels : LongTensor (U,)
    workspace : Workspace, optional
        Scratch buffers to reuse; the result may then live in one of them.
    channels_last : bool
        For a 2-d (transposed) convolution, lay the result out channels last (the same
        values; PyTorch's CPU convolutions after the cut are faster on such input).

    Returns
    -------
    Tensor (U, P, C_out, ...)
        Row ``[u, p]`` is the pre-activation change when only channel ``channels[u]`` of
        pair ``p`` is swapped; :func:`add_base_` adds the original pre-activation.
    """
    op = plan.op
    d = delta.index_select(1, channels.to(delta.device)).transpose(0, 1)  # (U, P, ...)
    if isinstance(op, nn.Linear):  # weight (C_out, C_in)
        w = weight.index_select(1, channels.to(weight.device)).t()  # (U, C_out)
        out = d.unsqueeze(-1) * w.unsqueeze(1)
    elif _fast_2d(op):
        out = _unfold_gemm(op, weight, d, channels, workspace, channels_last)
    else:
        out = torch.stack([group_contribution(plan, weight, delta, channels[u:u + 1])
                           for u in range(d.shape[0])])  # weight is unprepared here
    return out


def fused_add_relu_is_exact(prepared: torch.Tensor, delta: torch.Tensor,
                            base: torch.Tensor) -> bool:
    """Whether :func:`add_base_` may use the fused CPU kernel for these inputs.

    ``torch``'s fused add+ReLU turns NaN into 0 and inf into the largest float, where
    ``relu(x + y)`` keeps them (and a non-finite hybrid must be reported). It is exact
    when everything is finite and no single-channel contribution can overflow:
    ``|contribution| <= max over (c_in, c_out) of sum |w| * max |delta|``.
    """
    if base.device.type != "cpu" or not _HAS_ADD_RELU:
        return False
    w = prepared.flatten(2) if prepared.dim() > 2 else prepared
    bound = float(w.abs().sum(-1).max()) if w.dim() > 2 else float(w.abs().max())
    bound = bound * float(delta.abs().max()) + float(base.abs().max())
    return bound < _FLOAT32_SAFE  # NaN compares False


def add_base_(hyb: torch.Tensor, base: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``hyb += base`` in place (``base`` broadcasts), then ``relu`` if asked.

    With ``relu`` on CPU one fused pass over ``hyb`` instead of two (call only where
    :func:`fused_add_relu_is_exact` holds).
    """
    if relu and hyb.device.type == "cpu" and _HAS_ADD_RELU:
        return torch.ops.aten._add_relu_(hyb, base)
    hyb.add_(base)
    return hyb.relu_() if relu else hyb


def _out_hw(op: nn.Module, d: torch.Tensor) -> tuple[int, int]:
    h, w = d.shape[-2:]
    k, s, p, dil = op.kernel_size, op.stride, op.padding, op.dilation
    if isinstance(op, nn.ConvTranspose2d):
        op_ = op.output_padding
        return tuple((n - 1) * s[i] - 2 * p[i] + dil[i] * (k[i] - 1) + op_[i] + 1
                     for i, n in enumerate((h, w)))  # type: ignore[return-value]
    return tuple((n + 2 * p[i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1
                 for i, n in enumerate((h, w)))  # type: ignore[return-value]


def _unfold_gemm(op: nn.Module, weight: torch.Tensor, d: torch.Tensor,
                 channels: torch.Tensor, workspace: Workspace | None = None,
                 channels_last: bool = False) -> torch.Tensor:
    """Single-input-channel (transposed) 2-d convolution as im2col + batched GEMM.

    ``d`` is ``(U, P, H, W)``; returns ``(U, P, C_out, H_out, W_out)``, laid out with the
    channels last when ``channels_last``. A transposed convolution is a convolution of the
    zero-upsampled, padded input with the flipped kernel; for one input channel the im2col
    matrix is small and the GEMM writes each output once, which is much faster than a
    1-input-channel convolution call.
    """
    n_units, n_pairs, h, w = d.shape
    k, s, p, dil = op.kernel_size, op.stride, op.padding, op.dilation
    x = d.reshape(n_units * n_pairs, h, w)
    ch = channels.to(weight.device)
    if isinstance(op, nn.ConvTranspose2d):
        opad = op.output_padding
        if s != (1, 1):
            up = x.new_zeros(x.shape[0], (h - 1) * s[0] + 1, (w - 1) * s[1] + 1)
            up[:, ::s[0], ::s[1]] = x
            x = up
        lo = [dil[i] * (k[i] - 1) - p[i] for i in range(2)]
        x = F.pad(x, (lo[1], lo[1] + opad[1], lo[0], lo[0] + opad[0]))
        cols = _im2col(x, k, (1, 1), dil, workspace, channels_last)
    else:
        x = F.pad(x, (p[1], p[1], p[0], p[0]))
        cols = _im2col(x, k, s, dil, workspace, channels_last)
    wk = weight.index_select(0, ch)  # prepared: (U, C_out, kh*kw)
    ho, wo = _out_hw(op, d)
    c_out = wk.shape[1]
    cols = cols.view(n_units, n_pairs, cols.shape[1], cols.shape[2])
    if channels_last:  # (U, P, HW, taps) @ (U, 1, taps, C_out): pixels x channels
        a, b, shape = cols, wk.transpose(1, 2).unsqueeze(1), (ho * wo, c_out)
    else:  # (U, 1, C_out, taps) @ (U, P, taps, HW)
        a, b, shape = wk.unsqueeze(1), cols, (c_out, ho * wo)
    if workspace is None:
        out = torch.matmul(a, b)
    else:
        out = torch.matmul(a, b, out=workspace.get("contribution",
                                                   (n_units, n_pairs, *shape), cols))
    if channels_last:
        return out.view(n_units, n_pairs, ho, wo, c_out).permute(0, 1, 4, 2, 3)
    return out.view(n_units, n_pairs, c_out, ho, wo)


def _im2col(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
            workspace: Workspace | None = None, pixels_first: bool = False) -> torch.Tensor:
    """``(R, H, W)`` -> ``(R, kh * kw, H_out * W_out)`` columns of a strided, dilated window.

    Same as ``F.unfold`` on one channel, built from strided views (``F.unfold`` is orders
    of magnitude slower on CPU for one channel and a large batch). ``pixels_first``: the
    transpose, ``(R, H_out * W_out, kh * kw)``.
    """
    v = x.unfold(1, d[0] * (k[0] - 1) + 1, s[0]).unfold(2, d[1] * (k[1] - 1) + 1, s[1])
    v = v[..., ::d[0], ::d[1]]  # (R, H_out, W_out, kh, kw)
    r, ho, wo = v.shape[:3]
    if pixels_first:
        cols, shape = v, (r, ho * wo, k[0] * k[1])
    else:
        cols, shape = v.permute(0, 3, 4, 1, 2), (r, k[0] * k[1], ho * wo)
    if workspace is None:
        return cols.reshape(shape)
    return workspace.get("im2col", tuple(cols.shape), x).copy_(cols).view(shape)
