"""Diffusion models: sampling chains, window hybrids, influence maps per window.

A tiny diffusers UNet (8x8, 40 k parameters, 6 steps) keeps each test to a second or so;
a hand-checkable denoiser whose layer *is* the next state checks the all-swap identity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from cfmodules import GeneratorAdapter, hybridize  # noqa: E402
from cfmodules.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    LayerCallError,
)
from cfmodules.influence import influence_maps, module_influence_maps  # noqa: E402
from cfmodules.latents import pair_latents  # noqa: E402
from cfmodules.samplers import (  # noqa: E402
    DiffusionAdapter,
    from_diffusers,
    naive_window_hybrids,
    window_label,
    window_steps,
)

LAYER = "down_blocks.1.resnets.0"
WINDOWS = ["all", "early", "middle", "late", [1, 4], [5]]
KW = {"progress": False}


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       add_attention=False).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


SAMPLERS = {
    "ddim": lambda u: from_diffusers(u, DDIMScheduler(), 6),
    "ddim-eta": lambda u: from_diffusers(u, DDIMScheduler(), 6, eta=0.5),
    "ddpm": lambda u: from_diffusers(u, DDPMScheduler(), 6),
}


class StateNet(nn.Module):
    """x_{k+1} = body(x_k): the layer ``body.1`` is the whole next state, by hand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Tanh())
        self.extra = nn.Conv2d(2, 2, 1)
        with torch.no_grad():  # expanding, not contracting: the chain keeps its start's mark
            self.body[0].weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def state_adapter(**kw) -> DiffusionAdapter:
    return DiffusionAdapter(StateNet(), (2, 4, 4), lambda den, k, x, noise: den(x), 6, **kw)


# ---------------------------------------------------------------------- windows
def test_windows_are_thirds_lists_or_all():
    assert window_steps("all", 7) == tuple(range(7)) == window_steps(None, 7)
    assert [window_steps(w, 7) for w in ("early", "middle", "late")] == [
        (0, 1, 2), (3, 4), (5, 6)]
    assert window_steps([4, 1], 7) == (1, 4)
    assert window_steps(np.arange(2), 7) == (0, 1)
    assert window_label((5, 6), 7) == "late"
    assert window_label((1, 2, 3, 6), 7) == "steps 1-3,6"


@pytest.mark.parametrize("window, match", [
    ([], "empty"), ([0, 7], "outside the schedule"), ([-1], "outside the schedule"),
    ("last", "Unknown window"), ([1, 1], "more than once"), ([1.5], "integers"),
    (3, "list of step"),
])
def test_bad_windows_are_clear_errors(window, match):
    with pytest.raises(ConfigError, match=match):
        window_steps(window, 7)


def test_a_window_of_a_short_chain_that_is_empty_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        window_steps("late", 2)


# ---------------------------------------------------------------------- the chain
@pytest.mark.parametrize("kind", SAMPLERS)
def test_chain_equals_the_diffusers_loop(unet, kind):
    ad = SAMPLERS[kind](unet)
    z = ad.sample_latents(3, seed=4)
    sched = (DDPMScheduler() if kind == "ddpm" else DDIMScheduler())
    sched.set_timesteps(6)
    x = ad.initial(z)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            eps = unet(x, t).sample
            if kind == "ddpm":
                g = torch.Generator().manual_seed(k)
                noise = torch.randn(x.shape, generator=g)
                # diffusers draws the noise itself: ours is given the same draw
                x_ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(k)
                                   ).prev_sample
                x = ad.step(unet, k, x, noise)
                torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)
            else:
                x = sched.step(eps, t, x, eta=ad.step.eta,
                               variance_noise=ad.noise_at(z, k) if ad.stochastic else None
                               ).prev_sample
    if kind != "ddpm":
        torch.testing.assert_close(ad.generate(z), x, rtol=0, atol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", SAMPLERS)
def test_a_sample_is_the_same_whatever_the_batch(unet, kind):
    ad = SAMPLERS[kind](unet)
    assert ad.stochastic == (kind != "ddim")
    whole = ad.generate(ad.sample_latents(4, seed=3))
    alone = ad.generate(ad.sample_latents(1, seed=3, start=2))
    # batch size changes the kernels: rounding, amplified a little along the chain
    torch.testing.assert_close(whole[2:3], alone, rtol=0, atol=1e-4)


def test_unsupported_scheduler_and_settings_are_refused(unet):
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ConfigError, match="EulerDiscreteScheduler is not supported"):
        from_diffusers(unet, EulerDiscreteScheduler(), 6)
    with pytest.raises(ConfigError, match="eta 1"):
        from_diffusers(unet, DDPMScheduler(), 6, eta=0.3)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        from_diffusers(unet, DDIMScheduler(num_train_timesteps=10), 20)


# ---------------------------------------------------------------------- hybrids
@pytest.mark.numerics
@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("window", ["all", "middle", [1, 4], [5]])
def test_no_swap_is_original1_and_matches_the_naive_reference(unet, kind, window):
    ad = SAMPLERS[kind](unet).with_window(window)
    z1, z2 = pair_latents(ad, 3, seed=1)
    y1 = ad.generate(z1)
    torch.testing.assert_close(hybridize(ad, z1, z2, {LAYER: []}), y1, rtol=0, atol=1e-6)
    module = {LAYER: [0, 3, 9]}
    fast = hybridize(ad, z1, z2, module)
    ref = naive_window_hybrids(ad, z1, z2, {LAYER: torch.tensor([0, 3, 9])})
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4)
    assert (fast - y1).abs().max() > 1e-3  # the swap changes the image


@pytest.mark.parametrize("window", WINDOWS)
def test_all_swap_of_the_state_layer_is_original2(window):
    # body.1 computes the whole next state: swapping all its channels at any step makes
    # the chain Original 2's from there on, and nothing after the window undoes it
    ad = state_adapter(window=window)
    z1, z2 = pair_latents(ad, 4, seed=0)
    y1, y2 = ad.generate(z1), ad.generate(z2)
    hy = hybridize(ad, z1, z2, {"body.1": range(2)})
    torch.testing.assert_close(hy, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"body.1": []}), y1, rtol=0, atol=1e-6)
    # one channel of two: neither original
    one = hybridize(ad, z1, z2, {"body.1": [0]})
    assert (one - y1).abs().max() > 1e-3 and (one - y2).abs().max() > 1e-3


def test_the_window_decides_what_is_swapped():
    ad = state_adapter()
    z1, z2 = pair_latents(ad, 2, seed=0)
    # the last step alone: hybrid = body.2(swap(body.1(x_5 of Original 1))) by hand
    late = hybridize(ad.with_window([5]), z1, z2, {"body.1": [1]})
    gen = ad.generator
    with torch.no_grad():
        x1, x2 = z1, z2
        for _ in range(5):
            x1, x2 = gen(x1), gen(x2)
        a1, a2 = gen.body[1](gen.body[0](x1)), gen.body[1](gen.body[0](x2))
        a1[:, 1] = a2[:, 1]
        torch.testing.assert_close(late, gen.body[2](a1), rtol=0, atol=1e-6)


def test_a_layer_that_does_not_run_every_step_is_refused():
    def step(den, k, x, noise):
        return den.extra(den(x)) if k % 2 else den(x)  # `extra` runs at odd steps only

    ad = DiffusionAdapter(StateNet(), (2, 4, 4), step, 6)
    z1, z2 = pair_latents(ad, 2, seed=0)
    with pytest.raises(LayerCallError, match="ran 0 time"):
        hybridize(ad, z1, z2, {"extra": [0]})
    with pytest.raises(LayerCallError, match="ran 0 time"):
        influence_maps(ad, "extra", n_pairs=2, **KW)
    # within a window of odd steps it runs once per step: fine
    hybridize(ad.with_window([1, 3]), z1, z2, {"extra": [0]})


def test_window_on_a_one_forward_generator_is_refused():
    ad = GeneratorAdapter(nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 2, 2))), (4,))
    with pytest.raises(ConfigError, match="step_window= is for diffusion models"):
        influence_maps(ad, "0", n_pairs=2, step_window="late", **KW)


# ---------------------------------------------------------------------- influence maps
@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("window", ["all", "late", [1, 4]])
def test_influence_maps_per_window_match_the_naive_chain(unet, kind, window):
    ad = SAMPLERS[kind](unet)
    fast = influence_maps(ad, LAYER, [0, 5, 7], n_pairs=4, pairs_per_block=3, step_window=window,
                          **KW)
    naive = influence_maps(ad, LAYER, [0, 5, 7], n_pairs=4, pairs_per_block=3, step_window=window,
                           algorithm="hook", **KW)
    assert fast.settings["paths"] == {LAYER: "window"}
    assert naive.settings["paths"] == {LAYER: "hook"}
    assert fast.settings["sampler"]["window"] == list(window_steps(window, 6))
    scale = float(np.abs(naive.maps).max())
    assert scale > 1e-3
    np.testing.assert_allclose(fast.maps, naive.maps, rtol=0, atol=1e-4 * scale)


def test_module_maps_take_the_window(unet):
    ad = SAMPLERS["ddim"](unet)
    mods = [{LAYER: [0, 1]}, {LAYER: list(range(16))}]
    late = module_influence_maps(ad, mods, n_pairs=3, step_window="late", **KW)
    early = module_influence_maps(ad, mods, n_pairs=3, step_window="early", **KW)
    assert late.settings["sampler"]["window"] == [4, 5]
    assert not np.allclose(late.maps, early.maps)


# ---------------------------------------------------------------------- checkpoints
def _stop_after(pairs: int):
    def callback(p):
        if p.n_pairs_done >= pairs:
            raise KeyboardInterrupt
    return callback


@pytest.mark.numerics
def test_interrupted_window_run_resumes_to_the_same_maps(unet, tmp_path):
    ad = SAMPLERS["ddpm"](unet)
    kw = {**KW, "pairs_per_block": 2, "checkpoint_every": 0, "step_window": "middle"}
    full = influence_maps(ad, LAYER, [1, 2], n_pairs=6, **kw)
    ck = tmp_path / "w.ckpt"
    with pytest.raises(KeyboardInterrupt):
        influence_maps(ad, LAYER, [1, 2], n_pairs=6, checkpoint=ck, callback=_stop_after(2),
                       **kw)
    resumed = influence_maps(ad, LAYER, [1, 2], n_pairs=6, checkpoint=ck, **kw)
    np.testing.assert_array_equal(resumed.maps, full.maps)


def test_checkpoint_identity_holds_the_window_and_the_sampler(unet, tmp_path):
    ck = tmp_path / "w.ckpt"
    kw = {**KW, "checkpoint": ck, "n_pairs": 2}
    influence_maps(SAMPLERS["ddim"](unet), LAYER, [1], step_window="late", **kw)
    with pytest.raises(CheckpointError, match="sampler"):
        influence_maps(SAMPLERS["ddim"](unet), LAYER, [1], step_window="early", **kw)
    with pytest.raises(CheckpointError, match="sampler"):
        influence_maps(from_diffusers(unet, DDIMScheduler(), 7), LAYER, [1], step_window=[4, 5],
                       **kw)
    with pytest.raises(CheckpointError):
        influence_maps(SAMPLERS["ddim-eta"](unet), LAYER, [1], step_window="late", **kw)
    again = influence_maps(SAMPLERS["ddim"](unet), LAYER, [1], step_window="late", **kw)
    assert again.n_pairs == 2


# ---------------------------------------------------------------------- display
def test_notebook_display_of_a_window_result(unet):
    res = influence_maps(SAMPLERS["ddim"](unet), LAYER, [0, 1, 2], n_pairs=2, step_window="late",
                         **KW)
    html = res._repr_html_()
    assert "<img" in html and LAYER in html


# ---------------------------------------------------------------------- analysis, report
@pytest.fixture(scope="module")
def window_results(unet):
    from cfmodules.window_analysis import analyze_windows

    ad = SAMPLERS["ddim"](unet)
    return analyze_windows(ad, LAYER, n_pairs=4, n_modules=2, stability_ks=(), n_hybrids=2,
                           n_samples=4, progress=False)


def test_analyze_windows_gives_one_result_per_window(window_results, tmp_path):
    from cfmodules.analysis import AnalysisResult

    assert list(window_results) == ["early", "middle", "late"]
    assert [r.sampler["window"] for r in window_results.values()] == [[0, 1], [2, 3], [4, 5]]
    late = window_results["late"]
    late.save(tmp_path / "late.npz")
    back = AnalysisResult.load(tmp_path / "late.npz")
    assert back.sampler == late.sampler and back.window_name == "late"
    assert "window: late" in back.to_text()
    # the maps differ between windows: each window swaps at other steps
    assert not np.allclose(window_results["early"].maps, late.maps)


def test_analyze_window_matches_its_influence_maps(unet, window_results):
    from cfmodules.analysis import analyze

    ad = SAMPLERS["ddim"](unet)
    res = analyze(ad, LAYER, n_pairs=4, n_modules=2, stability_ks=(), n_hybrids=2,
                  n_samples=4, progress=False, step_window="late")
    np.testing.assert_array_equal(res.maps, window_results["late"].maps)
    direct = influence_maps(ad, LAYER, n_pairs=4, step_window="late", **KW)
    np.testing.assert_allclose(res.maps, direct.maps, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="step_window= is for diffusion"):
        analyze(GeneratorAdapter(nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 2, 2))),
                                 (4,)), "0", n_pairs=2, step_window="late", progress=False)


def test_window_report_shows_the_windows_side_by_side(window_results, tmp_path):
    from cfmodules.report import write_report, write_window_report

    path = write_window_report(window_results, tmp_path, links={"late": "late/report.html"})
    text = path.read_text()
    for name in ("early", "middle", "late"):
        assert f"<h2>{name}</h2>" in text
        assert (tmp_path / f"window_{name}_templates.png").is_file()
    assert "late/report.html" in text
    one = write_report(window_results["late"], tmp_path / "late").read_text()
    assert "at each of the steps late = [4, 5]" in one


def test_explorer_makes_window_hybrids(unet, window_results):
    from cfmodules.explorer import Explorer

    ad = SAMPLERS["ddim"](unet)
    result = window_results["late"]
    ex = Explorer(result, ad, n_pairs=2)
    got = ex.hybrids({LAYER: [0, 3]})
    z1, z2 = pair_latents(ad, 2, ex.seed)
    want = hybridize(ad.with_window("late"), z1, z2, {LAYER: [0, 3]})
    np.testing.assert_array_equal(got, ex._display(want))
    with pytest.raises(ConfigError, match="sampler differs"):
        Explorer(result, from_diffusers(unet, DDIMScheduler(), 7), n_pairs=2)


def test_notebook_display_of_a_window_analysis(window_results):
    html = window_results["middle"]._repr_html_()
    assert "<img" in html


@pytest.mark.numerics
def test_the_in_step_cut_replays_what_runs_before_the_layer(unet):
    from cfmodules.samplers import WindowSwaps

    ad = SAMPLERS["ddpm"](unet).with_window("late")  # steps 4, 5
    z1, z2 = pair_latents(ad, 3, seed=2)
    groups = [{LAYER: torch.tensor([c])} for c in (0, 4, 9)]
    cut, full = WindowSwaps(ad, groups), WindowSwaps(ad, groups, in_step_cut=False)
    cut.begin_block(z1, z2)
    full.begin_block(z1, z2)
    # everything before down_blocks.1.resnets.0 at step 4: the input conv, the time
    # embedding, the first down block; not the layer's own block, nor what follows it
    assert {"conv_in", "time_proj", "time_embedding", "down_blocks.0"} <= set(cut.cache.outputs)
    assert not {"down_blocks.1", "mid_block", "up_blocks.0"} & set(cut.cache.outputs)
    calls = []
    # inside the replayed block (its own hooks fire on a replay too)
    handle = unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        got = cut.hybrids(slice(0, 3), slice(0, 3))
        assert len(calls) == 1  # step 5 only: step 4's first block was replayed
        want = full.hybrids(slice(0, 3), slice(0, 3))
        assert len(calls) == 3
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- the real model
def _ddpm_faces(**kw):
    from cfmodules import zoo
    from cfmodules.errors import ModelNotAvailableError

    try:
        return zoo.load("ddpm-faces", **kw)
    except ModelNotAvailableError as e:  # pragma: no cover - an install without the extra
        pytest.skip(str(e))


def test_ddpm_faces_samples_look_like_the_faces_it_was_trained_on():
    from cfmodules.zoo.began import prepare_faces
    from cfmodules.zoo.vae_faces import olivetti_faces

    ad = _ddpm_faces(steps=10)
    assert ad.name == "ddpm-faces" and ad.n_steps == 10 and not ad.stochastic
    images = ad.generate(ad.sample_latents(16, seed=0))
    assert images.shape == (16, 1, 32, 32)
    faces = prepare_faces(olivetti_faces(), 32)
    # the mean sample is the mean face (the faces are aligned): correlation near 1
    a, b = images.mean(0).flatten(), faces.mean(0).flatten()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert corr > 0.8, corr
    # and the samples differ from each other (not one face)
    assert float(images.std(0).mean()) > 0.1


def test_ddpm_faces_weights_are_hash_checked(monkeypatch):
    from cfmodules.errors import ModelNotAvailableError
    from cfmodules.zoo import ddpm_faces

    _ddpm_faces(steps=2)
    monkeypatch.setattr(ddpm_faces, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ModelNotAvailableError, match="SHA-256"):
        ddpm_faces.load()
    with pytest.raises(ConfigError, match="scheduler"):
        ddpm_faces.load(scheduler="euler")


# ---------------------------------------------------------------------- command line
FACTORY = '''
from diffusers import DDIMScheduler, UNet2DModel
import torch
from cfmodules.samplers import from_diffusers

def make(device=None):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       add_attention=False).eval()
    return from_diffusers(unet, DDIMScheduler(), 6, name="tiny-unet")
'''
CLI_SMALL = ["--pairs", "3", "--k", "2", "--no-stability", "--hybrids", "2", "--samples", "4",
             "--quiet", "--layer", LAYER]


def test_cli_analyze_writes_the_windows_side_by_side(tmp_path, capsys):
    from cfmodules.analysis import AnalysisResult
    from cfmodules.cli import main

    (tmp_path / "tiny.py").write_text(FACTORY)
    out = tmp_path / "out"
    assert main(["analyze", "--model", f"{tmp_path / 'tiny.py'}:make", "--out", str(out),
                 *CLI_SMALL]) == 0
    text = (out / "report.html").read_text()
    for name in ("early", "middle", "late"):
        assert f"window-{name}/report.html" in text
        res = AnalysisResult.load(out / f"window-{name}" / "results.npz")
        assert res.window_name == name
    # one window, by its steps
    assert main(["analyze", "--model", f"{tmp_path / 'tiny.py'}:make", "--out",
                 str(tmp_path / "one"), "--step-window", "0,1", *CLI_SMALL]) == 0
    assert AnalysisResult.load(tmp_path / "one" / "results.npz").sampler["window"] == [0, 1]
    capsys.readouterr()
    assert main(["analyze", "--model", f"{tmp_path / 'tiny.py'}:make", "--out",
                 str(tmp_path / "bad"), "--step-window", "0,9", *CLI_SMALL]) == 2
    assert "outside the schedule" in capsys.readouterr().err


def test_checkpoint_identity_holds_an_own_step_function(tmp_path):
    ck = tmp_path / "s.ckpt"
    kw = {**KW, "checkpoint": ck, "n_pairs": 2}
    influence_maps(state_adapter(), "body.1", [0], **kw)
    other = DiffusionAdapter(StateNet(), (2, 4, 4), lambda den, k, x, noise: den(x) * 0.5, 6)
    with pytest.raises(CheckpointError, match="sampler_step"):
        influence_maps(other, "body.1", [0], **kw)


def test_the_scorecard_refuses_a_diffusion_model(unet):
    from cfmodules.evaluation.scorecard import scorecard

    mask = np.zeros((1, 8, 8), bool)
    mask[0, :4] = True
    with pytest.raises(ConfigError, match="diffusion"):
        scorecard(SAMPLERS["ddim"](unet), [{LAYER: [0, 1]}], masks=mask,
                  n_pairs=2, n_null=19, n_boot=10)


def test_layers_are_listed_per_step(unet):
    infos = {i.name: i for i in SAMPLERS["ddim"](unet).layers()}
    assert infos[LAYER].calls == 1 and infos[LAYER].shape == (16, 4, 4)

    def step(den, k, x, noise):
        return den.extra(den(x)) if k % 2 else den(x)

    infos = {i.name: i for i in DiffusionAdapter(StateNet(), (2, 4, 4), step, 6).layers()}
    assert infos["body.1"].calls == 1
    assert infos["extra"].calls == 3  # 3 of 6 steps: the chain's total, not per step
