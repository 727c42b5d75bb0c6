"""ModularityMonitor: it does not disturb training, follows the weights, matches modules."""

from __future__ import annotations

import copy
import json
import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.errors import (
    CfModulesError,
    ConfigError,
    GeneratorOutputError,
    LayerNotFoundError,
    ModelNotAvailableError,
    ShapeError,
)
from cfmodules.influence import influence_maps
from cfmodules.modules import locality, smooth
from cfmodules.monitor import (
    ModularityMonitor,
    MonitorHistory,
    MonitorSettings,
    chance_consistency,
    map_entropy,
    match_templates,
)
from cfmodules.synthetic import load_planted_conv
from conftest import no_hooks_left

FAST = dict(n_pairs=4, n_init=1, stability_repeats=2)


class TrainableGenerator(nn.Module):
    """Written the way training code is: BatchNorm, functional dropout, a layer called twice.

    z (N, 4) -> fc -> (8, 4, 4) -> BatchNorm -> ReLU -> ConvT -> BatchNorm -> ReLU ('act',
    6 channels, 8x8) -> dropout(training) -> conv -> tanh, then the same conv again on a
    skip of the activation: an image (N, 1, 8, 8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8 * 4 * 4)
        self.bn0 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, 2, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.fc(z).view(-1, 8, 4, 4)))
        h = self.act(self.bn1(self.up(h)))
        h = F.dropout(h, 0.2, training=self.training)
        return torch.tanh(self.out(h))


def _train(steps: int, monitor_every: int | None, tmp_path=None, seed: int = 0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    g = TrainableGenerator()
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    monitor = None
    if monitor_every is not None:
        monitor = ModularityMonitor(GeneratorAdapter(g, latent_shape=4), "act", every=monitor_every,
                                    n_modules=2, log_dir=tmp_path, **FAST)
    target = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    for step in range(steps):
        g.train()
        z = torch.randn(8, 4)  # the global stream: a monitor that drew from it would show
        loss = (g(z) - target).pow(2).mean() + 1e-3 * random.random() + 1e-3 * np.random.rand()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(step)
    return g, opt, monitor


def test_training_with_the_monitor_ends_bitwise_identical(tmp_path):
    plain, opt_a, _ = _train(7, None)
    state_a = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, opt_b, monitor = _train(7, 2, tmp_path)
    assert not [w for w in caught if "train mode" in str(w.message)]  # training is the point
    state_b = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert [c.step for c in monitor.checks] == [0, 2, 4, 6]  # it did run, in train mode
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm running statistics
    assert torch.equal(state_a[0], state_b[0])
    assert np.array_equal(state_a[1], state_b[1]) and state_a[2] == state_b[2]
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert watched.training and all(m.training for m in watched.modules())
    assert no_hooks_left(watched)


def test_monitor_restores_eval_mode_and_leaves_no_trace(tmp_path):
    g = TrainableGenerator().eval()
    monitor = ModularityMonitor(GeneratorAdapter(g, latent_shape=4), "act", n_modules=2, **FAST)
    before = copy.deepcopy(g.state_dict())
    monitor.check(0)
    assert not any(m.training for m in g.modules())
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert all(p.grad is None for p in g.parameters())


def test_maps_follow_the_weights_the_optimizer_changes():
    """The adapter the monitor keeps sees the trained weights, like a fresh wrapper of a copy."""
    torch.manual_seed(1)
    g = TrainableGenerator()
    adapter = GeneratorAdapter(g, latent_shape=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the monitor's checks: no train-mode notice
        monitor = ModularityMonitor(adapter, "act", n_modules=2, **FAST)
        monitor.check(0)  # captures the graph (and any cached weights) before training
    with pytest.warns(UserWarning, match="in train mode"):  # the user's own call still warns
        before = influence_maps(adapter, "act", n_pairs=4, progress=False).maps
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    for _ in range(3):
        g.train()
        loss = g(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reused = influence_maps(adapter, "act", n_pairs=4, progress=False)
    with pytest.warns(UserWarning, match="in train mode"):  # a new adapter: warned again
        fresh = influence_maps(GeneratorAdapter(copy.deepcopy(g), latent_shape=4), "act",
                               n_pairs=4, progress=False)
    assert not np.allclose(before, fresh.maps, rtol=1e-3)  # training did change the maps
    np.testing.assert_allclose(reused.maps, fresh.maps, rtol=1e-5, atol=1e-7)
    check = monitor.check(3)
    other = ModularityMonitor(GeneratorAdapter(copy.deepcopy(g), latent_shape=4), "act",
                              n_modules=2, **FAST).check(3)
    assert sorted(check.sizes) == sorted(other.sizes)
    np.testing.assert_allclose(sorted(check.influence), sorted(other.influence), rtol=1e-5)
    assert check.stability == pytest.approx(other.stability)


def test_planted_modules_are_found_and_kept_across_checks(tmp_path):
    adapter = load_planted_conv(n_modules=3, channels_per_module=4)
    truth = adapter.generator.true_labels()
    monitor = ModularityMonitor(adapter, adapter.generator.layer, n_modules=3, n_pairs=4,
                                stability_repeats=3, every=5, log_dir=tmp_path,
                                tensorboard=False)
    first = monitor.step(0)
    assert monitor.step(3) is None and monitor.step(3) is None
    second = monitor.step(5)
    from cfmodules.modules import match_labels

    assert match_labels(first.labels, truth)[0] == 1.0
    assert first.stability == pytest.approx(1.0) and first.stability_chance < 0.8
    assert np.array_equal(first.labels, second.labels)  # matched: same numbers
    assert second.label_agreement == 1.0
    np.testing.assert_allclose(second.template_shift, 0.0, atol=1e-9)
    assert sorted(first.sizes) == [4, 4, 4]
    assert all(i > 0 for i in first.influence)
    assert first.template_shift is None and first.label_agreement is None
    # locality: the library's one definition, of the maps smoothed with the window
    maps = influence_maps(adapter, adapter.generator.layer, n_pairs=4, progress=False).maps
    assert first.locality == pytest.approx(np.nanmean(locality(smooth(maps, 3))), rel=1e-5)
    np.testing.assert_allclose(first.template_locality, locality(first.templates), rtol=1e-6)
    assert 0.3 < first.locality < 1  # planted modules act on a third of the image each


def test_modules_keep_their_numbers_when_the_clustering_permutes_them():
    adapter = load_planted_conv(n_modules=3, channels_per_module=4)
    monitor = ModularityMonitor(adapter, adapter.generator.layer, n_modules=3, n_pairs=4,
                                stability_repeats=2)
    first = monitor.check(0)
    perm = np.array([2, 0, 1])
    # the previous check saw the same modules under other numbers
    monitor.checks[-1] = type(first)(**{**first.__dict__, "templates": first.templates[perm],
                                        "labels": np.argsort(perm)[first.labels]})
    second = monitor.check(1)
    assert np.array_equal(second.labels, np.argsort(perm)[first.labels])
    np.testing.assert_allclose(second.templates, first.templates[perm], rtol=1e-6)
    np.testing.assert_allclose(second.template_shift, 0.0, atol=1e-9)


def test_match_templates_by_hand():
    a = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    b = np.array([[0, 0, 2.0], [3, 0, 0], [0, 1, 1]])
    order, cos = match_templates(a, b)
    assert order.tolist() == [1, 2, 0]
    np.testing.assert_allclose(cos, [1.0, np.sqrt(0.5), 1.0])
    with pytest.raises(ShapeError):
        match_templates(a, b[:2])


def test_locality_entropy_and_chance_by_hand():
    maps = np.zeros((3, 10, 10))
    maps[0] = 1.0  # even
    maps[1, 2, 3] = 5.0  # one pixel
    maps[2, :1] = 1.0  # one row of ten: the top 10% of the pixels
    # the monitor's locality is the library's one definition
    np.testing.assert_allclose(locality(maps), [0.0, 1 - 1 / 100, 0.9])
    np.testing.assert_allclose(map_entropy(maps), [1.0, 0.0, np.log(10) / np.log(100)])
    with pytest.raises(ShapeError):
        map_entropy(np.ones(4))
    assert chance_consistency([5], 30) == 1.0
    big = chance_consistency([100, 100], 600)
    assert 0.5 <= big < 0.56  # large B: close to 1/K; small B: well above
    assert chance_consistency([4, 4], 12) > big


def test_log_files_are_complete_and_read_back_without_pickle(tmp_path):
    adapter = load_planted_conv(n_modules=2, channels_per_module=3)
    with ModularityMonitor(adapter, adapter.generator.layer, n_modules=2, every=1,
                           log_dir=tmp_path, tensorboard=False, **FAST) as monitor:
        for step in range(3):
            monitor.step(step)
    lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["sizes"] == list(monitor.checks[1].sizes) and len(rows[0]["labels"]) == 6
    hist = MonitorHistory.load(tmp_path)
    assert hist.templates.shape == (3, 2, 16, 16) and hist.steps.tolist() == [0, 1, 2]
    assert np.isnan(hist.template_shift[0]).all() and np.isfinite(hist.template_shift[1:]).all()
    np.testing.assert_array_equal(hist.labels, monitor.history().labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.jsonl", "monitor.npz"]
    with pytest.raises(ConfigError):
        monitor.step(3)  # closed


def test_tensorboard_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    adapter = load_planted_conv(n_modules=2, channels_per_module=3)
    with ModularityMonitor(adapter, adapter.generator.layer, n_modules=2, every=1,
                           log_dir=tmp_path, tensorboard=True, **FAST) as monitor:
        monitor.step(0)
        monitor.step(1)
    acc = EventAccumulator(str(tmp_path)).Reload()
    stab = acc.Scalars("modularity/stability")
    assert [e.step for e in stab] == [0, 1]
    assert stab[1].value == pytest.approx(monitor.checks[1].stability)
    assert "module1/template_shift" in acc.Tags()["scalars"]
    assert "modularity/templates" in acc.Tags()["images"]


def test_tensorboard_required_but_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails
    adapter = load_planted_conv(n_modules=2, channels_per_module=3)
    with pytest.raises(ModelNotAvailableError, match="pip install"):
        ModularityMonitor(adapter, adapter.generator.layer, n_modules=2, log_dir=tmp_path,
                          tensorboard=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monitor = ModularityMonitor(adapter, adapter.generator.layer, n_modules=2, log_dir=tmp_path,
                                **FAST)  # default: without tensorboard, files only
    monitor.check(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.jsonl", "monitor.npz"]


def test_bad_arguments_fail_at_once(tiny):
    adapter = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    with pytest.raises(ConfigError, match="GeneratorAdapter"):
        ModularityMonitor(tiny, "act")
    with pytest.raises(LayerNotFoundError, match="act"):
        ModularityMonitor(adapter, "acct")
    with pytest.raises(ConfigError, match="n_modules"):
        ModularityMonitor(adapter, "act", n_modules=5)
    with pytest.raises(ConfigError, match="every"):
        ModularityMonitor(adapter, "act", evry=3)
    with pytest.raises(ConfigError):
        MonitorSettings(every=0)
    with pytest.raises(ConfigError):
        MonitorSettings(n_pairs=1)
    with pytest.raises(ConfigError):
        ModularityMonitor(adapter, "act", n_modules=2, errors="ignore")
    with pytest.raises(ConfigError, match="log_dir"):
        ModularityMonitor(adapter, "act", n_modules=2, tensorboard=True)
    monitor = ModularityMonitor(adapter, "act", n_modules=2, every=10, **FAST)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="step"):
            monitor.step(bad)
    monitor.step(5)
    with pytest.raises(ConfigError, match="went back"):
        monitor.step(4)
    with pytest.raises(ConfigError, match="No check"):
        monitor.history()


class Diverging(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 4)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.up(z))))


def test_a_failing_check_warns_and_training_goes_on(tmp_path):
    g = Diverging().train()
    adapter = GeneratorAdapter(g, latent_shape=(2, 1, 1))
    monitor = ModularityMonitor(adapter, "act", n_modules=2, every=1, log_dir=tmp_path,
                                tensorboard=False, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no train-mode notice: training is the point
        assert monitor.step(0) is not None
    with torch.no_grad():
        g.out.bias.fill_(float("nan"))  # training diverged
    with pytest.warns(UserWarning, match="step 1 failed"):
        assert monitor.step(1) is None
    assert g.training and g.drop.training and no_hooks_left(g)
    rows = [json.loads(x) for x in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and "NaN" in rows[-1]["error"]
    strict = ModularityMonitor(adapter, "act", n_modules=2, errors="raise", **FAST)
    with pytest.raises(GeneratorOutputError):
        strict.check(0)
    assert g.training and no_hooks_left(g)
    assert issubclass(GeneratorOutputError, CfModulesError)


def test_dead_layer_is_reported_not_clustered(tiny):
    with torch.no_grad():
        tiny.out.weight.zero_()
    adapter = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    monitor = ModularityMonitor(adapter, "act", n_modules=2, errors="raise", **FAST)
    with pytest.raises(GeneratorOutputError, match="only zeros"):
        monitor.check(0)


@pytest.mark.numerics
def test_a_generator_wrapped_in_train_mode_is_traced_in_eval_mode():
    """fx bakes `training=self.training` of functional dropout into the graph at trace time."""
    g = TrainableGenerator().train()
    adapter = GeneratorAdapter(g, latent_shape=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        split = influence_maps(adapter, "act", n_pairs=4, algorithm="split", progress=False)
        hook = influence_maps(adapter, "act", n_pairs=4, algorithm="hook", progress=False)
    # two paths: float32 rounding, absolute in image units
    np.testing.assert_allclose(split.maps, hook.maps, rtol=1e-5, atol=1e-6)
    assert g.training


def test_curves_and_template_strip_figures():
    from cfmodules import plots

    adapter = load_planted_conv(n_modules=2, channels_per_module=3)
    monitor = ModularityMonitor(adapter, adapter.generator.layer, n_modules=2, every=1, **FAST)
    for step in range(3):
        monitor.step(step)
    hist = monitor.history()
    fig = plots.plot_modularity_curves(hist, title="t")
    assert len(fig.axes) == 5  # four panels and the locality axis
    black = fig.axes[0].lines[0]
    np.testing.assert_allclose(black.get_ydata(), hist.stability)
    strip = plots.plot_template_strip(hist, max_columns=2)
    assert len(strip.axes[0].images) == 2 * 2  # K rows, first and last check
    texts = [t.get_text() for t in strip.axes[0].texts]
    assert texts[:2] == ["step 0", "step 2"] and texts[2:] == ["module 0", "module 1"]
    with pytest.raises(ShapeError, match="stability_chance"):
        plots.plot_modularity_curves({"steps": hist.steps, "stability": hist.stability})
    with pytest.raises(ShapeError, match="T, K, H, W"):
        plots.plot_template_strip(np.zeros((2, 16, 16)))
    with pytest.raises(ShapeError, match="steps"):
        plots.plot_template_strip(hist.templates, steps=[1])


def test_a_generator_moved_after_wrapping_is_refused(tiny):
    adapter = GeneratorAdapter(tiny, latent_shape=(2, 1, 1))
    monitor = ModularityMonitor(adapter, "act", n_modules=2, errors="raise", **FAST)
    tiny.to("meta")  # another device than the adapter's
    with pytest.raises(ConfigError, match="wrap the generator after moving it"):
        monitor.check(0)
    assert monitor.checks == [] and no_hooks_left(tiny)
