"""`cfmodules score` and the report's scorecard section (`cfmodules analyze --scorecard`)."""

from __future__ import annotations

import numpy as np
import pytest

from cfmodules.cli import main
from cfmodules.evaluation.scorecard_result import Scorecard

SMALL = ["--pairs", "8", "--no-stability", "--samples", "4", "--hybrids", "2", "--n-init", "2",
         "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze_scorecard")
    assert main(["analyze", "--model", "planted-conv", "--out", str(out), "--scorecard",
                 *SMALL]) == 0
    return out


def test_analyze_scorecard_writes_file_and_report_section(analyzed):
    card = Scorecard.load(analyzed / "scorecard.npz")
    assert len(card.modules) == 3 and card.regions == ["region 0", "region 1", "region 2"]
    assert card.info["n_null"] == 100 and card.info["start"] == 8 + 2  # fresh pairs
    html = (analyzed / "report.html").read_text()
    assert "id='scorecard'" in html and "region 0" in html
    assert (analyzed / "scorecard.png").exists()
    assert "scorecard.npz" in (analyzed / "manifest.json").read_text()


def test_score_prints_the_table_and_writes_files(analyzed, tmp_path, capsys):
    out = tmp_path / "sc" / "card.npz"
    fig = tmp_path / "sc" / "card.png"
    masks = tmp_path / "masks.npz"
    left = np.zeros((16, 16), bool)
    left[:, :8] = True
    np.savez(masks, masks=np.stack([left, ~left]), names=np.array(["left", "right"]))
    code = main(["score", str(analyzed / "results.npz"), "--null", "19", "--boot", "50",
                 "--pairs", "6", "--masks", str(masks), "--out", str(out), "--figure", str(fig),
                 "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0
    assert "Scorecard of 3 module(s) of planted-conv" in text and "-> region '" in text
    card = Scorecard.load(out)
    assert card.regions == ["left", "right"] and card.n_null == 19
    assert fig.stat().st_size > 1000


@pytest.mark.parametrize("argv, needle", [
    (["--masks", "nothing.npz"], "--masks takes auto, faces, none"),
    (["--null", "5"], "n_null"),
    (["--boot", "0"], "--boot must be at least 1"),
])
def test_score_bad_input_is_one_line(analyzed, capsys, argv, needle):
    code = main(["score", str(analyzed / "results.npz"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
