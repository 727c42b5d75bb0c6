"""Result files: npz + JSON header, no pickle, atomic writes, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cfmodules.errors import ResultFileError, ShapeError
from cfmodules.files import atomic_write
from cfmodules.influence import InfluenceResult
from cfmodules.results import read_npz, write_npz


def _result(layer: str | None = "main.8") -> InfluenceResult:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 5)).astype(np.float32)
    units = [{"main.8": [c]} for c in (2, 0, 7)] if layer else [{"a": [1, 2]}, {"b": [0]},
                                                                  {"a": [0], "b": [3]}]
    names = [f"main.8[{c}]" for c in (2, 0, 7)] if layer else ["m0", "m1", "m2"]
    return InfluenceResult(maps=maps, stderr=maps / 10, n_pairs=16, units=units, names=names,
                           layer=layer, model="toy", settings={"seed": 3, "method": "auto"})


def test_generic_roundtrip(tmp_path):
    p = write_npz(tmp_path / "x.npz", {"a": np.arange(6).reshape(2, 3), "s": np.array(["u", "v"])},
                  {"kind": "demo", "k": [1, 2], "nan": float("nan")})
    arrays, header = read_npz(p, kind="demo")
    np.testing.assert_array_equal(arrays["a"], np.arange(6).reshape(2, 3))
    assert list(arrays["s"]) == ["u", "v"]
    assert header["kind"] == "demo" and header["k"] == [1, 2] and np.isnan(header["nan"])
    assert header["format"] == "cfmodules" and header["format_version"] == 1
    assert header["version"]


def test_name_is_kept_and_no_temp_file_left(tmp_path):
    write_npz(tmp_path / "result.cfm", {"a": np.zeros(2)}, {"kind": "demo"})
    assert sorted(os.listdir(tmp_path)) == ["result.cfm"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_files_get_the_permissions_of_a_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_npz(tmp_path / "r.npz", {"a": np.zeros(2)}, {"kind": "test"})
        png = atomic_write(tmp_path / "f.bin", b"xyz")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0o600
    assert png.stat().st_mode & 0o777 == 0o640
    assert png.read_bytes() == b"xyz"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = atomic_write(tmp_path / "f.bin", b"old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_writer_refuses_object_arrays_reserved_names_and_missing_kind(tmp_path):
    with pytest.raises(ShapeError, match="pickle"):
        write_npz(tmp_path / "x.npz", {"a": np.array([{}, 1], dtype=object)}, {"kind": "d"})
    with pytest.raises(ShapeError, match="reserved"):
        write_npz(tmp_path / "x.npz", {"header": np.zeros(1)}, {"kind": "d"})
    with pytest.raises(ShapeError, match="kind"):
        write_npz(tmp_path / "x.npz", {"a": np.zeros(1)}, {})
    with pytest.raises(ShapeError, match="JSON"):
        write_npz(tmp_path / "x.npz", {"a": np.zeros(1)}, {"kind": "d", "f": object()})
    assert not os.listdir(tmp_path)


def test_reader_errors(tmp_path):
    with pytest.raises(ResultFileError, match="No result file"):
        read_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ResultFileError, match="not a cfmodules result"):
        read_npz(tmp_path / "plain.npz")
    p = write_npz(tmp_path / "x.npz", {"a": np.zeros(100)}, {"kind": "demo"})
    with pytest.raises(ResultFileError, match="'demo' result, not 'influence'"):
        read_npz(p, kind="influence")
    data = p.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFileError, match="truncated"):
        read_npz(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ResultFileError):
        read_npz(tmp_path / "text.npz")


def test_newer_format_version_is_refused(tmp_path):
    p = write_npz(tmp_path / "x.npz", {"a": np.zeros(1)}, {"kind": "d", "format_version": 99})
    with pytest.raises(ResultFileError, match="upgrade"):
        read_npz(p)


@pytest.mark.parametrize("layer", ["main.8", None])
def test_influence_result_roundtrip(tmp_path, layer):
    r = _result(layer)
    r.save(tmp_path / "eim.npz")
    back = InfluenceResult.load(tmp_path / "eim.npz")
    np.testing.assert_array_equal(back.maps, r.maps)
    np.testing.assert_array_equal(back.stderr, r.stderr)
    assert back.units == r.units and back.names == r.names and back.layer == layer
    assert back.n_pairs == 16 and back.model == "toy" and back.settings == r.settings
    assert back.version == r.version


def test_influence_file_opens_with_numpy_alone(tmp_path):
    r = _result()
    r.save(tmp_path / "eim.npz")
    with np.load(tmp_path / "eim.npz", allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        assert set(f.files) == {"maps", "stderr", "influence", "channels", "header"}
        np.testing.assert_allclose(f["influence"], r.maps.mean(axis=(1, 2)))
        assert list(f["channels"]) == [2, 0, 7]
    assert header["kind"] == "influence" and header["units"][0] == {"main.8": [2]}


def test_influence_derived_and_repr():
    r = _result()
    np.testing.assert_allclose(r.influence, r.maps.mean(axis=(1, 2)))
    assert list(r.channels) == [2, 0, 7] and len(r) == 3
    assert _result(None).channels is None
    text = repr(r)
    assert "main.8" in text and "3x4x5" in text and "n_pairs=16" in text


def test_influence_result_validates_shapes():
    with pytest.raises(ShapeError):
        InfluenceResult(maps=np.zeros((2, 3)), stderr=np.zeros((2, 3)), n_pairs=1,
                        units=[{}, {}], names=["a", "b"])
    with pytest.raises(ShapeError, match="2 maps but 1 units"):
        InfluenceResult(maps=np.zeros((2, 3, 3)), stderr=np.zeros((2, 3, 3)), n_pairs=1,
                        units=[{}], names=["a"])


def test_loading_another_kind_fails(tmp_path):
    write_npz(tmp_path / "m.npz", {"labels": np.zeros(3)}, {"kind": "modules"})
    with pytest.raises(ResultFileError, match="'modules' result"):
        InfluenceResult.load(tmp_path / "m.npz")
    write_npz(tmp_path / "i.npz", {"maps": np.zeros((1, 2, 2))}, {"kind": "influence"})
    with pytest.raises(ResultFileError, match="incomplete"):
        InfluenceResult.load(tmp_path / "i.npz")
