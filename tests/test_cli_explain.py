"""``cfmodules explain MODEL --layer L``: what cfmodules.explain says, on the command line."""

from __future__ import annotations

from cfmodules.engine import explain
from cfmodules.zoo import load
from report_helpers import factory_file
from test_cli import one_line_error, run


def test_explain_prints_the_adapters_explanation(capsys):
    code, out, err = run(capsys, "explain", "planted-conv", "--layer", "main.3")
    assert code == 0, err
    expected = str(explain(load("planted-conv"), "main.3"))
    assert out.strip() == expected.strip()
    first = out.splitlines()[0]
    assert first.startswith("layer main.3: path ")
    assert "MFLOP" in out and "batch shape:" in out and "tried graph capture" in out


def test_explain_with_algorithm_hook_and_a_factory_model(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", "planted-conv", "--layer", "main.3",
                       "--algorithm", "hook")
    assert code == 0 and "path hook" in out and "at most 1.00x" in out
    path = factory_file(tmp_path)
    code, out, err = run(capsys, "explain", f"{path}:make_module", "--latent-shape", "4,1,1",
                         "--layer", "1")
    assert code == 0, err
    assert out.splitlines()[0].startswith("layer 1: path ")
    assert "graph of the forward" in out.splitlines()[0]


def test_explain_bad_layer_and_missing_layer_are_one_line_errors(capsys):
    code, _, err = run(capsys, "explain", "planted-conv", "--layer", "main.99")
    one_line_error(code, err, "main.99", "not found", "cfmodules layers")
    code, _, err = run(capsys, "explain", "planted-conv")
    one_line_error(code, err, "--layer")
    code, _, err = run(capsys, "explain", "planted-conv", "--layer", "main.3",
                       "--algorithm", "fast")
    one_line_error(code, err, "--algorithm")
