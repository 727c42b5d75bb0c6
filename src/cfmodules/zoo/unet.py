"""A diffusers ``UNet2DModel`` as a one-step generator: denoise a noisy input at one timestep.

The network is the ``UNet2DModel`` of the PyPI package ``diffusers`` (Apache-2.0): a small
random configuration (:func:`random_unet`), any ``UNet2DModel`` you built, or a
``from_pretrained`` folder on disk (a model folder, or a pipeline folder with ``unet/``;
never a download: ``local_files_only=True``, and diffusers reads ``.bin`` weights with
``torch.load(weights_only=True)``).

The generator is one denoising step. The latent is the noisy input ``x_t`` (``(C, H, W)``,
standard normal, as at the start of sampling), the ``timestep`` is fixed for the adapter,
and the image is the network's ``.sample`` output (``output="sample"``: the predicted noise
of an epsilon model), or the clean image it implies (``output="x0"``, with the DDPM
schedule's ``alphas_cumprod[timestep]`` and the scheduler's ``prediction_type``). The
multi-step chain is :mod:`cfmodules.samplers`' work; this module makes the network itself
a family: its down, mid and up blocks are layers like any other.

Layer names (diffusers' own)::

    conv_in                           the first convolution
    down_blocks.i.resnets.j           ResNet blocks of down block i (also the skips)
    down_blocks.i.attentions.j        their attention (Attn* blocks)
    down_blocks.i.downsamplers.0      the block's downsampling convolution
    mid_block                         the bottleneck's output
    mid_block.resnets.k, mid_block.attentions.0
    up_blocks.i                       up block i's output
    up_blocks.i.resnets.j, up_blocks.i.upsamplers.0
    conv_out                          the last convolution (the .sample)

A down block itself returns a tuple (its output and its skips), so it is not a layer:
:func:`block_layers` names one tensor layer per block. ``torch.fx`` cannot trace the
forward (it calls ``len`` on a proxy); ``torch.export`` can, with the batch bounded
(attention guards ``batch <= 63``), and the engine runs larger batches in chunks.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cfmodules import checks
from cfmodules.errors import CheckpointError, ConfigError, ModelNotAvailableError
from cfmodules.zoo._files import read_json_config
from cfmodules.zoo._range import calibrate_display

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.adapter import GeneratorAdapter

__all__ = ["INSTALL_COMMAND", "OUTPUTS", "small_config", "random_unet", "from_folder",
           "unet_adapter", "load", "block_layers", "OneStep"]

INSTALL_COMMAND = "pip install diffusers   (or: pip install 'cfmodules[families]')"
OUTPUTS = ("sample", "x0")
"""What the one-step generator returns: the network's ``.sample``, or the clean image."""


def _diffusers() -> Any:
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise ModelNotAvailableError(
            f"The package diffusers is not installed. Install it with: {INSTALL_COMMAND}"
        ) from None


def small_config(sample_size: int = 32, in_channels: int = 3) -> dict[str, Any]:
    """A small ``UNet2DModel`` configuration (about 4 M parameters, fast on a CPU).

    Three resolutions (32, 64, 64 channels), one ResNet per block, attention at the
    lowest resolution and in the mid block, as in the DDPM CIFAR-10 layout scaled down.
    """
    size = checks.integer(sample_size, "sample_size", low=8)
    if size % 4:
        raise ConfigError(f"sample_size must be a multiple of 4 (two downsamplings), got {size}.")
    return dict(sample_size=size, in_channels=checks.integer(in_channels, "in_channels", low=1),
                out_channels=in_channels, layers_per_block=1, block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=8)


def random_unet(sample_size: int = 32, seed: int = 0, **config: Any) -> nn.Module:
    """A ``UNet2DModel`` of :func:`small_config` (updated by ``config``), random weights.

    diffusers' own initialisation under ``torch.manual_seed(seed)``; the global torch RNG
    is left untouched. In eval mode.
    """
    diffusers = _diffusers()
    cfg = {**small_config(sample_size, config.pop("in_channels", 3)), **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(checks.seed(seed))
        try:
            model = diffusers.UNet2DModel(**cfg)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"UNet2DModel does not take this configuration: {err}") from None
    return model.eval()


def _subfolder(folder: Path) -> str | None:
    """``"unet"`` for a pipeline folder, None for a model folder (raises if neither)."""
    if (folder / "config.json").is_file():
        return None
    if (folder / "unet" / "config.json").is_file():
        return "unet"
    raise ModelNotAvailableError(
        f"{folder} holds no UNet2DModel: expected config.json and the weights "
        "(diffusion_pytorch_model.safetensors or .bin) in it or in its unet/ subfolder.")


def from_folder(folder: str | Path) -> nn.Module:
    """``UNet2DModel.from_pretrained(folder)`` from disk only (in eval mode).

    Raises
    ------
    ModelNotAvailableError
        If the folder or its config is missing.
    CheckpointError
        If the config is not a UNet2DModel's or the weights cannot be read or do not fit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotAvailableError(
            f"{folder} is not a folder. Give a folder saved by UNet2DModel.save_pretrained "
            "(or a pipeline folder with unet/); cfmodules never downloads.")
    sub = _subfolder(folder)
    diffusers = _diffusers()
    config = read_json_config(folder / (sub or "") / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(
            f"{folder}: the config describes a {config.get('_class_name')}, not a UNet2DModel.")
    try:
        model = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder=sub,
                                                      local_files_only=True)
    except Exception as err:  # diffusers raises OSError, ValueError, RuntimeError...
        text = str(err).strip().splitlines()
        raise CheckpointError(
            f"{folder}: the UNet2DModel cannot be loaded ({type(err).__name__}: "
            f"{text[0][:300] if text else ''}).") from None
    return model.eval()


class OneStep:
    """The adapter's forward: ``model(x_t, timestep).sample``, or the clean image it implies.

    With ``output="x0"``: ``x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a)`` for an epsilon
    model, ``x0 = sqrt(a) * x_t - sqrt(1 - a) * v`` for a v model, the output itself for a
    sample model, where ``a`` is ``alphas_cumprod[timestep]``.
    """

    def __init__(self, timestep: int, output: str = "sample", alpha_bar: float | None = None,
                 prediction_type: str = "epsilon"):
        self.timestep = timestep
        self.output = checks.one_of(output, "output", OUTPUTS)
        self.prediction_type = checks.one_of(prediction_type, "prediction_type",
                                             ("epsilon", "sample", "v_prediction"))
        self.alpha_bar = alpha_bar
        if self.output == "x0" and alpha_bar is None:
            raise ConfigError("output='x0' needs alpha_bar (alphas_cumprod[timestep]).")

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x, self.timestep).sample
        if self.output == "sample" or self.prediction_type == "sample":
            return out
        a = float(self.alpha_bar)  # type: ignore[arg-type]
        if self.prediction_type == "epsilon":
            return (x - (1 - a) ** 0.5 * out) / a ** 0.5
        return a ** 0.5 * x - (1 - a) ** 0.5 * out


def _scheduler(folder: Path | None) -> Any:
    """The DDPM scheduler of a pipeline folder (``scheduler/``), else diffusers' default."""
    diffusers = _diffusers()
    if folder is not None:
        for f in (folder / "scheduler" / "scheduler_config.json",
                  folder.parent / "scheduler" / "scheduler_config.json"):
            if f.is_file():
                return diffusers.DDPMScheduler.from_config(read_json_config(f))
    return diffusers.DDPMScheduler()


def unet_adapter(
    model: nn.Module,
    timestep: int = 500,
    *,
    output: str = "sample",
    scheduler: Any = None,
    output_range: tuple[float, float] = (-1.0, 1.0),
    device: str | torch.device | None = None,
    name: str = "unet",
) -> GeneratorAdapter:
    """Wrap a ``UNet2DModel`` as a one-step generator.

    Parameters
    ----------
    model : UNet2DModel
        Any (random, yours, :func:`from_folder`'s). Class-conditional UNets need a
        ``forward=`` of your own (``GeneratorAdapter(model, ..., forward=...)``).
    timestep : int
        The denoising step, in ``[0, num_train_timesteps)``.
    output : {"sample", "x0"}
        The network's ``.sample`` (e.g. predicted noise), or the clean image it implies.
    scheduler : diffusers scheduler, optional
        For ``output="x0"``: its ``alphas_cumprod`` and ``prediction_type`` (default:
        ``DDPMScheduler()``, linear betas over 1000 steps, epsilon).

    Returns
    -------
    GeneratorAdapter
        Latent ``x_t (N, C, H, W)`` (standard normal); images ``(N, C_out, H, W)``.
    """
    from cfmodules.adapter import GeneratorAdapter

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "sample_size"):
        raise ConfigError(f"unet_adapter wraps a diffusers UNet2DModel, got {type(model).__name__}.")
    if getattr(config, "num_class_embeds", None) or getattr(config, "class_embed_type", None):
        raise ConfigError("This UNet2DModel is class-conditional: wrap it with "
                          "GeneratorAdapter(model, latent_shape, forward=...) passing class_labels.")
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    steps = int(getattr(config, "num_train_timesteps", None) or 1000)
    timestep = checks.integer(timestep, "timestep", low=0, high=steps)
    output = checks.one_of(output, "output", OUTPUTS)
    alpha_bar, prediction = None, "epsilon"
    if output == "x0":
        sched = scheduler if scheduler is not None else _scheduler(None)
        alpha_bar = float(sched.alphas_cumprod[timestep])
        prediction = str(sched.config.prediction_type)
    forward = OneStep(timestep, output, alpha_bar, prediction)
    return GeneratorAdapter(model, latent_shape=(int(config.in_channels), int(h), int(w)),
                            forward=forward, output_range=output_range, device=device, name=name)


def load(
    device: str | torch.device | None = None,
    folder: str | Path | None = None,
    *,
    timestep: int = 500,
    output: str = "sample",
    sample_size: int = 32,
    seed: int = 0,
) -> GeneratorAdapter:
    """Zoo entry ``unet``: a random :func:`small_config` UNet (``seed``), or ``folder``.

    Random weights have no fixed output range, so their display range is set from 8
    samples (1st and 99th percentiles); a folder's model is shown in [-1, 1].
    """
    if folder is not None:
        model = from_folder(folder)
        sched = _scheduler(Path(folder)) if output == "x0" else None
        return unet_adapter(model, timestep, output=output, scheduler=sched, device=device,
                            name=f"unet-{Path(folder).name}")
    adapter = unet_adapter(random_unet(sample_size, seed), timestep, output=output,
                           device=device, name="unet")
    calibrate_display(adapter)
    return adapter


def block_layers(model: nn.Module) -> dict[str, str]:
    """One tensor layer per block: ``{"down_blocks.i": its last ResNet, "mid_block": ...,
    "up_blocks.i": ...}`` (a down block returns a tuple; its last ResNet's output is what
    goes down and into the skip)."""
    out = {}
    for i, block in enumerate(model.down_blocks):
        out[f"down_blocks.{i}"] = f"down_blocks.{i}.resnets.{len(block.resnets) - 1}"
    if getattr(model, "mid_block", None) is not None:
        out["mid_block"] = "mid_block"
    for i, _ in enumerate(model.up_blocks):
        out[f"up_blocks.{i}"] = f"up_blocks.{i}"
    return out
