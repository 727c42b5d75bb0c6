"""BigGAN-deep, the class-conditional GAN of sec. 4.2, through ``pytorch-pretrained-biggan``.

The architecture is the ``BigGAN`` class of the PyPI package ``pytorch-pretrained-biggan``
0.1.1 (Apache-2.0). Its pretrained weights download from the internet at run time, which
cfmodules never does: :func:`random_biggan` builds the real architecture with random
weights (for tests and for trying the pipeline), and :func:`from_pretrained_dir` loads
weights a user downloaded beforehand (``config.json`` + ``pytorch_model.bin``).

How the package is loaded. Its ``__init__`` imports ``file_utils``, which imports ``boto3``
and ``requests`` (only used to download) and defines an on-disk cache path; it downloads
nothing and prints nothing at import, but it cannot be imported without ``boto3``. So
cfmodules installs it with ``pip install --no-deps pytorch-pretrained-biggan==0.1.1`` and
executes only its two architecture files, ``config.py`` and ``model.py`` (class and
constant definitions, nothing else at module level), by file path under the private name
``cfmodules.zoo._biggan_pkg``, with a stand-in ``file_utils`` whose ``cached_path``
refuses to download. ``pytorch_pretrained_biggan`` itself is never imported. A model
built by the real package (``BigGAN.from_pretrained``) works with :func:`biggan_adapter`
as well: the adapter only relies on the module names and the forward signature.

The latent is a tuple of three per-sample inputs::

    (noise (N, z_dim), class one-hot (N, num_classes), truncation (N, 1))

BigGAN takes one Python float as truncation (it also picks batch-norm statistics with
it), so the adapter's forward checks that the batch has a single truncation value and
passes ``truncation[0]``; hybrids and influence maps always pair samples drawn with the
same truncation.

Layer names (``generator.layers.i`` is a Gblock, or the self-attention at
``config.attention_layer_position``)::

    generator.layers.i.conv_0     1x1 conv, in -> in/4 channels
    generator.layers.i.conv_1     3x3 conv after the (optional) 2x upsampling, in/4 channels
    generator.layers.i.conv_2     3x3 conv, in/4 channels
    generator.layers.i.conv_3     1x1 conv, in/4 -> out channels (added to the skip)
    generator.layers.i            the Gblock's output
    generator.layers.i.relu:k     the block's one ReLU module, called 4 times (k = 0..3)

The paper's "two successive layers within a Gblock" are ``conv_1`` and ``conv_2``
(:func:`gblock_layers`, :func:`two_layer_module`): same channel count, same resolution.
Gblocks are numbered from 1 as in the paper (Gblock 7 is the 7th GenBlock, skipping the
attention layer).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cfmodules import checks
from cfmodules.errors import (
    CheckpointError,
    ConfigError,
    LatentError,
    ModelNotAvailableError,
)
from cfmodules.zoo._files import package_file

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.adapter import GeneratorAdapter

__all__ = [
    "INSTALL_COMMAND",
    "KOALA",
    "TEDDY",
    "OSTRICH",
    "COCK",
    "biggan_config",
    "random_biggan",
    "from_pretrained_dir",
    "biggan_adapter",
    "load_random",
    "class_latents",
    "gblock_path",
    "gblock_layers",
    "two_layer_module",
]

INSTALL_COMMAND = "pip install --no-deps pytorch-pretrained-biggan==0.1.1"
"""Install line for the architecture (``--no-deps``: boto3/requests only serve downloads)."""

KOALA, TEDDY, OSTRICH, COCK = 105, 850, 9, 7
"""ImageNet class indices of the paper's Fig. 5 hybrids (koala/teddy, ostrich/cock)."""

_PACKAGE = "pytorch_pretrained_biggan"
_DIST = "pytorch-pretrained-biggan"
_VERSION = "0.1.1"
_PRIVATE = "cfmodules.zoo._biggan_pkg"

# (up-sample?, in, out) channel multipliers of the official BigGAN-deep configs, from
# pytorch_pretrained_biggan/convert_tf_to_pytorch.py, and the index of the attention layer
# (at 64x64 in all three). 32 and 64 follow the same pattern with fewer blocks (attention at
# half the output size); no pretrained weights exist for them: they make fast test models.
# Channels may only halve from one block to the next (the skip keeps the first half) and
# the last block must end at 1 x channel_width.
_DEEP_LAYERS = {
    32: ([(False, 16, 16), (True, 16, 8), (False, 8, 4), (True, 4, 2), (False, 2, 2),
          (True, 2, 1)], 4),
    64: ([(False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4),
          (True, 4, 2), (False, 2, 2), (True, 2, 1)], 6),
    128: ([(False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
           (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1)], 8),
    256: ([(False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
           (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
           (False, 2, 2), (True, 2, 1)], 8),
    512: ([(False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
           (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
           (False, 2, 2), (True, 2, 1), (False, 1, 1), (True, 1, 1)], 8),
}


# ---------------------------------------------------------------------------- the package
def _package_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``(config, model)`` modules of pytorch-pretrained-biggan, executed by file path."""
    if f"{_PRIVATE}.model" in sys.modules:
        return sys.modules[f"{_PRIVATE}.config"], sys.modules[f"{_PRIVATE}.model"]
    folder = package_file(_PACKAGE, "model.py", INSTALL_COMMAND).parent  # not executed
    version = importlib.metadata.version(_DIST)
    if version != _VERSION:
        raise ModelNotAvailableError(
            f"cfmodules runs the BigGAN architecture files of pytorch-pretrained-biggan "
            f"{_VERSION}, which it has checked; version {version} is installed. "
            f"Install the checked version with: {INSTALL_COMMAND}"
        )
    pkg = types.ModuleType(_PRIVATE)
    pkg.__path__ = []  # a package for the relative imports, with nothing else to find
    stub = types.ModuleType(f"{_PRIVATE}.file_utils")

    def cached_path(url_or_filename: object, cache_dir: object = None) -> str:
        raise ModelNotAvailableError(
            "cfmodules never downloads weights. Download the BigGAN config.json and "
            "pytorch_model.bin yourself and use cfmodules.zoo.biggan.from_pretrained_dir(folder)."
        )

    stub.cached_path = cached_path  # type: ignore[attr-defined]
    added = {_PRIVATE: pkg, f"{_PRIVATE}.file_utils": stub}
    sys.modules.update(added)
    try:
        for name in ("config", "model"):
            full = f"{_PRIVATE}.{name}"
            file_spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
            sys.modules[full] = added[full] = module
            file_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        for name in added:
            sys.modules.pop(name, None)
        raise
    return sys.modules[f"{_PRIVATE}.config"], sys.modules[f"{_PRIVATE}.model"]


def biggan_config(
    resolution: int = 128,
    channel_width: int = 128,
    num_classes: int = 1000,
    z_dim: int = 128,
) -> Any:
    """A ``BigGANConfig`` with the official BigGAN-deep layout at ``resolution``.

    Parameters
    ----------
    resolution : {32, 64, 128, 256, 512}
        Output size; 256 is the paper's BigGAN-deep-256 (12 Gblocks). 128, 256 and 512 are
        the pretrained layouts; 32 (6 Gblocks) and 64 (8 Gblocks) follow their pattern
        with fewer blocks, for fast tests.
    channel_width : int
        128 in the pretrained models; a small value (4) gives a fast model for tests.
        At least 4 (the last block has ``channel_width`` channels, RGB takes 3 of them).
    num_classes, z_dim : int
        1000 and 128 in the pretrained models.
    """
    if resolution not in _DEEP_LAYERS:
        raise ConfigError(
            f"BigGAN-deep layouts exist for resolutions {sorted(_DEEP_LAYERS)}, got {resolution}."
        )
    channel_width = checks.integer(channel_width, "channel_width", low=4)
    config_mod, _ = _package_modules()
    return config_mod.BigGANConfig(
        output_dim=resolution, z_dim=z_dim, class_embed_dim=z_dim,
        channel_width=channel_width, num_classes=num_classes,
        layers=[tuple(x) for x in _DEEP_LAYERS[resolution][0]],
        attention_layer_position=_DEEP_LAYERS[resolution][1],
        eps=1e-4, n_stats=51,
    )


def random_biggan(
    resolution: int = 128,
    channel_width: int = 4,
    num_classes: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The real BigGAN-deep architecture with random weights (no download).

    The global torch RNG is left untouched; the same ``seed`` gives the same weights.
    The parameters the package leaves uninitialised (the last batch norm's affine) are set
    to the identity, and the attention's ``gamma`` to 0.2 so that attention takes part.

    Returns
    -------
    nn.Module
        A ``BigGAN`` in eval mode: ``model(noise (N, 128), one_hot (N, num_classes),
        truncation: float)`` -> images (N, 3, resolution, resolution) in [-1, 1].
    """
    _, model_mod = _package_modules()
    config = biggan_config(resolution, channel_width, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_mod.BigGAN(config)
        with torch.no_grad():
            model.generator.bn.weight.fill_(1.0)
            model.generator.bn.bias.zero_()
            for m in model.modules():
                if type(m).__name__ == "SelfAttn":
                    m.gamma.fill_(0.2)
                if hasattr(m, "weight_orig") and hasattr(m, "weight_u"):
                    _converge_spectral_norm(m)
    model.eval()
    return model.to(device) if device is not None else model


def _converge_spectral_norm(module: nn.Module, n_iter: int = 30) -> None:
    """Run power iterations on a spectral-norm module's ``u``, ``v`` (as training would).

    In eval mode ``torch.nn.utils.spectral_norm`` divides by ``u^T W v`` with the stored
    vectors. Freshly initialised they are random, so that estimate can be ~0 or negative
    and the network blows up (NaN); trained weights come with converged vectors.
    """
    w = module.weight_orig.reshape(module.weight_orig.shape[0], -1)
    v = module.weight_v
    for _ in range(n_iter):
        u = nn.functional.normalize(w @ v, dim=0, eps=1e-12)
        v = nn.functional.normalize(w.t() @ u, dim=0, eps=1e-12)
    module.weight_u.copy_(u)
    module.weight_v.copy_(v)


def from_pretrained_dir(
    folder: str | Path, device: str | torch.device | None = None, strict: bool = True
) -> nn.Module:
    """Load a BigGAN whose ``config.json`` and ``pytorch_model.bin`` you downloaded.

    The files are those of ``BigGAN.from_pretrained('biggan-deep-256')`` (the package's
    cache, ``~/.pytorch_pretrained_biggan``, names them by hash; copy them into a folder as
    ``config.json`` and ``pytorch_model.bin``). The weights load with
    ``torch.load(weights_only=True)`` and must fit the architecture exactly; if a file made
    by another torch version does not (the package itself loads with ``strict=False``),
    ``strict=False`` loads what fits and warns with the keys that did not.

    Raises
    ------
    ModelNotAvailableError
        If a file is missing.
    CheckpointError
        If the weights do not fit the configuration.
    """
    folder = Path(folder)
    config_file, weights_file = folder / "config.json", folder / "pytorch_model.bin"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ModelNotAvailableError(
                f"{f} not found. The folder must hold BigGAN's config.json and "
                "pytorch_model.bin (see docs/families.md)."
            )
    config_mod, model_mod = _package_modules()
    config = config_mod.BigGANConfig.from_dict(json.loads(config_file.read_text("utf-8")))
    model = model_mod.BigGAN(config)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(
            f"{weights_file} does not fit the BigGAN described by {config_file}: {err}"
            + ("" if not strict else " (strict=False loads the tensors that fit)")
        ) from None
    if result.missing_keys or result.unexpected_keys:
        warnings.warn(
            f"BigGAN weights loaded with strict=False: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}.",
            UserWarning,
            stacklevel=2,
        )
    model.eval()
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------- latents
def _truncated_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal restricted to [-2, 2] (BigGAN's ``truncated_noise_sample``)."""
    x = torch.randn(shape, generator=generator)
    out = x.abs() > 2
    while out.any():
        x[out] = torch.randn(int(out.sum()), generator=generator)
        out = x.abs() > 2
    return x


def _check_truncation(truncation: float) -> float:
    return checks.real(truncation, "BigGAN's truncation", low=0, high=1, low_open=True)


def _class_prior(model: nn.Module, classes: Sequence[int] | None, truncation: float):
    num_classes = model.embeddings.in_features
    z_dim = model.embeddings.out_features
    pool = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in pool if not 0 <= c < num_classes]
    if not pool or bad:
        raise ConfigError(
            f"classes must be a non-empty list of class indices in [0, {num_classes}); "
            f"got {list(classes) if classes is not None else classes} (bad: {bad[:5]})."
        )

    def prior(n: int, generator: torch.Generator):
        noise = truncation * _truncated_normal((n, z_dim), generator)
        pick = torch.randint(len(pool), (n,), generator=generator)
        one_hot = torch.zeros(n, num_classes)
        one_hot[torch.arange(n), torch.tensor(pool)[pick]] = 1.0
        return noise, one_hot, torch.full((n, 1), truncation)

    return prior


def _forward(model: nn.Module, latent: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(noise, class_vector, truncation)`` with one float truncation per batch."""
    noise, class_vector, truncation = latent
    t = truncation.reshape(-1)
    if not torch.all(t == t[0]):
        raise LatentError(
            "BigGAN takes one truncation per forward, but this batch mixes truncations "
            f"{sorted({float(v) for v in t})[:5]}. Pair samples drawn with the same truncation."
        )
    value = float(t[0])
    if not 0 < value <= 1:
        raise LatentError(f"BigGAN's truncation must be in (0, 1], got {value}.")
    return model(noise, class_vector, value)


def biggan_adapter(
    model: nn.Module,
    truncation: float = 0.4,
    classes: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    name: str = "biggan",
) -> GeneratorAdapter:
    """Wrap a ``BigGAN`` (random, downloaded or the real package's) in a GeneratorAdapter.

    Parameters
    ----------
    model : nn.Module
        A ``BigGAN``: ``model(noise, class_vector, truncation: float)``.
    truncation : float in (0, 1]
        Truncation of the prior's noise (BigGAN's trick; 0.4 gives typical samples).
    classes : list of int, optional
        The prior draws each sample's class uniformly from these (default: all classes).
    device : str or torch.device, optional
    name : str

    Returns
    -------
    GeneratorAdapter
        Latent ``(noise (N, z_dim), one-hot (N, num_classes), truncation (N, 1))``;
        images (N, 3, R, R) in [-1, 1].
    """
    from cfmodules.adapter import GeneratorAdapter

    truncation = _check_truncation(truncation)
    z_dim = model.embeddings.out_features
    num_classes = model.embeddings.in_features
    return GeneratorAdapter(
        model,
        latent_shape=((z_dim,), (num_classes,), (1,)),
        prior=_class_prior(model, classes, truncation),
        forward=_forward,
        output_range=(-1.0, 1.0),
        device=device,
        name=name,
    )


def load_random(
    device: str | torch.device | None = None,
    resolution: int = 128,
    channel_width: int = 4,
    seed: int = 0,
    truncation: float = 0.4,
    classes: Sequence[int] | None = None,
) -> GeneratorAdapter:
    """Zoo entry ``biggan-deep-random``: the real architecture, random weights, no download."""
    model = random_biggan(resolution, channel_width, seed=seed, device=device)
    return biggan_adapter(model, truncation, classes, device, name=f"biggan-deep-{resolution}-random")


def class_latents(
    adapter: GeneratorAdapter, class_index: int, n: int, seed: int = 0, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` latents of one class: the adapter's prior with the class vector set.

    Sample ``i`` depends only on ``(seed, start + i)`` and the class, so
    ``class_latents(ad, KOALA, n, seed)`` and ``class_latents(ad, TEDDY, n, seed)`` share
    their noise: hybrids across classes then differ by class only.

    Returns
    -------
    (noise (n, z_dim), one-hot (n, num_classes), truncation (n, 1))
    """
    noise, one_hot, trunc = adapter.sample_latents(n, seed=seed, start=start)
    num_classes = one_hot.shape[1]
    class_index = checks.integer(class_index, "class_index", low=0, high=num_classes)
    one_hot = torch.zeros_like(one_hot)
    one_hot[:, class_index] = 1.0
    return noise, one_hot, trunc


# ---------------------------------------------------------------------------- layers
def gblock_path(model: nn.Module, block: int) -> str:
    """Layer name of Gblock ``block``, counted from 1 as in the paper (attention skipped).

    Raises
    ------
    ConfigError
        If the model has no such Gblock.
    """
    blocks = [
        f"generator.layers.{i}"
        for i, m in enumerate(model.generator.layers)
        if type(m).__name__ == "GenBlock"
    ]
    try:
        block = checks.integer(block, "block", low=1, high=len(blocks) + 1)
    except ConfigError:
        raise ConfigError(
            f"This BigGAN has Gblocks 1..{len(blocks)} (numbered from 1 as in the paper); "
            f"got {block!r}."
        ) from None
    return blocks[block - 1]


def gblock_layers(model: nn.Module, block: int) -> tuple[str, str]:
    """The two successive layers of Gblock ``block`` that the paper intervenes on together.

    Returns ``(".../conv_1", ".../conv_2")``: the block's two 3x3 convolutions, both with
    ``in/4`` channels at the block's output resolution.
    """
    path = gblock_path(model, block)
    return f"{path}.conv_1", f"{path}.conv_2"


def two_layer_module(
    model: nn.Module,
    block: int,
    channels_a: Sequence[int],
    channels_b: Sequence[int] | None = None,
) -> dict[str, list[int]]:
    """A module spanning the two successive layers of Gblock ``block`` (sec. 4.2).

    Parameters
    ----------
    model : nn.Module
        The BigGAN (``adapter.generator``).
    block : int
        Gblock number, from 1.
    channels_a : list of int
        Channels of ``conv_1``.
    channels_b : list of int, optional
        Channels of ``conv_2``; default: the same indices as ``channels_a``.

    Returns
    -------
    dict
        ``{conv_1 name: channels_a, conv_2 name: channels_b}``, ready for
        :func:`cfmodules.hybrid.hybridize`.
    """
    layer_a, layer_b = gblock_layers(model, block)
    a = [int(c) for c in channels_a]
    b = a if channels_b is None else [int(c) for c in channels_b]
    return {layer_a: a, layer_b: list(b)}
