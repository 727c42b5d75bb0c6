"""The identity of an influence run: fingerprints of everything that decides its numbers.

A checkpoint may only be resumed by the run that wrote it. Besides the settings (units,
seed, block size, dtype, method), the numbers depend on code and state that live in
Python objects:

- the generator: its ``state_dict``, the class of every submodule (module + qualname),
  the code of the user-defined classes' methods (``forward`` and the helpers it calls)
  and the simple attributes a forward may read (``self.gain = 3.0``, a conv's stride);
- the adapter: ``forward``, ``output_transform``, a callable ``prior``, and the methods a
  subclass of :class:`~cfmodules.GeneratorAdapter` overrides.

A function is fingerprinted by its bytecode, constants, default arguments, closure
values and the global names it reads (recursively for user code; library functions such
as ``torch.tanh`` by their qualified name). The bytecode is what runs: editing a factory
file changes it, comments and formatting do not. Values are fingerprinted by content:
numbers, strings, tensors and arrays, containers of them, ``nn.Module`` objects (class
and ``state_dict``), classes and modules by name.

Anything else (a closure over an object of an arbitrary class, say) cannot be checked;
:func:`run_identity` then records *why* instead of a fingerprint, and the checkpoint is
only resumed when the caller says the run is the same (``assume_same=True``, CLI
``--assume-same``).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Unverifiable", "fingerprint", "model_fingerprint", "adapter_fingerprints",
           "UNVERIFIABLE"]

UNVERIFIABLE = "unverifiable"
"""Key of an identity entry that records why a part of the run could not be fingerprinted."""


class Unverifiable(Exception):
    """Raised inside the fingerprinting when a value cannot be checked (internal)."""


def _library_roots() -> tuple[str, ...]:
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(str(Path(__file__).resolve().parents[1]))  # cfmodules itself
    roots.add(str(Path(torch.__file__).resolve().parent))
    return tuple(str(Path(r).resolve()) for r in roots if r)


@functools.lru_cache(maxsize=1)
def _roots() -> tuple[str, ...]:
    return _library_roots()


def _is_library(obj: Any) -> bool:
    """Whether ``obj`` (a function or class) comes from an installed library or the stdlib."""
    name = getattr(obj, "__module__", None) or ""
    if name.split(".")[0] in ("builtins", "torch", "numpy", "cfmodules", "math", "functools",
                              "operator"):
        return True
    code = getattr(obj, "__code__", None)
    file = code.co_filename if code is not None else getattr(
        sys.modules.get(name), "__file__", None)
    if not file or file.startswith("<"):
        return False  # typed in a REPL or a notebook cell: user code
    try:
        path = str(Path(file).resolve())
    except OSError:
        return False
    return path.startswith(_roots())


def _qualname(obj: Any) -> str:
    """``module.qualname`` for library code; the qualname alone for user code, whose module
    name may change from process to process (a file imported by path) and whose code is
    fingerprinted anyway."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    if isinstance(obj, types.ModuleType):
        return f"module:{obj.__name__}"
    return f"{getattr(obj, '__module__', '?')}.{name}" if _is_library(obj) else name


class _Hasher:
    """Feeds values into one SHA-256, recursing through user code; cycles are cut."""

    def __init__(self, owner: Any = None) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.owner = owner  # the adapter: its own methods are fingerprinted by their code

    def tag(self, text: str) -> None:
        self.h.update(text.encode())
        self.h.update(b"\0")

    def value(self, v: Any, where: str) -> None:
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            self.tag(f"{type(v).__name__}:{v!r}")
            return
        if isinstance(v, (torch.dtype, torch.device, torch.Size, range, slice)):
            self.tag(repr(v))
            return
        if v is not None and v is self.owner:  # e.g. forward = self.my_forward
            self.tag("owner")
            return
        key = id(v)
        if key in self.seen:  # a cycle, or the same object twice: its position suffices
            self.tag(f"seen:{self.seen[key]}")
            return
        self.seen[key] = len(self.seen)
        if isinstance(v, torch.Tensor):
            self.tensor(v)
        elif isinstance(v, np.ndarray):
            if v.dtype == object:
                raise Unverifiable(f"{where} is an object array")
            self.tag(f"ndarray:{v.dtype.str}:{v.shape}")
            self.h.update(np.ascontiguousarray(v).tobytes())
        elif isinstance(v, np.generic):
            self.tag(f"np:{v.dtype.str}:{v!r}")
        elif isinstance(v, (tuple, list, set, frozenset)):
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            self.tag(f"{type(v).__name__}:{len(items)}")
            for i, item in enumerate(items):
                self.value(item, f"{where}[{i}]")
        elif isinstance(v, dict):
            self.tag(f"dict:{len(v)}")
            for k in sorted(v, key=repr):
                self.value(k, f"{where} key")
                self.value(v[k], f"{where}[{k!r}]")
        elif isinstance(v, nn.Module):
            self.module(v, where)
        elif isinstance(v, functools.partial):
            self.tag("partial")
            self.value(v.func, f"{where}.func")
            self.value(v.args, f"{where}.args")
            self.value(v.keywords, f"{where}.keywords")
        elif isinstance(v, types.MethodType):
            self.tag("method")
            self.function(v.__func__, where)
            self.value(v.__self__, f"{where}.__self__")
        elif isinstance(v, types.FunctionType):
            self.function(v, where)
        elif isinstance(v, (types.BuiltinFunctionType, types.ModuleType)) or (
                callable(v) and _is_library(v) and not isinstance(v, type)
                and hasattr(v, "__qualname__")):
            self.tag(f"lib:{getattr(v, '__name__', '')}:{_qualname(v)}")
        elif isinstance(v, type):
            self.cls(v, where)
        elif isinstance(v, torch.Generator):
            self.tag("torch.Generator")
            self.tensor(v.get_state())
        else:
            raise Unverifiable(
                f"{where} is an object of type {type(v).__module__}.{type(v).__qualname__}, "
                "whose effect on the numbers cfmodules cannot check")

    def tensor(self, t: torch.Tensor) -> None:
        if t.is_meta:
            raise Unverifiable("a meta tensor has no values")
        self.tag(f"tensor:{t.dtype}:{tuple(t.shape)}")
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self.h.update(flat.view(torch.uint8).numpy().tobytes())

    def code(self, co: types.CodeType, where: str) -> None:
        self.tag(f"code:{co.co_name}:{co.co_argcount}:{co.co_kwonlyargcount}:{co.co_flags}")
        self.h.update(co.co_code)
        self.tag(repr((co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars)))
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c, where)
            else:
                self.value(c, f"a constant of {where}")

    def function(self, fn: types.FunctionType, where: str) -> None:
        name = getattr(fn, "__qualname__", "function")
        library = _is_library(fn)
        if library:  # its code is the installed version's; what it closes over may differ
            self.tag(f"lib:{_qualname(fn)}")
        else:
            self.tag(f"function:{name}")
            self.code(fn.__code__, f"{where} ({name})")
        if not library:  # (a library's defaults may be sentinels; they do not vary)
            self.value(fn.__defaults__, f"a default argument of {name}")
            self.value(fn.__kwdefaults__, f"a default argument of {name}")
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (recursion not yet bound)
                content = None
            self.value(content, f"the variable '{var}' that {name} closes over")
        if library:
            return
        g = fn.__globals__
        for gname in _global_names(fn.__code__):
            if gname in g:  # (other names are attributes or builtins)
                self.tag(f"global:{gname}")
                self.value(g[gname], f"the global '{gname}' that {name} reads")

    def cls(self, c: type, where: str) -> None:
        self.tag(f"class:{_qualname(c)}")
        if _is_library(c):
            return
        for base in c.__mro__:
            if base is object or _is_library(base):
                continue
            self.tag(f"base:{_qualname(base)}")
            for attr, member in sorted(vars(base).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if isinstance(member, types.FunctionType):
                    self.tag(f"member:{attr}")
                    self.function(member, f"{where}: {base.__qualname__}.{attr}")

    def module(self, m: nn.Module, where: str) -> None:
        self.tag(f"nn.Module:{_qualname(type(m))}")
        self.tag(model_fingerprint(m))
        for name, sub in m.named_modules():
            self.tag(f"sub:{name}:{_qualname(type(sub))}")
            self.cls(type(sub), f"{where}.{name}" if name else where)
            for attr, val in sorted(vars(sub).items()):
                if attr.startswith("_") or attr == "training":
                    continue
                if isinstance(val, (nn.Module, torch.Tensor)):
                    continue  # submodules and registered state: covered above
                try:
                    sub_h = _Hasher()
                    sub_h.value(val, f"{where}.{name}.{attr}")
                except Unverifiable:
                    continue  # not a simple value: its effect shows in the code it calls
                self.tag(f"attr:{attr}:{sub_h.h.hexdigest()}")

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def _global_names(co: types.CodeType) -> list[str]:
    """Names a code object (and the code objects nested in it) may read as globals."""
    names = list(co.co_names)
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            names += _global_names(c)
    return sorted(set(names))


def fingerprint(value: Any, what: str, owner: Any = None) -> str:
    """SHA-256 (hex, 16 chars) of ``value``: code, constants, closures, tensors by content.

    ``owner`` (the adapter) counts as known: a method bound to it is fingerprinted by its
    code (the adapter's class is fingerprinted on its own).

    Raises
    ------
    Unverifiable
        Naming what ``what`` holds that cannot be checked.
    """
    h = _Hasher(owner)
    h.value(value, what)
    return h.hexdigest()


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of a module's state_dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def adapter_fingerprints(adapter: Any) -> dict[str, Any]:
    """Identity entries for the generator and the adapter's code.

    Returns
    -------
    dict
        ``{"generator": fp, "forward": fp, "output_transform": fp, "prior": fp,
        "noise": fp, "adapter_class": fp}``; an entry that cannot be fingerprinted is
        ``{"unverifiable": "why"}`` instead.
    """
    from cfmodules.adapter import GeneratorAdapter

    parts: dict[str, tuple[Any, str]] = {
        "generator": (adapter.generator, "the generator"),
        "forward": (adapter.forward_fn, "the adapter's forward"),
        "output_transform": (adapter.output_transform, "the adapter's output_transform"),
        "prior": (adapter.prior, "the adapter's prior"),
        "noise": (getattr(adapter, "noise", None), "the adapter's noise setting"),
        "adapter_class": (_subclasses(type(adapter), GeneratorAdapter),
                          f"the methods of {type(adapter).__qualname__}"),
    }
    step = getattr(adapter, "step", None)  # a DiffusionAdapter's own step function
    if callable(step) and not hasattr(step, "settings"):  # diffusers' steps: by settings
        parts["sampler_step"] = (step, "the diffusion sampler's step function")
    out: dict[str, Any] = {}
    for key, (value, what) in parts.items():
        try:
            out[key] = fingerprint(value, what, owner=adapter)
        except Unverifiable as e:
            out[key] = {UNVERIFIABLE: str(e)}
        except RecursionError:
            out[key] = {UNVERIFIABLE: f"{what} is nested too deeply to fingerprint"}
    return out


def _subclasses(cls: type, base: type) -> list[type]:
    """The classes between ``cls`` and ``base`` (a subclass's overrides), by name and code."""
    return [k for k in cls.__mro__ if issubclass(k, base) and k is not base]
