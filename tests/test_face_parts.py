"""Face part masks from dlib's 68 landmarks (Debian libdlib-data + PyPI dlib-bin)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cfmodules.errors import ModelNotAvailableError, ShapeError
from cfmodules.evaluation import face_parts as fp

# CI installs both (README, .ci/run): there a missing one fails instead of skipping
if os.environ.get("CI") != "true":
    pytest.importorskip("dlib")
    if not fp._DEBIAN_PATH.is_file():
        pytest.skip(f"no landmark model (install: {fp.INSTALL})", allow_module_level=True)


def canonical_face(size=64):
    """68 points of a frontal face drawn by hand on a size x size image."""
    s = size / 64
    jaw = [(10 + 44 * i / 16, 28 + 24 * np.sin(np.pi * i / 16)) for i in range(17)]
    brows = [(14 + 3 * i, 20) for i in range(5)] + [(38 + 3 * i, 20) for i in range(5)]
    nose = [(32, 24 + 2.5 * i) for i in range(4)] + [(28 + 2 * i, 36) for i in range(5)]

    def eye(cx):
        return [(cx - 4, 26), (cx - 2, 24.5), (cx + 2, 24.5), (cx + 4, 26), (cx + 2, 27.5),
                (cx - 2, 27.5)]

    mouth = [(32 + 8 * np.cos(a), 45 + 4 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 13)[:12]]
    inner = [(32 + 5 * np.cos(a), 45 + 2 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 9)[:8]]
    pts = np.array(jaw + brows + nose + eye(22) + eye(42) + mouth + inner) * s
    assert pts.shape == (68, 2)
    return pts


def test_part_masks_partition_the_image_and_fall_on_the_parts():
    pts = canonical_face()
    masks = fp.part_masks(pts[None], (64, 64))[0]
    assert masks.shape == (6, 64, 64)
    assert (masks.sum(0) == 1).all()  # every pixel in exactly one part
    names = dict(zip(fp.FACE_PARTS, masks))
    assert names["eyes"][26, 22] and names["eyes"][26, 42]
    assert names["mouth"][45, 32] and names["nose"][33, 32]
    assert names["brows"][20, 20] and names["face"][40, 20]
    assert names["hair and background"][2, 2] and names["hair and background"][60, 2]
    with pytest.raises(ShapeError):
        fp.part_masks(pts[None, :60], (64, 64))


def test_landmarks_of_generated_faces_give_sensible_regions():
    from cfmodules import zoo

    adapter = zoo.load("dcgan-faces")
    with torch.no_grad():
        images = adapter.to_unit(adapter.generate(adapter.sample_latents(16, seed=3)))
    masks, names, freq, detected = fp.face_part_masks(images)
    assert names == list(fp.FACE_PARTS) and masks.shape == (6, 64, 64)
    assert (masks.sum(0) == 1).all() and np.allclose(freq.sum(0), 1)
    assert detected.mean() >= 0.5  # the HOG detector finds most of these faces
    rows = {n: np.nonzero(m)[0].mean() for n, m in zip(names, masks) if m.any()}
    # top to bottom: brows, eyes, nose, mouth (image rows grow downwards)
    assert rows["brows"] < rows["eyes"] < rows["nose"] < rows["mouth"]
    cols = np.nonzero(masks[0])[1]
    assert cols.min() < 32 < cols.max()  # both eyes
    with pytest.raises(ShapeError):
        fp.face_landmarks(np.zeros((2, 64, 64)))


def test_missing_model_file_is_a_library_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CFMODULES_DLIB_LANDMARKS", str(tmp_path / "none.dat"))
    with pytest.raises(ModelNotAvailableError, match="libdlib-data"):
        fp.landmark_model_path()


@pytest.mark.slow
def test_scorecard_with_face_parts_on_dcgan():
    from cfmodules import zoo
    from cfmodules.evaluation.scorecard import scorecard

    adapter = zoo.load("dcgan-faces")
    mods = {"a": {"main.8": list(range(0, 128, 3))}, "b": {"main.8": list(range(1, 40))}}
    sc = scorecard(adapter, mods, masks="faces", n_pairs=8, n_null=19, n_boot=50)
    assert "eyes" in sc.regions and "eyes, brows, nose, mouth" in sc.regions
    assert all(sc.region_of(m) in sc.regions for m in sc.modules)
    assert sc.masks.shape == (len(sc.regions), 64, 64)
