"""End to end: `cfmodules analyze` on the pretrained DCGAN faces, as a user runs it.

Small settings (8 pairs, two clustering restarts, a k-means stability sweep over two K with
one repetition) keep it under a minute on two CPU cores; every output must exist and load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cfmodules
from cfmodules.analysis import AnalysisResult
from cfmodules.report import FIGURES

pytestmark = pytest.mark.slow


def _command() -> tuple[list[str], dict[str, str]]:
    """The installed `cfmodules` script, else `python -m cfmodules` with src on the path."""
    env = dict(os.environ)
    src = str(Path(cfmodules.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = shutil.which("cfmodules")
    return ([script] if script else [sys.executable, "-m", "cfmodules"]), env


def test_analyze_default_model_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    cmd, env = _command()
    out = tmp_path / "out"
    res = subprocess.run(
        [*cmd, "analyze", "--pairs", "8", "--stability-ks", "2-3", "--stability-repeats", "1",
         "--stability-methods", "kmeans", "--n-init", "2", "--samples", "8", "--hybrids", "4", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"Report:  {out / 'report.html'}" in res.stdout

    # the report: self-contained, one embedded PNG per figure file
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == set(FIGURES) | {f"hybrids_module_{k}" for k in range(3)}
    html = (out / "report.html").read_text()
    assert not re.findall(r'src="(?!data:image/png;base64,)', html)
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "dcgan-faces" in html and "main.8" in html

    # every figure loads as an image
    import matplotlib.image as mpimg

    for p in pngs:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, p.name

    # the numbers: with numpy alone, and with cfmodules
    with np.load(out / "results.npz", allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        assert header["kind"] == "analysis" and header["model_spec"] == "dcgan-faces"
        assert f["maps"].shape == (128, 64, 64) and f["labels"].shape == (128,)
        assert f["templates"].shape == (3, 64, 64)
        assert f["stability_consistency"].shape == (1, 2, 1)
    r = AnalysisResult.load(out / "results.npz")
    assert r.layers == ["main.8"] and r.settings.n_pairs == 8
    assert sorted(r.module_sizes.tolist()) != [0, 0, 128]  # a real partition
    assert np.isfinite(r.maps).all() and (r.maps > 0).any()
    # hybrids differ from both originals (a module changes something, not everything)
    o1 = r.original1.astype(float)
    o2 = r.original2.astype(float)
    for k in range(3):
        hy = r.hybrids[k].astype(float)
        assert 0 < np.abs(hy - o1).mean() < np.abs(o2 - o1).mean()

    # new hybrids from the saved modules, without recomputing maps (in this process: the
    # command line's own process was tested above)
    from cfmodules.cli import main

    assert main(["hybrids", "--modules", str(out / "results.npz"), "--pairs", "4",
                 "--device", "cpu", "--out", str(out / "new.png")]) == 0
    assert mpimg.imread(out / "new.png").ndim == 3
