"""Detecting a shortcut classifier with counterfactual hybrids: a controlled case.

A synthetic world of 16x16 images: a light object (square, disk or triangle: the class)
on a coloured background (red, green or blue). Two classifiers are trained on rendered
images:

- the *shortcut* classifier on a biased training set where the background colour always
  goes with the class (square on red, disk on green, triangle on blue);
- the *robust* classifier on decorrelated data (any object on any background).

A small generator with an object/background structure (an object stream and a background
stream merged in its hidden layer ``hidden``) is trained, in a few CPU minutes, to render
the world from a latent. Then the library's pipeline runs with no knowledge of which
hidden channel does what: influence maps of the channels of ``hidden`` -> NMF clustering
into two modules -> the module whose influence lies on the image border is the background
module -> hybrids that swap only the background module between two samples ->
robustness analysis. A classifier is flagged when it keeps Original 1's class (the object
is unchanged) on fewer than half of the hybrids whose originals differ in class.

Run ``python examples/shortcut_detection.py`` (about 2-3 minutes on 2 CPU cores; ``--fast``
for the smaller settings of the test). The last line is::

    RESULT shortcut_flagged=True robust_flagged=False shortcut_rate=... robust_rate=...

where the rates are the shares of background-swapped hybrids classified as Original 1's
object, computed by the analysis.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfmodules.adapter import GeneratorAdapter
from cfmodules.evaluation.robustness import RobustnessResult, classifier_robustness
from cfmodules.influence import influence_maps
from cfmodules.modules import ModuleClustering

SIZE = 16
N_CLASSES = 3
SHAPES = ("square", "disk", "triangle")
COLOURS = ("red", "green", "blue")
_RGB = torch.tensor([[0.85, 0.15, 0.15], [0.15, 0.7, 0.2], [0.15, 0.3, 0.9]])
_OBJECT_RGB = torch.tensor([0.92, 0.92, 0.85])
LATENT_DIM = 9  # class one-hot (3), colour one-hot (3), position (2), shade (1)


# ----------------------------------------------------------------------------- the world


def render(cls: torch.Tensor, colour: torch.Tensor, pos: torch.Tensor, shade: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, 16, 16) in [0, 1] of objects ``cls`` on backgrounds ``colour``.

    pos (N, 2) in [-1, 1] moves the object by up to 2 pixels; shade (N,) in [-1, 1] darkens
    the background by up to 25 %.
    """
    n = cls.shape[0]
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32),
                            torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    cx = (SIZE - 1) / 2 + 2 * pos[:, 0].view(n, 1, 1)
    cy = (SIZE - 1) / 2 + 2 * pos[:, 1].view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    square = (dx.abs() <= 3.2) & (dy.abs() <= 3.2)
    disk = dx**2 + dy**2 <= 4.0**2
    triangle = (dy <= 3.5) & (dy >= -4) & (dx.abs() <= (dy + 4) * 0.6)
    mask = torch.where(cls.view(n, 1, 1) == 0, square,
                       torch.where(cls.view(n, 1, 1) == 1, disk, triangle)).float()
    bg = _RGB[colour] * (0.875 + 0.125 * shade).view(n, 1)  # (N, 3)
    img = bg.view(n, 3, 1, 1) * (1 - mask[:, None]) + _OBJECT_RGB.view(1, 3, 1, 1) * mask[:, None]
    return img


def prior(n: int, g: torch.Generator) -> torch.Tensor:
    """Latent prior: uniform class and colour (independent), uniform position and shade."""
    cls = torch.randint(N_CLASSES, (n,), generator=g)
    colour = torch.randint(N_CLASSES, (n,), generator=g)
    rest = torch.rand(n, 3, generator=g) * 2 - 1
    return torch.cat([F.one_hot(cls, N_CLASSES).float(), F.one_hot(colour, N_CLASSES).float(), rest], 1)


def render_latent(z: torch.Tensor) -> torch.Tensor:
    """The image a latent stands for: what the generator is trained to produce."""
    return render(z[:, :3].argmax(1), z[:, 3:6].argmax(1), z[:, 6:8], z[:, 8])


def object_class(z: torch.Tensor) -> torch.Tensor:
    """The true class (object shape) of the image generated from latent ``z``."""
    return z[:, :3].argmax(1)


def dataset(n: int, correlated: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rendered images and their classes; ``correlated``: background colour = class."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(N_CLASSES, (n,), generator=g)
    colour = cls.clone() if correlated else torch.randint(N_CLASSES, (n,), generator=g)
    pos = torch.rand(n, 2, generator=g) * 2 - 1
    shade = torch.rand(n, generator=g) * 2 - 1
    return render(cls, colour, pos, shade), cls


# ----------------------------------------------------------------------------- the models


class ShapesGenerator(nn.Module):
    """latent (N, 9) -> images (N, 3, 16, 16) in [0, 1].

    An object stream reads the class and position, a background stream the colour and
    shade; both are upsampled to 8x8 and concatenated in the hidden layer ``hidden``
    (channels 0-15 object stream, 16-31 background stream -- which the analysis is *not*
    told), from which a shared head renders the image.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.obj_fc = nn.Linear(5, width * 4 * 4)
        self.obj_up = nn.ConvTranspose2d(width, width, 4, 2, 1)
        self.bg_fc = nn.Linear(4, width * 4 * 4)
        self.bg_up = nn.ConvTranspose2d(width, width, 4, 2, 1)
        self.hidden = nn.ReLU()
        self.head = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, 9) -> (N, 3, 16, 16)."""
        w = self.width
        o = self.obj_up(F.relu(self.obj_fc(torch.cat([z[:, :3], z[:, 6:8]], 1))).view(-1, w, 4, 4))
        b = self.bg_up(F.relu(self.bg_fc(torch.cat([z[:, 3:6], z[:, 8:9]], 1))).view(-1, w, 4, 4))
        return self.head(self.hidden(torch.cat([o, b], 1)))


class SmallCNN(nn.Module):
    """images (N, 3, 16, 16) in [0, 1] -> logits (N, 3)."""

    classes = SHAPES

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) -> (N, 3) logits."""
        return self.net(x)


def train_generator(steps: int, seed: int = 0, batch: int = 64) -> ShapesGenerator:
    """Fit the generator to render the world from random latents (regression, MSE)."""
    torch.manual_seed(seed)
    gen = ShapesGenerator()
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z = prior(batch, g)
        loss = F.mse_loss(gen(z), render_latent(z))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return gen.eval()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur and pixel noise, so that classifiers trained on crisp renderings also
    read the slightly soft images of a generator."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=g)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x + u * (blurred - x) + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> SmallCNN:
    """Cross-entropy training of a SmallCNN, mini-batches of 64, with :func:`augment`."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = SmallCNN()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    n = images.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 64):
            idx = perm[s:s + 64]
            loss = F.cross_entropy(clf(augment(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


def accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images classified as their label."""
    with torch.no_grad():
        return float((clf(images).argmax(1) == labels).float().mean())


# ----------------------------------------------------------------------------- the analysis


def border_share(maps: np.ndarray) -> np.ndarray:
    """For maps (K, H, W): the share of each map's mass in the outer frame (a quarter of
    the side on each edge), where the object never is."""
    h, w = maps.shape[-2:]
    frame = np.ones((h, w), bool)
    m = max(1, h // 4)
    frame[m:-m, m:-m] = False
    total = maps.sum((-2, -1))
    return maps[..., frame].sum(-1) / np.where(total > 0, total, 1)


@dataclass
class Settings:
    """Sizes of the run (``fast`` for the test)."""

    gen_steps: int = 1500
    train_images: int = 3000
    epochs: int = 4
    influence_pairs: int = 64
    robustness_pairs: int = 300


FAST = Settings(gen_steps=300, train_images=3000, epochs=3, influence_pairs=32, robustness_pairs=150)


def run(settings: Settings, seed: int = 0, verbose: bool = True) -> dict:
    """Train the models, run the pipeline, return the numbers (see module docstring)."""
    say = print if verbose else (lambda *a, **k: None)
    gen = train_generator(settings.gen_steps, seed)
    test_x, test_y = dataset(600, correlated=False, seed=seed + 100)
    z = prior(256, torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        gen_err = float((gen(z) - render_latent(z)).abs().mean())
    say(f"generator: mean |error| per pixel {gen_err:.4f}")

    shortcut = train_classifier(*dataset(settings.train_images, True, seed + 1), settings.epochs, seed)
    robust = train_classifier(*dataset(settings.train_images, False, seed + 2), settings.epochs, seed)
    acc = {"shortcut": accuracy(shortcut, test_x, test_y), "robust": accuracy(robust, test_x, test_y)}
    say(f"accuracy on decorrelated test images: shortcut {acc['shortcut']:.3f}, robust {acc['robust']:.3f}")

    ad = GeneratorAdapter(gen, latent_shape=(LATENT_DIM,), prior=prior, output_range=(0.0, 1.0),
                          name="shapes")
    layer = "hidden"
    maps = influence_maps(ad, layer, n_pairs=settings.influence_pairs, seed=seed,
                          progress=False).maps  # (C, H, W)
    labels = ModuleClustering(2, method="nmf").fit(maps).labels_
    modules = {f"C{k}": {layer: np.flatnonzero(labels == k).tolist()} for k in range(2)
               if (labels == k).any()}
    mean_maps = np.stack([maps[labels == int(name[1:])].mean(0) for name in modules])
    share = border_share(mean_maps)
    background = list(modules)[int(np.argmax(share))]
    say("modules: " + "; ".join(
        f"{n}: {len(m[layer])} channels, border share {s:.2f}" for (n, m), s in zip(modules.items(), share)))
    planted = set(range(gen.width, 2 * gen.width))  # the background stream's channels
    recovered = set(modules[background][layer]) == planted
    say(f"background module: {background} (= the background stream's channels: {recovered})")

    res: RobustnessResult = classifier_robustness(
        ad, {"shortcut": shortcut, "robust": robust}, modules,
        n_pairs=settings.robustness_pairs, seed=seed + 1, labels=object_class)
    say(res.to_text())
    flags = res.context_sensitive(background)
    bg = res.modules.index(background)
    return {
        "shortcut_flagged": flags["shortcut"],
        "robust_flagged": flags["robust"],
        "shortcut_rate": float(res.rates("shortcut")["original1"][bg]),
        "robust_rate": float(res.rates("robust")["original1"][bg]),
        "accuracy": acc,
        "generator_error": gen_err,
        "modules": modules,
        "background": background,
        "background_is_planted": recovered,
        "border_share": share.tolist(),
        "result": res,
    }


def main(argv: list[str] | None = None) -> dict:
    """Command line: ``--fast`` for the test's settings, ``--seed N``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="smaller settings (the test's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run(FAST if args.fast else Settings(), seed=args.seed)
    print(f"RESULT shortcut_flagged={out['shortcut_flagged']} robust_flagged={out['robust_flagged']} "
          f"shortcut_rate={out['shortcut_rate']:.3f} robust_rate={out['robust_rate']:.3f}")
    return out


if __name__ == "__main__":
    main()
