"""Measure the tables of docs/evaluation.md (Table 2 on faces, Table 2 of the DCGAN, the face case).

Every pair comes from ``cfmodules.latents.pair_latents`` (pair p = samples 2p, 2p + 1), as
in the library since 0.2. The tables:

- ``vae-faces``: Fréchet distances between the 400 Olivetti faces R, 400 samples G and
  400 hybrids of each module of ``decoder.6`` (NMF K = 3 on 64 pairs), default (fer)
  features, normalized by d(R, G);
- ``dcgan``: the same without real data on ``dcgan-faces`` ``main.5`` (NMF K = 3 on 32
  pairs), 2000 images per set, raw distances, and the noise floor d(G, G') between the
  2000 samples of seed 0 and of seed 1;
- ``face-case``: the fer classifier on 500 hybrid pairs (seed 1) of each of those DCGAN
  modules, the originals' classes being fer's own answers, with ``min_confidence`` 0 and
  0.6.

- ``fashion``: a small VAE trained here (seeded) on 20 000 Fashion-MNIST training images
  (Debian package ``dataset-fashion-mnist``), modules of ``main.5`` (NMF K = 3 on 64 pairs),
  R = 2000 test images, 2000 images per set, with the features of a small classifier
  trained here too and with the default features.

The shortcut case is ``examples/shortcut_detection.py``.

    flock /tmp/cfmodules-bench.lock env PYTHONPATH=src python benchmarks/eval_tables.py

Prints the tables as markdown and ``RESULT eval_tables ...`` lines.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cfmodules.evaluation.fer import load_fer_classifier
from cfmodules.evaluation.frechet import (
    default_features,
    feature_statistics,
    frechet_distance,
    hybrid_distance_table,
)
from cfmodules.evaluation.robustness import classifier_robustness
from cfmodules.influence import influence_maps
from cfmodules.modules import ModuleClustering
from cfmodules.names import module_name
from cfmodules.zoo import load
from cfmodules.zoo.vae_faces import olivetti_faces

TABLES = ("vae-faces", "dcgan", "face-case", "fashion")
FASHION = "/usr/share/datasets/fashion-mnist"


def _modules(adapter, layer: str, n_pairs: int) -> tuple[dict[str, dict[str, list[int]]], list[int]]:
    """NMF K = 3 modules of ``layer`` (ModuleClustering's defaults, random_state 0)."""
    maps = influence_maps(adapter, layer, n_pairs=n_pairs, seed=0, progress=False).maps
    clust = ModuleClustering(3, "nmf", random_state=0).fit(maps)
    modules = {module_name(k): {layer: m.tolist()} for k, m in enumerate(clust.modules_)}
    return modules, [len(m) for m in clust.modules_]


def vae_faces_table() -> None:
    ad = load("vae-faces")
    modules, sizes = _modules(ad, "decoder.6", 64)
    real = olivetti_faces()
    table = hybrid_distance_table(ad, modules, n_images=len(real), real=real, seed=0)
    print(f"vae-faces decoder.6, module sizes {sizes}, d(R, G) = {table.normalizer:.2f}")
    print(table.to_markdown())
    norm = table.normalized
    lab = table.labels
    mods = [i for i, la in enumerate(lab) if la not in ("R", "G")]
    g, r = lab.index("G"), lab.index("R")
    between = [norm[i, j] for i in mods for j in mods if i > j]
    print(f"RESULT eval_tables table=vae-faces sizes={sizes} dRG={table.normalizer:.3f} "
          f"dCG={min(norm[i, g] for i in mods):.3f}-{max(norm[i, g] for i in mods):.3f} "
          f"dCR={min(norm[i, r] for i in mods):.3f}-{max(norm[i, r] for i in mods):.3f} "
          f"dCC={min(between):.3f}-{max(between):.3f}")


def dcgan_table(n_images: int = 2000) -> dict[str, dict[str, list[int]]]:
    ad = load("dcgan-faces")
    modules, sizes = _modules(ad, "main.5", 32)
    table = hybrid_distance_table(ad, modules, n_images=n_images, seed=0)
    d = table.distances
    lab = table.labels
    g = lab.index("G")
    mods = [i for i, la in enumerate(lab) if la != "G"]
    between = [d[i, j] for i in mods for j in mods if i > j]
    feats = default_features()
    stats = [feature_statistics(_samples(ad, n_images, seed), feats) for seed in (0, 1)]
    floor = frechet_distance(*stats)
    print(f"dcgan-faces main.5, module sizes {sizes}, {n_images} images per set (raw)")
    print(table.to_markdown())
    print(f"RESULT eval_tables table=dcgan sizes={sizes} "
          f"dCG={min(d[i, g] for i in mods):.3f}-{max(d[i, g] for i in mods):.3f} "
          f"dCC={min(between):.3f}-{max(between):.3f} dGG'={floor:.3f}")
    return modules


def _samples(adapter, n: int, seed: int, batch: int = 200):
    """Samples ``0 .. n-1`` of stream ``seed`` in [0, 1], batch by batch."""
    for start in range(0, n, batch):
        z = adapter.sample_latents(min(batch, n - start), seed=seed, start=start)
        with torch.no_grad():
            yield adapter.to_unit(adapter.generate(z))


def face_case(modules: dict[str, dict[str, list[int]]], n_pairs: int = 500) -> None:
    ad = load("dcgan-faces")
    fer = load_fer_classifier()
    for conf in (0.0, 0.6):
        res = classifier_robustness(ad, {"fer": fer}, modules, n_pairs=n_pairs, seed=1,
                                    min_confidence=conf)
        r = res.rates("fer")
        print(f"face case, min_confidence={conf}:")
        print(res.to_text())
        cells = " ".join(f"{m}={r['original1'][k]:.3f}/{r['original2'][k]:.3f}/"
                         f"{r['neither'][k]:.3f}" for k, m in enumerate(res.modules))
        print(f"RESULT eval_tables table=face-case min_confidence={conf} "
              f"pairs={int(r['n_informative'][0])} {cells}")


def _fashion(name: str):
    """uint8 idx files -> images (N, 1, 32, 32) in [0, 1] (zero-padded), labels (N,)."""
    import gzip

    import torch.nn.functional as F

    with gzip.open(f"{FASHION}/{name}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28) / 255.0
    with gzip.open(f"{FASHION}/{name}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return F.pad(torch.tensor(x, dtype=torch.float32), (2, 2, 2, 2)), torch.tensor(y)


class FashionDecoder(torch.nn.Module):
    """The VAE's decoder: fc -> 128x4x4 -> ConvT 64 (main.2) -> ConvT 32 (main.5) -> ConvT 1."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.fc = nn.Linear(32, 128 * 4 * 4)
        self.main = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z)).view(-1, 128, 4, 4)
        return torch.sigmoid(self.main(h))


def _train_fashion(x: torch.Tensor, y: torch.Tensor, epochs: int = 3):
    """A VAE (BCE + KL, Adam 2e-3, batch 128) and a small classifier, both seeded."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1),
                            nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(2048, 64))
    decoder = FashionDecoder()
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    clf = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    copt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            xb = x[idx]
            mu, logvar = encoder(xb).chunk(2, dim=1)
            z = mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()
            rec = F.binary_cross_entropy(decoder(z), xb, reduction="sum")
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
            opt.zero_grad()
            ((rec + kl) / len(xb)).backward()
            opt.step()
            loss = F.cross_entropy(clf(xb), y[idx])
            copt.zero_grad()
            loss.backward()
            copt.step()
    return decoder.eval(), clf.eval()


def fashion_table(n_train: int = 20000, n_images: int = 2000) -> None:
    from cfmodules.adapter import GeneratorAdapter

    x_train, y_train = _fashion("train")
    x_test, y_test = _fashion("t10k")
    decoder, clf = _train_fashion(x_train[:n_train], y_train[:n_train])
    with torch.no_grad():
        acc = float((clf(x_test).argmax(1) == y_test).float().mean())
    adapter = GeneratorAdapter(decoder, latent_shape=(32,), output_range=(0.0, 1.0),
                               name="fashion-vae")
    modules, sizes = _modules(adapter, "main.5", 64)

    def own(images: torch.Tensor) -> torch.Tensor:
        return clf[:-1](images)

    for name, feats in (("classifier", own), ("fer", None)):
        with torch.no_grad():
            table = hybrid_distance_table(adapter, modules, n_images=n_images, real=x_test,
                                          features=feats, seed=0)
        norm, lab = table.normalized, table.labels
        g, r = lab.index("G"), lab.index("R")
        mods = [i for i, la in enumerate(lab) if la not in ("R", "G")]
        between = [norm[i, j] for i in mods for j in mods if i > j]
        print(f"fashion {name} features, classifier test accuracy {acc:.3f}, sizes {sizes}")
        print(table.to_markdown())
        print(f"RESULT eval_tables table=fashion features={name} accuracy={acc:.3f} "
              f"sizes={sizes} dCG={min(norm[i, g] for i in mods):.3f}-"
              f"{max(norm[i, g] for i in mods):.3f} dCR={min(norm[i, r] for i in mods):.3f}-"
              f"{max(norm[i, r] for i in mods):.3f} dCC={min(between):.3f}-{max(between):.3f} "
              f"dRG={table.normalizer:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tables", nargs="*", choices=[*TABLES, []], metavar="TABLE",
                   help=f"tables to measure, among {', '.join(TABLES)} (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.tables = args.tables or list(TABLES)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if "vae-faces" in args.tables:
        vae_faces_table()
    modules = None
    if "dcgan" in args.tables:
        modules = dcgan_table()
    if "face-case" in args.tables:
        if modules is None:
            modules, _ = _modules(load("dcgan-faces"), "main.5", 32)
        face_case(modules)
    if "fashion" in args.tables:
        fashion_table()
    print(f"RESULT eval_tables seconds={time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
