"""Classifier robustness on hybrids: hand-checked rates, entropies, disagreements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfmodules.adapter import GeneratorAdapter
from cfmodules.errors import ConfigError, ResultFileError, ShapeError
from cfmodules.evaluation.robustness import (
    OUTCOME_EXCLUDED,
    OUTCOME_NEITHER,
    OUTCOME_ORIGINAL1,
    OUTCOME_ORIGINAL2,
    OUTCOME_SAME_CLASS,
    RobustnessResult,
    classifier_robustness,
    renormalized_entropy,
    robustness_from_probabilities,
)
from cfmodules.hybrid import hybridize


def test_renormalized_entropy_by_hand():
    p = np.array([[0.25, 0.25, 0.5], [0.1, 0.0, 0.9], [0.0, 0.0, 1.0]])
    e = renormalized_entropy(p, np.array([0, 1]))
    np.testing.assert_allclose(e, [np.log(2), 0.0, np.log(2)])  # last: no mass -> uniform
    np.testing.assert_allclose(renormalized_entropy(p, np.arange(3))[2], 0.0)


def one_hot(labels, k=3, hot=0.7):
    p = np.full((len(labels), k), (1 - hot) / (k - 1))
    p[np.arange(len(labels)), labels] = hot
    return p


def test_rates_outcomes_and_disagreement_by_hand():
    l1, l2 = np.array([0, 0, 1, 2]), np.array([1, 2, 1, 0])  # pair 2 is uninformative
    # module A: hybrids keep Original 1's class; module B: answers 1, 0, 1, 0
    a = one_hot([0, 0, 1, 2])
    b = one_hot([1, 0, 1, 0])
    res = robustness_from_probabilities(
        {"net": np.stack([a, b]), "other": np.stack([a, a])},
        {"net": l1, "other": l1}, {"net": l2, "other": l2},
        ["A", "B"], {"A": ["main.8"], "B": ["main.8"]}, {"net": ["cat", "dog", "owl"]}, top_k=2,
    )
    np.testing.assert_array_equal(res.outcomes("net"), [
        [OUTCOME_ORIGINAL1, OUTCOME_ORIGINAL1, OUTCOME_SAME_CLASS, OUTCOME_ORIGINAL1],
        [OUTCOME_ORIGINAL2, OUTCOME_ORIGINAL1, OUTCOME_SAME_CLASS, OUTCOME_ORIGINAL2],
    ])
    r = res.rates("net")
    np.testing.assert_allclose(r["original1"], [1.0, 1 / 3])
    np.testing.assert_allclose(r["original2"], [0.0, 2 / 3])
    np.testing.assert_allclose(r["neither"], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(r["se2"][1], np.sqrt(2 / 9 / 3))
    assert list(r["n_informative"]) == [3, 3]
    assert res.context_sensitive("B") == {"net": True, "other": False}
    np.testing.assert_allclose(res.disagreement(), [0.0, 0.5])
    rows = res.disagreements("B")
    assert [row["pair"] for row in rows] == [0, 3]
    assert rows[0]["net"] == "dog (original 2)" and rows[0]["other"] == "0 (original 1)"
    assert res.rate_by_layer("net") == {"main.8": pytest.approx((1.0 + 2 / 3) / 2)}
    # top-2 classes by total probability: class 0 and 1 for "net"
    assert list(res.top_classes["net"]) == [0, 1]
    # renormalized over {0, 1}: a hybrid with p = (0.7, 0.15, .15) -> (0.8235, 0.1765)
    q = np.array([0.7, 0.15]) / 0.85
    assert res.entropy["net"][0, 0] == pytest.approx(-(q * np.log(q)).sum())
    text = res.to_text()
    assert "disagreement" in text and "0.667" in text
    d = res.to_dict()
    assert d["summary"]["net"]["top_classes"] == ["cat", "dog"]
    assert d["classifiers"] == ["net", "other"] and d["disagreement"] == [0.0, 0.5]


def test_neither_and_no_informative_pairs():
    res = robustness_from_probabilities(
        {"c": one_hot([2, 2])[None]}, {"c": np.array([0, 1])}, {"c": np.array([1, 1])}, ["M"])
    r = res.rates()
    assert r["neither"][0] == pytest.approx(1.0) and r["n_informative"][0] == 1
    res = robustness_from_probabilities(
        {"c": one_hot([1])[None]}, {"c": np.array([1])}, {"c": np.array([1])}, ["M"])
    assert np.isnan(res.rates()["original1"][0])
    assert res.outcomes()[0, 0] == OUTCOME_SAME_CLASS
    assert OUTCOME_NEITHER == 0


def test_bad_array_inputs():
    with pytest.raises(ShapeError, match="modules=2"):
        robustness_from_probabilities({"c": np.zeros((3, 2, 3))}, {"c": [0, 0]}, {"c": [0, 0]}, ["A", "B"])
    with pytest.raises(ShapeError, match=r"\(2,\)"):
        robustness_from_probabilities({"c": np.zeros((1, 2, 3))}, {"c": [0]}, {"c": [0, 0]}, ["A"])
    with pytest.raises(ConfigError, match="top_k"):
        robustness_from_probabilities({"c": np.zeros((1, 1, 3))}, {"c": [0]}, {"c": [0]}, ["A"], top_k=0)
    res = robustness_from_probabilities({"c": one_hot([0])[None]}, {"c": [0]}, {"c": [1]}, ["C0"])
    with pytest.raises(ConfigError, match="Did you mean 'C0'"):
        res.context_sensitive("C1")
    with pytest.raises(ConfigError, match="at least two"):
        res.disagreement()


# ------------------------------------------------------------------ with a generator


class Brightness(torch.nn.Module):
    """Classifier of a 1x2x2 image: class 1 if the top-left pixel is brighter than the bottom-right."""

    classes = ("dark-first", "bright-first")

    def forward(self, x):
        d = (x[:, 0, 0, 0] - x[:, 0, 1, 1]) * 20
        return torch.stack([-d, d], 1)


@pytest.fixture
def adapter(tiny):
    return GeneratorAdapter(tiny, latent_shape=(2, 1, 1))


@pytest.mark.numerics
def test_full_swap_follows_original2_and_result_is_batch_independent(adapter):
    clf = Brightness().train()
    mods = {"all": {"act": [0, 1, 2, 3]}, "one": {"act": [1]}}
    res = classifier_robustness(adapter, {"b": clf}, mods, n_pairs=40, seed=3, batch_size=40)
    assert clf.training  # restored
    r = res.rates("b")
    assert r["n_informative"][0] > 5
    assert r["original2"][0] == 1.0  # every channel from Original 2: the hybrid *is* Original 2
    res2 = classifier_robustness(adapter, {"b": clf}, mods, n_pairs=40, seed=3, batch_size=7)
    for c in ("b",):
        np.testing.assert_array_equal(res.predictions[c], res2.predictions[c])
        # float32 generator and classifier in batches of 40 vs 7: rounding (3e-6 relative
        # on an AMD EPYC), and entropies of confident predictions are tiny (hence atol)
        np.testing.assert_allclose(res.entropy[c], res2.entropy[c], rtol=1e-5, atol=1e-7)
    # the same pairs and hybrids as hybridize on the documented latents
    z = adapter.sample_latents(80, seed=3)  # pair i is samples 2i and 2i + 1
    z1, z2 = z[0::2], z[1::2]
    h = adapter.to_unit(hybridize(adapter, z1, z2, mods["one"]))
    np.testing.assert_array_equal(res.predictions["b"][1], clf(h).argmax(1).numpy())
    np.testing.assert_array_equal(res.labels2["b"], clf(adapter.to_unit(adapter.generate(z2))).argmax(1).numpy())
    again = res.hybrids(adapter, "one", [0, 5])
    torch.testing.assert_close(again, hybridize(adapter, z1[[0, 5]], z2[[0, 5]], mods["one"]))
    assert res.class_name("b", 1) == "bright-first"


def test_given_labels_and_two_classifiers(adapter):
    def labels(z):  # the sign of the first latent coordinate
        return (z[:, 0, 0, 0] > 0).long()

    res = classifier_robustness(
        adapter, {"b": Brightness(), "flip": lambda x: -Brightness()(x)},
        [{"act": [0, 1, 2, 3]}], n_pairs=30, seed=0, labels=labels)
    z1 = adapter.sample_latents(60, seed=0)[0::2]  # Original 1 of pair i is sample 2i
    np.testing.assert_array_equal(res.labels1["flip"], labels(z1).numpy())
    assert res.modules == ["module 0"]
    assert res.disagreement().shape == (1,)
    assert res.info["labels"] == "given"


def test_bad_classifier_inputs(adapter):
    mods = [{"act": [0]}]
    with pytest.raises(ConfigError, match="logits"):
        classifier_robustness(adapter, Brightness(), mods, 4, outputs="scores")
    with pytest.raises(ShapeError, match=r"\(N, classes\)"):
        classifier_robustness(adapter, lambda x: x.flatten(), mods, 4)
    with pytest.raises(ConfigError, match="probabilities"):
        classifier_robustness(adapter, Brightness(), mods, 4, outputs="probabilities")
    with pytest.raises(ConfigError, match="layer -> channel"):
        classifier_robustness(adapter, Brightness(), [[0, 1]], 4)
    with pytest.raises(ConfigError, match="callable"):
        classifier_robustness(adapter, {"x": 3}, mods, 4)


def test_excluded_originals_leave_the_rates_and_disagreement():
    l1, l2 = np.array([0, -1, 1, 0]), np.array([1, 1, 0, 2])
    a = one_hot([1, 1, 1, 0])
    res = robustness_from_probabilities(
        {"x": a[None], "y": a[None]}, {"x": l1, "y": np.array([0, 0, 1, 0])},
        {"x": l2, "y": l2}, ["M"])
    assert res.outcomes("x")[0, 1] == OUTCOME_EXCLUDED
    r = res.rates("x")
    assert r["n_informative"][0] == 3
    np.testing.assert_allclose([r["original1"][0], r["original2"][0]], [2 / 3, 1 / 3])
    np.testing.assert_allclose(res.disagreement(), [0.0])  # pair 1 left out for both
    assert res.disagreements("M") == []


def test_min_confidence_excludes_unsure_originals(adapter):
    class Unsure(torch.nn.Module):
        def forward(self, x):
            d = (x[:, 0, 0, 0] - x[:, 0, 1, 1]) * 2  # soft: often below 0.7
            return torch.stack([-d, d], 1)

    mods = [{"act": [0, 1, 2, 3]}]
    all_ = classifier_robustness(adapter, Unsure(), mods, 40, seed=2)
    sure = classifier_robustness(adapter, Unsure(), mods, 40, seed=2, min_confidence=0.7)
    z1 = adapter.sample_latents(80, seed=2)[0::2]
    with torch.no_grad():
        p = Unsure()(adapter.to_unit(adapter.generate(z1))).softmax(1)
    expected = np.where(p.max(1).values.numpy() >= 0.7, p.argmax(1).numpy(), -1)
    np.testing.assert_array_equal(sure.labels1["classifier"], expected)
    assert 0 < sure.rates()["n_informative"][0] < all_.rates()["n_informative"][0]
    with pytest.raises(ConfigError, match="min_confidence"):
        classifier_robustness(adapter, Unsure(), mods, 4, min_confidence=1.0)


# ------------------------------------------------------------------ files
def _two_classifiers():
    l1, l2 = np.array([0, 0, 1, -1]), np.array([1, 2, 1, 0])
    return robustness_from_probabilities(
        {"net/v2": np.stack([one_hot([0, 0, 1, 2]), one_hot([1, 0, 1, 0])]),
         "other net": np.stack([one_hot([0, 1, 1, 2], k=4), one_hot([1, 1, 1, 0], k=4)])},
        {"net/v2": l1, "other net": l1}, {"net/v2": l2, "other net": l2},
        ["A", "B"], {"A": ["main.5", "main.8"], "B": ["main.8"]},
        {"net/v2": ["cat", "dog", "owl"]}, top_k=2)


def _assert_same(a, b):
    assert (a.classifiers, a.modules, a.module_layers, a.class_names, a.info) == (
        b.classifiers, b.modules, b.module_layers, b.class_names, b.info)
    for name in ("predictions", "labels1", "labels2", "entropy", "top_classes"):
        x, y = getattr(a, name), getattr(b, name)
        assert list(x) == list(y)
        for c in x:  # stored as they are: equal by design
            np.testing.assert_array_equal(x[c], y[c])
            assert y[c].dtype == (np.float64 if name == "entropy" else np.int64)
    assert a.to_text() == b.to_text()


def test_save_and_load_round_trip_without_pickle(tmp_path):
    import json

    res = _two_classifiers()
    path = res.save(tmp_path / "robustness.npz")
    back = RobustnessResult.load(path)
    _assert_same(res, back)
    assert back.module_layers["A"] == ("main.5", "main.8")  # tuples again
    # numpy alone reads it: one array per classifier, the summary in the JSON header
    with np.load(path, allow_pickle=False) as f:
        assert "predictions/net/v2" in f.files and "entropy/other net" in f.files
        header = json.loads(str(f["header"]))
    assert header["kind"] == "robustness"
    assert header["summary"]["net/v2"]["n_informative"] == [2, 2]
    assert header["disagreement"] == res.disagreement().tolist()
    # from_dict inverts to_dict too
    _assert_same(res, RobustnessResult.from_dict(res.to_dict()))


def test_a_measured_result_round_trips_and_regenerates_its_hybrids(adapter, tmp_path):
    mods = {"all": {"act": [0, 1, 2, 3]}, "one": {"act": [1]}}
    res = classifier_robustness(adapter, {"b": Brightness()}, mods, n_pairs=6, seed=3)
    back = RobustnessResult.load(res.save(tmp_path / "r.npz"))
    _assert_same(res, back)
    torch.testing.assert_close(back.hybrids(adapter, "one", [0, 2]),
                               res.hybrids(adapter, "one", [0, 2]))


def _rewrite(path, tmp_path, arrays=None, header=None, drop=()):
    import json

    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files if k not in drop}
    h = json.loads(str(data.pop("header")))
    h.update(header or {})
    data.update(arrays or {})
    out = tmp_path / "bad.npz"
    np.savez(out, header=np.array(json.dumps(h)), **data)
    return out


@pytest.mark.parametrize("change, match", [
    (dict(drop=("labels2/other net",)), "'labels2' has arrays for"),
    (dict(arrays={"predictions/intruder": np.zeros((2, 4), np.int64)}), "'predictions' has arrays"),
    (dict(arrays={"predictions/net/v2": np.zeros((3, 4), np.int64)}), "3 rows, not one per module"),
    (dict(arrays={"entropy/net/v2": np.zeros((2, 4), np.int64)}), "floats"),
    (dict(arrays={"labels1/net/v2": np.zeros(5, np.int64)}), "5 pairs"),
    (dict(arrays={"top_classes/net/v2": np.zeros((2, 2), np.int64)}), "top_classes"),
    (dict(header={"classifiers": "net/v2"}), "'classifiers' in the header"),
    (dict(header={"modules": []}), "'modules' in the header"),
    (dict(header={"module_layers": {"A": ["main.8"]}}), "module_layers names"),
    (dict(header={"module_layers": None}), "'module_layers'"),
])
def test_malformed_files_are_refused_with_what_is_wrong(tmp_path, change, match):
    path = _two_classifiers().save(tmp_path / "r.npz")
    with pytest.raises(ResultFileError, match=match):
        RobustnessResult.load(_rewrite(path, tmp_path, **change))


def test_another_kind_of_file_is_refused(tmp_path):
    from cfmodules.results import write_npz

    path = write_npz(tmp_path / "x.npz", {"maps": np.zeros((1, 2, 2))}, {"kind": "influence"})
    with pytest.raises(ResultFileError, match="not 'robustness'"):
        RobustnessResult.load(path)


def test_an_inconsistent_result_is_refused_when_made():
    res = _two_classifiers()
    with pytest.raises(ShapeError, match="one per module"):
        RobustnessResult(res.classifiers, ["A"], {"A": ("main.8",)}, res.predictions,
                         res.labels1, res.labels2, res.entropy, res.top_classes)
