"""The controlled case: robustness analysis flags the shortcut classifier, clears the robust one."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shortcut_detection.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("shortcut_detection", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_world_renders_what_the_latent_says(example):
    import torch

    g = torch.Generator().manual_seed(0)
    z = example.prior(12, g)
    img = example.render_latent(z)
    assert img.shape == (12, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    corner = img[:, :, 0, 0]  # always background
    colour = z[:, 3:6].argmax(1)
    assert (corner.argmax(1) == colour).all()  # red, green, blue backgrounds
    x, y = example.dataset(50, correlated=True, seed=0)
    assert (x[:, :, 0, 0].argmax(1) == y).all()


def test_shortcut_flagged_robust_cleared(example, capsys):
    out = example.main(["--fast"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT shortcut_flagged=(True|False) robust_flagged=(True|False) "
                     r"shortcut_rate=([0-9.]+) robust_rate=([0-9.]+)", last)
    assert m, last
    assert m.group(1) == "True" and m.group(2) == "False"
    assert float(m.group(3)) == pytest.approx(out["shortcut_rate"], abs=1e-3)
    assert out["shortcut_flagged"] and not out["robust_flagged"]
    assert out["shortcut_rate"] < 0.5 < 0.8 < out["robust_rate"]
    assert out["background_is_planted"]  # unsupervised modules = the background stream
    # the other module carries the object: the robust classifier follows Original 2 there
    res = out["result"]
    other = [m for m in res.modules if m != out["background"]][0]
    assert res.rates("robust")["original2"][res.modules.index(other)] > 0.8
