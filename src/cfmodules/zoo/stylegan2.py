"""StyleGAN2 through the PyPI package ``stylegan2-pytorch`` (lucidrains, MIT).

The architecture is the package's own ``StyleVectorizer`` (the mapping network, z -> w)
and ``Generator`` (modulated/demodulated grouped convolutions, per-pixel noise, skips to
RGB). Weights are random (a fixed seed) or those of a checkpoint the package's own
``Trainer`` wrote (``models/<name>/model_<n>.pt``, next to ``.config.json``).

How the package is imported. ``stylegan2_pytorch`` 1.9.0 asserts
``torch.cuda.is_available()`` at module level and imports ``aim`` (an experiment tracker
with some thirty dependencies, only used by the trainer's logging). cfmodules imports the
package's dependencies first, then the package with ``torch.cuda.is_available`` answering
True *for the duration of that import only* (restored in ``finally``), and, when ``aim``
is not installed, with a stand-in ``aim`` module in ``sys.modules`` for the same duration
(the trainer's logger then raises a clear error; the generator never touches it). Nothing
else of the user's torch state changes. The install line is therefore
``pip install --no-deps stylegan2-pytorch==1.9.0`` plus the generator's own imports
(einops, kornia, fire, vector-quantize-pytorch): see :data:`INSTALL_COMMAND`.

The adapter follows the package's sampling code (``Trainer.generate_truncated``,
``ModelLoader``): ``z ~ N(0, I)`` goes through the mapping network to ``w``, ``w`` is
broadcast to every block (``styles_def_to_tensor``), optionally truncated towards the
mean ``w`` (``trunc_psi``) and optionally mixed (``mix_at``: blocks from ``mix_at`` on
take a second ``z``'s style), and the per-pixel noise image ``U(0, 1)`` of shape
``(image_size, image_size, 1)`` (``image_noise``) is **part of the latent**. So the latent
is a tuple ``(z (N, latent_dim), noise (N, S, S, 1))`` (``(z, z_mix, noise)`` with
``mix_at``), drawn per sample from the sample's seed: the hybrid with no channel swapped
is Original 1 exactly, and a hybrid keeps Original 1's noise.

Layer names (block ``i`` of ``G.blocks``, 4x4 for ``i = 0``, doubling with each block)::

    G.initial_conv                 3x3 conv on the constant input (4x4)
    G.blocks.i.conv1               first modulated 3x3 conv (after the 2x upsampling)
    G.blocks.i.activation:0        its LeakyReLU, after the first noise is added
    G.blocks.i.conv2               second modulated 3x3 conv
    G.blocks.i.activation:1        its LeakyReLU, after the second noise: the block's
                                   features (what the next block and to_rgb read)
    G.blocks.i.to_rgb              the running RGB image after this block (upsampled)
    S.net.k                        the mapping network (vectors, no spatial maps)

:func:`block_layers` gives the four feature layers of one block.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
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

__all__ = ["INSTALL_COMMAND", "StyleGAN2Generator", "package", "random_generator",
           "from_checkpoint", "stylegan2_adapter", "load", "block_layers"]

INSTALL_COMMAND = ("pip install --no-deps stylegan2-pytorch==1.9.0 && pip install einops "
                   "kornia fire vector-quantize-pytorch==0.1.0   (or: pip install "
                   "'cfmodules[families]' and the first part)")
"""How to install the package without its trainer-only dependencies (aim and its ~30)."""

_MODULE = "stylegan2_pytorch.stylegan2_pytorch"
_DEPENDENCIES = ("einops", "kornia.filters", "torchvision", "vector_quantize_pytorch", "fire",
                 "tqdm", "PIL")
"""What the package's module imports at its top, imported before the patched import."""


# ---------------------------------------------------------------------------- the package
def package() -> types.ModuleType:
    """The module ``stylegan2_pytorch.stylegan2_pytorch``, imported on any machine.

    ``torch.cuda.is_available`` is replaced by ``lambda: True`` only while the package's
    module executes (and a stand-in ``aim`` sits in ``sys.modules`` then, if aim is not
    installed); both are restored in ``finally``, also when the import fails.

    Raises
    ------
    ModelNotAvailableError
        If the package or one of the modules it imports is not installed.
    """
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    if importlib.util.find_spec("stylegan2_pytorch") is None:
        raise ModelNotAvailableError(
            f"The package stylegan2-pytorch is not installed. Install it with: {INSTALL_COMMAND}")
    for dep in _DEPENDENCIES:  # imported unpatched: only the package's own code is
        try:
            importlib.import_module(dep)
        except ImportError as err:
            raise ModelNotAvailableError(
                f"stylegan2-pytorch imports {dep}, which cannot be imported ({err}). "
                f"Install the generator's dependencies with: {INSTALL_COMMAND}") from None
    stand_in = None
    if "aim" not in sys.modules and importlib.util.find_spec("aim") is None:
        stand_in = _aim_stand_in()
        sys.modules["aim"] = stand_in
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # the module asserts it; nothing else reads it
    try:
        return importlib.import_module(_MODULE)
    finally:
        torch.cuda.is_available = available
        if stand_in is not None and sys.modules.get("aim") is stand_in:
            del sys.modules["aim"]


def _aim_stand_in() -> types.ModuleType:
    """A module named ``aim`` whose only attribute the package uses refuses with a reason."""
    module = types.ModuleType("aim")

    class Session:  # the trainer's logger (Trainer(log=True)); the generator never uses it
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise ModelNotAvailableError(
                "stylegan2-pytorch's training logger needs the package aim, which is not "
                "installed (cfmodules imports only the generator). pip install aim to log.")

    module.Session = Session  # type: ignore[attr-defined]
    return module


# ---------------------------------------------------------------------------- the model
class StyleGAN2Generator(nn.Module):
    """Mapping network + synthesis network, as the package samples them.

    ``forward(z, noise)`` (or ``forward(z, z_mix, noise)`` with ``mix_at``): ``w = S(z)``,
    truncated towards ``w_avg`` by ``trunc_psi`` (1: none), broadcast to every block; with
    ``mix_at``, blocks ``mix_at ..`` take ``S(z_mix)``. ``noise`` is ``(N, S, S, 1)`` in
    [0, 1] (the package's ``image_noise``). Returns images ``(N, 3, S, S)``, which the
    package clamps to [0, 1] when it saves them.
    """

    def __init__(self, S: nn.Module, G: nn.Module, trunc_psi: float = 1.0,
                 mix_at: int | None = None):
        super().__init__()
        self.S, self.G = S, G
        self.num_layers = int(G.num_layers)
        self.latent_dim = int(G.latent_dim)
        self.image_size = int(G.image_size)
        self.trunc_psi = float(trunc_psi)
        self.mix_at = None if mix_at is None else int(mix_at)
        self.register_buffer("w_avg", torch.zeros(1, self.latent_dim))
        self.layer = block_layers(self, self.num_layers // 2)[3]
        """The default layer of :func:`cfmodules.analyze`: the features of the middle block."""

    def _w(self, z: torch.Tensor) -> torch.Tensor:
        w = self.S(z)
        if self.trunc_psi != 1.0:
            w = self.trunc_psi * (w - self.w_avg) + self.w_avg
        return w

    def forward(self, z: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        noise = rest[-1]
        w = self._w(z)
        if self.mix_at is None:
            styles = w[:, None, :].expand(-1, self.num_layers, -1)
        else:
            w2 = self._w(rest[0])
            styles = torch.cat([w[:, None, :].expand(-1, self.mix_at, -1),
                                w2[:, None, :].expand(-1, self.num_layers - self.mix_at, -1)],
                               dim=1)
        return self.G(styles, noise)


def _check_config(image_size: Any, network_capacity: Any, latent_dim: Any, style_depth: Any
                  ) -> tuple[int, int, int, int]:
    size = checks.integer(image_size, "image_size", low=8)
    if size & (size - 1):
        raise ConfigError(f"StyleGAN2's image_size must be a power of 2 (>= 8), got {size}.")
    return (size, checks.integer(network_capacity, "network_capacity", low=1),
            checks.integer(latent_dim, "latent_dim", low=1),
            checks.integer(style_depth, "style_depth", low=1))


def _build(size: int, capacity: int, latent_dim: int, style_depth: int, fmap_max: int,
           attn_layers: tuple[int, ...], no_const: bool, lr_mlp: float, transparent: bool
           ) -> tuple[nn.Module, nn.Module]:
    sg = package()
    S = sg.StyleVectorizer(latent_dim, style_depth, lr_mul=lr_mlp)
    G = sg.Generator(size, latent_dim, capacity, transparent=transparent,
                     attn_layers=list(attn_layers), no_const=no_const, fmap_max=fmap_max)
    return S, G


def random_generator(
    image_size: int = 64,
    network_capacity: int = 16,
    latent_dim: int = 512,
    style_depth: int = 8,
    *,
    fmap_max: int = 512,
    attn_layers: tuple[int, ...] = (),
    seed: int = 0,
    noise_strength: float = 0.3,
) -> tuple[nn.Module, nn.Module]:
    """``(S, G)``: the package's mapping and synthesis networks with random weights.

    Initialised as the package's ``StyleGAN2._init_weights`` does, except the noise
    weights (``to_noise1``, ``to_noise2``), which the package sets to zero and training
    grows: here they are ``N(0, noise_strength^2)``, so that the per-pixel noise takes
    part as in a trained model. The global torch RNG is left untouched.
    """
    size, capacity, latent_dim, style_depth = _check_config(
        image_size, network_capacity, latent_dim, style_depth)
    strength = checks.real(noise_strength, "noise_strength", low=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(checks.seed(seed))
        S, G = _build(size, capacity, latent_dim, style_depth, fmap_max, tuple(attn_layers),
                      False, 0.1, False)
        with torch.no_grad():
            for m in (*S.modules(), *G.modules()):
                if type(m) in (nn.Conv2d, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in",
                                            nonlinearity="leaky_relu")
            for block in G.blocks:
                for lin in (block.to_noise1, block.to_noise2):
                    lin.weight.normal_(0.0, strength)
                    lin.bias.zero_()
    return S.eval(), G.eval()


def from_checkpoint(
    path: str | Path,
    image_size: int | None = None,
    network_capacity: int | None = None,
    ema: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """``(S, G)`` from a checkpoint of the package's ``Trainer`` (``model_<n>.pt``).

    The file holds ``{'GAN': StyleGAN2.state_dict(), 'version': ...}``; it is read with
    ``torch.load(weights_only=True)`` (a file holding anything but tensors and plain
    containers is refused, nothing in it executes). The architecture comes from the
    trainer's ``.config.json`` beside the file (``image_size``, ``network_capacity``,
    ``fmap_max``, ``attn_layers``, ``no_const``, ``lr_mlp``, ``transparent``); arguments
    given here must agree with it. ``latent_dim`` and ``style_depth`` are read from the
    mapping network's tensors. ``ema=True`` takes the moving averages ``SE``/``GE`` (what
    the package samples with), else ``S``/``G``. The tensors must fit exactly.

    Raises
    ------
    ModelNotAvailableError
        If the file does not exist.
    CheckpointError
        If it is not a trainer checkpoint, holds pickled objects, or does not fit the
        architecture (another image size or capacity).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} not found: give the path of a checkpoint written by stylegan2-pytorch's "
            "trainer, e.g. models/default/model_10.pt.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error of any kind: refused, nothing ran
        raise CheckpointError(
            f"{path} cannot be read as a weights-only checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). cfmodules loads weights with "
            "torch.load(weights_only=True) and never unpickles objects.") from None
    state = data.get("GAN") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is not a stylegan2-pytorch checkpoint: expected a dict with the key 'GAN' "
            "holding the StyleGAN2 state dict (as Trainer.save writes).")
    config = _trainer_config(path)
    for key, given in (("image_size", image_size), ("network_capacity", network_capacity)):
        if given is not None and key in config and int(config[key]) != int(given):
            raise CheckpointError(
                f"{path}: its .config.json says {key}={config[key]}, but {key}={given} was "
                "asked for. Leave it out to use the checkpoint's.")
    size = image_size if image_size is not None else config.get("image_size")
    capacity = network_capacity if network_capacity is not None else config.get(
        "network_capacity", 16)
    if size is None:
        raise CheckpointError(
            f"{path} has no .config.json beside it; pass image_size= (and network_capacity=) "
            "as the checkpoint was trained with.")
    s_key, g_key = ("SE.", "GE.") if ema else ("S.", "G.")
    mapping = sorted(k for k in state if k.startswith(s_key) and k.endswith(".weight"))
    if not mapping:
        raise CheckpointError(f"{path} holds no '{s_key}' mapping network tensors.")
    latent_dim = int(state[mapping[0]].shape[1])
    size, capacity, latent_dim, depth = _check_config(size, capacity, latent_dim, len(mapping))
    S, G = _build(size, capacity, latent_dim, depth, int(config.get("fmap_max", 512)),
                  tuple(config.get("attn_layers", ())), bool(config.get("no_const", False)),
                  float(config.get("lr_mlp", 0.1)), bool(config.get("transparent", False)))
    for module, prefix in ((S, s_key), (G, g_key)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()
            raise CheckpointError(
                f"{path} does not fit a StyleGAN2 of image_size={size}, "
                f"network_capacity={capacity}, latent_dim={latent_dim}: "
                f"{' '.join(first[:3])[:400]}") from None
    return S.eval(), G.eval()


def _trainer_config(path: Path) -> dict[str, Any]:
    """The trainer's ``.config.json`` beside ``path`` ({} if there is none)."""
    file = path.parent / ".config.json"
    return read_json_config(file) if file.is_file() else {}


# ---------------------------------------------------------------------------- the adapter
def _prior(latent_dim: int, size: int, mixed: bool):
    def prior(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        zs = [torch.randn(n, latent_dim, generator=generator) for _ in range(2 if mixed else 1)]
        noise = torch.rand(n, size, size, 1, generator=generator)  # the package's image_noise
        return (*zs, noise)
    return prior


def mean_w(S: nn.Module, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """The mean of ``S(z)`` over ``n`` draws of ``z`` (the trainer's ``av``), ``(1, latent_dim)``."""
    latent_dim = S.net[0].weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=g)
    device = next(S.parameters()).device
    with torch.no_grad():
        return torch.cat([S(c.to(device)) for c in z.split(256)]).mean(0, keepdim=True)


def stylegan2_adapter(
    S: nn.Module,
    G: nn.Module,
    *,
    trunc_psi: float = 1.0,
    mix_at: int | None = None,
    output_range: tuple[float, float] | None = None,
    device: str | torch.device | None = None,
    name: str = "stylegan2",
) -> GeneratorAdapter:
    """Wrap the package's mapping ``S`` and synthesis ``G`` networks in a GeneratorAdapter.

    Parameters
    ----------
    S, G : nn.Module
        ``StyleVectorizer`` and ``Generator`` (random, a checkpoint's, or your own).
    trunc_psi : float in (0, 1]
        Truncation towards the mean ``w`` (1: none; the trainer samples with 0.6).
    mix_at : int, optional
        Style mixing: blocks ``mix_at ..`` take the style of a second ``z`` (in the latent).
    output_range : (float, float), optional
        Display range; default (0, 1), the range the package clamps its images to.
    device, name : as for GeneratorAdapter.

    Returns
    -------
    GeneratorAdapter
        Latent ``(z (N, latent_dim), noise (N, S, S, 1))`` (``(z, z_mix, noise)`` with
        ``mix_at``); images ``(N, 3, S, S)``.
    """
    from cfmodules.adapter import GeneratorAdapter

    psi = checks.real(trunc_psi, "trunc_psi", low=0, high=1, low_open=True)
    layers = int(G.num_layers)
    if mix_at is not None:
        mix_at = checks.integer(mix_at, "mix_at", low=1, high=layers)
    model = StyleGAN2Generator(S, G, psi, mix_at)
    if psi != 1.0:
        model.w_avg.copy_(mean_w(S))
    if device is not None:
        model.to(device)
    size, dim = model.image_size, model.latent_dim
    shapes = ((dim,), (dim,), (size, size, 1)) if mix_at is not None else ((dim,), (size, size, 1))
    return GeneratorAdapter(model, latent_shape=shapes, prior=_prior(dim, size, mix_at is not None),
                            output_range=output_range or (0.0, 1.0), device=device, name=name)


def load(
    device: str | torch.device | None = None,
    image_size: int | None = None,
    network_capacity: int | None = None,
    checkpoint: str | Path | None = None,
    *,
    latent_dim: int = 512,
    style_depth: int = 8,
    seed: int = 0,
    trunc_psi: float = 1.0,
    mix_at: int | None = None,
    ema: bool = True,
) -> GeneratorAdapter:
    """Zoo entry ``stylegan2``: random weights (``seed``), or a trainer ``checkpoint``.

    Random weights default to ``image_size=64``, ``network_capacity=16`` (the package's
    default capacity), ``latent_dim=512``, ``style_depth=8``. Their images have no fixed
    range, so the display range is set from 8 samples (1st and 99th percentiles);
    a checkpoint's images are shown in [0, 1] as the package saves them.
    """
    if checkpoint is not None:
        S, G = from_checkpoint(checkpoint, image_size, network_capacity, ema)
        return stylegan2_adapter(S, G, trunc_psi=trunc_psi, mix_at=mix_at, device=device,
                                 name=f"stylegan2-{Path(checkpoint).stem}")
    S, G = random_generator(64 if image_size is None else image_size,
                            16 if network_capacity is None else network_capacity,
                            latent_dim, style_depth, seed=seed)
    adapter = stylegan2_adapter(S, G, trunc_psi=trunc_psi, mix_at=mix_at, device=device,
                                name="stylegan2")
    calibrate_display(adapter)
    return adapter


def block_layers(model: nn.Module, block: int) -> tuple[str, str, str, str]:
    """``(conv1, activation:0, conv2, activation:1)`` of block ``block`` (from 0).

    ``model`` is a :class:`StyleGAN2Generator` (``adapter.generator``).
    """
    n = len(model.G.blocks)
    block = checks.integer(block, "block", low=0, high=n)
    p = f"G.blocks.{block}"
    return f"{p}.conv1", f"{p}.activation:0", f"{p}.conv2", f"{p}.activation:1"
