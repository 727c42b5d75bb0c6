"""The reference regions of a scorecard: planted regions, face parts, the user's masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError, ShapeError

__all__ = ["reference_masks", "auto_masks", "check_masks"]


def reference_masks(adapter: GeneratorAdapter) -> tuple[np.ndarray, list[str]] | None:
    """The known regions of a generator with planted modules, or None.

    :class:`~cfmodules.synthetic.PlantedConvGenerator` has ``regions`` and
    :class:`~cfmodules.synthetic.PlantedModel1` ``supports`` (``(K, H, W)`` bool): region
    ``k`` is what planted module ``k`` paints. Any generator with such an attribute counts.
    """
    gen = adapter.generator
    for attr in ("regions", "supports"):
        value = getattr(gen, attr, None)
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.dtype == bool:
            return value.copy(), [f"region {k}" for k in range(len(value))]
    return None


def auto_masks(adapter: GeneratorAdapter) -> str | None:
    """``masks="auto"``: a planted generator's regions (None: found by default), the face
    parts for a face generator (its name says "face") when the landmark model is
    installed, else no references."""
    if reference_masks(adapter) is not None or "face" not in adapter.name:
        return None
    from cfmodules.errors import ModelNotAvailableError
    from cfmodules.evaluation.face_parts import _dlib, landmark_model_path

    try:
        landmark_model_path()
        _dlib()
    except ModelNotAvailableError:
        return None
    return "faces"


def check_masks(masks: Any, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Reference masks as ``(R, H, W)`` bool and R distinct names (or a library error)."""
    if isinstance(masks, Mapping):
        names = [str(n) for n in masks]
        masks = [np.asarray(masks[n]) for n in masks]
        shapes = {np.shape(m) for m in masks}
        if len(shapes) > 1:
            raise ShapeError(f"The masks have different shapes {sorted(shapes)}; every mask "
                             "must be (H, W) like the images.")
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.dtype == object:
        raise ShapeError(f"masks must be an array (regions, H, W) of booleans, got shape "
                         f"{arr.shape}.")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ShapeError("masks must hold booleans (or 0 / 1): one (H, W) mask per region.")
        arr = arr.astype(bool)
    if names is None:
        names = [f"region {r}" for r in range(len(arr))]
    names = [str(n) for n in names]
    if len(names) != len(arr) or len(set(names)) != len(names):
        raise ConfigError(f"Give {len(arr)} distinct mask names, one per mask; got {names}.")
    area = arr.reshape(len(arr), -1).sum(1)
    for n, a in zip(names, area):
        if a == 0 or a == arr[0].size:
            raise ConfigError(f"Mask '{n}' is {'empty' if a == 0 else 'the whole image'}: a "
                              "region must hold some pixels and leave some out.")
    return arr.copy(), names
