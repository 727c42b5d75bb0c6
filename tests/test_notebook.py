"""The notebook walk-through in examples/ runs top to bottom and shows its pictures inline."""

from __future__ import annotations

import base64
import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
if importlib.util.find_spec("gan_face_generate") is None:
    pytest.skip("the walk-through uses the dcgan-faces zoo model (pip install -e '.[zoo]')",
                allow_module_level=True)

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook_walkthrough.ipynb"


def test_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def _images(output) -> list[bytes]:
    data = output.get("data", {})
    found = []
    if "image/png" in data:
        found.append(base64.b64decode(data["image/png"]))
    html = data.get("text/html", "")
    for part in html.split("data:image/png;base64,")[1:]:
        found.append(base64.b64decode(part.split('"')[0]))
    return found


@pytest.mark.slow
def test_walkthrough_runs_and_shows_templates_and_hybrids(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    src = str(Path(__file__).resolve().parents[1] / "src")  # the kernel imports these sources
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    first = code[0].outputs[-1]
    assert "AnalysisResult" in first["data"]["text/html"]
    assert "Templates of the modules" in first["data"]["text/html"]
    pngs = _images(first)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") and len(p) < 200_000 for p in pngs)
    # every display cell shows at least one picture
    for cell in code[1:6]:
        assert any(_images(o) for o in cell.outputs), cell.source
    assert "<iframe" in code[6].outputs[-1]["data"]["text/html"]
