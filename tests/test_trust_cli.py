"""Issue 12 item 7: every malformed result file given to the CLI ends in exit 2 and one line."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from cfmodules.cli import main
from cfmodules.errors import ResultFileError
from cfmodules.results import FORMAT_VERSION, read_npz, write_npz
from report_helpers import fake_result


def one_line(capsys, *argv: str) -> str:
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    return lines[0]


def _results(tmp_path):
    path = tmp_path / "results.npz"
    fake_result().save(path)
    return path


def _rewrite_header(path, **change):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays.pop("header")))
    for k, v in change.items():
        if v is KeyError:
            header.pop(k, None)
        else:
            header[k] = v
    np.savez(path, header=np.array(json.dumps(header)), **arrays)


def _plain_npy(tmp_path):
    p = tmp_path / "arr.npy"
    np.save(p, np.arange(6.0))
    return p


def _text(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("hello")
    return p


def _truncated(tmp_path):
    p = _results(tmp_path)
    p.write_bytes(p.read_bytes()[:300])
    return p


def _folder(tmp_path):
    return tmp_path


def _foreign_npz(tmp_path):
    p = tmp_path / "foreign.npz"
    np.savez(p, x=np.zeros(3))
    return p


def _pickled_npz(tmp_path):
    p = tmp_path / "pickled.npz"
    np.savez(p, header=np.array([{"format": "cfmodules"}], dtype=object))
    return p


def _header_not_json(tmp_path):
    p = tmp_path / "h.npz"
    np.savez(p, header=np.array("{not json"))
    return p


def _header_a_list(tmp_path):
    p = tmp_path / "h.npz"
    np.savez(p, header=np.array("[1, 2]"))
    return p


def _header_array_of_ints(tmp_path):
    p = tmp_path / "h.npz"
    np.savez(p, header=np.arange(3))
    return p


def _missing_array(tmp_path):
    p = _results(tmp_path)
    arrays, header = read_npz(p)
    del arrays["labels"]
    write_npz(p, arrays, header)
    return p


def _bad_array(name, value):
    def make(tmp_path):
        p = _results(tmp_path)
        arrays, header = read_npz(p)
        arrays[name] = value
        write_npz(p, arrays, header)
        return p
    return make


def _bad_header_field(**change):
    def make(tmp_path):
        p = _results(tmp_path)
        _rewrite_header(p, **change)
        return p
    return make


BAD_FILES = {
    "plain .npy": (_plain_npy, "not an .npz"),
    "text file": (_text, "Cannot read"),
    "truncated": (_truncated, "Cannot read"),
    "a folder": (_folder, "folder"),
    "foreign npz": (_foreign_npz, "not a cfmodules result"),
    "pickled header": (_pickled_npz, "Cannot read"),
    "header not JSON": (_header_not_json, "header"),
    "header a list": (_header_a_list, "header"),
    "header array of ints": (_header_array_of_ints, "header"),
    "format_version string": (_bad_header_field(format_version="1"), "format_version"),
    "format_version null": (_bad_header_field(format_version=None), "format_version"),
    "format_version missing": (_bad_header_field(format_version=KeyError), "format_version"),
    "format_version bool": (_bad_header_field(format_version=True), "format_version"),
    "format_version float": (_bad_header_field(format_version=1.5), "format_version"),
    "format_version newer": (_bad_header_field(format_version=FORMAT_VERSION + 1), "upgrade"),
    "format_version zero": (_bad_header_field(format_version=0), "format_version"),
    "kind missing": (_bad_header_field(kind=KeyError), "'analysis'"),
    "kind influence": (_bad_header_field(kind="influence"), "'analysis'"),
    "labels missing": (_missing_array, "labels"),
    "labels of text": (_bad_array("labels", np.array(["a"] * 6)), "labels"),
    "labels out of range": (_bad_array("labels", np.arange(6) + 10), "labels"),
    "channels negative": (_bad_array("unit_channel", -np.ones(6, np.int64)), "unit_channel"),
    "unit_layer wrong length": (_bad_array("unit_layer", np.array(["act"])), "unit_layer"),
    "layers not a list": (_bad_header_field(layers="act"), "layers"),
    "settings of the wrong type": (_bad_header_field(settings={"n_pairs": "two"}), "n_pairs"),
    "settings a string": (_bad_header_field(settings="x"), "settings"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_hybrids_with_a_malformed_modules_file_ends_in_one_line(capsys, tmp_path, case):
    make, needle = BAD_FILES[case]
    path = make(tmp_path)
    line = one_line(capsys, "hybrids", "--modules", str(path), "--out",
                    str(tmp_path / "h.png"))
    assert needle in line, line
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("value", ["1", None, KeyError, True, 1.5, 0])
def test_read_npz_validates_the_format_version(tmp_path, value):
    p = _bad_header_field(format_version=value)(tmp_path)
    with pytest.raises(ResultFileError, match="format_version"):
        read_npz(p)


def test_read_npz_of_a_zip_that_is_no_npz(tmp_path):
    p = tmp_path / "z.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(ResultFileError):
        read_npz(p)


# ------------------------------------------------------------------ analyze --out reuse
EDITABLE = '''
import torch
from torch import nn
from cfmodules import GeneratorAdapter


class Opaque:
    def __init__(self, k):
        self.k = k


OPAQUE = Opaque(1.0)


def make():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.ConvTranspose2d(4, 6, 4), nn.ReLU(), nn.Conv2d(6, 3, 1), nn.Tanh())
    return GeneratorAdapter(gen, (4, 1, 1), name="tiny", output_transform=lambda y: GAIN * y)


def make_opaque():
    gen = make().generator
    return GeneratorAdapter(gen, (4, 1, 1), name="tiny", output_transform=lambda y: OPAQUE.k * y)
'''
TINY = ["--layer", "1", "--pairs", "4", "--k", "2", "--no-stability", "--samples", "2",
        "--hybrids", "2", "--quiet", "--device", "cpu"]


def test_analyze_out_after_the_factory_is_edited_does_not_reuse_the_old_maps(capsys, tmp_path):
    path = tmp_path / "gen.py"
    path.write_text(EDITABLE + "\nGAIN = 1.0\n")
    out = str(tmp_path / "o")
    assert main(["analyze", "--model", f"{path}:make", "--out", out, *TINY]) == 0
    assert main(["analyze", "--model", f"{path}:make", "--out", out, *TINY]) == 0  # reused
    capsys.readouterr()
    path.write_text(EDITABLE + "\nGAIN = 10.0\n")  # the maps would be 10x: never the old ones
    line = one_line(capsys, "analyze", "--model", f"{path}:make", "--out", out, *TINY)
    assert "checkpoint" in line and "output_transform" in line and "delete" in line
    assert main(["analyze", "--model", f"{path}:make", "--out", out, "--fresh", *TINY]) == 0


def test_analyze_out_with_unverifiable_code_needs_assume_same(capsys, tmp_path):
    path = tmp_path / "gen.py"
    path.write_text(EDITABLE + "\nGAIN = 1.0\n")
    out = str(tmp_path / "o")
    assert main(["analyze", "--model", f"{path}:make_opaque", "--out", out, *TINY]) == 0
    capsys.readouterr()
    line = one_line(capsys, "analyze", "--model", f"{path}:make_opaque", "--out", out, *TINY)
    assert "Opaque" in line and "--assume-same" in line
    assert main(["analyze", "--model", f"{path}:make_opaque", "--out", out, "--assume-same",
                 *TINY]) == 0
