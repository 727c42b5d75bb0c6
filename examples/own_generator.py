"""Your own generator: a custom forward function, from Python and from the command line.

cfmodules needs three things about a generator: how to sample its latent (``latent_shape``,
``prior``), how to call it (``forward``) and where the images are in what it returns
(``output_transform``). Here the generator takes keyword inputs and returns a dict, as many
research codebases do. Its body is a small convolutional generator with three planted
modules (each paints its own region of the image), so we can check that the analysis finds
them; replace ``MyGenerator`` by your trained network.

From Python (a few seconds)::

    python examples/own_generator.py --out own_report

From the command line, the factory below is all the CLI needs::

    cfmodules layers examples/own_generator.py:make_adapter
    cfmodules analyze --model examples/own_generator.py:make_adapter --layer body.main.3 --out own_report

A factory may also return a bare ``nn.Module`` whose forward takes the latent batch; then
give the latent shape: ``--model my_gan.py:make_generator --latent-shape 100,1,1``.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.analysis import analyze
from cfmodules.report import write_report
from cfmodules.synthetic import PlantedConvGenerator


class MyGenerator(nn.Module):
    """A generator with keyword inputs and a dict output (a stand-in for yours)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = PlantedConvGenerator(n_modules=3, latent_per_module=4,
                                         channels_per_module=(12, 8, 6), image_size=32)

    def forward(self, *, noise: torch.Tensor, truncation: float = 1.0) -> dict:
        """noise (N, 12, 1, 1) -> {"image": (N, 3, 32, 32) in [-1, 1], "noise": noise}."""
        return {"image": self.body(noise * truncation), "noise": noise}


def make_adapter(device: str | None = None) -> GeneratorAdapter:
    """The factory for ``cfmodules --model examples/own_generator.py:make_adapter``."""
    generator = MyGenerator().eval()
    if device is not None:
        generator.to(device)
    return GeneratorAdapter(
        generator,
        latent_shape=(12, 1, 1),                                   # one sample's noise
        prior="normal",
        forward=lambda g, z: g(noise=z, truncation=0.8),           # how to call it
        output_transform=lambda out: out["image"],                 # where the images are
        output_range=(-1.0, 1.0),                                  # for display
        device=device,
        name="my-generator",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="own_report")
    args = parser.parse_args()

    adapter = make_adapter("cpu")
    for info in adapter.layers():
        print("  ", info)
    # The hidden layer at 16x16 of the body; with a custom forward cfmodules cuts the
    # network with hooks (prefix once, suffix per hybrid) instead of torch.fx.
    result = analyze(adapter, "body.main.3", n_pairs=16, n_modules=3, stability_ks=(2, 3, 4),
                     stability_repeats=5, model_spec="examples/own_generator.py:make_adapter")
    print(result)
    truth = adapter.generator.body.true_labels()
    print("agreement with the planted modules (adjusted Rand index):",
          round(adjusted_rand_score(truth, result.labels), 3))
    result.save(f"{args.out}/results.npz")
    print("report:", write_report(result, args.out))


if __name__ == "__main__":
    main()
