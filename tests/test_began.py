"""BEGAN (the paper's third family): architecture, the equilibrium step, the example."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cfmodules.errors import ConfigError, ShapeError
from cfmodules.monitor import ModularityMonitor
from cfmodules.zoo import began

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_began_olivetti.py"


@pytest.mark.parametrize("size", [16, 32])
def test_generator_and_autoencoder_shapes(size):
    g = began.BEGANGenerator(latent_dim=8, n_filters=4, image_size=size)
    d = began.BEGANDiscriminator(latent_dim=8, n_filters=4, image_size=size)
    x = g(torch.randn(3, 8))
    assert x.shape == (3, 1, size, size)
    assert d(x).shape == x.shape and d.loss(x).dim() == 0
    names = dict(g.named_modules())
    assert {"fc", "block8.elu2", "up16", "block16.conv1", "to_image"} <= set(names)
    assert (f"block{size}.elu2" in names) and (f"up{2 * size}" not in names)
    adapter = began.adapter(g)
    assert adapter.layer_shape("block16.elu2") == (4, 16, 16)


def test_bad_architecture_and_training_arguments():
    with pytest.raises(ConfigError, match="image_size"):
        began.BEGANGenerator(image_size=48)
    with pytest.raises(ConfigError, match="n_filters"):
        began.BEGANDiscriminator(n_filters=0)
    g, d = began.BEGANGenerator(8, 4, 16), began.BEGANDiscriminator(8, 4, 16)
    with pytest.raises(ConfigError, match="gamma"):
        began.BEGANTrainer(g, d, gamma=0)
    with pytest.raises(ConfigError, match="k must"):
        began.BEGANTrainer(g, d, k=2.0)
    trainer = began.BEGANTrainer(g, d)
    with pytest.raises(ShapeError, match="Real images"):
        trainer.step(torch.zeros(2, 1, 32, 32), torch.zeros(2, 8))
    with pytest.raises(ShapeError, match="z must"):
        trainer.step(torch.zeros(2, 1, 16, 16), torch.zeros(2, 9))
    with pytest.raises(ConfigError):
        began.adapter(torch.nn.Linear(2, 2))


def test_one_step_follows_the_equilibrium_rule():
    torch.manual_seed(0)
    g, d = began.BEGANGenerator(8, 4, 16), began.BEGANDiscriminator(8, 4, 16)
    trainer = began.BEGANTrainer(g, d, gamma=0.5, lambda_k=0.1, k=0.3)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    z = torch.randn(4, 8)
    with torch.no_grad():
        loss_real = float(d.loss(real))
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    stats = trainer.step(real, z)
    assert stats.loss_real == pytest.approx(loss_real, rel=1e-6)
    expected_k = min(max(0.3 + 0.1 * (0.5 * stats.loss_real - stats.loss_fake), 0.0), 1.0)
    assert stats.k == pytest.approx(expected_k, abs=1e-12) and trainer.k == stats.k
    assert stats.convergence == pytest.approx(
        stats.loss_real + abs(0.5 * stats.loss_real - stats.loss_fake))
    assert all(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    big = began.BEGANTrainer(g, d, lambda_k=1e6)
    assert big.step(real, z).k in (0.0, 1.0)  # clipped to [0, 1]


def test_olivetti_faces_at_32():
    from cfmodules.zoo.vae_faces import olivetti_faces

    faces = began.prepare_faces(olivetti_faces(), 32)
    assert faces.shape == (400, 1, 32, 32)
    assert -1.0 <= float(faces.min()) < -0.5 and 0.5 < float(faces.max()) <= 1.0
    with pytest.raises(ShapeError):
        began.prepare_faces(faces, 16)


def test_a_few_steps_with_the_monitor(tmp_path):
    torch.manual_seed(0)
    g, d = began.BEGANGenerator(8, 6, 16), began.BEGANDiscriminator(8, 4, 16)
    trainer = began.BEGANTrainer(g, d)
    monitor = ModularityMonitor(began.adapter(g), "block16.elu1", every=2, n_modules=2,
                                n_pairs=4, n_init=1, stability_repeats=2, log_dir=tmp_path,
                                tensorboard=False)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    for step in range(5):
        monitor.step(step)
        trainer.step(real, torch.randn(4, 8))
    assert [c.step for c in monitor.checks] == [0, 2, 4]
    assert all(np.isfinite(c.stability) and sum(c.sizes) == 6 for c in monitor.checks)


@pytest.mark.slow
def test_the_example_trains_monitors_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("train_began_olivetti", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "run"
    assert mod.main(["--steps", "2", "--every", "1", "--g-filters", "6", "--d-filters", "4",
                     "--pairs", "2", "--k", "2", "--analysis-pairs", "2", "--batch", "4",
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for name in ("modularity_curves.png", "template_strip.png", "samples.png",
                 "report/report.html", "results.npz", "training.jsonl"):
        assert (out / name).stat().st_size > 0, name
    state = torch.load(out / "generator.pt", weights_only=True)
    assert state["fc.weight"].shape == (6 * 64, 64)
    assert not list(out.rglob("*.tmp"))
