"""SIGTERM and SIGHUP save the work like Ctrl-C does.

A batch scheduler's time limit, ``timeout``, ``kill`` and a dropped SSH session send
SIGTERM or SIGHUP, whose default action ends the process at once: the blocks of pairs
done since the last checkpoint would be lost. While an influence run is going,
:func:`save_on_signals` turns these signals into :class:`Interrupted`, a
``KeyboardInterrupt``, so the run writes its checkpoint on the way out exactly as for
Ctrl-C. Handlers are installed only in the main thread, only for signals that still
have their default action, and the previous handlers are restored when the block ends.

A signal the program ignores is left ignored, never re-enabled: under ``nohup cmd &``
(and in background jobs of scripts, some schedulers and CI runners) SIGHUP and SIGINT
are inherited as ignored, so a hang-up or a Ctrl-C meant for the shell does not end the
run, as the user asked; SIGTERM still saves. SIGINT itself is Python's: its
KeyboardInterrupt handler when the program started with SIGINT at its default, nothing
when it started ignored. A handler the program set itself is left alone too.

Only the first signal raises: a second one while the run saves its checkpoint on the
way out (a hang-up sends SIGHUP twice, from the terminal and from the shell; a scheduler
may repeat SIGTERM) is noted and dropped, so it cannot cut the save short. The command
line exits with the conventional code ``128 + signal number`` (143 for SIGTERM, 129 for
SIGHUP; 130 for Ctrl-C).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "save_on_signals", "SIGNALS"]

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that save a checkpoint besides SIGINT (SIGHUP does not exist on Windows)."""


class Interrupted(KeyboardInterrupt):
    """The run was ended by a signal (SIGTERM, SIGHUP); its checkpoint has been written.

    Attributes
    ----------
    signum : int
    exit_code : int
        ``128 + signum``, the exit status a shell expects of a process ended by it.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"ended by {signal.Signals(self.signum).name}")


@contextmanager
def save_on_signals() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGHUP raises :class:`Interrupted` (main
    thread only; signals that are ignored or handled elsewhere are left as they are).

    Put the save on the way out inside the block: later signals are dropped until the
    block ends.
    """
    received: list[int] = []

    def _raise(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            raise Interrupted(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
