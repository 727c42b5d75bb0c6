"""Issue 12 item 6: SIGTERM and SIGHUP save the checkpoint like Ctrl-C, then resume exactly.

A real process on a tiny generator gets SIGTERM from outside after it reports a finished
block (never a fixed sleep) and while it waits; SIGHUP (the same handler) and SIGINT
(Python's own KeyboardInterrupt) are raised in the test's own main thread at the same
point, which costs no new interpreter. ``signal.raise_signal`` directs the signal at this
thread, and Python runs the handler before the call returns. ``os.kill`` of our own pid
is sent to the process: the kernel may hand it to any thread (pytest-xdist's I/O
thread, say), and the main thread runs the handler when it next notices; once, in a
whole-suite run, the run ended first ("DID NOT RAISE"). Each run then resumes from its
checkpoint and the resumed maps are compared bitwise with an uninterrupted run: exact by
design, the same blocks by the same code path.

The suite may be started where SIGINT and SIGHUP are inherited as ignored (``nohup``, a
background job of a non-interactive shell, some CI runners and schedulers). So the tests
never rely on the dispositions they were started with: the in-process runs set the ones
they need for their duration (``foreground_dispositions``), and the child processes are
started through ``_launcher`` with the dispositions of a foreground start, or, for the test
of cfmodules' behaviour under ``nohup``, with SIGINT and SIGHUP ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from cfmodules.influence import influence_maps
from cfmodules.influence.interrupt import Interrupted, save_on_signals
from cfmodules.results import read_npz
from influence_helpers import convt_adapter

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
TIMEOUT = 300  # generous: the machine may be loaded; normally a few seconds

SCRIPT = textwrap.dedent('''
    import os, signal, sys, threading
    from cfmodules.influence import influence_maps
    from cfmodules.influence.interrupt import Interrupted
    from influence_helpers import convt_adapter

    release = threading.Event()

    if os.environ.get("CFM_SECOND_SIGNAL"):  # another signal lands while the save writes
        import cfmodules.influence.maps as maps_module

        save = maps_module.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            signal.raise_signal(int(os.environ["CFM_SECOND_SIGNAL"]))
            return save(*args, **kwargs)

        maps_module.save_checkpoint = save_checkpoint

    def dispositions():
        names = {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default",
                 signal.default_int_handler: "python"}
        return " ".join(f"{s.name}={names.get(signal.getsignal(s), 'handled')}"
                        for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM))

    def callback(p):
        if p.n_pairs_done == 6:
            print("during", dispositions(), flush=True)
        print(f"block {p.n_pairs_done}", flush=True)
        if p.n_pairs_done == 6:
            release.wait(120)  # the parent's signal ends this wait (or the test times out)

    try:
        influence_maps(convt_adapter(), "5", n_pairs=12, pairs_per_block=3,
                       checkpoint=sys.argv[1], checkpoint_every=3600, progress=False,
                       callback=callback)
    except Interrupted as e:
        print("interrupted", e.signum, flush=True)
        print("after", dispositions(), flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", 2, flush=True)
        sys.exit(130)
    print("done", flush=True)
''')


LAUNCH = textwrap.dedent('''
    import os, signal, sys
    ignored = {getattr(signal, name) for name in sys.argv[1].split(",") if name}
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
    os.execv(sys.argv[2], sys.argv[2:])  # dispositions SIG_DFL and SIG_IGN survive exec
''')


def _launcher(cmd: list[str], ignore: tuple[str, ...] = ()) -> list[str]:
    """``cmd`` started with SIGINT, SIGHUP and SIGTERM at their defaults, or ignored (the
    names in `ignore`, as ``nohup`` and ``&`` do), whatever this process inherited: a
    Python started with SIGINT at its default installs its own KeyboardInterrupt handler."""
    return [sys.executable, "-c", LAUNCH, ",".join(ignore), *cmd]


def _disposition(sig: int) -> str:
    h = signal.getsignal(sig)
    return {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default",
            signal.default_int_handler: "python"}.get(h, "handled")


@pytest.fixture
def foreground_dispositions():
    """SIGINT, SIGHUP and SIGTERM as in a foreground start (Python's KeyboardInterrupt
    handler, the defaults) for the test's duration, then what they were before."""
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL,
              signal.SIGTERM: signal.SIG_DFL}
    try:
        before = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    except ValueError:  # signal.signal works in the main thread only
        pytest.skip("the tests run outside the main thread (some runners do): signal "
                    "handlers cannot be set, so no signal can be delivered to the run")
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}


def _signalled_run(tmp_path: Path, ck: Path, *sigs: int, ignore: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run SCRIPT in a process of its own, started with the signals named in `ignore`
    ignored and the others at their defaults, and send it `sigs` in turn once it holds
    after block 6."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = _launcher([sys.executable, str(script), str(ck)], ignore)
    proc = subprocess.Popen(cmd, env={**_env(), **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait for block 6, where the script holds
            lines.append(line)
            if line.strip() == "block 6":
                for sig in sigs:
                    proc.send_signal(sig)
                break
        out_text, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + out_text, err)


def _signalled_here(ck: Path, sig: int) -> KeyboardInterrupt:
    """The same run in this process, whose main thread gets the signal once block 6 is done
    (the real handler, run by Python before ``raise_signal`` returns)."""
    def callback(p):
        if p.n_pairs_done == 6:
            signal.raise_signal(sig)

    with pytest.raises(KeyboardInterrupt) as caught:
        influence_maps(convt_adapter(), "5", n_pairs=12, pairs_per_block=3, checkpoint=ck,
                       checkpoint_every=3600, progress=False, callback=callback)
    return caught.value


@pytest.mark.parametrize("sig,code,where", [(signal.SIGTERM, 143, "own process"),
                                            (signal.SIGHUP, 129, "this process"),
                                            (signal.SIGINT, 130, "this process")])
def test_a_signal_saves_the_checkpoint_and_the_rerun_resumes_bitwise(tmp_path, sig, code,
                                                                     where,
                                                                     foreground_dispositions):
    ck = tmp_path / "run.ckpt"
    if where == "own process":
        killed = _signalled_run(tmp_path, ck, sig)
        assert killed.returncode == code, killed.stderr[-2000:]
        assert "during SIGINT=python SIGHUP=handled SIGTERM=handled" in killed.stdout
        assert f"interrupted {int(sig)}" in killed.stdout and "done" not in killed.stdout
        assert "after SIGINT=python SIGHUP=default SIGTERM=default" in killed.stdout
        assert "Traceback" not in killed.stderr
    else:
        e = _signalled_here(ck, sig)
        assert getattr(e, "exit_code", 130) == code  # what cfmodules' command line exits with
        assert isinstance(e, Interrupted) == (sig != signal.SIGINT)
    _, header = read_npz(ck, kind="influence-checkpoint")
    assert header["n_pairs_done"] == 6  # saved on the signal (checkpoint_every is an hour)
    blocks = []
    resumed = influence_maps(convt_adapter(), "5", n_pairs=12, pairs_per_block=3,
                             checkpoint=ck, checkpoint_every=3600, progress=False,
                             callback=lambda p: blocks.append(p.n_pairs_done))
    assert 3 not in blocks and blocks[-2:] == [9, 12]  # resumed at 6
    full = influence_maps(convt_adapter(), "5", n_pairs=12, pairs_per_block=3, progress=False)
    np.testing.assert_array_equal(resumed.maps, full.maps)  # exact: same blocks, same path


@pytest.mark.parametrize("first,second", [(signal.SIGHUP, signal.SIGHUP),
                                          (signal.SIGTERM, signal.SIGHUP)])
def test_a_second_signal_during_the_save_neither_cuts_it_nor_kills(tmp_path, first, second):
    """A hang-up sends SIGHUP twice (from the terminal, then from the shell); a scheduler
    may send SIGTERM and its job's SIGHUP. The second one, arriving while the checkpoint
    is written on the way out, is dropped: the save completes, the exit code is the
    first signal's (by its default action it once killed the process mid-save)."""
    ck = tmp_path / "run.ckpt"
    killed = _signalled_run(tmp_path, ck, first, env={"CFM_SECOND_SIGNAL": str(int(second))})
    assert killed.returncode == 128 + first, killed.stderr[-2000:]
    assert f"interrupted {int(first)}" in killed.stdout and "done" not in killed.stdout
    assert "after SIGINT=python SIGHUP=default SIGTERM=default" in killed.stdout
    assert "Traceback" not in killed.stderr
    _, header = read_npz(ck, kind="influence-checkpoint")
    assert header["n_pairs_done"] == 6


def test_under_nohup_sigint_and_sighup_stay_ignored_and_sigterm_still_saves(tmp_path):
    """Started as ``nohup cmd &`` starts it (SIGHUP and SIGINT ignored), a run leaves both
    ignored, as the user asked: the hang-up of the terminal and a Ctrl-C meant for the
    shell go unheeded. SIGTERM (``kill``, ``timeout``, a scheduler) still saves."""
    ck = tmp_path / "run.ckpt"
    # SIGHUP or SIGINT heeded would end the run first (129 or 130): these come first, and
    # Python runs pending handlers in signal-number order
    killed = _signalled_run(tmp_path, ck, signal.SIGHUP, signal.SIGINT, signal.SIGTERM,
                            ignore=("SIGINT", "SIGHUP"))
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "during SIGINT=ignored SIGHUP=ignored SIGTERM=handled" in killed.stdout
    assert "interrupted 15" in killed.stdout and "done" not in killed.stdout
    assert "after SIGINT=ignored SIGHUP=ignored SIGTERM=default" in killed.stdout
    assert "Traceback" not in killed.stderr
    _, header = read_npz(ck, kind="influence-checkpoint")
    assert header["n_pairs_done"] == 6  # saved on SIGTERM (checkpoint_every is an hour)


def test_handlers_are_installed_only_during_the_run_and_restored(foreground_dispositions):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    seen = {}

    def callback(p):
        seen.update({s: _disposition(s) for s in before})

    influence_maps(convt_adapter(), "5", n_pairs=2, progress=False, callback=callback)
    # ours during the run; Ctrl-C stays Python's own KeyboardInterrupt
    assert seen == {signal.SIGINT: "python", signal.SIGTERM: "handled",
                    signal.SIGHUP: "handled"}
    assert {s: signal.getsignal(s) for s in before} == before  # restored after


def test_a_signal_the_program_ignores_or_handles_is_left_alone():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    mine = lambda s, f: None  # noqa: E731
    old_term = signal.signal(signal.SIGTERM, mine)
    try:
        with save_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGHUP, old)
        signal.signal(signal.SIGTERM, old_term)


def test_a_run_in_another_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen, errors = {}, []

    def work():
        try:
            influence_maps(convt_adapter(), "5", n_pairs=2, progress=False,
                           callback=lambda p: seen.setdefault("h", signal.getsignal(
                               signal.SIGTERM)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(TIMEOUT)
    assert not errors and seen["h"] is before


def test_interrupted_is_a_keyboard_interrupt_with_the_conventional_exit_code():
    e = Interrupted(signal.SIGTERM)
    assert isinstance(e, KeyboardInterrupt) and e.exit_code == 143 and "SIGTERM" in str(e)


FACTORY = textwrap.dedent('''
    import os
    import time

    import torch
    from torch import nn

    BIG_CALLS = [0]


    class Gen(nn.Module):
        """A tiny generator that holds in the second block of pairs until it is signalled."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up = nn.ConvTranspose2d(4, 6, 4)
            self.act = nn.ReLU()
            self.out = nn.Conv2d(6, 3, 1)

        def forward(self, z):
            h = self.act(self.up(z))
            # data-dependent control flow: no graph capture, every call runs this code
            if bool(torch.isfinite(h[:1]).all()) and h.shape[0] > 100:
                BIG_CALLS[0] += 1  # one batch of 6 x 32 hybrids per block of 32 pairs
                marker = os.environ["CFM_MARKER"]
                if BIG_CALLS[0] == 2 and not os.path.exists(marker):
                    open(marker, "w").close()
                    time.sleep(600)  # the block 1 is merged; SIGTERM ends this
            return torch.tanh(self.out(h))


    def make():
        return Gen()
''')


@pytest.mark.slow  # a CLI process to signal, then two runs of the CLI in this process
def test_cli_analyze_shorter_than_checkpoint_every_resumes_after_sigterm(tmp_path, monkeypatch):
    """`cfmodules analyze` killed by SIGTERM exits 143 and the rerun resumes the maps."""
    import time

    from cfmodules.cli import main

    (tmp_path / "gen.py").write_text(FACTORY)
    marker = tmp_path / "marker"
    args = ["analyze", "--model", f"{tmp_path / 'gen.py'}:make", "--latent-shape", "4,1,1",
            "--layer", "act", "--pairs", "96", "--k", "2", "--no-stability", "--samples", "2",
            "--hybrids", "2", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(_launcher([sys.executable, "-m", "cfmodules", *args, "--out",
                                       str(tmp_path / "o")]),
                            env={**_env(), "CFM_MARKER": str(marker)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the marker, not a fixed wait
        assert marker.exists(), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "resume" in err and "Traceback" not in err
    ckpts = list((tmp_path / "o" / "checkpoints").glob("eim_*.npz"))
    assert len(ckpts) == 1
    assert read_npz(ckpts[0])[1]["n_pairs_done"] == 32  # the first block, saved on SIGTERM
    # the rerun (the marker exists: no more waiting) resumes; compare with a fresh run
    import cfmodules.influence.maps as maps_module

    monkeypatch.setenv("CFM_MARKER", str(marker))
    found = []
    load = maps_module.load_checkpoint
    monkeypatch.setattr(maps_module, "load_checkpoint",
                        lambda *a, **k: found.append(load(*a, **k)) or found[-1])
    full_forward = "one full forward of the generator per hybrid"  # no capture can be cut
    with pytest.warns(UserWarning, match=full_forward):
        assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert found[0] is not None and found[0][0] == 32  # resumed after the first block
    with pytest.warns(UserWarning, match=full_forward):
        assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert found[-1] is None  # a fresh run starts from nothing
    a = read_npz(tmp_path / "o" / "results.npz")[0]["maps"]
    b = read_npz(tmp_path / "fresh" / "results.npz")[0]["maps"]
    np.testing.assert_array_equal(a, b)  # exact: the same blocks by the same code path


@pytest.mark.slow  # the pretrained DCGAN's analysis, stopped in its stability sweep
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads child processes in /proc")
def test_sigterm_during_the_sweep_stops_the_workers_and_exits_143(tmp_path):
    """The sweep runs on worker processes beside the next steps: SIGTERM then ends the
    command like Ctrl-C (exit 143, one line), and takes its workers along."""
    import time

    proc = subprocess.Popen(
        _launcher([sys.executable, "-m", "cfmodules", "analyze", "--pairs", "4", "--jobs", "2",
                   "--threads", "1", "--out", str(tmp_path / "o")]),
        env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    err = ""
    try:
        deadline = time.monotonic() + TIMEOUT
        while "worker processes" not in err and time.monotonic() < deadline:
            line = proc.stderr.readline()  # one line per step; the bars end with \r
            if not line:
                break
            err += line
        assert "worker processes" in err, err[-2000:]
        kids = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=TIMEOUT)
        err += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "Exception in thread" not in err
    assert kids  # the workers (and loky's resource tracker) were its children
    deadline = time.monotonic() + 30
    alive = kids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"worker processes left behind: {alive}"
    assert not list((tmp_path / "o").glob("report.html"))  # nothing half-written


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and (st := _stat(int(p))) is not None and st[1] == str(pid)]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie is gone for this purpose
