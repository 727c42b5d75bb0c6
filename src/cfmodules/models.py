"""Load a generator from a spec: a zoo name or ``path/to/file.py:factory``.

The one place that turns what a user names (on the command line, in a results file's
``model_spec``) into a checked :class:`~cfmodules.GeneratorAdapter`: the command line, the
``hybrids`` command and the explorer call :func:`load_model`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from cfmodules import checks
from cfmodules.errors import CfModulesError, ConfigError

__all__ = ["load_model", "load_model_for", "parse_latent_shape", "resolve_device", "split_spec",
           "machine_is_busy", "set_threads"]


def parse_latent_shape(text: str) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """``"100,1,1"`` -> ``(100, 1, 1)``; ``"128;1000"`` -> ``((128,), (1000,))``.

    Dimensions are separated by ``,`` or ``x``; the inputs of a multi-input generator by
    ``;``.
    """
    try:
        shapes = []
        for part in text.split(";"):
            dims = tuple(int(d) for d in part.replace("x", ",").split(",") if d.strip())
            if not dims or any(d < 1 for d in dims):
                raise ValueError
            shapes.append(dims)
    except ValueError:
        raise ConfigError(
            f"--latent-shape must be positive integers separated by commas, e.g. 100,1,1 (and "
            f"';' between the inputs of a multi-input generator, e.g. 128;1000); got {text!r}."
        ) from None
    return shapes[0] if len(shapes) == 1 else tuple(shapes)


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when available, else CPU; any other name is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    checks.device(device, "--device")  # 'auto' is the CLI's own choice
    return device


def split_spec(spec: str) -> tuple[str, str] | None:
    """``"path/file.py:factory"`` -> (path, factory); None for a zoo name (ConfigError for
    a path without a factory)."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, name
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        raise ConfigError(
            f"--model {spec!r}: give a zoo name or path/to/file.py:factory, where factory is a "
            "function of that file returning an nn.Module or a GeneratorAdapter."
        )
    return None


def _call_factory(path: str, name: str, device: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--model: no file '{path}'.")
    if not name.isidentifier():
        raise ConfigError(f"--model: '{name}' is not a function name; use {path}:make_generator.")
    # a name that is the same in every process (hash() of a str is not)
    mod_name = f"_cfmodules_user_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--model: cannot import '{path}' as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == mod_name]
            from cfmodules.errors import did_you_mean

            raise ConfigError(f"--model: '{path}' has no function '{name}'."
                              f"{did_you_mean(name, public)}"
                              + (f" Functions: {', '.join(public[:8])}." if public else ""))
        try:
            takes_device = "device" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes_device = False
        return factory(device=device) if takes_device else factory()
    except CfModulesError:
        raise
    except Exception as e:
        raise ConfigError(f"--model {path}:{name} failed: {type(e).__name__}: "
                          f"{first_line(e)}") from e
    finally:
        sys.path.remove(str(file.resolve().parent))


def load_model(spec: str, device: str = "auto", latent_shape: str | None = None):
    """Load ``spec`` (a zoo name or ``path/to/file.py:factory``) as a GeneratorAdapter.

    Parameters
    ----------
    spec : str
        Zoo name (``cfmodules.zoo.available()``) or ``file.py:factory``. The factory
        returns a GeneratorAdapter, or an nn.Module (then ``latent_shape`` is needed); it
        receives ``device=`` if it has such a parameter.
    device : str, default "auto"
        ``"auto"``: CUDA when available, else CPU.
    latent_shape : str, optional
        For a factory returning an nn.Module, e.g. ``"100,1,1"``.

    Returns
    -------
    GeneratorAdapter
        Checked by one forward pass of a single sample.

    Raises
    ------
    ConfigError, ModelNotAvailableError
    """
    import torch
    from torch import nn

    from cfmodules import zoo
    from cfmodules.adapter import GeneratorAdapter

    dev = resolve_device(device)
    factory = split_spec(spec)
    if factory is None:
        if latent_shape is not None:
            raise ConfigError(f"--latent-shape is for models given as file.py:factory; the zoo "
                              f"model '{spec}' knows its own.")
        adapter = zoo.load(spec, device=dev)
    else:
        obj = _call_factory(*factory, dev)
        if isinstance(obj, GeneratorAdapter):
            if latent_shape is not None:
                raise ConfigError(f"{spec} returned a GeneratorAdapter, which has its own latent "
                                  "shape; drop --latent-shape.")
            adapter = obj
            if device != "auto" and adapter.device != torch.device(dev):
                raise ConfigError(
                    f"{spec} returned an adapter on {adapter.device}, not {dev}; give the "
                    "factory a device parameter (it is then called with device=...).")
        elif isinstance(obj, nn.Module):
            if latent_shape is None:
                raise ConfigError(
                    f"{spec} returned an nn.Module ({type(obj).__name__}); give its per-sample "
                    "latent shape with --latent-shape (e.g. 100,1,1), or return a "
                    "cfmodules.GeneratorAdapter from the factory.")
            shape = parse_latent_shape(latent_shape)
            adapter = GeneratorAdapter(obj.to(dev), shape, device=dev,
                                       name=Path(factory[0]).stem)
        else:
            raise ConfigError(f"{spec} returned {type(obj).__name__}, not an nn.Module or a "
                              "GeneratorAdapter.")
    try:
        adapter.layers_cached()  # one forward of one sample: fail now, not mid-analysis
    except CfModulesError:
        raise
    except Exception as e:
        raise ConfigError(
            f"Running {spec} on one latent of shape {adapter.latent_shape} failed: "
            f"{type(e).__name__}: {first_line(e)}. Check the latent shape (--latent-shape) "
            "or pass forward=/output_transform= to the GeneratorAdapter your factory returns."
        ) from e
    return adapter


def load_model_for(modules: Any, path: str, model: str | None = None, device: str = "auto",
                   latent_shape: str | None = None) -> Any:
    """Load the model of ``modules`` (a ModuleFile read from ``path``) and check it matches.

    ``model`` and ``latent_shape`` override the spec and options recorded in the file.

    Raises
    ------
    ConfigError
        The model cannot be loaded, or lacks the layers or channel counts of the modules.
    """
    spec = model or modules.model_spec
    shape = latent_shape or modules.model_options.get("latent_shape")
    adapter = load_model(spec, device, shape)
    try:
        modules.check_model(adapter, spec)
    except ConfigError as e:
        raise ConfigError(f"'{path}': {e}") from None
    return adapter


def first_line(e: BaseException) -> str:
    """The first line of an error's message (for one-line reports)."""
    text = str(e).strip().splitlines()
    return text[0] if text else ""


# ---------------------------------------------------------------------- threads
def machine_is_busy() -> bool:
    """Whether other work already keeps every usable core busy (1-minute load average).

    Then torch's default of one thread per core makes each operation wait for the slowest
    thread: the influence maps of the default analysis took 12.7-29.8 s with 2 threads and
    3.2-5.2 s with 1 at load 6 on 2 cores (docs/cost.md), with the same numbers.
    """
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return False
    return cores > 1 and load >= cores


def set_threads(threads: int | None, note: str | None = None) -> None:
    """``torch.set_num_threads(threads)``; without ``threads``, one thread on a busy machine.

    ``note``: a prefix (e.g. ``"cfmodules analyze"``) to say so on stderr when the busy
    rule applies (:func:`machine_is_busy`); None: silently. Without ``threads`` on a
    machine with free cores, torch's own default is left.
    """
    if threads is None and not machine_is_busy():
        return
    import torch

    torch.set_num_threads(1 if threads is None else threads)
    if threads is None and note:
        print(f"{note}: the machine is busy (load average {os.getloadavg()[0]:.1f} on "
              f"{len(os.sched_getaffinity(0))} cores): one torch thread, several times faster "
              "than waiting for busy cores; --threads N overrides", file=sys.stderr)
