"""Modules of the pretrained DCGAN faces at main.8 (slow: the real model)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cfmodules import zoo
from cfmodules.influence import influence_maps
from cfmodules.modules import ModuleClustering


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gan_face_generate") is None,
                    reason="pip install gan-face-generate")
def test_dcgan_faces_main8_has_a_facial_features_module():
    adapter = zoo.load("dcgan-faces")
    result = influence_maps(adapter, "main.8", n_pairs=16, seed=0, progress=False)
    clust = ModuleClustering(3, random_state=0).fit(result)
    assert clust.layer_ == "main.8" and clust.labels_.shape == (128,)
    assert min(len(m) for m in clust.modules_) >= 10
    t = clust.templates_.reshape(3, -1)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    assert (t @ t.T)[np.triu_indices(3, 1)].max() < 0.7  # three distinct templates
    # Share of each template in the central 24x24 square (14% of the image). Measured with
    # 16 pairs: 0.34 (eyes, nose, mouth), 0.15, 0.02 (borders / background).
    centre = clust.templates_[:, 20:44, 20:44].sum(axis=(1, 2)) / clust.templates_.sum(axis=(1, 2))
    assert centre.max() > 0.25 and centre.min() < 0.08
