"""docs/api.md names only things that exist: every module, function, class and method
it mentions imports (the reference cannot drift from the code unnoticed)."""

from __future__ import annotations

import builtins
import functools
import importlib
import inspect
import keyword
import pkgutil
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
_SECTION = re.compile(r"^## .*`(cfmodules(?:\.\w+)*)`", re.M)
_INDEX = re.compile(r"^(cfmodules(?:\.\w+)*)\s{2,}(.+)$", re.M)
_CALL = re.compile(r"`(?:(cfmodules(?:\.\w+)+)\.)?([A-Za-z_]\w*)\(")  # `name(` or `mod.name(`
_CLASS = re.compile(r"`([A-Z]\w+)`")
_SKIP = {"main"}  # `cfmodules` the command's own words, not Python names


@functools.lru_cache(maxsize=1)
def _all_classes() -> dict[str, object]:
    """Every public class of every cfmodules module."""
    import cfmodules

    out: dict[str, object] = {}
    for info in pkgutil.walk_packages(cfmodules.__path__, "cfmodules."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # an optional dependency that is not installed
            continue
        out.update({n: v for n, v in vars(mod).items()
                    if inspect.isclass(v) and not n.startswith("_")})
    return out


def _resolves(dotted: str) -> bool:
    """Whether ``cfmodules.a.B.c`` names something: the longest importable module, then
    attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _sections() -> list[tuple[str, str]]:
    text = API.read_text()
    heads = list(_SECTION.finditer(text))
    return [(m.group(1), text[m.end():heads[i + 1].start() if i + 1 < len(heads) else None])
            for i, m in enumerate(heads)]


def _namespace(module_name: str) -> dict[str, object]:
    """What a section may name: the module's attributes and those of its public classes
    (a section about a class, ``cfmodules.GeneratorAdapter``, names its methods)."""
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError:
        parent, _, attr = module_name.rpartition(".")
        mod = importlib.import_module(parent)
        assert hasattr(mod, attr), f"docs/api.md has a section on {module_name}, which is missing"
    names: dict[str, object] = {n: getattr(mod, n) for n in dir(mod)}
    for value in list(names.values()):
        if inspect.isclass(value) and value.__module__.startswith("cfmodules"):
            names.update({n: getattr(value, n) for n in dir(value)})
            try:  # constructor arguments that are callables, e.g. forward(generator, z)
                names.update(dict.fromkeys(inspect.signature(value).parameters))
            except (TypeError, ValueError):
                pass
    return names


def test_every_module_and_name_of_the_index_imports():
    index = API.read_text().split("```", 2)[1]
    rows = _INDEX.findall(index)
    assert rows, "the module index of docs/api.md was not found"
    for module_name, listed in rows:
        mod = importlib.import_module(module_name)
        for name in re.findall(r"\b([A-Za-z_]\w*)\b", listed.split("(")[0]):
            if name in {"plot_", "figures", "the", "file", "format", "command", "sampling",
                        "and", "pairing"}:
                continue
            assert hasattr(mod, name), f"docs/api.md lists {module_name}.{name}, which is missing"


@pytest.mark.parametrize("module_name, body", _sections(), ids=[m for m, _ in _sections()])
def test_every_function_named_in_a_section_exists(module_name, body):
    names = {**_all_classes(), **_namespace(module_name)}  # a class may be named anywhere
    missing = []
    for qualified, name in _CALL.findall(body):
        if name in _SKIP or name in dir(builtins) or keyword.iskeyword(name):
            continue
        if qualified:
            if not _resolves(f"{qualified}.{name}"):
                missing.append(f"{qualified}.{name}")
        elif name not in names and not hasattr(importlib.import_module("cfmodules"), name):
            missing.append(name)
    for cls in _CLASS.findall(body):
        if cls.isupper() or keyword.iskeyword(cls):  # MODEL (a placeholder), None
            continue
        if cls not in names and not hasattr(importlib.import_module("cfmodules.errors"), cls):
            missing.append(cls)
    assert not missing, f"docs/api.md, section {module_name}, names what does not exist: {missing}"


def test_every_zoo_entry_is_documented():
    from cfmodules import zoo

    text = API.read_text()
    undocumented = [name for name in zoo.available() if f"`{name}`" not in text]
    assert not undocumented, f"zoo entries missing from docs/api.md: {undocumented}"
