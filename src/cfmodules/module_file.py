"""Modules as a small JSON file: which channels, of which layers, of which model.

The explorer downloads a selection in this format, ``cfmodules hybrids --modules FILE``
reads it (as well as a ``results.npz``), and each module in it is what
:func:`cfmodules.hybridize` takes::

    {
      "kind": "cfmodules-modules",
      "version": "0.1.0",
      "model": "dcgan-faces",
      "model_spec": "dcgan-faces",
      "model_options": {},
      "layer_channels": {"main.8": 128},
      "modules": {"selection": {"main.8": [3, 17, 42]}}
    }

>>> mf = ModuleFile.load("selection.json")
>>> hybrids = hybridize(adapter, z1, z2, mf.modules["selection"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfmodules.errors import ConfigError, ResultFileError

__all__ = ["ModuleFile", "KIND"]

KIND = "cfmodules-modules"


def _channels(layer: Any, chans: Any, where: str) -> list[int]:
    if not isinstance(layer, str) or not layer:
        raise ResultFileError(f"{where}: layer names must be strings, got {layer!r}.")
    if not isinstance(chans, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chans):
        raise ResultFileError(f"{where}: the channels of layer '{layer}' must be a list of "
                              f"non-negative integers, got {chans!r}.")
    return sorted(set(chans))


@dataclass
class ModuleFile:
    """Named modules of one model, with what is needed to load that model again.

    Attributes
    ----------
    modules : dict name -> dict layer -> list of int
        Each value is a module as :func:`cfmodules.hybridize` takes it.
    model : str
        The model's name.
    model_spec : str
        How to load it: a zoo name or ``path/to/file.py:factory``.
    model_options : dict
        E.g. ``{"latent_shape": "100,1,1"}`` for a factory returning an ``nn.Module``.
    layer_channels : dict layer -> int
        Channels of each layer in the model the modules were found in (checked on load).
    """

    modules: dict[str, dict[str, list[int]]]
    model: str
    model_spec: str
    model_options: dict[str, Any] = field(default_factory=dict)
    layer_channels: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Module names, in file order."""
        return list(self.modules)

    @classmethod
    def from_result(cls, result: Any) -> ModuleFile:
        """The modules of an :class:`~cfmodules.analysis.AnalysisResult`."""
        counts = {}
        for layer in result.layers:
            rows = result.unit_layer == layer
            counts[layer] = int(result.unit_channel[rows].max()) + 1
        return cls(modules=dict(zip(result.module_names, result.modules)),
                   model=result.model, model_spec=result.model_spec,
                   model_options=dict(result.model_options), layer_channels=counts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON content."""
        from cfmodules import __version__

        return {"kind": KIND, "version": __version__, "model": self.model,
                "model_spec": self.model_spec, "model_options": dict(self.model_options),
                "layer_channels": dict(self.layer_channels),
                "modules": {n: {la: list(map(int, ch)) for la, ch in m.items()}
                            for n, m in self.modules.items()}}

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (temp file + rename); returns the path."""
        from cfmodules.files import atomic_write

        return atomic_write(path, self.to_json().encode("utf-8"))

    @classmethod
    def from_dict(cls, data: Any, where: str = "module file") -> ModuleFile:
        """Validate parsed JSON (raises ResultFileError saying what is wrong)."""
        if not isinstance(data, Mapping) or data.get("kind") != KIND:
            raise ResultFileError(f"{where} is not a cfmodules module file (it needs "
                                  f"\"kind\": \"{KIND}\"); write one with the explorer's "
                                  "'Download module' or ModuleFile.save.")
        modules = data.get("modules")
        if not isinstance(modules, Mapping) or not modules:
            raise ResultFileError(f"{where}: \"modules\" must map names to modules, e.g. "
                                  "{\"selection\": {\"main.8\": [3, 17]}}.")
        out: dict[str, dict[str, list[int]]] = {}
        for name, module in modules.items():
            if not isinstance(module, Mapping):
                raise ResultFileError(f"{where}: module '{name}' must map layer names to "
                                      f"channel lists, got {module!r}.")
            out[str(name)] = {la: _channels(la, ch, where) for la, ch in module.items()}
        counts = data.get("layer_channels", {})
        if not isinstance(counts, Mapping) or not all(
                isinstance(v, int) and v > 0 for v in counts.values()):
            raise ResultFileError(f"{where}: \"layer_channels\" must map layers to positive "
                                  f"channel counts, got {counts!r}.")
        spec = data.get("model_spec", data.get("model"))
        if not isinstance(spec, str) or not spec:
            raise ResultFileError(f"{where}: \"model_spec\" (the model to load) is missing.")
        options = data.get("model_options", {})
        if not isinstance(options, Mapping):
            raise ResultFileError(f"{where}: \"model_options\" must be an object.")
        return cls(modules=out, model=str(data.get("model", spec)), model_spec=spec,
                   model_options=dict(options), layer_channels=dict(counts))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModuleFile:
        """Read a file written by :meth:`save` (or by the explorer)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ResultFileError(f"Cannot read the module file '{path}': "
                                  f"{e.strerror or e}.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultFileError(f"'{path}' is not valid JSON ({e.msg}, line {e.lineno}).") \
                from None
        return cls.from_dict(data, f"'{path}'")

    def check_model(self, adapter: Any, spec: str | None = None) -> None:
        """Raise ConfigError unless ``adapter`` has the layers and channel counts recorded."""
        from cfmodules.hooks import resolve_layers

        layers = sorted({la for m in self.modules.values() for la in m} | set(self.layer_channels))
        resolve_layers(adapter.generator, layers)
        for layer, n in self.layer_channels.items():
            have = adapter.layer_channels(layer)
            if have != n:
                raise ConfigError(f"The modules have {n} channels in layer '{layer}', but "
                                  f"{spec or adapter.name} has {have} there: not the same model.")
        for name, module in self.modules.items():
            for layer, chans in module.items():
                have = adapter.layer_channels(layer)
                if chans and max(chans) >= have:
                    raise ConfigError(f"Module '{name}' names channel {max(chans)} of layer "
                                      f"'{layer}', which has {have} channels.")
