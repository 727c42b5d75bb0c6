"""analyze() on a planted generator, AnalysisResult files, and the HTML report."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from cfmodules import zoo
from cfmodules.analysis import (
    AnalysisResult,
    AnalysisSettings,
    analyze,
    default_layer,
    make_hybrids,
    template_location,
)
from cfmodules.errors import ConfigError, LayerNotFoundError, ResultFileError
from cfmodules.hybrid import hybridize
from cfmodules.report import FIGURES, figure_recipes, make_figures, render_html, write_report
from cfmodules.results import write_npz
from report_helpers import blob, fake_result

SMALL = dict(n_pairs=4, stability_ks=(2, 3), stability_repeats=1, n_samples=4, n_hybrids=3)


@pytest.fixture(scope="module")
def planted():
    adapter = zoo.load("planted-conv")
    return adapter, analyze(adapter, progress=False, **SMALL)


# ---------------------------------------------------------------------- analyze
def test_analyze_recovers_the_planted_modules(planted):
    adapter, r = planted
    assert r.layers == [adapter.generator.layer] == ["main.3"]
    assert adjusted_rand_score(r.labels, adapter.generator.true_labels()) == 1.0
    assert r.maps.shape == (24, 16, 16) and r.templates.shape == (3, 16, 16)
    assert r.module_sizes.tolist() == [8, 8, 8]
    assert r.suggested_k() == 3
    assert set(r.timings) == {"samples", "influence_maps", "clustering", "module_influence",
                              "stability", "hybrids", "total"}
    assert 0 < r.total_seconds == r.timings["total"]


def test_analyze_hybrids_are_real_hybrids_of_new_pairs(planted):
    adapter, r = planted
    # pairs n_pairs .. n_pairs + n_hybrids - 1 of the seed's stream
    z = adapter.sample_latents(2 * 3, seed=0, start=2 * SMALL["n_pairs"])
    z1, z2 = z[0::2], z[1::2]
    want = hybridize(adapter, z1, z2, r.modules[1])
    got = torch.from_numpy(r.hybrids[1].astype(np.float32) / 255)
    assert (got - adapter.to_unit(want)).abs().max() <= 0.5 / 255 + 1e-6
    assert r.original1.shape == r.original2.shape == (3, 3, 16, 16)
    assert r.samples.dtype == np.uint8 and r.samples.shape == (4, 3, 16, 16)


def test_module_maps_measure_whole_modules(planted):
    _, r = planted
    # each planted module paints only its region: its map is zero outside the template area
    for k in range(3):
        inside = r.templates[k] > 0.5
        assert r.module_maps[k][inside].mean() > 5 * r.module_maps[k][~inside].mean()
    np.testing.assert_allclose(r.module_influence, r.module_maps.mean(axis=(1, 2)), rtol=1e-6)


def test_two_layer_analysis_clusters_both_layers_together():
    adapter = zoo.load("planted-conv")
    r = analyze(adapter, ["main.1", "main.3"], progress=False, n_pairs=4, stability_ks=(),
                n_samples=2, n_hybrids=2)
    assert len(r.labels) == 48 and r.stability is None
    for module in r.modules:
        assert set(module) == {"main.1", "main.3"}
        # the same planted group in both layers
        assert module["main.1"] == module["main.3"]


def test_analyze_is_deterministic(planted):
    adapter, r = planted
    again = analyze(adapter, progress=False, **SMALL)
    np.testing.assert_array_equal(again.labels, r.labels)
    np.testing.assert_array_equal(again.hybrids, r.hybrids)
    np.testing.assert_allclose(again.maps, r.maps)


def test_analyze_bad_input_fails_before_work():
    adapter = zoo.load("planted-conv")
    with pytest.raises(ConfigError, match="more than the 24 channels"):
        analyze(adapter, n_modules=25, progress=False)
    with pytest.raises(ConfigError, match="two-thirds"):
        analyze(adapter, stability_ks=(2, 30), progress=False)
    with pytest.raises(LayerNotFoundError, match="main.3"):
        analyze(adapter, "main.33", progress=False)
    with pytest.raises(ConfigError, match="Did you mean 'n_pairs'"):
        analyze(adapter, n_pair=4, progress=False)
    with pytest.raises(ConfigError, match="n_jobs"):
        analyze(adapter, n_jobs=0, progress=False)
    with pytest.raises(ConfigError, match="GeneratorAdapter"):
        analyze(adapter.generator)
    with pytest.raises(ConfigError, match="method"):
        AnalysisSettings(method="pca")


def test_checkpoints_make_a_rerun_resume(tmp_path):
    adapter = zoo.load("planted-conv")
    first = analyze(adapter, progress=False, checkpoint_dir=tmp_path, **SMALL)
    files = list(tmp_path.glob("eim_*.npz"))
    assert len(files) == 1
    second = analyze(adapter, progress=False, checkpoint_dir=tmp_path, **SMALL)
    np.testing.assert_array_equal(first.maps, second.maps)  # exact: read back from the checkpoint


def test_default_layer():
    assert default_layer(zoo.load("planted-conv")) == "main.3"

    from cfmodules import GeneratorAdapter

    gen = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 4, 2), torch.nn.ReLU())
    with pytest.raises(ConfigError, match=r"no default layer.*0 \(4x2x2\)"):
        default_layer(GeneratorAdapter(gen, (2, 1, 1)))


@pytest.mark.numerics
def test_make_hybrids_empty_module_gives_original1():
    adapter = zoo.load("planted-conv")
    o1, o2, hy = make_hybrids(adapter, [{}, {"main.3": list(range(24))}], n=2, seed=3)
    np.testing.assert_array_equal(hy[0], o1)
    # every channel of the last hidden layer: Original 2 up to float rounding, which may
    # move a pixel across a uint8 rounding boundary
    assert np.abs(hy[1].astype(int) - o2.astype(int)).max() <= 1
    with pytest.raises(ConfigError):
        make_hybrids(adapter, [{}], n=0)


@pytest.mark.parametrize("where, name", [
    ((0.5, 0.5), "centre"), ((0.5, 0.05), "left side"), ((0.5, 0.95), "right side"),
    ((0.05, 0.5), "top"), ((0.95, 0.95), "bottom-right"),
])
def test_template_location(where, name):
    assert template_location(blob(*where, r=0.12)) == name


def test_template_location_border_and_nothing():
    ring = np.ones((8, 8))
    ring[2:6, 2:6] = 0
    assert template_location(ring) == "border"
    assert template_location(np.zeros((4, 4))) == "nowhere"


# ---------------------------------------------------------------------- files
def test_result_roundtrip_and_plain_numpy(tmp_path, planted):
    _, r = planted
    path = r.save(tmp_path / "results.npz")
    back = AnalysisResult.load(path)
    for name in ("maps", "labels", "templates", "weights", "module_maps", "hybrids", "samples"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert back.modules == r.modules and back.settings == r.settings
    np.testing.assert_array_equal(back.stability.consistency, r.stability.consistency)
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        assert header["kind"] == "analysis" and header["modules"] == r.modules
        assert f["maps"].shape == (24, 16, 16) and f["labels"].dtype == np.int64
        assert f["stability_consistency"].shape == (2, 2, 1)
        assert [str(x) for x in f["unit_layer"][:2]] == ["main.3", "main.3"]


def test_every_field_round_trips_through_the_file(tmp_path):
    """save/load/to_dict walk the dataclass fields: a field added later is saved too."""
    import dataclasses

    r = fake_result()
    back = AnalysisResult.load(r.save(tmp_path / "r.npz"))
    for f in dataclasses.fields(AnalysisResult):
        a, b = getattr(r, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
            assert a.dtype.kind == b.dtype.kind, f.name
        elif f.name == "stability":
            assert a.to_dict().keys() == b.to_dict().keys()
            np.testing.assert_array_equal(a.cosine, b.cosine)
        else:
            assert a == b, f.name
    assert back.to_text() == str(back) == repr(back) == r.to_text()
    d = r.to_dict()
    assert {f.name for f in dataclasses.fields(AnalysisResult)} <= set(d)
    assert d["modules"] == r.modules and d["module_names"] == r.module_names
    no_sweep = fake_result(stability=False)
    assert AnalysisResult.load(no_sweep.save(tmp_path / "n.npz")).stability is None


def test_load_rejects_other_files(tmp_path):
    other = write_npz(tmp_path / "eim.npz", {"maps": np.zeros((1, 2, 2))}, {"kind": "influence"})
    with pytest.raises(ResultFileError, match="not 'analysis'"):
        AnalysisResult.load(other)
    incomplete = write_npz(tmp_path / "bad.npz", {"maps": np.zeros((1, 2, 2))},
                           {"kind": "analysis"})
    with pytest.raises(ResultFileError, match="incomplete"):
        AnalysisResult.load(incomplete)
    with pytest.raises(ResultFileError):
        AnalysisResult.load(tmp_path / "missing.npz")


def test_repr_is_readable(planted):
    text = repr(planted[1])
    assert text.startswith("AnalysisResult(model='planted-conv', layers=['main.3'], 24 units")
    assert "module 0: " in text and "suggested K=3" in text


# ---------------------------------------------------------------------- report
def test_make_figures_names():
    figs = make_figures(fake_result(k=2))
    assert set(figs) == set(FIGURES) | {"hybrids_module_0", "hybrids_module_1"}
    assert "stability" not in make_figures(fake_result(k=2, stability=False))


def test_report_is_self_contained(tmp_path):
    result = fake_result(k=2)
    path = write_report(result, tmp_path / "out", command="cfmodules analyze --out out")
    html = path.read_text()
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "href=\"http" not in html and "<script" not in html
    for text in ("module 0: centre", "module 1: left side", "Original 1", "Choosing K",
                 "cfmodules analyze --out out", "0.0.test", "influence_maps"):
        assert text in html
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(f"{n}.png" for n in make_figures(result))
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_figure_recipes_draw_the_figures():
    result = fake_result(k=2)
    recipes = figure_recipes(result)
    assert list(recipes) == list(make_figures(result))
    fn, args, kwargs = recipes["stability"]
    assert isinstance(args[0], dict)  # plain arrays and dicts: nothing heavy to send
    assert fn(*args, **kwargs).axes


def test_render_html_skips_missing_figures_and_escapes():
    result = fake_result(k=2, stability=False)
    result.model = "<b>gan</b>"
    html = render_html(result, {})
    assert "<b>gan</b>" not in html and "&lt;b&gt;gan&lt;/b&gt;" in html
    assert "<img" not in html and "not run" in html


# ---------------------------------------------------------------------- the sweep beside the rest
def test_the_sweep_runs_beside_the_next_steps_and_changes_no_number(monkeypatch):
    """With workers the stability sweep starts after the maps and `during_sweep` sees the
    rest of the result while it runs; the numbers equal a run with everything in turn."""
    from cfmodules.modules import fits

    monkeypatch.setattr(fits, "MIN_PARALLEL_WORK", 0)  # a tiny sweep still goes to workers
    adapter = zoo.load("planted-conv")
    seen = []

    def meanwhile(partial):
        seen.append(partial)
        # the sweep is still running on the workers: nothing of it in the partial result
        assert partial.stability is None and "stability" not in partial.timings

    threads = torch.get_num_threads()
    par = analyze(adapter, progress=False, n_jobs=2, during_sweep=meanwhile, **SMALL)
    assert torch.get_num_threads() == threads  # one thread only while the workers ran
    seq = analyze(adapter, progress=False, n_jobs=1, **SMALL)
    assert len(seen) == 1 and np.array_equal(seen[0].templates, par.templates)
    assert np.array_equal(par.stability.consistency, seq.stability.consistency)
    assert np.array_equal(par.stability.cosine, seq.stability.cosine)
    for name in ("maps", "labels", "templates", "module_maps", "hybrids"):
        np.testing.assert_array_equal(getattr(par, name), getattr(seq, name))
    # no sweep: nothing to wait for, no call
    analyze(adapter, progress=False, n_jobs=2, during_sweep=seen.append,
            **{**SMALL, "stability_ks": ()})
    assert len(seen) == 1


def test_an_error_beside_the_sweep_stops_it_and_restores_the_threads(monkeypatch):
    from cfmodules.modules import fits

    monkeypatch.setattr(fits, "MIN_PARALLEL_WORK", 0)
    threads = torch.get_num_threads()

    def fail(partial):
        assert torch.get_num_threads() == 1  # the workers hold the cores meanwhile
        raise RuntimeError("drawing failed")

    with pytest.raises(RuntimeError, match="drawing failed"):
        analyze(zoo.load("planted-conv"), progress=False, n_jobs=2, during_sweep=fail, **SMALL)
    assert torch.get_num_threads() == threads
    # the workers are usable again at once
    again = analyze(zoo.load("planted-conv"), progress=False, n_jobs=2, **SMALL)
    assert again.stability is not None


@pytest.mark.parametrize("where", ["announcing it", "right after"])
def test_an_interrupt_just_after_the_sweep_starts_stops_it(monkeypatch, capsys, where):
    """SIGTERM arriving while the sweep's line is printed, or just after, must cancel the
    running sweep (a sweep nobody holds is aborted by joblib mid-task, with a traceback)."""
    import sys

    import cfmodules.analysis as analysis_mod

    class Sweep:
        in_background, cancelled = True, 0

        def cancel(self):
            self.cancelled += 1

        def result(self):
            raise AssertionError("not reached")

    sweep = Sweep()
    monkeypatch.setattr(analysis_mod, "start_stability_sweep", lambda *a, **k: sweep)

    class Interrupting:
        def write(self, text):
            if where == "announcing it" and "worker processes" in text:
                raise KeyboardInterrupt
            sys.__stderr__.write(text)

        def flush(self):
            pass

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stderr", Interrupting())
    if where == "right after":
        monkeypatch.setattr(analysis_mod, "cluster_maps", interrupt)
    with pytest.raises(KeyboardInterrupt):
        analyze(zoo.load("planted-conv"), progress=True, n_jobs=2, **SMALL)
    assert sweep.cancelled == 1


def test_figures_drawn_ahead_give_the_same_report(tmp_path):
    from cfmodules.report import draw_figures

    r = fake_result()
    ahead = draw_figures(r, skip=("stability",))
    assert "stability" not in ahead and "templates" in ahead
    write_report(r, tmp_path / "a", drawn=ahead)
    write_report(r, tmp_path / "b")
    for name in ("report.html", "templates.png", "stability.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_timings_say_when_the_sweep_ran_beside_the_other_steps():
    r = fake_result()
    r.timings.update({"stability": 5.0, "total": 6.0})  # 1.5 + 0.25 + 5 > 6: overlapped
    assert "beside the clustering" in render_html(r, {})
    r.timings.update({"stability": 1.0, "total": 6.0})
    assert "beside the clustering" not in render_html(r, {})
    del r.timings["total"]  # a file from before: the total is the sum of the steps
    assert r.total_seconds == 1.5 + 0.25 + 1.0 and "beside the clustering" not in render_html(r, {})
