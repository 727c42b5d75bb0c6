"""Issue 12 item 8: kills (SIGKILL) while writing leave no temporary files for good, and a
report folder always holds one run's files (never K=2 results beside K=3 figures)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cfmodules import files as F
from cfmodules import results as R
from cfmodules.errors import ResultFileError
from cfmodules.results import check_folder, finish_folder_update, folder_update, read_npz

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX kills")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
TIMEOUT = 300


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ temporary files
WRITER = textwrap.dedent('''
    import sys
    import numpy as np
    import cfmodules.files as f
    import cfmodules.results as r

    f._USE_O_TMPFILE = sys.argv[2] == "unnamed"
    big = np.random.default_rng(0).random(2 * 2**20)  # 16 MiB, a large checkpoint
    i = 0
    while True:
        r.write_npz(sys.argv[1], {"mean": big}, {"kind": "t", "i": i})
        print("wrote", i, flush=True)
        i += 1
''')


@pytest.mark.parametrize("mode", ["unnamed", "named"])
def test_kills_during_writes_leave_no_temporary_file_for_good(tmp_path, monkeypatch, mode):
    if mode == "unnamed" and not F._USE_O_TMPFILE:
        pytest.skip("no O_TMPFILE here")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target = tmp_path / "ck" / "run.npz"
    target.parent.mkdir()
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(target), mode], env=_env(),
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().startswith("wrote")  # mid-way through the next
            time.sleep(rng.uniform(0, 0.05))  # a random point of the next write
            proc.kill()
        finally:
            proc.wait(TIMEOUT)
            proc.stdout.close()
        arrays, header = read_npz(target)  # the file is always whole: old or new
        assert arrays["mean"].shape == (2 * 2**20,)
        if mode == "unnamed":  # the file has no name until it is complete
            assert len(_temps(target.parent)) <= 1  # at most one killed between link and rename
    # the next write of the same file removes what killed writers left
    monkeypatch.setattr(F, "_STALE_TEMP_S", 0.0)
    R.write_npz(target, {"mean": np.zeros(2)}, {"kind": "t"})
    assert _temps(target.parent) == []


def test_a_fresh_temporary_file_of_a_live_writer_is_not_removed(tmp_path):
    target = tmp_path / "run.npz"
    live = tmp_path / f".run.npz.{os.getpid()}.abcd.tmp"
    live.write_bytes(b"being written")
    R.write_npz(target, {"a": np.zeros(1)}, {"kind": "t"})
    assert live.exists()  # younger than a minute: perhaps another process's write


def test_atomic_write_gives_umask_permissions_and_no_temporary_file(tmp_path):
    path = F.atomic_write(tmp_path / "x.bin", b"abc")
    assert path.read_bytes() == b"abc" and _temps(tmp_path) == []
    assert path.stat().st_mode & 0o777 == 0o666 & ~F._umask()


# ------------------------------------------------------------------ report folders
UPDATER = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import cfmodules.files as f
    import cfmodules.results as r

    out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    calls = 0
    real_replace, real_unlink = os.replace, Path.unlink

    def count():
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def replace(*a, **k):
        count()
        return real_replace(*a, **k)

    def unlink(self, *a, **k):
        count()
        return real_unlink(self, *a, **k)

    os.replace, Path.unlink = replace, unlink
    with r.folder_update(out) as stage:  # the new run: K=2, one figure fewer
        for name, text in [("results.npz", "K=2"), ("report.html", "K=2"),
                           ("hybrids_module_0.png", "K=2"), ("hybrids_module_1.png", "K=2")]:
            f.atomic_write(stage / name, text.encode())
    print(calls)
''')

OLD = {"results.npz": "K=3", "report.html": "K=3", "hybrids_module_0.png": "K=3",
       "hybrids_module_1.png": "K=3", "hybrids_module_2.png": "K=3"}


def _old_report(out: Path) -> None:
    with folder_update(out) as stage:
        for name, text in OLD.items():
            (stage / name).write_text(text)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "eim.npz").write_text("state")  # not the report's: never touched


def _report_files(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.iterdir()
            if p.is_file() and p.name != R.MANIFEST}


def test_a_kill_at_any_step_of_a_report_update_never_mixes_two_runs(tmp_path):
    script = tmp_path / "update.py"
    script.write_text(UPDATER)
    dry = tmp_path / "dry"
    _old_report(dry)
    done = subprocess.run([sys.executable, str(script), str(dry), "0"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    n_steps = int(done.stdout.split()[-1])
    new = {"results.npz": "K=2", "report.html": "K=2", "hybrids_module_0.png": "K=2",
           "hybrids_module_1.png": "K=2"}
    assert _report_files(dry) == new and n_steps > 5
    states = set()
    for k in range(1, n_steps + 1):
        out = tmp_path / f"out{k}"
        _old_report(out)
        killed = subprocess.run([sys.executable, str(script), str(out), str(k)], env=_env(),
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert killed.returncode == -signal.SIGKILL
        try:
            check_folder(out)
            files = _report_files(out)
            assert files in (OLD, new), f"kill at step {k}: {files}"  # one run's files
            states.add("old" if files == OLD else "new")
        except ResultFileError as e:
            assert "half-way" in str(e)
            states.add("half-way")
            with pytest.raises(ResultFileError, match="half-way"):
                check_folder(out, "results.npz")  # a reader of results.npz is told too
            finish_folder_update(out)  # what the next `cfmodules analyze` does first
            check_folder(out)
            assert _report_files(out) == new
        assert (out / "checkpoints" / "eim.npz").read_text() == "state"
        assert not any(p.name.endswith(".tmp") for p in out.iterdir())
        manifest = json.loads((out / R.MANIFEST).read_text())
        assert set(manifest["files"]) == set(_report_files(out))
    assert {"old", "half-way"} <= states  # kills before and after the commit point


def test_a_changed_file_of_a_report_folder_is_noticed(tmp_path):
    _old_report(tmp_path)
    check_folder(tmp_path)
    (tmp_path / "results.npz").write_text("K=2")
    with pytest.raises(ResultFileError, match="changed or replaced"):
        check_folder(tmp_path, "results.npz")
    check_folder(tmp_path, "mine.npz")  # a file the report does not own is not its business


def test_an_error_while_staging_leaves_the_old_report(tmp_path):
    _old_report(tmp_path)
    with pytest.raises(RuntimeError):
        with folder_update(tmp_path) as stage:
            (stage / "results.npz").write_text("K=2")
            raise RuntimeError("figure failed")
    check_folder(tmp_path)
    assert _report_files(tmp_path) == OLD


KILL_IN_COMMIT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path

    out = Path(sys.argv[1]).resolve()
    moves = 0
    real_replace = os.replace

    def replace(src, dst, *a, **k):  # SIGKILL after two files of the new report moved in
        global moves
        if Path(dst).resolve().parent == out:
            moves += 1
            if moves == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **k)

    os.replace = replace
    from cfmodules.cli import main
    sys.exit(main(sys.argv[2:]))
''')


@pytest.mark.slow  # a CLI process to kill, and three runs of the CLI in this process
def test_a_killed_rerun_of_analyze_never_leaves_k2_results_beside_k3_figures(tmp_path, capsys):
    from cfmodules.cli import main

    out = tmp_path / "o"
    small = ["--model", "planted-conv", "--pairs", "4", "--no-stability", "--samples", "2",
             "--hybrids", "2", "--quiet", "--device", "cpu", "--out", str(out)]
    assert main(["analyze", "--k", "3", *small]) == 0
    assert (out / "hybrids_module_2.png").exists()
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_COMMIT)
    killed = subprocess.run([sys.executable, str(script), str(out), "analyze", "--k", "2",
                             *small], env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.raises(ResultFileError, match="half-way"):
        check_folder(out)
    capsys.readouterr()
    assert main(["hybrids", "--modules", str(out / "results.npz"), "--out",
                 str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert "half-way" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", "--k", "2", *small]) == 0
    check_folder(out)
    assert read_npz(out / "results.npz")[0]["templates"].shape[0] == 2
    assert not (out / "hybrids_module_2.png").exists()  # K=3's figure is gone
    assert not (out / ".cfmodules-staging").exists()
