"""Tiny, hand-checkable generators shared by the tests (keep this file small)."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

# small models: threads cost more than they save; .ci/run also tries 2 (other reductions)
THREADS = os.environ.get("CFMODULES_TEST_THREADS", "1")
torch.set_num_threads(int(THREADS))
# the processes the tests start (the CLI, torchrun's ranks, the notebook's kernel) too: with
# one test worker per core (pytest -n auto), a process with a thread per core makes the
# cores wait on each other (the notebook's kernel burnt 22 s of CPU for 11 s of work)
os.environ.setdefault("OMP_NUM_THREADS", THREADS)


def _fixed(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def tiny_sequential() -> nn.Sequential:
    """z (2,1,1) -> convT -> relu (4ch 2x2) -> conv 1x1 -> 1x2x2 image. Layer 'act' is the unit layer."""
    return _fixed(nn.Sequential(OrderedDict(
        up=nn.ConvTranspose2d(2, 4, 2), act=nn.ReLU(), out=nn.Conv2d(4, 1, 1),
    )), 0)


class SkipGenerator(nn.Module):
    """Non-Sequential: the output reads the hidden layer and an earlier one (a skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2)
        self.act = nn.ReLU()
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.out = nn.Conv2d(4, 2, 1)
        _fixed(self, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(z))
        return torch.tanh(self.out(self.act2(self.mid(h)) + h))


class ConditionalGenerator(nn.Module):
    """Two per-sample inputs (noise, class one-hot); the class is read again after the hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 + 2, 4 * 2 * 2)
        self.act = nn.ReLU()
        self.embed = nn.Linear(2, 4)
        self.out = nn.Conv2d(4, 1, 1)
        _fixed(self, 2)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(torch.cat([z, y], 1)).view(-1, 4, 2, 2))
        return self.out(h + self.embed(y)[:, :, None, None])


@pytest.fixture
def tiny():
    return tiny_sequential()


@pytest.fixture
def skip():
    return SkipGenerator()


@pytest.fixture
def conditional():
    return ConditionalGenerator()


def no_hooks_left(module: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in module.modules()
    )


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """The CLI's busy-machine rule (one torch thread) off: tests must not depend on the
    machine's load; tests of the rule patch ``machine_is_busy`` themselves."""
    import cfmodules.models

    monkeypatch.setattr(cfmodules.models, "machine_is_busy", lambda: False)
