"""The pretrained DCGAN faces: the fast path equals the naive method (slow: real model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cfmodules.influence import influence_maps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dcgan():
    pytest.importorskip("torch")
    from cfmodules.errors import ModelNotAvailableError
    from cfmodules.zoo.dcgan import load_dcgan_faces

    try:
        return load_dcgan_faces()
    except ModelNotAvailableError as e:
        pytest.skip(str(e))


def _naive(adapter, layer, n_pairs):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_influence import naive_maps
    finally:
        sys.path.pop(0)
    return naive_maps(adapter, layer, n_pairs).double().numpy()


def test_dcgan_fast_path_equals_naive_at_main_8(dcgan):
    res = influence_maps(dcgan, "main.8", n_pairs=4, progress=False)
    assert res.settings["linear_shortcut"] == {"main.8": "main.10"}
    ref = _naive(dcgan, "main.8", 4)
    assert res.maps.shape == ref.shape == (128, 64, 64)
    rel = np.abs(res.maps - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert (res.influence > 0).all()
