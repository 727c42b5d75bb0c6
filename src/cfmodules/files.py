"""Writing files safely: to a temporary name in the same folder, then renamed.

The bottom of the file format (:mod:`cfmodules.results`), the figures, the report, the
image grids and the notebook display all write through :func:`atomic_write`, so a crash
never leaves a half-written file under the final name and no temporary file outlives a
run. Knows nothing of what is written.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]

_STALE_TEMP_S = 60.0
"""A temporary file of ours that has not changed for this long belongs to a killed writer."""
_USE_O_TMPFILE = hasattr(os, "O_TMPFILE")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The content goes to a temporary file in the same folder, is flushed to disk, gets the
    permissions of a newly created file (``0o666`` less the umask) and is renamed over
    ``path``: readers see the old file or the whole new one, never a partial one.

    A process killed while writing leaves no temporary file behind for good: on Linux the
    file has no name until it is complete (``O_TMPFILE``, then linked under
    ``.<name>.<pid>.<random>.tmp`` just before the rename); elsewhere it has that name
    from the start. Either way the next write of the same ``path`` removes such files
    that have not changed for a minute.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0o600
            os.fsync(f.fileno())
            if tmp is None:  # an unnamed O_TMPFILE: name it now, complete
                try:
                    tmp = _link_temp(f.fileno(), path)
                except OSError:  # no /proc, say: copy it to a named file after all
                    f.seek(0)
                    tmp = _copy_to_named(f.fileno(), path)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _open_temp(path: Path) -> tuple[int, str | None]:
    """An unnamed temporary file in ``path``'s folder (O_TMPFILE), else a named one."""
    if _USE_O_TMPFILE:
        try:
            return os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError:  # the file system cannot: fall back to a named file
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    return fd, tmp


def _link_temp(fd: int, path: Path) -> str:
    tmp = _temp_name(path)
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/<fd>: a name for the open file itself
    # (a dir_fd makes Python call linkat; plain link() would refuse the /proc symlink)
    proc = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        os.link(str(fd), tmp, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)
    return str(tmp)


def _copy_to_named(fd: int, path: Path) -> str:
    out_fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    with os.fdopen(out_fd, "wb") as out, os.fdopen(os.dup(fd), "rb") as src:
        src.seek(0)
        while chunk := src.read(1 << 20):
            out.write(chunk)
        out.flush()
        os.fchmod(out.fileno(), 0o666 & ~_umask())
        os.fsync(out.fileno())
    return tmp


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of earlier writes of ``path`` that a kill left behind."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            st = tmp.lstat()
            if now - max(st.st_mtime, st.st_ctime) >= _STALE_TEMP_S:
                tmp.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask
