"""Toy generators with planted modules: ground truth for the module detection pipeline.

* :class:`PlantedModel1` is Model 1 of Besserve et al. (2020, sec. 3.4): K independent
  latent variables z_k, hidden vectors V_k = S(H_k z_k) with a leaky ReLU S, and output
  Y = sum_k W^k V_k where the rows of W^k are supported on a pixel set I_k, each I_k holding
  pixels no other module touches. By Prop. 3 the partition of the hidden layer into the V_k
  is disjoint and is what NMF of the thresholded influence maps recovers.
* :class:`PlantedConvGenerator` is a small convolutional generator with the same structure:
  disjoint latent groups feed disjoint channel groups (grouped transposed convolutions),
  and each group paints its own region of the image.

Both are plain ``nn.Module`` generators, seeded, with ``latent_shape``, ``prior``, the
planted ``layer`` name and :meth:`true_labels` giving the module of each channel of the
planted layer. ``load_planted_model1`` / ``load_planted_conv`` wrap them in a
:class:`~cfmodules.adapter.GeneratorAdapter`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cfmodules import checks
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError

__all__ = [
    "PlantedModel1",
    "PlantedConvGenerator",
    "RegionPaint",
    "load_planted_model1",
    "load_planted_conv",
]




def _count(name: str, value: object, low: int) -> int:
    return checks.integer(value, name, low=low)


def _sizes(name: str, value: object, k: int, low: int) -> list[int]:
    """An int (same for every module) or a sequence of K ints, each >= low."""
    if isinstance(value, (list, tuple, np.ndarray)):
        sizes = [_count(name, v, low) for v in value]
        if len(sizes) != k:
            raise ConfigError(f"{name} has {len(sizes)} entries; give one per module ({k}).")
        return sizes
    return [_count(name, value, low)] * k


def _block_mask(rows: list[int], cols: list[int]) -> torch.Tensor:
    """Block-diagonal 0/1 mask (sum(rows), sum(cols)): block k is rows[k] x cols[k]."""
    mask = torch.zeros(sum(rows), sum(cols))
    r0 = c0 = 0
    for r, c in zip(rows, cols):
        mask[r0:r0 + r, c0:c0 + c] = 1
        r0, c0 = r0 + r, c0 + c
    return mask


def _pair(name: str, value: object, low: int) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be an int or a (height, width) pair, got {value!r}.")
    return _count(name, pair[0], low), _count(name, pair[1], low)


class PlantedModel1(nn.Module):
    """Model 1 of the paper as a generator of small images.

    ``z`` (N, K) uniform on [-1, 1]  ->  ``mix``: V_k pre-activation H_k z_k (block-diagonal
    Linear, no bias)  ->  ``hidden``: leaky ReLU, the planted layer (N, K*n)  ->
    ``readout``: Y = sum_k W^k V_k (Linear, no bias)  ->  ``image``: (N, 1, H, W).

    The image is cut into K vertical bands; module k's pixel set I_k is band k widened by
    ``overlap`` columns into each neighbouring band, so the band's inner columns are private
    to module k and the widened columns are shared. Non-zero coefficients of H_k and W^k
    are drawn from a normal distribution (a density, as Model 1 asks).

    Parameters
    ----------
    n_modules : int, default 3
        K.
    units_per_module : int or sequence of K ints, default 6
        n, the size of each V_k (n > 1); a sequence gives modules of different sizes.
    image_size : int or (int, int), default (8, 12)
        (H, W) of the output; W >= K so each band has a column.
    overlap : int, default 1
        Columns by which each I_k reaches into its neighbours' bands (0: disjoint sets).
    negative_slope : float, default 0.2
        Of the leaky ReLU S (strictly increasing, > 0).
    seed : int, default 0
        Seed of the parameters.

    Attributes
    ----------
    layer : str
        ``"hidden"``, the planted layer (K*n channels).
    latent_shape : tuple
        ``(K,)``.
    prior : str
        ``"uniform"`` (on [-1, 1]).
    supports : ndarray (K, H, W) of bool
        The pixel sets I_k.
    """

    layer = "hidden"
    prior = "uniform"
    output_range = (-2.0, 2.0)  # for display; Y is linear in V and not bounded

    def __init__(
        self,
        n_modules: int = 3,
        units_per_module: int | tuple[int, ...] = 6,
        image_size: int | tuple[int, int] = (8, 12),
        overlap: int = 1,
        negative_slope: float = 0.2,
        seed: int = 0,
    ):
        super().__init__()
        k = _count("n_modules", n_modules, 1)
        sizes = _sizes("units_per_module", units_per_module, k, 2)
        h, w = _pair("image_size", image_size, 1)
        ov = _count("overlap", overlap, 0)
        if w < k:
            raise ConfigError(f"image width {w} is smaller than n_modules={k}: each module "
                              "needs a band of at least one private column.")
        if not negative_slope > 0:
            raise ConfigError(f"negative_slope must be > 0 (S strictly increasing), got "
                              f"{negative_slope!r}.")
        self.n_modules, self.units_per_module = k, tuple(sizes)
        units = sum(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.image_size = (h, w)
        self.latent_shape = (k,)
        g = torch.Generator().manual_seed(int(seed))
        edges = np.linspace(0, w, k + 1).round().astype(int)
        supports = np.zeros((k, h, w), dtype=bool)
        for j in range(k):
            supports[j, :, max(0, edges[j] - ov):min(w, edges[j + 1] + ov)] = True
        private = supports & (supports.sum(axis=0) == 1)
        if not private.reshape(k, -1).any(axis=1).all():
            raise ConfigError(f"overlap={ov} leaves a module without private pixels; use a "
                              "smaller overlap or a wider image.")
        self.supports = supports

        self.mix = nn.Linear(k, units, bias=False)
        self.hidden = nn.LeakyReLU(negative_slope)
        self.readout = nn.Linear(units, h * w, bias=False)
        self.image = nn.Unflatten(1, (1, h, w))
        with torch.no_grad():
            mix = torch.zeros(units, k)
            read = torch.zeros(h * w, units)
            for j, n in enumerate(sizes):
                a, b = starts[j], starts[j + 1]
                mix[a:b, j] = torch.randn(n, generator=g)
                rows = torch.from_numpy(np.flatnonzero(supports[j].ravel()))
                read[rows, a:b] = torch.randn(len(rows), n, generator=g) / n**0.5
            self.mix.weight.copy_(mix)
            self.readout.weight.copy_(read)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, K) -> images (N, 1, H, W)."""
        return self.image(self.readout(self.hidden(self.mix(z))))

    def true_labels(self, layer: str | None = None) -> np.ndarray:
        """Module of each channel (unit) of the planted layer, shape (sum of n_k,)."""
        if layer not in (None, self.layer, "mix"):
            raise ConfigError(f"Modules are planted in layers 'mix' and 'hidden', not {layer!r}.")
        return np.repeat(np.arange(self.n_modules), self.units_per_module)


class RegionPaint(nn.Module):
    """Paint each module's colour channels into its own image region.

    Input (N, K*C, H, W), module k owning channels ``k*C .. k*C+C-1``; output (N, C, H, W)
    ``= sum_k x[:, k*C:(k+1)*C] * masks[k]``.

    Parameters
    ----------
    masks : Tensor (K, H, W)
        Region of each module (a partition of the image: masks sum to 1 at every pixel).
    """

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", masks.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K*C, H, W) -> (N, C, H, W)."""
        k, h, w = self.masks.shape
        n = x.shape[0]
        return (x.reshape(n, k, -1, h, w) * self.masks[None, :, None]).sum(dim=1)


class PlantedConvGenerator(nn.Module):
    """A small DCGAN-like generator whose hidden layers have planted modules.

    Layers under ``main`` (for the default 16x16 output)::

        main.0  ConvTranspose2d(K*d -> C, 4, 1, 0)            4x4    C = sum of c_k
        main.1  LeakyReLU(0.2)                                planted
        main.2  ConvTranspose2d(C -> C, 4, 2, 1)              8x8
        main.3  LeakyReLU(0.2)                                planted (``layer``)
        main.4  ConvTranspose2d(C -> K*colours, 4, 2, 1)      16x16
        main.5  Tanh()
        main.6  RegionPaint                                   (N, colours, 16, 16)

    The convolution weights are zero outside diagonal blocks (a grouped convolution whose
    groups may differ in size), which keeps latent group k (``z[:, k*d:(k+1)*d]``) and
    channel group k (the k-th run of ``c_k`` consecutive channels of every hidden layer)
    apart; group k only paints region k, a cell of a seeded Voronoi partition of the image.
    Images are in [-1, 1].

    Parameters
    ----------
    n_modules : int, default 3
    latent_per_module : int, default 4
        d.
    channels_per_module : int or sequence of K ints, default 8
        c; a sequence gives modules of different sizes.
    image_size : int, default 16
        4 * 2**m with m >= 1 (8, 16, 32, ...); m upsampling layers follow the first.
    colours : int, default 3
    seed : int, default 0

    Attributes
    ----------
    layer : str
        The last hidden activation, ``"main.3"`` at 16x16 (``main.{2m-1}`` in general).
    latent_shape : tuple
        ``(K*d, 1, 1)``.
    prior : str
        ``"normal"``.
    regions : ndarray (K, H, W) of bool
    """

    prior = "normal"
    output_range = (-1.0, 1.0)

    def __init__(
        self,
        n_modules: int = 3,
        latent_per_module: int = 4,
        channels_per_module: int | tuple[int, ...] = 8,
        image_size: int = 16,
        colours: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        k = _count("n_modules", n_modules, 1)
        d = _count("latent_per_module", latent_per_module, 1)
        cs = _sizes("channels_per_module", channels_per_module, k, 1)
        colours = _count("colours", colours, 1)
        size = _count("image_size", image_size, 8)
        m = int(round(np.log2(size / 4)))
        if 4 * 2**m != size:
            raise ConfigError(f"image_size must be 4 * 2**m (8, 16, 32, ...), got {size}.")
        self.n_modules, self.channels_per_module = k, tuple(cs)
        ds, outs = [d] * k, [colours] * k
        self.latent_shape = (k * d, 1, 1)
        self.image_size = (size, size)
        g = torch.Generator().manual_seed(int(seed))
        self.regions = _voronoi(k, size, g)

        # Transposed convolutions whose weights are zero outside diagonal blocks: group k's
        # inputs reach only group k's outputs (like groups=K, but groups may differ in size).
        blocks = [(ds, cs, 1, 0)] + [(cs, outs if i == m - 1 else cs, 2, 1) for i in range(m)]
        layers: list[nn.Module] = []
        masks = []
        for i, (cin, cout, stride, pad) in enumerate(blocks):
            layers.append(nn.ConvTranspose2d(sum(cin), sum(cout), 4, stride, pad))
            layers.append(nn.Tanh() if i == m else nn.LeakyReLU(0.2))
            masks.append(_block_mask(cin, cout))
        layers.append(RegionPaint(torch.from_numpy(self.regions)))
        self.main = nn.Sequential(*layers)
        self.layer = f"main.{2 * m - 1}"
        self._hidden = {f"main.{2 * i + 1}" for i in range(m)} | {
            f"main.{2 * i}" for i in range(m)}
        with torch.no_grad():
            convs = [mod for mod in self.main if isinstance(mod, nn.ConvTranspose2d)]
            for mod, mask in zip(convs, masks):
                fan = mask.sum(dim=0, keepdim=True).clamp(min=1) * 4  # inputs x ~4 taps
                w = torch.randn(mod.weight.shape, generator=g) / fan[..., None, None] ** 0.5
                mod.weight.copy_(w * mask[..., None, None])  # weight (in, out, kH, kW)
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, K*d, 1, 1) -> images (N, colours, H, W) in [-1, 1]."""
        return self.main(z)

    def true_labels(self, layer: str | None = None) -> np.ndarray:
        """Module of each channel of a hidden layer (default: :attr:`layer`), (sum of c_k,)."""
        if layer is not None and layer not in self._hidden:
            raise ConfigError(f"Modules are planted in the hidden layers "
                              f"{sorted(self._hidden)}, not {layer!r}.")
        return np.repeat(np.arange(self.n_modules), self.channels_per_module)


def _voronoi(k: int, size: int, g: torch.Generator) -> np.ndarray:
    """K regions of a size x size image: cells of K random centres, each >= 1/(2K) of it."""
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(1000):
        centres = torch.rand(k, 2, generator=g).numpy() * (size - 1)
        d = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        owner = d.argmin(axis=0)
        if np.bincount(owner.ravel(), minlength=k).min() >= size * size / (2 * k):
            break
    return np.stack([owner == j for j in range(k)])


def _wrap(gen: PlantedModel1 | PlantedConvGenerator, name: str,
          device: str | torch.device | None) -> GeneratorAdapter:
    gen.eval()
    if device is not None:
        gen.to(device)
    return GeneratorAdapter(gen, gen.latent_shape, prior=gen.prior,
                            output_range=gen.output_range, device=device, name=name)


def load_planted_model1(device: str | torch.device | None = None,
                        **kwargs: Any) -> GeneratorAdapter:
    """:class:`PlantedModel1` (keyword arguments passed on) in a GeneratorAdapter."""
    return _wrap(PlantedModel1(**kwargs), "planted-model1", device)


def load_planted_conv(device: str | torch.device | None = None,
                      **kwargs: Any) -> GeneratorAdapter:
    """:class:`PlantedConvGenerator` (keyword arguments passed on) in a GeneratorAdapter."""
    return _wrap(PlantedConvGenerator(**kwargs), "planted-conv", device)
