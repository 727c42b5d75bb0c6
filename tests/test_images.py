"""Display images and grids (cfmodules.images): exact against a hand layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.errors import ShapeError
from cfmodules.images import as_uint8, image_grid, save_image_grid


def test_as_uint8_rounds_clamps_and_keeps_three_channels():
    x = torch.tensor([0.0, 0.5, 1.0, 1.7, -0.2, 0.25]).view(1, 6, 1, 1)
    got = as_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (1, 3, 1, 1)
    assert got.ravel().tolist() == [0, 128, 255]


def test_image_grid_is_the_hand_layout():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 3, 4, 6), dtype=np.uint8)
    grid = image_grid(imgs, nrow=2, padding=1, pad_value=1.0)
    # 3 rows x 2 columns of (4 x 6) images, 1 pixel of white around and between them
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 2)
        cell = grid[1 + 5 * r:1 + 5 * r + 4, 1 + 7 * c:1 + 7 * c + 6]
        np.testing.assert_array_equal(cell, imgs[i].transpose(1, 2, 0))
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()
    assert (grid[11:, 8:] == 255).all()  # the empty sixth cell is padding colour


def test_grey_images_become_rgb_and_bad_shapes_are_refused():
    grid = image_grid(torch.full((2, 1, 3, 3), 0.5), nrow=2, padding=0)
    assert grid.shape == (3, 6, 3) and (grid == 128).all()
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\)"):
        image_grid(np.zeros((2, 5, 3, 3)))


def test_save_image_grid_writes_the_same_pixels_atomically(tmp_path):
    from PIL import Image

    imgs = torch.rand(3, 3, 5, 5)
    path = save_image_grid(imgs, tmp_path / "g.png", nrow=3)
    assert list(tmp_path.iterdir()) == [path]
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")),
                                  image_grid(imgs, nrow=3))


@pytest.mark.parametrize("n, nrow, padding, channels", [(5, 2, 1, 3), (1, 8, 2, 3),
                                                       (7, 3, 0, 1), (4, 4, 3, 4)])
def test_grids_are_torchvisions_pixels_and_png_bytes(tmp_path, n, nrow, padding, channels):
    """The same layout and rounding as make_grid + save_image (the reference), without
    importing torchvision: its import pulls in torch._dynamo (seconds)."""
    import io

    tv = pytest.importorskip("torchvision.utils")
    imgs = torch.rand(n, channels, 5, 6, generator=torch.Generator().manual_seed(n))
    ref = tv.make_grid(imgs[:, :3], nrow=nrow, padding=padding, pad_value=0.25)
    ref = (ref * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(image_grid(imgs, nrow, padding, pad_value=0.25), ref)
    buf = io.BytesIO()
    tv.save_image(imgs[:, :3], buf, nrow=nrow, padding=padding, pad_value=0.25, format="png")
    path = save_image_grid(imgs, tmp_path / "g.png", nrow, padding, pad_value=0.25)
    assert path.read_bytes() == buf.getvalue()
