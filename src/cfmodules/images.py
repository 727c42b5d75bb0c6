"""Images for people: uint8 display arrays and image grids (one home for both).

Generators produce float images in their own output range; figures, the report, the
explorer and notebooks show them as ``uint8`` arrays and grids. Grids are laid out and
rounded exactly as ``torchvision.utils.make_grid`` and ``save_image`` lay them out and
round them (the same pixels and PNG bytes: tested), but without importing torchvision,
whose import pulls in ``torch._dynamo`` (2.5 s on a notebook's first ``show``). PNG files
are written by Pillow through :func:`cfmodules.files.atomic_write`, so a crash never
leaves half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmodules.errors import ShapeError

__all__ = ["as_uint8", "image_grid", "save_image_grid"]


def _batch(images: Any) -> torch.Tensor:
    """``(N, C, H, W)`` float in [0, 1] from a tensor or array, float or uint8."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] not in (1, 3, 4) or t.shape[0] == 0:
        raise ShapeError(f"images must be (N, C, H, W) with C = 1, 3 or 4, got "
                         f"{tuple(t.shape)}.")
    t = t.detach().cpu()
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float().clamp(0, 1)


def as_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [0, 1] ``(N, C, H, W)`` -> uint8 ``(N, C', H, W)``, C' = min(C, 3).

    Values are rounded to the nearest of 256 levels; channels beyond the third (alpha,
    extra outputs) are dropped for display.
    """
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.dim() != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(t.shape)}.")
    t = t.detach().float().cpu()[:, :3]
    return (t * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def image_grid(images: Any, nrow: int = 8, padding: int = 2, pad_value: float = 1.0
               ) -> np.ndarray:
    """A grid of images as one ``(H, W, 3)`` uint8 array, laid out as
    ``torchvision.utils.make_grid`` lays it out.

    Parameters
    ----------
    images : tensor or array (N, C, H, W), float in [0, 1] or uint8
        C = 1 (grey, repeated to RGB), 3 or 4 (alpha dropped).
    nrow : int, default 8
        Images per row.
    padding : int, default 2
        Pixels around and between images (none around a single image).
    pad_value : float, default 1.0
        Colour of the padding (1: white).

    Returns
    -------
    ndarray (H', W', 3) uint8
        Rounded as ``torchvision.utils.save_image`` rounds, so a PNG file of the grid has
        exactly these pixels.
    """
    t = _batch(images)[:, :3]
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    n, c, h, w = t.shape
    if n == 1:
        grid = t[0]
    else:
        cols = min(int(nrow), n)
        rows = -(-n // cols)
        grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding),
                          float(pad_value))
        for k in range(n):
            r, q = divmod(k, cols)
            y, x = r * (h + padding) + padding, q * (w + padding) + padding
            grid[:, y:y + h, x:x + w] = t[k]
    return (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_image_grid(images: Any, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
                    pad_value: float = 1.0) -> Path:
    """Write :func:`image_grid` of ``images`` to a PNG file, atomically; return its path."""
    from PIL import Image

    from cfmodules.files import atomic_write

    buf = io.BytesIO()
    Image.fromarray(image_grid(images, nrow, padding, pad_value)).save(buf, format="png")
    return atomic_write(path, buf.getvalue())
