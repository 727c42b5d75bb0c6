"""The command line: the three commands on small models, and bad command lines.

Every bad command line must end with exactly one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cfmodules
from cfmodules.analysis import AnalysisResult
from cfmodules.cli import main
from cfmodules.errors import ConfigError, LayerNotFoundError
from cfmodules.models import parse_latent_shape
from cfmodules.report import FIGURES
from report_helpers import factory_file

SMALL = ["--pairs", "4", "--stability-ks", "2-3", "--stability-repeats", "1", "--samples", "4",
         "--hybrids", "3", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    assert main(["analyze", "--model", "planted-conv", "--out", str(out), *SMALL]) == 0
    return out


# ---------------------------------------------------------------------- layers
def test_layers_lists_shapes_and_marks_the_default(capsys):
    code, out, _ = run(capsys, "layers", "planted-conv")
    assert code == 0
    line = next(li for li in out.splitlines() if li.startswith("main.3 "))
    assert "LeakyReLU" in line and "24x8x8" in line and "24" in line and "<- default" in line


def test_layers_of_a_factory_module(capsys, tmp_path):
    path = factory_file(tmp_path)
    code, out, _ = run(capsys, "layers", f"{path}:make_module", "--latent-shape", "4,1,1")
    assert code == 0
    assert any(li.startswith("0 ") and "ConvTranspose2d" in li and "6x4x4" in li
               for li in out.splitlines())


# ---------------------------------------------------------------------- analyze
def test_analyze_writes_report_figures_and_results(analyzed, capsys):
    pngs = {p.stem for p in analyzed.glob("*.png")}
    assert pngs == set(FIGURES) | {f"hybrids_module_{k}" for k in range(3)}
    html = (analyzed / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    result = AnalysisResult.load(analyzed / "results.npz")
    assert result.model_spec == "planted-conv" and result.layers == ["main.3"]
    assert result.settings.n_pairs == 4 and result.n_modules == 3
    assert "--pairs 4" in html  # the command that made it
    assert list((analyzed / "checkpoints").glob("eim_main.3_*.npz"))


def test_analyze_prints_where_the_report_is(tmp_path, capsys):
    code, out, err = run(capsys, "analyze", "--model", "planted-conv", "--out", str(tmp_path),
                         "--k", "2", "--method", "kmeans", "--no-stability", *SMALL)
    assert code == 0
    assert f"Report:  {tmp_path / 'report.html'}" in out
    r = AnalysisResult.load(tmp_path / "results.npz")
    assert r.n_modules == 2 and r.settings.method == "kmeans" and r.stability is None


@pytest.mark.parametrize("layers", [["--layer", "main.1", "--layer", "main.3"],
                                    ["--layer", "main.1,main.3"]])
def test_analyze_two_layers(tmp_path, capsys, layers):
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", *layers,
                       "--no-stability", "--out", str(tmp_path), *SMALL)
    assert code == 0, err
    r = AnalysisResult.load(tmp_path / "results.npz")
    assert r.layers == ["main.1", "main.3"] and len(r.labels) == 48
    # each planted module is found across both layers: its hybrid swaps channels of both
    assert all(set(m) == {"main.1", "main.3"} for m in r.modules)


def test_analyze_layer_auto_takes_the_scans_layer_and_k(tmp_path, capsys):
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--layer", "auto",
                       "--out", str(tmp_path), *SMALL)
    assert code == 0, err
    r = AnalysisResult.load(tmp_path / "results.npz")
    assert r.scan is not None and r.scan.layers == ["main.1", "main.3", "main.5"]
    assert r.layers == [r.scan.suggested_layer] and r.n_modules == r.scan.suggested_k == 3
    assert "scan" in r.timings and (tmp_path / "scan.png").exists()
    page = (tmp_path / "report.html").read_text()
    assert "Which layer, which K" in page and r.scan.reason()[:40] in page
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--layer", "auto",
                       "--layer", "main.1", "--out", str(tmp_path / "o"))
    one_line_error(code, err, "--layer auto")


def test_analyze_a_factory_adapter(tmp_path, capsys):
    path = factory_file(tmp_path)
    code, _, err = run(capsys, "analyze", "--model", f"{path}:make_adapter", "--layer", "1",
                       "--k", "2", "--no-stability", "--out", str(tmp_path / "o"), *SMALL)
    assert code == 0, err
    r = AnalysisResult.load(tmp_path / "o" / "results.npz")
    assert r.model == "tiny" and r.model_spec == f"{path.resolve()}:make_adapter"


def test_analyze_progress_goes_to_stderr(tmp_path, capsys):
    code, out, err = run(capsys, "analyze", "--model", "planted-conv", "--no-stability",
                         "--out", str(tmp_path), *SMALL[:-1])
    assert code == 0
    assert "[1/5]" in err and "AnalysisResult(" in err and "[1/5]" not in out


def test_fresh_ignores_a_foreign_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "eim_main.3_pairs4_seed0.npz").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--no-stability",
                       "--out", str(tmp_path), *SMALL)
    one_line_error(code, err, "checkpoint")
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--no-stability",
                       "--out", str(tmp_path), "--fresh", *SMALL)
    assert code == 0, err


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cfmodules.analysis.analyze", interrupted)
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--out", str(tmp_path))
    assert code == 130 and "resume" in err and "Traceback" not in err


# ---------------------------------------------------------------------- hybrids
def test_hybrids_from_saved_modules(analyzed, tmp_path, capsys):
    out = tmp_path / "new.png"
    code, text, err = run(capsys, "hybrids", "--modules", str(analyzed / "results.npz"),
                          "--pairs", "5", "--out", str(out))
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG" and "seed 1" in text
    code, _, err = run(capsys, "hybrids", "--modules", str(analyzed / "results.npz"),
                       "--out", str(tmp_path / "folder"))
    assert code == 0 and (tmp_path / "folder" / "hybrids_new.png").exists()


def test_hybrids_refuses_another_model(analyzed, capsys, tmp_path):
    code, _, err = run(capsys, "hybrids", "--modules", str(analyzed / "results.npz"),
                       "--model", "planted-model1", "--out", str(tmp_path / "x.png"))
    one_line_error(code, err, "main.3")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, needles", [
    (["analyze", "--model", "dcgan-face"], ["Unknown model", "Did you mean 'dcgan-faces'"]),
    (["analyze", "--model", "planted-conv", "--layer", "main.33"],
     ["Layer 'main.33' not found", "Did you mean", "main.3"]),
    (["analyze", "--model", "planted-conv", "--k", "100"], ["K=100", "24 channels"]),
    (["analyze", "--model", "planted-conv", "--pairs", "0"], ["--pairs must be at least 1"]),
    (["layers", "planted-conv", "--threads", "0"], ["--threads must be at least 1"]),
    (["analyze", "--model", "planted-conv", "--jobs", "0"], ["--jobs must be at least 1"]),
    (["analyze", "--model", "planted-conv", "--max-memory", "lots"],
     ["max_memory must be a number of bytes or a size like '2GB'"]),
    (["analyze", "--k", "x"], ["argument --k: invalid int value: 'x'"]),
    (["analyze", "--method", "pca"], ["invalid choice: 'pca'"]),
    (["analyse"], ["invalid choice: 'analyse'"]),
    (["analyze", "--stability-ks", "2-"], ["--stability-ks takes a range"]),
    (["analyze", "--model", "planted-conv", "--layer", "a", "--layer", "b", "--layer", "c"],
     ["names 3 layers"]),
    (["analyze", "--model", "my_gan.py"], ["file.py:factory"]),
    (["analyze", "--model", "missing.py:make"], ["no file 'missing.py'"]),
    (["layers", "planted-conv", "--latent-shape", "3"], ["--latent-shape is for models"]),
    (["hybrids", "--modules", "missing.npz"], ["No result file at 'missing.npz'"]),
    (["hybrids"], ["--modules"]),
])
def test_bad_command_lines_end_in_one_line(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] == "analyze"
                                        else []))
    one_line_error(code, err, *needles)


def test_layer_typo_fails_before_the_output_folder_is_made(capsys, tmp_path):
    code, _, err = run(capsys, "analyze", "--model", "planted-conv", "--layer", "main.33",
                       "--out", str(tmp_path / "o"))
    one_line_error(code, err, "Did you mean")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("factory, extra, needles", [
    ("make_string", [], ["returned str, not an nn.Module or a GeneratorAdapter"]),
    ("make_module", [], ["returned an nn.Module", "--latent-shape"]),
    ("make_module", ["--latent-shape", "5,1,1"], ["failed", "RuntimeError", "--latent-shape"]),
    ("make_module", ["--latent-shape", "a,b"], ["--latent-shape must be positive integers"]),
    ("make_adapter", ["--latent-shape", "4,1,1"], ["drop --latent-shape"]),
    ("make_broken", [], ["make_broken failed: RuntimeError: weights not found"]),
    ("make_modul", [], ["has no function 'make_modul'", "Did you mean 'make_module'"]),
])
def test_bad_factories(capsys, tmp_path, factory, extra, needles):
    path = factory_file(tmp_path)
    code, _, err = run(capsys, "analyze", "--model", f"{path}:{factory}", *extra,
                       "--out", str(tmp_path / "o"))
    one_line_error(code, err, *needles)


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "analyze", "--model", "planted-conv",
                       "--out", str(blocker / "sub"))
    one_line_error(code, err, "Cannot write to the output folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(capsys, tmp_path):
    code, _, err = run(capsys, "layers", "planted-conv", "--device", "cuda")
    one_line_error(code, err, "CUDA is not available")


def test_no_command_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "analyze" in err and "hybrids" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "layers", "nope"])
    with pytest.raises(LayerNotFoundError):
        main(["--debug", "analyze", "--model", "planted-conv", "--layer", "x", "--out",
              str(tmp_path)])


def test_parse_latent_shape():
    assert parse_latent_shape("100,1,1") == (100, 1, 1)
    assert parse_latent_shape("100x1x1") == (100, 1, 1)
    assert parse_latent_shape("128;1000") == ((128,), (1000,))
    with pytest.raises(ConfigError):
        parse_latent_shape("0,1")


def test_python_dash_m_and_version():
    src = str(Path(cfmodules.__file__).resolve().parents[1])
    env_code = f"import sys; sys.path.insert(0, {src!r}); import runpy; " \
               "sys.argv = ['cfmodules', '--version']; runpy.run_module('cfmodules', " \
               "run_name='__main__')"
    res = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"cfmodules {cfmodules.__version__}"


def test_results_file_is_plain_numpy(analyzed):
    with np.load(analyzed / "results.npz", allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        assert header["kind"] == "analysis" and header["model_spec"] == "planted-conv"
        assert f["labels"].shape == (24,) and f["templates"].shape == (3, 16, 16)


def test_model_loading_lives_in_models_only():
    from cfmodules import cli, models

    assert not hasattr(cli, "load_model") and not hasattr(cli, "parse_latent_shape")
    assert models.parse_latent_shape("2,1,1") == (2, 1, 1)
    assert models.split_spec("gen.py:make") == ("gen.py", "make")
    assert models.split_spec("dcgan-faces") is None


# ---------------------------------------------------------------------- scan
def test_scan_writes_figure_and_results(capsys, tmp_path):
    from cfmodules.scan import ScanResult

    code, out, err = run(capsys, "scan", "planted-conv", "--pairs", "4", "--ks", "2-4",
                         "--repeats", "2", "--out", str(tmp_path / "s"), "--quiet")
    assert code == 0, err
    assert "Suggestion:" in out and "K=3" in out
    res = ScanResult.load(tmp_path / "s" / "scan.npz")
    assert res.layers == ["main.1", "main.3", "main.5"] and res.suggested_k == 3
    assert (tmp_path / "s" / "scan.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, needles", [
    (["scan", "planted-conv", "--layers", "main.1,main.33"], ["'main.33' not found"]),
    (["scan", "planted-conv", "--ks", "x"], ["--ks takes a range"]),
    (["scan", "planted-conv", "--repeats", "0"], ["--repeats must be at least 1"]),
    (["scan", "planted-conv", "--window", "2"], ["window must be a positive odd integer"]),
    (["scan", "planted-conv", "--max-iter", "0"], ["--max-iter must be at least 1"]),
    (["analyze", "--model", "planted-conv", "--percentile", "100"], ["percentile", "100"]),
])
def test_bad_scan_command_lines(capsys, tmp_path, argv, needles):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, cls", [("analyze", "AnalysisSettings"), ("scan", "ScanSettings")])
def test_clustering_options_are_the_same_in_every_command(command, cls):
    import argparse
    from dataclasses import fields

    from cfmodules import analysis, scan
    from cfmodules.cli import _clustering, build_parser
    from cfmodules.modules import ClusteringSettings

    settings = {"AnalysisSettings": analysis.AnalysisSettings, "ScanSettings": scan.ScanSettings}[cls]
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cmd = sub.choices[command]
    # one option per ClusteringSettings field; none given: the class's defaults
    assert _clustering(cmd.parse_args([])) == {}
    argv = ["--method", "kmeans", "--seed", "5", "--n-init", "4", "--max-iter", "50",
            "--window", "5", "--percentile", "60", "--backend", "sklearn"]
    given = _clustering(cmd.parse_args(argv))
    assert sorted(given) == sorted(f.name for f in fields(ClusteringSettings))
    assert settings(**given) == settings(method="kmeans", seed=5, n_init=4, max_iter=50,
                                         window=5, percentile=60.0, backend="sklearn")
    # the help states the class's defaults
    helps = {a.dest: a.help for a in cmd._actions}
    d = settings()
    assert f"(default {d.n_init})" in helps["n_init"]
    assert f"(default {d.window})" in helps["window"]
    assert f"(default {d.percentile:g})" in helps["percentile"]
    assert f"(default {d.method})" in helps["method"] and f"(default {d.seed})" in helps["seed"]


@pytest.mark.parametrize("busy,argv,want", [
    (True, [], [1]),  # other work fills the cores: one thread, said on stderr
    (True, ["--threads", "2"], [2]),  # an explicit choice wins
    (False, [], []),  # a quiet machine: torch's own default
])
def test_threads_on_a_busy_machine(capsys, monkeypatch, busy, argv, want):
    import cfmodules.models as models_mod

    seen: list[int] = []
    monkeypatch.setattr(models_mod, "machine_is_busy", lambda: busy)
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    code, _, err = run(capsys, "layers", "planted-conv", *argv)
    assert code == 0 and seen == want
    assert ("machine is busy" in err) == (want == [1])
