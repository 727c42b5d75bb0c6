"""The explorer: region selection, hybrids, and the web API's answers to good and bad requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("flask", reason="the explorer needs flask (pip install 'cfmodules[explore]')")

from cfmodules.errors import ChannelError, ConfigError, LayerNotFoundError, ShapeError  # noqa: E402
from cfmodules.explorer import Explorer, ExplorerServer, create_app, explore  # noqa: E402
from cfmodules.module_file import ModuleFile  # noqa: E402
from explorer_helpers import planted_analysis  # noqa: E402


@pytest.fixture(scope="module")
def planted():
    adapter, result = planted_analysis()
    return adapter, result, Explorer(result, adapter, n_pairs=3)


@pytest.fixture(scope="module")
def client(planted):
    return create_app(planted[2]).test_client()


def group(k: int) -> list[int]:
    return list(range(8 * k, 8 * k + 8))


# ---------------------------------------------------------------------- core
@pytest.mark.parametrize("k", [0, 1, 2])
def test_painting_a_planted_region_selects_exactly_its_channels(planted, k):
    adapter, _, ex = planted
    region = adapter.generator.regions[k].astype(int)
    out = ex.select_region(region)
    assert out["selection"] == {"main.3": group(k)}
    assert all(s["share"] > 0.9 for s in out["scores"][:8])
    assert out["area"] == pytest.approx(region.mean(), abs=1e-4)


def test_a_small_region_inside_a_planted_one_selects_that_group_at_a_lower_threshold(planted):
    adapter, _, ex = planted
    ys, xs = np.nonzero(adapter.generator.regions[1])
    mask = np.zeros((16, 16), int)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    mask[cy - 1:cy + 2, cx - 1:cx + 2] = adapter.generator.regions[1][cy - 1:cy + 2, cx - 1:cx + 2]
    strict = ex.select_region(mask, threshold=0.5)["selection"]
    loose = ex.select_region(mask, threshold=0.05)["selection"]
    assert strict == {}  # 9 pixels hold less than half of any map's mass
    assert set(loose["main.3"]) >= set(group(1)) and set(loose["main.3"]) <= set(group(1))


def test_hybrids_equal_hybridize(planted):
    import torch

    from cfmodules.hybrid import hybridize
    from cfmodules.images import as_uint8
    from cfmodules.latents import pair_latents

    adapter, result, ex = planted
    z1, z2 = pair_latents(adapter, 3, ex.seed, 3)
    for sel in ({"main.3": [1, 9, 17]}, {"main.3": group(2)}):
        with torch.no_grad():
            ref = as_uint8(adapter.to_unit(hybridize(adapter, z1, z2, sel))).astype(int)
        got = ex.hybrids(sel, start=3).astype(int)
        assert np.abs(got - ref).max() <= 1  # BatchNorm-free; GEMM vs native conv rounding
        assert (ex.hybrids(sel, start=3) == got).all()  # a cached prefix is not modified
    o1, o2 = ex.originals(3)
    assert (ex.hybrids({}, 3) == o1).all()
    assert np.abs(ex.hybrids({"main.3": list(range(24))}, 3).astype(int) - o2).max() <= 1


def test_hybrids_change_with_the_selection_and_the_pairs(planted):
    _, _, ex = planted
    a = ex.hybrids({"main.3": group(0)}, 0)
    b = ex.hybrids({"main.3": group(1)}, 0)
    c = ex.hybrids({"main.3": group(0)}, 3)
    assert (a != b).any() and (a != c).any()


@pytest.mark.parametrize("selection, error, match", [
    ({"main.9": [1]}, LayerNotFoundError, "Did you mean 'main.3'"),
    ({"main.3": [24]}, ChannelError, "channels 0..23"),
    ({"main.3": [-1]}, ChannelError, "out of range"),
    ({"main.3": [True]}, ChannelError, "out of range"),
    ({"main.3": [1.5]}, ChannelError, "out of range"),
    ({"main.3": 3}, ConfigError, "must be a list"),
    ([1, 2], ConfigError, "maps layer names"),
])
def test_bad_selections(planted, selection, error, match):
    with pytest.raises(error, match=match):
        planted[2].hybrids(selection)


@pytest.mark.parametrize("mask, error, match", [
    (np.zeros((16, 16), int), ConfigError, "empty"),
    (np.ones((16, 16), int), ConfigError, "covers 100%"),
    (np.ones((8, 8), int), ShapeError, "16x16"),
    (np.full((16, 16), 2), ShapeError, "0 or 1"),
    ("abc", ShapeError, "16x16"),
    ([[1, 0], [1]], ShapeError, "16x16"),
])
def test_bad_regions(planted, mask, error, match):
    with pytest.raises(error, match=match):
        planted[2].select_region(mask)


def test_module_file_round_trip(planted, tmp_path):
    adapter, result, ex = planted
    mf = ex.module_file({"main.3": [3, 1, 1]}, "mine")
    path = mf.save(tmp_path / "m.json")
    back = ModuleFile.load(path)
    assert back.modules == {"mine": {"main.3": [1, 3]}}
    assert back.model_spec == "planted-conv" and back.layer_channels == {"main.3": 24}
    back.check_model(adapter)
    with pytest.raises(ConfigError, match="empty"):
        ex.module_file({})


# ---------------------------------------------------------------------- web API
def test_page_and_static_files_are_served_offline(client):
    page = client.get("/").get_data(as_text=True)
    assert "explorer.js" in page and "http" not in page.replace("http-equiv", "")  # no CDN
    js = client.get("/static/explorer.js").get_data(as_text=True)
    assert "http://" not in js and "https://" not in js
    assert client.get("/static/explorer.css").status_code == 200


def test_api_answers(client, planted):
    adapter = planted[0]
    info = client.get("/api/info").get_json()
    assert info["map_shape"] == [16, 16] and info["layers"] == [{"name": "main.3", "channels": 24}]
    assert sorted(ch for m in info["modules"] for ch in m["channels"]["main.3"]) == list(range(24))
    pairs = client.get("/api/pairs?start=0").get_json()
    assert len(pairs["original1"]) == 3 and pairs["original1"][0].startswith("data:image/png;base64,")
    sel = client.post("/api/select", json={"mask": adapter.generator.regions[2].astype(int).tolist()})
    assert sel.get_json()["selection"] == {"main.3": group(2)}
    hy = client.post("/api/hybrids", json={"selection": {"main.3": group(2)}, "start": 0})
    body = hy.get_json()
    assert hy.status_code == 200 and len(body["hybrids"]) == 3 and body["ms"] >= 0
    empty = client.post("/api/hybrids", json={"selection": {}, "start": 0}).get_json()
    assert empty["hybrids"] == pairs["original1"]  # no channel: Original 1
    png = client.get("/api/map/main.3/5")
    assert png.status_code == 200 and png.mimetype == "image/png"
    grid = client.post("/api/hybrids.png", json={"selection": {"main.3": [1]}})
    assert grid.status_code == 200 and grid.data.startswith(b"\x89PNG")


def test_downloaded_module_drives_the_cli(client, tmp_path, capsys):
    from cfmodules.cli import main

    resp = client.post("/api/module", json={"selection": {"main.3": group(1)}, "name": "sky"})
    assert resp.status_code == 200 and "attachment" in resp.headers["Content-Disposition"]
    path = tmp_path / "module.json"
    path.write_bytes(resp.data)
    assert main(["hybrids", "--modules", str(path), "--pairs", "2", "--out",
                 str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 0
    assert "1 modules" in capsys.readouterr().out
    bad = json.loads(resp.data)
    bad["modules"]["sky"]["main.3"] = [99]
    path.write_text(json.dumps(bad))
    assert main(["hybrids", "--modules", str(path), "--out", str(tmp_path / "h2.png")]) == 2
    assert "names channel 99" in capsys.readouterr().err


@pytest.mark.parametrize("method, url, kwargs, status, match", [
    ("post", "/api/hybrids", {"json": {"selection": {"main.9": [1]}}}, 400, "not a layer"),
    ("post", "/api/hybrids", {"json": {"selection": {"main.3": [24]}}}, 400, "out of range"),
    ("post", "/api/hybrids", {"json": {"selection": {}, "start": -1}}, 400, "start"),
    ("post", "/api/hybrids", {"data": "{not json", "content_type": "application/json"}, 400,
     "JSON object"),
    ("post", "/api/hybrids", {"data": "[1, 2]", "content_type": "application/json"}, 400,
     "JSON object"),
    ("post", "/api/select", {"json": {"mask": [[0] * 16] * 16}}, 400, "empty"),
    ("post", "/api/select", {"json": {"mask": [[1] * 16] * 16}}, 400, "covers 100%"),
    ("post", "/api/select", {"json": {"mask": [[1] * 16] * 8}}, 400, "16x16"),
    ("post", "/api/select", {"json": {"mask": [[1] * 4] * 4, "threshold": 2}}, 400, "threshold"),
    ("post", "/api/select", {"json": {}}, 400, "mask"),
    ("post", "/api/select", {"data": json.dumps({"mask": [[1] * 1000] * 1000}),
                             "content_type": "application/json"}, 413, "larger than"),
    ("get", "/api/map/main.9/1", {}, 404, "Did you mean 'main.3'"),
    ("get", "/api/map/main.3/99", {}, 400, "out of range"),
    ("get", "/api/map/main.3/x", {}, 400, "out of range"),
    ("get", "/api/pairs?start=abc", {}, 400, "start"),
    ("get", "/api/nothing", {}, 404, "No such"),
    ("get", "/api/hybrids", {}, 405, "method"),
    ("post", "/api/module", {"json": {"selection": {"main.3": [1]}, "name": ""}}, 400, "name"),
])
def test_malformed_requests_get_a_json_4xx_and_the_server_keeps_serving(
        client, method, url, kwargs, status, match):
    resp = getattr(client, method)(url, **kwargs)
    assert resp.status_code == status
    assert resp.is_json and match in resp.get_json()["error"]
    assert client.get("/api/info").status_code == 200


def test_a_real_server_on_localhost(planted):
    server = ExplorerServer(planted[2], port=0).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "api/info", timeout=30) as r:
            assert json.load(r)["model"] == "planted-conv"
        assert f'src="{server.url}"' in server._repr_html_()
    finally:
        server.stop()


def test_explore_from_a_notebook_checks_the_model(planted, tmp_path):
    import torch

    from cfmodules import GeneratorAdapter

    adapter, result, _ = planted
    server = explore(result, adapter)
    try:
        assert "<iframe" in server._repr_html_()
    finally:
        server.stop()
    other = GeneratorAdapter(torch.nn.Sequential(torch.nn.ConvTranspose2d(12, 5, 4)), (12, 1, 1))
    with pytest.raises(LayerNotFoundError):
        explore(result, other)
    with pytest.raises(ConfigError, match="AnalysisResult"):
        explore(42)


def test_cli_explore_refuses_bad_input(tmp_path, capsys):
    from cfmodules.cli import main

    assert main(["explore", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert main(["explore", "x.npz", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_cli_explore_serves_the_results_file(planted, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = planted[1].save(tmp_path / "results.npz")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "cfmodules", "explore", str(path), "--port",
                             "0", "--no-browser", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("cfmodules explorer: http://127.0.0.1:"), line
        url = line.split()[2]
        with urllib.request.urlopen(url + "api/info", timeout=60) as r:
            assert json.load(r)["layers"] == [{"name": "main.3", "channels": 24}]
        req = urllib.request.Request(url + "api/hybrids", data=b"{oops",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400 and "JSON object" in json.load(err.value)["error"]
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_two_layer_analysis(planted):
    import torch

    from cfmodules.analysis import analyze
    from cfmodules.hybrid import hybridize
    from cfmodules.images import as_uint8
    from cfmodules.latents import pair_latents

    adapter = planted[0]
    result = analyze(adapter, ["main.1", "main.3"], n_pairs=2, stability_ks=(), n_init=1,
                     n_hybrids=1, n_samples=1, progress=False)
    ex = Explorer(result, adapter, n_pairs=2)
    assert [la["name"] for la in ex.info()["layers"]] == ["main.1", "main.3"]
    sel = ex.select_region(adapter.generator.regions[1].astype(int))["selection"]
    assert sel == {"main.1": group(1), "main.3": group(1)}
    z1, z2 = pair_latents(adapter, 2, ex.seed, 0)
    with torch.no_grad():
        ref = as_uint8(adapter.to_unit(hybridize(adapter, z1, z2, sel))).astype(int)
    assert np.abs(ex.hybrids(sel, 0).astype(int) - ref).max() <= 1
    with pytest.raises(LayerNotFoundError, match="main.1, main.3"):
        ex.map_image("main.2", 0)


def test_numbers_of_requests_and_settings_go_through_the_shared_checks(planted):
    adapter, result, ex = planted
    assert ex.check_threshold(np.float32(0.25)) == 0.25
    for bad in (0, 1.5, True, float("nan"), "0.5", None):
        with pytest.raises(ConfigError, match=r"threshold .* must be a finite number in \(0, 1\]"):
            ex.check_threshold(bad)
    assert ex.check_start(np.int64(3)) == 3
    with pytest.raises(ConfigError, match="start"):
        ex.check_start(-1)
    layer = ex.layers[0]
    assert ex.check_channel(layer, np.int64(0)) == 0
    with pytest.raises(ChannelError, match="out of range"):
        ex.check_channel(layer, True)
    other = Explorer(result, adapter, n_pairs=np.int64(2), threads=np.int64(1), seed=np.uint32(5))
    assert (other.n_pairs, other.threads, other.seed) == (2, 1, 5)
    for bad in ({"n_pairs": 65}, {"n_pairs": 0}, {"threads": 0}, {"threads": 1.0},
                {"seed": -1}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            Explorer(result, adapter, **bad)
