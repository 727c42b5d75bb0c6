"""Tiny generators and a naive reference for the influence-map tests.

Each model is small enough that a whole EIM computation takes well under a second, and
covers one architecture the linear shortcut must handle (or refuse) exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cfmodules.adapter import GeneratorAdapter
from cfmodules.hybrid import hybridize
from cfmodules.latents import pair_latents

__all__ = [
    "hand_adapter",
    "seq_conv_adapter",
    "convt_adapter",
    "linear_head_adapter",
    "skip_adapter",
    "conditional_adapter",
    "nan_adapter",
    "naive_maps",
    "wide_convt_adapter",
]


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "weight" in name else 0.1))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


class HandModel(nn.Module):
    """z (N, 2, 2, 2) -> a = z (identity 1x1 conv) -> colours (a0, a1, a0 + a1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(2, 2, 1, bias=False)
        self.out = nn.Conv2d(2, 3, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(3, 2, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(z))


def hand_adapter() -> GeneratorAdapter:
    """Swapping channel 0 changes colours 0 and 2 by z2_0 - z1_0: EIM_0 = 2/3 E|z2_0 - z1_0|."""
    return GeneratorAdapter(HandModel().eval(), (2, 2, 2), name="hand")


def seq_conv_adapter() -> GeneratorAdapter:
    """Sequential Conv2d stack: stride, dilation, groups, reflect padding, BatchNorm."""
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),                                   # 2: -> strided dilated conv + BN
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.2),                           # 5: -> grouped conv (loop path)
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),                                   # 7: -> reflect-padded conv
        nn.Conv2d(8, 5, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),                                   # 9
        nn.Conv2d(5, 3, 1),
    )
    return GeneratorAdapter(_init(model, 1), (4, 8, 8), name="seq-conv")


def convt_adapter() -> GeneratorAdapter:
    """DCGAN-like ConvTranspose2d stack with output_padding, dilation, in-place ReLUs."""
    model = nn.Sequential(
        nn.ConvTranspose2d(6, 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(True),                               # 2: 8x4x4
        nn.ConvTranspose2d(8, 6, 4, 2, 1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(True),                               # 5: 6x8x8
        nn.ConvTranspose2d(6, 5, 3, 2, 1, output_padding=1, dilation=1),
        nn.ReLU(True),                               # 7: 5x16x16 -> dilated ConvT, no BN
        nn.ConvTranspose2d(5, 3, 3, 1, 2, dilation=2),
        nn.Tanh(),
    )
    return GeneratorAdapter(_init(model, 2), (6, 1, 1), name="convt")


class LinearHead(nn.Module):
    """z (N, 5) -> Linear + BN1d + ReLU (layer 'act', 12 units) -> Linear -> 3x4x4 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.bn = nn.BatchNorm1d(12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(16, 48)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.bn2(self.fc2(self.act(self.bn(self.fc1(z))))))
        return torch.tanh(self.head(h)).view(-1, 3, 4, 4)


def linear_head_adapter() -> GeneratorAdapter:
    return GeneratorAdapter(_init(LinearHead(), 3), (5,), name="linear-head")


class SkipNet(nn.Module):
    """a = relu(c1(z)); b = relu(c2(a)); out = c4(relu(bn3(c3(b))) + a): a skip over b."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(6, 7, 3, padding=1)
        self.r2 = nn.ReLU()
        self.c3 = nn.Conv2d(7, 6, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.r3 = nn.ReLU()
        self.c4 = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.r1(self.c1(z))
        b = self.r2(self.c2(a))
        return self.c4(self.r3(self.bn3(self.c3(b))) + a)


def skip_adapter() -> GeneratorAdapter:
    """'r2' feeds only c3 (+bn3): shortcut with 'a' on the frontier; 'r1' has two users."""
    return GeneratorAdapter(_init(SkipNet(), 4), (3, 6, 6), name="skip")


class Conditional(nn.Module):
    """forward(z (N, 4), y (N, 3)): class embedding at the input and a class gain later."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.fc = nn.Linear(8, 6 * 4 * 4)
        self.act = nn.ReLU()
        self.up = nn.ConvTranspose2d(6, 5, 4, 2, 1)
        self.bn = nn.BatchNorm2d(5)
        self.act2 = nn.ReLU()
        self.gain = nn.Linear(3, 5)
        self.out = nn.Conv2d(5, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(torch.cat([z, self.embed(y)], 1)).view(-1, 6, 4, 4))
        h = self.act2(self.bn(self.up(h)))
        h = h * (1 + self.gain(y)).view(-1, 5, 1, 1)
        return torch.tanh(self.out(h))


def _cond_prior(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, 4, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    return z, y


def conditional_adapter() -> GeneratorAdapter:
    """Two inputs (z, class one-hot): per-sample y stays with Original 1 in the hybrid."""
    return GeneratorAdapter(_init(Conditional(), 5), ((4,), (3,)), prior=_cond_prior,
                            name="conditional")


class NanHybrid(nn.Module):
    """Images are finite when both channels of 'layer' agree, NaN otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.layer(z)
        img = torch.where(a[:, :1] == a[:, 1:], a[:, :1], torch.full_like(a[:, :1], float("nan")))
        return img.expand(-1, 3, -1, -1)


def _twin_prior(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=g).expand(-1, 2, -1, -1).clone()


def nan_adapter(always: bool = False) -> GeneratorAdapter:
    """Originals are finite and every hybrid is NaN (or, with ``always``, every output)."""
    prior = "normal" if always else _twin_prior
    return GeneratorAdapter(NanHybrid().eval(), (2, 2, 2), prior=prior, name="nan")


def naive_maps(adapter: GeneratorAdapter, modules: list[dict], n_pairs: int, seed: int = 0
               ) -> np.ndarray:
    """Reference: the lead's hybridize() per module, then mean over pairs of |hybrid - Y|."""
    z1, z2 = pair_latents(adapter, n_pairs, seed, 0)
    y = adapter.generate(z1)
    out = []
    for module in modules:
        h = hybridize(adapter, z1, z2, module)
        out.append((h - y).abs().mean(1).double().mean(0).numpy())
    return np.stack(out)


def wide_convt_adapter() -> GeneratorAdapter:
    """A last ConvTranspose2d with few outputs (2 x 4 x 4 <= 32 inputs): the GEMM suffix."""
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 32, 4, 1, 0, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(True),                               # 2: 32x4x4
        nn.ConvTranspose2d(32, 32, 4, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(True),                               # 5: 32x8x8
        nn.ConvTranspose2d(32, 2, 4, 2, 1),
        nn.Tanh(),
    )
    return GeneratorAdapter(_init(model, 6), (4, 1, 1), name="wide-convt")
