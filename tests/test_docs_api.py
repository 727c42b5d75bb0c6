"""docs/api.md names only things that exist: every module, function, class and method
it mentions imports (the reference cannot drift from the code unnoticed)."""

from __future__ import annotations

import builtins
import importlib
import inspect
import keyword
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
_SECTION = re.compile(r"^## .*`(cfmodules(?:\.\w+)*)`", re.M)
_INDEX = re.compile(r"^(cfmodules(?:\.\w+)*)\s{2,}(.+)$", re.M)
_CALL = re.compile(r"`(?:(cfmodules(?:\.\w+)+)\.)?([A-Za-z_]\w*)\(")  # `name(` or `mod.name(`
_CLASS = re.compile(r"`([A-Z]\w+)`")
_SKIP = {"main"}  # `cfmodules` the command's own words, not Python names


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
    names = _namespace(module_name)
    for other, _ in _sections():  # a class may be named in another module's section
        names.update({n: v for n, v in _namespace(other).items() if inspect.isclass(v)})
    missing = []
    for qualified, name in _CALL.findall(body):
        if name in _SKIP or name in dir(builtins) or keyword.iskeyword(name):
            continue
        if qualified:
            if not hasattr(importlib.import_module(qualified), name):
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
