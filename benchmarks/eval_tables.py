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

The shortcut case is ``examples/shortcut_detection.py``; the Fashion-MNIST Table 2 needs
the Debian package ``dataset-fashion-mnist`` and a trained VAE (see docs/evaluation.md).

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

TABLES = ("vae-faces", "dcgan", "face-case")


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
    norm = table.normalized()
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tables", nargs="*", default=list(TABLES), choices=TABLES)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
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
    print(f"RESULT eval_tables seconds={time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
