"""Face part masks (eyes, brows, nose, mouth, face, hair and background) from landmarks.

The reference regions of the scorecard on face generators. The 68 facial landmarks of
iBUG 300-W are found by dlib's shape predictor (an ensemble of regression trees, Kazemi and
Sullivan 2014), whose trained model ``shape_predictor_68_face_landmarks.dat`` Debian ships
in the package ``libdlib-data`` (``/usr/share/dlib``); dlib's Python binding is the PyPI
wheel ``dlib-bin``. Both are installed, never downloaded::

    apt-get install libdlib-data && pip install dlib-bin

(``CFMODULES_DLIB_LANDMARKS`` may name another copy of the file.) The model's licence
follows the 300-W data set's: research use.

Each image (at least 64x64; smaller ones are upsampled 4x for the predictor) gets dlib's
HOG face detector's box, or the whole image where it finds none (the 64x64 DCGAN faces
are face crops), and the predictor's 68 points. The parts are polygons of the points:
the eyes (each eye's outline, grown by one pixel), the brows (a band two pixels wide along
each brow), the nose (bridge and base), the mouth (outer lip line), the face (the outline
of jaw and brows, less the parts above) and, outside it, hair and background.

:func:`face_part_masks` turns the parts of many samples into one set of regions: each
pixel goes to the part it belongs to most often (so the regions partition the image),
which suits a generator whose faces are aligned, as in CelebA-like data sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmodules import checks
from cfmodules.errors import ModelNotAvailableError, ShapeError

__all__ = ["FACE_PARTS", "landmark_model_path", "face_landmarks", "part_masks",
           "face_part_masks", "INSTALL"]

FACE_PARTS = ("eyes", "brows", "nose", "mouth", "face", "hair and background")
"""The regions, in order; every pixel of an image is in exactly one."""

INSTALL = "apt-get install libdlib-data && pip install dlib-bin"
_DEBIAN_PATH = Path("/usr/share/dlib/shape_predictor_68_face_landmarks.dat")
_ENV = "CFMODULES_DLIB_LANDMARKS"

# the 68 points of iBUG 300-W (0-based)
_JAW, _BROWS, _NOSE = range(0, 17), (range(17, 22), range(22, 27)), range(27, 36)
_EYES, _MOUTH = (range(36, 42), range(42, 48)), range(48, 60)


def landmark_model_path() -> Path:
    """Path of ``shape_predictor_68_face_landmarks.dat`` (Debian's ``libdlib-data``)."""
    given = os.environ.get(_ENV)
    path = Path(given) if given else _DEBIAN_PATH
    if not path.is_file():
        raise ModelNotAvailableError(
            f"The face landmark model is not at '{path}'. Install it with: {INSTALL} "
            f"(or set {_ENV} to the file).")
    return path


def _dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise ModelNotAvailableError(f"Face part masks need dlib's Python binding. Install "
                                     f"it with: {INSTALL}") from None
    return dlib


_MODELS: dict[str, Any] = {}


def _models() -> tuple[Any, Any]:
    path = str(landmark_model_path())
    if path not in _MODELS:
        dlib = _dlib()
        _MODELS[path] = (dlib.get_frontal_face_detector(), dlib.shape_predictor(path))
    return _MODELS[path]


def _as_uint8(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ShapeError(f"Face landmarks need images (N, 1 or 3, H, W) in [0, 1], got shape "
                         f"{x.shape}.")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def face_landmarks(images: Any) -> tuple[np.ndarray, np.ndarray]:
    """The 68 landmarks of each face image.

    Parameters
    ----------
    images : array or tensor (N, 1 or 3, H, W) in [0, 1]

    Returns
    -------
    points : ndarray (N, 68, 2) float
        ``(x, y)`` in pixels of the image (pixel centres at integers).
    detected : ndarray (N,) bool
        Whether the face detector found the face (else the whole image was the box).
    """
    detector, predictor = _models()
    dlib = _dlib()
    x = _as_uint8(images)
    scale = max(1, int(np.ceil(256 / max(x.shape[1:3]))))  # the predictor wants ~256 px faces
    points = np.zeros((len(x), 68, 2))
    detected = np.zeros(len(x), dtype=bool)
    for i, img in enumerate(x):
        big = np.ascontiguousarray(np.repeat(np.repeat(img, scale, 0), scale, 1))
        boxes = detector(big, 1)
        detected[i] = len(boxes) > 0
        box = (max(boxes, key=lambda b: b.area()) if boxes
               else dlib.rectangle(0, 0, big.shape[1] - 1, big.shape[0] - 1))
        shape = predictor(big, box)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        points[i] = (pts + 0.5) / scale - 0.5
    return points, detected


def _inside(polygon: np.ndarray, h: int, w: int, grow: float = 0.0) -> np.ndarray:
    """Pixels (H, W) whose centre lies in the polygon (grown by ``grow`` pixels)."""
    from matplotlib.path import Path as MplPath

    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    return MplPath(polygon).contains_points(centres, radius=2 * grow).reshape(h, w) | (
        MplPath(polygon[::-1]).contains_points(centres, radius=2 * grow).reshape(h, w))


def _band(line: np.ndarray, h: int, w: int, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of a polyline."""
    yy, xx = np.mgrid[0:h, 0:w]
    p = np.stack([xx, yy], axis=-1).reshape(-1, 1, 2).astype(np.float64)
    a, b = line[:-1][None], line[1:][None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(1)
    return (dist <= width / 2).reshape(h, w)


def part_masks(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The parts of each face, ``(N, 6, H, W)`` bool in the order of :data:`FACE_PARTS`.

    Every pixel is in exactly one part: a pixel of two polygons goes to the first listed.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[1:] != (68, 2):
        raise ShapeError(f"points must be (N, 68, 2) landmarks, got {points.shape}.")
    h, w = (checks.positive_int(s, "image size") for s in size)
    out = np.zeros((len(points), len(FACE_PARTS), h, w), dtype=bool)
    for i, pts in enumerate(points):
        eyes = np.zeros((h, w), bool)
        for eye in _EYES:
            eyes |= _inside(pts[list(eye)], h, w, grow=1.0)
        brows = np.zeros((h, w), bool)
        for brow in _BROWS:
            brows |= _band(pts[list(brow)], h, w, width=2.0)
        nose_pts = pts[[27, 31, 32, 33, 34, 35]]
        nose = _inside(nose_pts, h, w, grow=0.5)
        mouth = _inside(pts[list(_MOUTH)], h, w, grow=0.5)
        outline = np.concatenate([pts[list(_JAW)], pts[26:16:-1]])  # jaw, then brows back
        face = _inside(outline, h, w)
        taken = np.zeros((h, w), bool)
        for k, part in enumerate((eyes, brows, nose, mouth, face)):
            out[i, k] = part & ~taken
            taken |= part
        out[i, 5] = ~taken
    return out


def face_part_masks(images: Any) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """One set of face regions for many aligned face images.

    Parameters
    ----------
    images : array or tensor (N, 1 or 3, H, W) in [0, 1]
        E.g. ``adapter.to_unit(adapter.generate(z))`` for samples of a face generator.

    Returns
    -------
    masks : ndarray (6, H, W) bool
        Each pixel in the part it belongs to in most images (a partition of the image;
        a part that wins no pixel is left empty).
    names : list of str
        :data:`FACE_PARTS`.
    frequency : ndarray (6, H, W)
        Share of the images in which each pixel is in each part.
    detected : ndarray (N,) bool
        Images on which the face detector found the face.
    """
    x = _as_uint8(images)
    points, detected = face_landmarks(images)
    per_image = part_masks(points, x.shape[1:3])
    frequency = per_image.mean(0)
    winner = frequency.argmax(0)
    masks = np.stack([winner == k for k in range(len(FACE_PARTS))])
    return masks, list(FACE_PARTS), frequency, detected
