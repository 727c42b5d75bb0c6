"""Issue 12, wrong error family: bad seeds and counts get a ConfigError, numpy integers pass."""

from __future__ import annotations

import numpy as np
import pytest

from cfmodules.analysis import AnalysisSettings, analyze
from cfmodules.errors import CheckpointError, ConfigError
from cfmodules.influence import influence_maps
from cfmodules.influence.maps import InfluenceSettings
from influence_helpers import convt_adapter


@pytest.mark.parametrize("settings", [AnalysisSettings, InfluenceSettings])
@pytest.mark.parametrize("seed", [2**32, 1.5, -1, True, "0"])
def test_seeds_that_would_alias_another_stream_are_refused(settings, seed):
    # 2**32 used to be seed 0 and 1.5 seed 1: the same maps under another name
    with pytest.raises(ConfigError, match="seed"):
        settings(seed=seed)


@pytest.mark.parametrize("settings", [AnalysisSettings, InfluenceSettings])
def test_numpy_integers_are_accepted_and_stored_as_int(settings):
    s = settings(n_pairs=np.int64(8), seed=np.uint32(2**32 - 1))
    assert s.n_pairs == 8 and type(s.n_pairs) is int
    assert s.seed == 2**32 - 1 and type(s.seed) is int


def test_influence_maps_take_numpy_integers_and_refuse_float_seeds():
    ad = convt_adapter()
    a = influence_maps(ad, "5", n_pairs=np.int64(2), seed=np.int32(1),
                       max_memory=np.int64(2**30), progress=False)
    b = influence_maps(ad, "5", n_pairs=2, seed=1, progress=False)
    np.testing.assert_array_equal(a.maps, b.maps)  # exact: the very same computation
    for bad in (2**32, 1.5):
        with pytest.raises(ConfigError, match="seed"):
            influence_maps(ad, "5", n_pairs=2, seed=bad, progress=False)
    with pytest.raises(ConfigError, match="max_memory"):
        influence_maps(ad, "5", n_pairs=2, max_memory=2.5, progress=False)


def test_sample_latents_refuses_aliasing_seeds():
    ad = convt_adapter()
    with pytest.raises(ConfigError, match="seed"):
        ad.sample_latents(2, seed=2**32)
    with pytest.raises(ConfigError, match="start"):
        ad.sample_latents(2, start=-1)


def test_stability_ks_must_be_integers():
    with pytest.raises(ConfigError, match="stability_ks"):
        AnalysisSettings(stability_ks=(2, 2.5))


def test_checkpoint_dir_that_is_a_file_is_a_checkpoint_error(tmp_path):
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        analyze(convt_adapter(), "5", checkpoint_dir=f, progress=False, n_pairs=2,
                n_modules=2, stability_ks=())
