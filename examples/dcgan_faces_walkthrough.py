"""Walk-through: the modules of the pretrained DCGAN faces, step by step.

Each step of the paper (Besserve et al., ICLR 2020) is one library call, so the same lines
work in a notebook. ``cfmodules analyze`` runs the same steps (and writes an HTML report);
this script shows what happens inside and writes its figures to ``--out``.

Run (30 s to 2 minutes on 2 CPU cores depending on their load and threads, see
docs/cost.md; ``--pairs 8`` for a quick look)::

    python examples/dcgan_faces_walkthrough.py --out walkthrough
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cfmodules import hybridize, zoo
from cfmodules.analysis import template_location
from cfmodules.influence import influence_maps, module_influence_maps
from cfmodules.latents import pair_latents
from cfmodules.modules import ModuleClustering, cluster_stability, module_sizes
from cfmodules.plots import (
    plot_hybrid_grid,
    plot_images,
    plot_influence_maps,
    plot_module_influence,
    plot_stability,
    plot_templates,
    save_figure,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="walkthrough", help="folder for the figures")
    parser.add_argument("--layer", default="main.8")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The generator, wrapped in a GeneratorAdapter (latent sampling, layers, hooks).
    adapter = zoo.load("dcgan-faces", device="cpu")
    print(adapter)
    for info in adapter.layers():
        print("  ", info)
    samples = adapter.to_unit(adapter.generate(adapter.sample_latents(16, seed=0)))
    save_figure(plot_images(samples, title="Samples"), out / "samples.png")

    # 2. A counterfactual hybrid: Original 1 with 64 channels of main.8 from Original 2.
    z1, z2 = pair_latents(adapter, 6, seed=0)
    hybrid = hybridize(adapter, z1, z2, {args.layer: range(64)})
    print("hybrid batch:", tuple(hybrid.shape))

    # 3. Elementary influence maps (EIM) of every channel: the mean |hybrid - Original 1|
    #    over latent pairs (eq. 2). The checkpoint makes an interrupted run resume.
    eim = influence_maps(adapter, args.layer, n_pairs=args.pairs, seed=0,
                         checkpoint=out / f"eim_{args.layer}_{args.pairs}.npz")
    print(eim)

    # 4. Modules: smooth, threshold at the 75th percentile, NMF with K templates (sec. 3.4).
    clustering = ModuleClustering(n_modules=args.k, method="nmf", random_state=0).fit(eim.maps)
    print(clustering)
    names = [f"module {k}: {template_location(t)}" for k, t in enumerate(clustering.templates_)]
    sizes = module_sizes(clustering.labels_, args.k)
    for name, channels in zip(names, clustering.modules_):
        print(f"  {name:<22} {len(channels):>3} channels: {channels[:10].tolist()} ...")
    weight = clustering.weights_[np.arange(len(eim.maps)), clustering.labels_]
    save_figure(plot_influence_maps(eim.maps, clustering.labels_, names=eim.names,
                                    module_names=names, order=weight), out / "maps.png")
    save_figure(plot_templates(clustering.templates_, background=samples.mean(0),
                               names=names, sizes=sizes), out / "templates.png")

    # 5. Hybrids of new pairs, one row per module (Fig. 4 of the paper).
    z1, z2 = pair_latents(adapter, 8, seed=1)
    hybrids = [adapter.to_unit(hybridize(adapter, z1, z2, {args.layer: m}))
               for m in clustering.modules_]
    fig = plot_hybrid_grid(adapter.to_unit(adapter.generate(z1)),
                           adapter.to_unit(adapter.generate(z2)), hybrids,
                           module_names=names, templates=clustering.templates_)
    save_figure(fig, out / "hybrids.png")

    # 6. Influence of each module (all its channels swapped at once) against its size.
    modules = {name: {args.layer: m} for name, m in zip(names, clustering.modules_) if len(m)}
    mod = module_influence_maps(adapter, modules, n_pairs=args.pairs, seed=0)
    save_figure(plot_module_influence(sizes, mod.influence, names=names),
                out / "module_influence.png")

    # 7. How stable is the clustering for each K? (sec. 4.1, Fig. 9; the paper used 20
    #    repetitions, 5 keep this walk-through short.)
    stability = cluster_stability(eim.maps, ks=range(2, 7), n_repeats=5, progress=True)
    print(stability)
    print("suggested K:", stability.suggest_k("nmf"))
    save_figure(plot_stability(stability, chosen_k=args.k), out / "stability.png")
    print(f"figures written to {out}/")


if __name__ == "__main__":
    main()
