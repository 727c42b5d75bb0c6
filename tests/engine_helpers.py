"""Generators written the way published code is written, for the engine tests.

Each is tiny (a forward takes well under a millisecond) and exercises one forward style
the capture must handle exactly or refuse: control flow on ``dim()``, ``cat`` then
``.view(batch, ...)``, dict and tuple outputs, in-place ops, a module called twice, a
StyleGAN-like generator with sample-dependent weights and per-layer noise inputs, a
decoder with skip connections from the prefix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.hybrid import hybridize
from cfmodules.influence import influence_maps
from influence_helpers import _init

__all__ = ["ConditionalDCGAN", "DictOut", "TupleOut", "InPlace", "Twice", "StyleLike",
           "SkipDecoder", "DropoutGen", "FloatArgument", "float_argument_adapter", "init",
           "assert_paths_agree"]


def init(model: nn.Module, seed: int) -> nn.Module:
    """Fixed small weights and BatchNorm statistics, eval mode."""
    return _init(model, seed)


class ConditionalDCGAN(nn.Module):
    """Issue 13's forward: squeeze, ``if noise.dim() == 1``, cat, ``.view(batch, ...)``."""

    def __init__(self, nz: int = 6, nc: int = 3, ch: int = 8) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz + nc, ch * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(ch * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ch * 2, ch, 4, 2, 1, bias=False), nn.BatchNorm2d(ch),
            nn.ReLU(True), nn.Dropout(0.3),
            nn.ConvTranspose2d(ch, 3, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = noise.squeeze()
        if z.dim() == 1:  # a batch of one was squeezed to a vector
            z = z[None]
        x = torch.cat((z, labels), dim=1)
        return self.main(x.view(x.size(0), -1, 1, 1))


class DictOut(nn.Module):
    """Returns ``{"image": ..., "aux": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8 * 2 * 2)
        self.act = nn.ReLU()
        self.up = nn.ConvTranspose2d(8, 3, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.act(self.fc(z).view(z.shape[0], 8, 2, 2))
        return {"image": torch.tanh(self.up(h)), "aux": h.mean((2, 3))}


class TupleOut(DictOut):
    """A subclass returning ``(image, features)``."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(z)
        return out["image"], out["aux"]


class InPlace(nn.Module):
    """In-place ReLU modules, ``relu_``, ``+=`` and ``mul_`` after the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 4)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(z))
        g = self.conv(h)
        g += h
        g.relu_()
        return self.out(g).mul_(0.5)


class Twice(nn.Module):
    """One conv module called twice (``block:0`` and ``block:1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 4)
        self.block = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.block(self.up(z)))
        return self.out(self.act(self.block(h)))


class _ModConv(nn.Module):
    """StyleGAN2 modulated/demodulated 3x3 conv: the weight depends on the sample."""

    def __init__(self, c_in: int, c_out: int, w_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3))
        self.affine = nn.Linear(w_dim, c_in)
        self.noise_strength = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n, c, h, wd = x.shape
        s = self.affine(w) + 1  # (N, C_in)
        weight = self.weight[None] * s[:, None, :, None, None]
        d = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * d[:, :, None, None, None]
        out = F.conv2d(x.reshape(1, n * c, h, wd), weight.reshape(-1, c, 3, 3), padding=1,
                       groups=n)
        out = out.reshape(n, -1, h, wd)
        return F.leaky_relu(out + self.noise_strength * noise, 0.2)


class StyleLike(nn.Module):
    """Mapping network, per-layer noise *inputs*, modulated convs, upsampling."""

    def __init__(self, z_dim: int = 4, w_dim: int = 4, ch: int = 4) -> None:
        super().__init__()
        self.mapping = nn.Sequential(nn.Linear(z_dim, w_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(w_dim, w_dim))
        self.const = nn.Parameter(torch.randn(1, ch, 4, 4))
        self.conv0 = _ModConv(ch, ch, w_dim)
        self.conv1 = _ModConv(ch, ch, w_dim)
        self.to_rgb = nn.Conv2d(ch, 3, 1)

    def forward(self, z: torch.Tensor, noise0: torch.Tensor, noise1: torch.Tensor) -> torch.Tensor:
        w = self.mapping(z)
        x = self.const.expand(z.shape[0], -1, -1, -1)
        x = self.conv0(x, w, noise0)
        x = F.interpolate(x, scale_factor=2)
        x = self.conv1(x, w, noise1)
        return self.to_rgb(x)


class SkipDecoder(nn.Module):
    """U-Net-like decoder: the output reads values computed before the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6 * 4 * 4)
        self.enc = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.mid = nn.Conv2d(6, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(12, 3, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x0 = self.fc(z).view(-1, 6, 4, 4)
        e = self.act(self.enc(x0))
        m = self.mid(e)
        return torch.tanh(self.up(torch.cat([m, x0], 1)))


class DropoutGen(nn.Module):
    """``F.dropout(h, 0.5, training=self.training)`` (no Dropout module) and a gain."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 4)
        self.relu = nn.ReLU()
        self.out = nn.Conv2d(6, 3, 1)
        self.gain = 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.up(z))
        h = F.dropout(h, 0.5, training=self.training)
        return self.out(h) * self.gain


class _Scaled(nn.Module):
    """``out(relu(up(z)) * scale)`` with a Python float ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.out = nn.ConvTranspose2d(4, 4, 4), nn.ReLU(), nn.Conv2d(4, 3, 1)

    def forward(self, z: torch.Tensor, scale: float) -> torch.Tensor:
        return self.out(self.act(self.up(z)) * scale)


class FloatArgument(nn.Module):
    """BigGAN's truncation style: a float read out of a tensor input, passed on."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Scaled()

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(z, float(t[0]))  # data-dependent: neither fx nor export trace it


def cond_adapter() -> GeneratorAdapter:
    """:class:`ConditionalDCGAN` wrapped: a (6, 1, 1) noise and a 3-class label per sample."""
    return GeneratorAdapter(init(ConditionalDCGAN(), 0), ((6, 1, 1), (3,)), name="cond")


def float_argument_adapter(cls: type[FloatArgument] = FloatArgument) -> GeneratorAdapter:
    """:class:`FloatArgument` (or a subclass) wrapped, with the float input 0.5 for every
    sample."""
    return GeneratorAdapter(init(cls(), 1), ((4, 1, 1), (1,)),
                            prior=lambda n, g: (torch.randn(n, 4, 1, 1, generator=g),
                                                torch.full((n, 1), 0.5)))


def assert_paths_agree(ad: GeneratorAdapter, layer: str, n: int = 3, n_pairs: int = 4,
                       channels: list[int] | None = None) -> None:
    """Hybrids and influence maps of the engine's path equal the hook path's (rounding)."""
    z1, z2 = ad.sample_latents(n, seed=1), ad.sample_latents(n, seed=2)
    c = ad.layer_channels(layer)
    chans = list(range(c)) if channels is None else channels
    for module in ({layer: []}, {layer: chans[:1]}, {layer: chans}):
        fast = hybridize(ad, z1, z2, module)
        with ad.trace(layer) as acts:
            ad.generate(z2)
        idx = torch.as_tensor(module[layer], dtype=torch.long)
        with ad.intervene({layer: (idx, acts[layer][:, idx])}):
            ref = ad.generate(z1)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    res = influence_maps(ad, layer, chans, n_pairs=n_pairs, pairs_per_block=3, progress=False)
    ref = influence_maps(ad, layer, chans, n_pairs=n_pairs, pairs_per_block=3, progress=False,
                         algorithm="hook")
    # float32 rounding: relative to the maps, or absolute in image units (maps far below the
    # images' scale, e.g. a random BigGAN's 3e-3, carry the images' rounding, ~1e-7)
    np.testing.assert_allclose(res.maps, ref.maps, rtol=1e-5, atol=1e-6)
