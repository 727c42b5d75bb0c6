"""The DCGAN tail as one fused kernel: influence-map sums without materialised hybrids.

At the penultimate block of a DCGAN (``main.8`` of the faces model), what follows the
swapped layer is ``ConvTranspose2d(4, 2, 1)`` [+ BatchNorm] -> ReLU ->
``ConvTranspose2d(4, 2, 1)`` -> Tanh (a VAE decoder's: Sigmoid or nothing, or the
adapter's ``output_transform=torch.sigmoid``). With the linear shortcut
(:mod:`cfmodules.engine.linear`) each hybrid costs only the last convolution, about 7
MFLOP, and as a chain of PyTorch operations most of its time goes to moving its 64x32x32
intermediates through memory (``docs/cost.md``). ``fused_tail.c`` does the whole chain
per hybrid while its data stay in cache -- contribution + base + ReLU, the last
convolution as a GEMM plus col2im, the activation, ``|hybrid - Original 1|`` averaged over colour,
and the sums over pairs -- on as many threads as PyTorch uses
(:func:`torch.get_num_threads`), split by unit.

The numbers are those of the PyTorch path up to float rounding, and do not depend on the
thread count or the batch: each hybrid is computed alone, and each unit's sum runs over
its pairs in order. A pixel that a swap does not reach is Original 1's bit for bit, so its
map is exactly 0 there, as in the naive rerun.

:meth:`FusedTail.match` says whether a :class:`~cfmodules.engine.swaps.LinearSwaps` has
this tail; the kernel is built on first use by :mod:`cfmodules.native`, and
without a C compiler (or with ``CFMODULES_NATIVE=0``) the PyTorch path runs instead.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from cfmodules import native

__all__ = ["FusedTail", "kernel_note"]

KERNEL = "fused_tail"
_P = ctypes.c_void_p
_I = ctypes.c_int
# (a, t) -> kernel row ky of the 4x4 kernel for output phase a, tap t (see fused_tail.c)
_KY = {(0, 0): 1, (0, 1): 3, (1, 0): 0, (1, 1): 2}


def _is_dcgan_convt(m: nn.Module) -> bool:
    """A plain ``ConvTranspose2d(kernel 4, stride 2, padding 1)``, groups 1, float32, with
    no hook that could change its weight or output (old-style spectral norm, user hooks)."""
    return (type(m) is nn.ConvTranspose2d and m.kernel_size == (4, 4) and m.stride == (2, 2)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.output_padding == (0, 0)
            and m.groups == 1 and m.padding_mode == "zeros" and m.weight.dtype == torch.float32
            and not (m._forward_pre_hooks or m._forward_hooks))


def _is(gm: fx.GraphModule, node: fx.Node, module: type, functions: tuple) -> bool:
    if len(node.args) != 1 or node.kwargs and set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is module
    if node.op == "call_function":
        return node.target in functions
    return False


_ACT = {nn.Tanh: 1, nn.Sigmoid: 2, torch.tanh: 1, F.tanh: 1, torch.sigmoid: 2, F.sigmoid: 2}
"""The kernel's output activations: 0 none, 1 Tanh, 2 Sigmoid (modules and functions)."""


def _activation(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> int | None:
    """The code of ``node`` if it is a Tanh or Sigmoid of ``x`` alone, else None."""
    if len(node.args) != 1 or node.kwargs or node.args[0] is not x or len(x.users) != 1:
        return None
    if node.op == "call_module":
        return _ACT.get(type(gm.get_submodule(node.target)))
    return _ACT.get(node.target) if node.op == "call_function" else None


def _suffix_tail(gm: fx.GraphModule) -> tuple[nn.ConvTranspose2d, int] | None:
    """(the last convolution, the activation code) when ``gm`` is exactly
    ``x -> relu -> ConvT(4, 2, 1) [-> tanh | sigmoid]``."""
    nodes = list(gm.graph.nodes)
    if len(nodes) not in (4, 5) or nodes[0].op != "placeholder" or nodes[2].op != "call_module":
        return None
    x, relu, conv, out = nodes[0], nodes[1], nodes[2], nodes[-1]
    if not (_is(gm, relu, nn.ReLU, (torch.relu, F.relu)) and relu.args[0] is x):
        return None
    if conv.args != (relu,) or conv.kwargs or not _is_dcgan_convt(gm.get_submodule(conv.target)):
        return None
    if len(x.users) != 1 or len(relu.users) != 1 or len(conv.users) != 1:
        return None
    act = 0
    if len(nodes) == 5:
        act = _activation(gm, nodes[3], conv)
        if act is None:
            return None
    if out.op != "output" or out.args != (nodes[-2],):
        return None
    return gm.get_submodule(conv.target), act


def _pattern(plan, plain_suffix: fx.GraphModule | None, adapter
             ) -> tuple[nn.ConvTranspose2d, int] | None:
    """(the last convolution, the output activation) when the layer of ``plan`` has a
    DCGAN tail on CPU, else None. The adapter's ``output_transform`` may be the activation
    (``torch.sigmoid`` or ``torch.tanh`` itself, after a tail without one): the face VAE's."""
    if (adapter.device.type != "cpu" or plain_suffix is None
            or not _is_dcgan_convt(plan.op)):
        return None
    found = _suffix_tail(plain_suffix)
    if found is None or found[0].in_channels != plan.op.out_channels:
        return None
    last, act = found
    transform = adapter.output_transform
    if transform is not None:
        if act != 0 or transform not in (torch.sigmoid, torch.tanh):
            return None
        act = _ACT[transform]
    return last, act


def kernel_note(plan, plain_suffix: fx.GraphModule | None, adapter) -> tuple[str, bool]:
    """For :func:`~cfmodules.engine.explain`: whether the fused kernel computes this
    layer's maps and why (not), and whether it can (``("", False)`` without a DCGAN tail)."""
    if _pattern(plan, plain_suffix, adapter) is None:
        return "", False
    return (f"fused DCGAN-tail kernel {native.status(KERNEL)} (for single-channel maps when "
            "a block's inputs are finite and bounded, as for the fused add+ReLU)",
            native.load(KERNEL) is not None)


class FusedTail:
    """The fused kernel for one linear-shortcut layer with a DCGAN tail.

    Made by :meth:`match`; :meth:`begin_block` takes a block's deltas and base
    pre-activations, :meth:`sums` returns the sums over pairs of the influence maps.
    """

    def __init__(self, lib: ctypes.CDLL, last: nn.ConvTranspose2d, act: int):
        self.lib, self.last, self.act = lib, last, act
        self._weights_key: tuple = ()

    @classmethod
    def match(cls, plan, plain_suffix: fx.GraphModule | None, adapter) -> FusedTail | None:
        """A :class:`FusedTail` when the layer of ``plan`` (a linear shortcut) has a DCGAN
        tail on CPU in float32 and the kernel can be built here; else None.

        ``plain_suffix`` is the graph after the cut (ReLU, the last convolution, Tanh).
        """
        found = _pattern(plan, plain_suffix, adapter)
        if found is None:
            return None
        lib = native.load(KERNEL)
        if lib is None:
            return None
        _declare(lib)
        return cls(lib, *found)

    # ------------------------------------------------------------------ weights
    def _weights(self, first: torch.Tensor) -> None:
        """The kernel's weight layouts, remade when a weight changes.

        ``first`` is the first convolution's weight with the BatchNorm scale folded in
        (``plan.weight()``), ``(C_in, C_mid, 4, 4)``.
        """
        last = self.last.weight
        bias = self.last.bias
        key = (first.data_ptr(), first._version, last.data_ptr(), last._version,
               None if bias is None else (bias.data_ptr(), bias._version))
        if key == self._weights_key:
            return
        with torch.no_grad():
            w = first.detach().float().cpu()
            phases = torch.empty(w.shape[0], w.shape[1], 4, 4)
            for a in range(2):
                for b in range(2):
                    for ty in range(2):
                        for tx in range(2):
                            phases[:, :, a * 2 + b, ty * 2 + tx] = w[:, :, _KY[a, ty],
                                                                     _KY[b, tx]]
            self.w1 = phases.contiguous()
            c_mid, c_out = last.shape[0], last.shape[1]
            rows = self.lib.cfm_tile_rows()
            m_pad = -(-(c_out * 16) // rows) * rows
            a = torch.zeros(c_mid, m_pad)
            a[:, :c_out * 16] = last.detach().float().reshape(c_mid, c_out * 16)
            self.a = a.contiguous()
            self.bias = None if bias is None else bias.detach().float().contiguous()
        self._weights_key = key

    # ------------------------------------------------------------------ blocks
    def begin_block(self, weight: torch.Tensor, delta: torch.Tensor, base: torch.Tensor) -> None:
        """Take a block: ``delta`` (P, C_in, H, W) at the layer, ``base`` (P, C_mid, 2H, 2W)
        Original 1's pre-activation after the first convolution (and BatchNorm), ``weight``
        the first convolution's weight with the BatchNorm scale folded in."""
        self._weights(weight)
        p, c_in, h, w = delta.shape
        c_mid = base.shape[1]
        self.hw = (h, w)
        self.c_in, self.c_mid, self.c_out = c_in, c_mid, self.last.out_channels
        self.dpad = F.pad(delta.detach().float(), (1, 1, 1, 1)).contiguous()
        self.base = (base.detach().float().reshape(p, c_mid, h, 2, w, 2)
                     .permute(0, 1, 3, 5, 2, 4).contiguous())  # (P, C_mid, a, b, m, n)
        self.img = torch.empty(p, self.c_out, 4, 4, h, w)
        bias = _P(self.bias.data_ptr()) if self.bias is not None else None
        rc = self.lib.cfm_tail_images(p, c_mid, self.c_out, h, w, self.a.shape[1], self.act,
                                      _P(self.base.data_ptr()), _P(self.a.data_ptr()), bias,
                                      _P(self.img.data_ptr()))
        _check(rc)

    def sums(self, channels: torch.Tensor, pairs: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum and sum of squares over ``pairs`` of the maps of ``channels``, float64
        ``(U, 4H, 4W)`` each (as :func:`cfmodules.influence.maps._sums` of the hybrids)."""
        # the bookkeeping around the calls is numpy's: a PyTorch operation here would wake
        # its OpenMP threads, which then spin on the cores the kernel's threads need
        units = np.ascontiguousarray(channels.cpu().numpy(), dtype=np.int64)
        n_u = units.size
        h, w = self.hw
        s = np.zeros((n_u, 4, 4, h, w))
        q = np.zeros_like(s)
        dpad, base, img = (t[pairs] for t in (self.dpad, self.base, self.img))
        n_p = dpad.shape[0]
        bias = _P(self.bias.data_ptr()) if self.bias is not None else None
        n_threads = max(1, min(torch.get_num_threads(), n_u))
        cuts = [n_u * i // n_threads for i in range(n_threads + 1)]

        def run(i: int) -> int:
            lo, hi = cuts[i], cuts[i + 1]
            if hi == lo:
                return 0
            return self.lib.cfm_tail_sums(
                hi - lo, _P(units.ctypes.data + 8 * lo), n_p, self.c_in, self.c_mid,
                self.c_out, h, w, self.a.shape[1], self.act, _P(dpad.data_ptr()),
                _P(self.w1.data_ptr()),
                _P(base.data_ptr()), _P(self.a.data_ptr()), bias, _P(img.data_ptr()),
                _P(s[lo].ctypes.data), _P(q[lo].ctypes.data))

        if n_threads == 1:
            codes = [run(0)]
        else:
            codes = list(_executor(n_threads).map(run, range(n_threads)))
        for rc in codes:
            _check(rc)
        # superphase layout (U, qy, qx, i, j) -> image (U, 4i + qy, 4j + qx)
        return _unpermute(s), _unpermute(q)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(n: int) -> ThreadPoolExecutor:
    """The process's threads for the kernel calls (made again when the count changes)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="cfmodules-tail"), n
        return _pool


def _unpermute(t: np.ndarray) -> torch.Tensor:
    n, _, _, h, w = t.shape
    return torch.from_numpy(np.ascontiguousarray(t.transpose(0, 3, 1, 4, 2)).reshape(n, 4 * h,
                                                                                     4 * w))


def _check(rc: int) -> None:
    if rc != 0:  # the kernel's scratch memory could not be allocated
        raise MemoryError("DefaultCPUAllocator: can't allocate memory for the fused tail "
                          "kernel's scratch buffers (Cannot allocate memory)")


def _declare(lib: ctypes.CDLL) -> None:
    lib.cfm_tile_rows.restype = _I
    lib.cfm_tile_rows.argtypes = []
    lib.cfm_tail_images.restype = _I
    lib.cfm_tail_images.argtypes = [_I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P]
    lib.cfm_tail_sums.restype = _I
    lib.cfm_tail_sums.argtypes = [_I, _P, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P,
                                  _P, _P, _P]
