"""The direction of imports that docs/architecture.md draws, enforced.

Every ``import`` of a cfmodules module is read from the source (also the ones inside
functions, which run later but still tie the layers together; only ``if TYPE_CHECKING:``
blocks are left out), and each module may import only from its own layer or below.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# low to high; a module imports only from its own layer or a lower one
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "_lazy", "names", "checks", "files", "results",
                    "__version__", "native",  # native: builds the C kernels
                    "display", "images"}),  # notebook display and image grids
    ("latents and hooks", {"latents", "hooks", "noise", "channels", "layers"}),
    ("adapter", {"adapter"}),
    ("engine", {"engine", "samplers"}),  # samplers: sampling chains, window swaps
    ("modules, hybrids, ground truth", {"modules", "hybrid", "synthetic", "module_file"}),
    ("influence", {"influence"}),
    ("analysis, evaluation, zoo", {"analysis", "analysis_result", "evaluation", "zoo", "scan",
                                   "monitor", "window_analysis"}),
    ("faces", {"models", "plots", "report", "cli", "explorer", "__main__",
               "evaluation.plots"}),
]


DISPLAY_HOOKS = {"_html_figures", "_repr_html_"}

ALLOWED_UPWARD: set[tuple[str, str]] = set()  # none: say why in docs/architecture.md first


def _unit(module: str) -> str:
    """``cfmodules.influence.maps`` -> ``influence``; the faces inside a package by name."""
    parts = module.split(".")[1:]
    if ".".join(parts[:2]) == "evaluation.plots":
        return "evaluation.plots"
    return parts[0] if parts else ""


def _layer(unit: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if unit in members:
            return i
    raise AssertionError(f"cfmodules.{unit} has no layer in tests/test_architecture.py; "
                         "add it (and to docs/architecture.md)")


def _imports(path: Path, exact: bool = False) -> set[str]:
    """The cfmodules modules ``path`` imports. ``exact``: ``from cfmodules.p import m`` of a
    submodule ``m`` is an arrow to ``cfmodules.p.m`` (else to ``cfmodules.p``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are annotations only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
        # a result's notebook display draws its figures with plots, lazily: the one
        # sanctioned upward import (only a notebook calls it, never the core)
        if isinstance(node, ast.FunctionDef) and node.name in DISPLAY_HOOKS:
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cfmodules":
                out.update(f"cfmodules.{a.name}" for a in node.names)
            elif node.module.startswith("cfmodules.") and exact:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if _file_of(sub) is not None else node.module)
            elif node.module.startswith("cfmodules."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cfmodules."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("cfmodules.") and ":" in node.value:
            out.add(node.value.split(":")[0])  # zoo registry targets
    return out


def _file_of(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((SRC / "cfmodules").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:  # the package root resolves its names lazily
            out.append((".".join(parts), path))
    return out


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_go_down_the_layers(module, path):
    own = _layer(_unit(module))
    upward = [t for t in _imports(path)
              if _unit(t) != _unit(module) and _layer(_unit(t)) > own
              and not (path.name == "__init__.py" and t.startswith(module))
              and (module, t) not in ALLOWED_UPWARD]
    assert not upward, (f"{module} ({LAYERS[own][0]}) imports {upward}, from a higher layer: "
                        "move the code down, or the import up, as docs/architecture.md says")


def test_modules_work_on_arrays_only():
    """modules/ knows nothing of adapters, generators, hooks or torch."""
    for path in (SRC / "cfmodules" / "modules").glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path.name
        units = {_unit(t) for t in _imports(path)} - {"modules"}
        assert units <= LAYERS[0][1], f"modules/{path.name} imports {units - LAYERS[0][1]}"


def test_the_core_imports_no_face():
    faces = LAYERS[-1][1]
    for module, path in _modules():
        if _unit(module) in faces:
            continue
        bad = sorted(t for t in _imports(path) if _unit(t) in faces)
        assert not bad, f"{module} imports the face(s) {bad}"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an upward import in a fake core file is found."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from cfmodules.report import write_report\n")
    assert "cfmodules.report" in _imports(fake)
    typed = tmp_path / "y.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from cfmodules.adapter import GeneratorAdapter\n")
    assert _imports(typed) == set()
    assert _layer("report") > _layer("analysis") > _layer("influence") > _layer("adapter")


IMPORT_COSTS = textwrap.dedent('''
    import sys
    from cfmodules.analysis import AnalysisResult
    result = AnalysisResult.load(sys.argv[1])
    assert result.modules and result.stability is not None
    heavy = sorted({"sklearn", "scipy"} & set(sys.modules))
    assert not heavy, f"reading a result (its modules, its sweep) imported {heavy}"
    import cfmodules, cfmodules.adapter, cfmodules.hybrid, cfmodules.cli
    import cfmodules.modules
    assert "matplotlib" not in sys.modules, "the core imported matplotlib"
    import cfmodules.evaluation.frechet, cfmodules.evaluation.robustness
    import cfmodules.evaluation.plots, cfmodules.plots as p
    assert "matplotlib" not in sys.modules, "a figure module imported matplotlib at import"
    import numpy as np
    p.plot_images(np.zeros((1, 3, 4, 4)))
    assert "matplotlib.pyplot" not in sys.modules, "pyplot used"
    from cfmodules import hybridize, zoo
    from cfmodules.influence import influence_maps, module_influence_maps
    ad = zoo.load("planted-conv")
    influence_maps(ad, "main.3", n_pairs=2, progress=False)
    module_influence_maps(ad, [{"main.3": [0, 1]}], n_pairs=2, progress=False)
    hybridize(ad, ad.sample_latents(2, seed=1), ad.sample_latents(2, seed=2), {"main.3": [0]})
    assert "torch._dynamo" not in sys.modules, "the engine imported dynamo for a traceable model"
    from cfmodules.display import ImageGrid
    ImageGrid.from_images(np.zeros((2, 3, 4, 4)))._repr_html_()  # what show() displays
    assert "torchvision" not in sys.modules, "an image grid imported torchvision (and dynamo)"
''')


def test_imports_that_cost_seconds_are_paid_only_when_used(tmp_path):
    """scikit-learn and scipy (1-3 s) only to cluster, matplotlib (0.6 s) only for figures,
    torch._dynamo (3 s) only for what needs it.

    One fresh process checks them all: reading a result file (what ``cfmodules hybrids``
    and the explorer do) imports neither scikit-learn nor scipy; no core or evaluation
    module imports matplotlib, nor a figure uses pyplot (nothing is shown); and the
    engine's work for a generator that torch.fx traces (influence maps of units and
    modules with the batch-shape probe, hybrids) never imports torch._dynamo, nor does a
    notebook's image grid (importing torchvision would).
    """
    from report_helpers import fake_result

    path = fake_result().save(tmp_path / "r.npz")
    done = subprocess.run([sys.executable, "-c", IMPORT_COSTS, str(path)], capture_output=True,
                          text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _file_graph() -> dict[str, set[str]]:
    """Every file of ``src/cfmodules`` (a package as its ``__init__``) -> the files it imports.

    ``from cfmodules import GeneratorAdapter`` (a lazy name of the root) is an arrow to the
    root package, ``from cfmodules.engine import split`` one to ``engine/__init__.py``.
    """
    files = {}
    for path in sorted((SRC / "cfmodules").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    graph = {}
    for module, path in files.items():
        targets = set()
        for t in _imports(path, exact=True):
            while t not in files:  # a name inside a module: the module that holds it
                t = t.rsplit(".", 1)[0]
            if t != module:
                targets.add(t)
        graph[module] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one file (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles_between_files():
    """Every file a room, every import an arrow (inside functions too): no circle.

    A package's ``__init__`` is a room of its own, so a file that imports its own package's
    ``__init__`` (which imports that file) is a circle too.
    """
    circles = _circles(_file_graph())
    assert not circles, ("import circles (each: files that import each other, directly or "
                         f"round a loop): {circles}; move what both sides need one floor down")


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    graph = _file_graph()
    assert "cfmodules.engine.cut" in graph["cfmodules.engine"]
    assert "cfmodules.adapter" in graph["cfmodules.engine.cut"]
    assert not any(t.startswith("cfmodules.engine") for t in graph["cfmodules.adapter"])


LONG_FILE = 600


def _ceilings() -> dict[str, int]:
    """docs/architecture.md's table of long files: path under src/cfmodules -> ceiling."""
    import re

    text = (SRC.parent / "docs" / "architecture.md").read_text()
    section = text.split("## Files over 600 lines", 1)[1]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\| `([\w/]+\.py)` \| (\d+) \|", section, re.MULTILINE)}


def test_long_files_have_a_reason():
    """No file of src/ over 600 lines without a line in docs/architecture.md saying why, and
    none past the ceiling given there."""
    ceilings = _ceilings()
    root = SRC / "cfmodules"
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        n = len(path.read_text().splitlines())
        if n > LONG_FILE:
            assert rel in ceilings, (f"src/cfmodules/{rel} has {n} lines: split it, or say why "
                                     "it is one file in docs/architecture.md's long-file table")
            assert n <= ceilings[rel], (f"src/cfmodules/{rel} has {n} lines, past the ceiling "
                                        f"{ceilings[rel]} of docs/architecture.md: split it")
    stale = sorted(r for r in ceilings if not (root / r).is_file())
    assert not stale, f"docs/architecture.md lists long files that are gone: {stale}"
