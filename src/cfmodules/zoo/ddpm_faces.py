"""The ``ddpm-faces`` zoo entry: a small DDPM UNet trained here on the 32x32 Olivetti faces.

(Skeleton: the architecture; the loader follows.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["UNET_CONFIG", "SCHEDULER_CONFIG", "IMAGE_SIZE", "build_unet"]

IMAGE_SIZE = 32
"""Side of the (grayscale) images, in pixels."""

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
"""``diffusers.UNet2DModel`` arguments of the shipped model."""

SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=True,
)
"""``diffusers.DDPMScheduler`` / ``DDIMScheduler`` arguments it was trained with."""


def build_unet():
    """A freshly initialised UNet with :data:`UNET_CONFIG` (needs ``diffusers``)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)
