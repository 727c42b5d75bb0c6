"""An exported forward that holds for a bounded batch only (diffusers' UNet2DModel style).

``torch.export`` fails with ``Constraints violated (batch)! ... Suggested fixes: batch =
Dim('batch', max=K)`` when the forward branches on the batch size; the engine retries
with the bound and runs larger batches in chunks of at most K.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.engine import engine_of, explain, split
from cfmodules.engine.exported import batch_bound
from cfmodules.engine.paths import run_padded
from engine_helpers import assert_paths_agree

pytestmark = pytest.mark.numerics  # the exported graph against the hook path


class BatchBranch(nn.Module):
    """A decoder whose forward takes another (equal-valued) code path for large batches,
    as kernels picked by ``batch * heads`` do: export can only hold ``batch <= 5``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 8 * 4 * 4)
        self.up = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.out = nn.Conv2d(8, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.head(z).view(z.shape[0], 8, 4, 4)
        x = self.act(self.up(x))
        if x.shape[0] <= 5:  # fx cannot trace this; export guards the batch on it
            x = self.conv(x)
        else:
            x = self.conv(x.contiguous())
        return torch.tanh(self.out(x))


def _adapter() -> GeneratorAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # PyTorch's default init: outputs well inside tanh's range
        model = BatchBranch().eval()
    return GeneratorAdapter(model, (6,), name="batch-branch")


def test_the_bound_export_suggests_is_taken_and_larger_batches_run_in_chunks():
    ad = _adapter()
    ex = explain(ad, "act", algorithm="split")
    assert ex.path == "split" and ex.capture == "torch.export graph of the forward", str(ex)
    assert ex.attempts[-1].kind == "export" and ex.attempts[-1].error is None
    assert batch_bound(engine_of(ad).graph("act")) == 5
    inner = split(ad, "act").inner
    assert (inner.min_batch, inner.max_batch) == (2, 5)
    assert ex.limit > 1.3  # the suffix's FLOPs, not a full forward's (the hook path's 1.00x)
    # 12 samples: chunks of 5, 5 and 2; hybrids and maps equal the hook path's
    assert_paths_agree(ad, "act", n=12, n_pairs=13)
    assert_paths_agree(ad, "conv", n=7, n_pairs=6)


def test_run_padded_chunks_pads_and_joins_structured_outputs():
    calls = []

    def fn(a, b):
        calls.append(a.shape[0])
        assert 2 <= a.shape[0] <= 4
        return {"sum": a + b, "pair": (a * 2, b)}

    a, b = torch.arange(9.0)[:, None], torch.arange(9.0, 18.0)[:, None]
    out = run_padded(fn, (a, b), 2, 4)
    assert calls == [4, 4, 2]  # the last chunk of one sample padded to two
    torch.testing.assert_close(out["sum"], a + b, rtol=0, atol=0)
    torch.testing.assert_close(out["pair"][0], a * 2, rtol=0, atol=0)
    torch.testing.assert_close(out["pair"][1], b, rtol=0, atol=0)
    assert run_padded(fn, (a[:1], b[:1]), 2, 4)["sum"].shape == (1, 1)
