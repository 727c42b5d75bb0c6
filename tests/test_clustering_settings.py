"""One clustering-settings class shared by the analysis, the scan and the monitor."""

from __future__ import annotations

import warnings
from dataclasses import fields

import numpy as np
import pytest

from cfmodules.analysis import AnalysisSettings, cluster_maps, stability_sweep
from cfmodules.errors import ConfigError
from cfmodules.modules import ClusteringSettings, ModuleClustering, cluster_stability
from cfmodules.monitor import MonitorSettings
from cfmodules.scan import ScanSettings
from modules_helpers import block_maps

ALL = (ClusteringSettings, AnalysisSettings, MonitorSettings, ScanSettings)
CLUSTERING_FIELDS = [f.name for f in fields(ClusteringSettings)]


def test_every_settings_class_is_a_clustering_settings_with_the_same_fields():
    for cls in ALL:
        assert issubclass(cls, ClusteringSettings)
        assert [f.name for f in fields(cls)][:len(CLUSTERING_FIELDS)] == CLUSTERING_FIELDS


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [
    {"method": "pca"}, {"method": "NMF"}, {"window": 2}, {"window": 0}, {"window": (3, 4)},
    {"window": True}, {"window": 2.0}, {"percentile": 0}, {"percentile": 100},
    {"percentile": float("nan")}, {"percentile": "75"}, {"n_init": 0}, {"n_init": 1.5},
    {"n_init": True}, {"max_iter": 0}, {"backend": "gpu"}, {"seed": -1}, {"seed": 2**32},
])
def test_the_clustering_checks_are_the_same_in_every_settings_class(cls, bad):
    with pytest.raises(ConfigError) as err:
        cls(**bad)
    with pytest.raises(ConfigError) as ref:
        ClusteringSettings(**bad)
    assert str(err.value) == str(ref.value)  # one check, one message
    assert list(bad)[0] in str(err.value)


@pytest.mark.parametrize("cls", ALL)
def test_numpy_integers_are_accepted_and_stored_as_python_ints(cls):
    s = cls(n_init=np.int64(4), seed=np.uint32(7), window=np.int16(5), max_iter=np.int32(20),
            percentile=np.float32(60))
    assert (s.n_init, s.seed, s.window, s.max_iter, s.percentile) == (4, 7, 5, 20, 60.0)
    assert all(type(v) is int for v in (s.n_init, s.seed, s.window, s.max_iter))
    assert type(s.percentile) is float


@pytest.mark.parametrize("cls", ALL)
def test_to_dict_and_from_dict_round_trip_including_a_window_pair(cls):
    import json

    s = cls(window=(3, 5), percentile=None, max_iter=50, method="kmeans", backend="sklearn")
    d = json.loads(json.dumps(s.to_dict()))  # what a result file holds
    assert cls.from_dict(d) == s
    assert cls.from_dict({**d, "a_newer_setting": 1}) == s  # newer files: ignored


def test_old_files_without_the_new_fields_still_load():
    old = {"n_pairs": 8, "n_modules": 2, "method": "nmf", "seed": 0, "window": 3,
           "percentile": 75.0, "n_init": 10, "stability_ks": [2, 3],
           "stability_methods": ["nmf"], "stability_repeats": 2, "n_samples": 4,
           "n_hybrids": 2, "backend": "fast", "stability_pool": 1}
    s = AnalysisSettings.from_dict(old)
    assert s.max_iter is None and s.stability_ks == (2, 3)


@pytest.mark.parametrize("cls", ALL)
def test_fields_are_keywords_only(cls):
    # positional fields would now bind to other names (the order changed): refused
    with pytest.raises(TypeError):
        cls("nmf")


def test_defaults_of_each_user_are_kept():
    assert (AnalysisSettings().n_init, MonitorSettings().n_init, ScanSettings().n_init) == (10, 3, 2)
    for cls in ALL:
        s = cls()
        assert (s.method, s.window, s.percentile, s.max_iter, s.backend, s.seed) == (
            "nmf", 3, 75.0, None, "fast", 0)


@pytest.mark.parametrize("cls, what", [(AnalysisSettings, "analysis"),
                                       (MonitorSettings, "monitor"), (ScanSettings, "scan")])
def test_unknown_settings_get_one_message_with_a_suggestion(cls, what):
    with pytest.raises(ConfigError, match=f"Unknown {what} setting 'windw'.*'window'"):
        cls.coerce(None, what, {"windw": 5})
    with pytest.raises(ConfigError, match=f"settings must be a {cls.__name__}"):
        cls.coerce(ClusteringSettings() if cls is not ClusteringSettings else 3, what, {})
    assert cls.coerce(None, what, {"window": 5}).window == 5


def test_estimator_carries_every_setting():
    s = MonitorSettings(method="kmeans", window=(1, 3), percentile=None, n_init=2, max_iter=40,
                        backend="sklearn", seed=9)
    est = s.estimator(4)
    assert isinstance(est, ModuleClustering)
    assert est.get_params() == {"n_modules": 4, "method": "kmeans", "window": (1, 3),
                                "percentile": None, "n_init": 2, "max_iter": 40,
                                "random_state": 9, "backend": "sklearn", "n_jobs": None}
    assert ClusteringSettings().estimator(3).max_iter == 500  # the clustering's default
    assert s.estimator(4, n_jobs=1).n_jobs == 1  # processes: no setting, changes no number


def test_analysis_steps_use_the_settings_and_keep_their_numbers():
    maps, _ = block_maps(sizes=(4, 5, 6), shape=(8, 8))
    s = AnalysisSettings(n_modules=3, n_init=2, stability_ks=(2, 3), stability_methods=("nmf",),
                         stability_repeats=2, max_iter=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = cluster_maps(maps, s)
        ref = ModuleClustering(3, "nmf", n_init=2, max_iter=60, random_state=0).fit(maps)
        sweep = stability_sweep(maps, s, progress=False)
        ref_sweep = cluster_stability(maps, ks=(2, 3), methods=("nmf",), n_repeats=2,
                                      n_init=3, max_iter=60, seed=0)
    assert fit.max_iter == 60
    # the same code path with the same seeds: equal by design
    np.testing.assert_array_equal(fit.labels_, ref.labels_)
    np.testing.assert_array_equal(sweep.consistency, ref_sweep.consistency)
    # without max_iter the sweep keeps the protocol's 300 iterations (its numbers unchanged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = stability_sweep(maps, AnalysisSettings(stability_ks=(2,), stability_repeats=2,
                                                         stability_methods=("nmf",)),
                                  progress=False)
        ref_default = cluster_stability(maps, ks=(2,), methods=("nmf",), n_repeats=2, seed=0)
    np.testing.assert_array_equal(default.consistency, ref_default.consistency)
    np.testing.assert_array_equal(default.cosine, ref_default.cosine)


def test_a_bad_monitor_window_fails_when_the_monitor_is_made_not_at_each_check():
    with pytest.raises(ConfigError, match="odd"):
        MonitorSettings(window=2)
