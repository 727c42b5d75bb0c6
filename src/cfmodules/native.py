"""Small C kernels, compiled on first use with the system's C compiler and cached.

Some of the engine's hot loops are faster as one fused C function than as a chain of
PyTorch operations, because the chain moves every intermediate through memory
(:mod:`cfmodules.engine.tail`). Such a kernel ships as C source in the package (listed in
``KERNELS``) and is built for this machine (``-O3 -march=native``) the first time it is
needed, then loaded with :mod:`ctypes`; nothing is downloaded and nothing runs at import.
This file imports nothing of cfmodules and not torch, so the command line can start a
build (:func:`build_in_background`) before torch has loaded.

- The compiler is ``$CC`` if set, else the one Python was built with, else ``cc``.
- On x86 the instruction set follows PyTorch's ``ATEN_CPU_CAPABILITY`` when it is set
  (``avx2``: no AVX-512; ``default``: no AVX), else the CPU's own.
- Builds are cached in ``$CFMODULES_CACHE_DIR``, else ``$XDG_CACHE_HOME/cfmodules``, else
  ``~/.cache/cfmodules``, under a name that hashes the source, the compiler's version, the
  flags and the CPU's feature flags (so a cache shared between machines never loads a build
  made for another CPU). A build is written under a temporary name and renamed.
- ``CFMODULES_NATIVE=0`` turns the kernels off. Without a working compiler they are off
  too; :func:`status` says why, and the engine uses its PyTorch path (same numbers up to
  float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

__all__ = ["KERNELS", "load", "status", "enabled", "build_in_background"]

_HERE = Path(__file__).parent
KERNELS = {"fused_tail": "engine/fused_tail.c"}
"""Each kernel's C source, relative to the package."""
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why: dict[str, str] = {}


def enabled() -> bool:
    """False when ``CFMODULES_NATIVE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("CFMODULES_NATIVE", "1").strip().lower() not in ("0", "false", "no",
                                                                           "off")


def _compiler() -> list[str] | None:
    for cmd in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cmd:
            parts = shlex.split(cmd)
            if parts and shutil.which(parts[0]):
                return parts
    return None


def _native_flags() -> list[str]:
    """``-march=native``, capped like PyTorch's own kernels by ``ATEN_CPU_CAPABILITY`` on
    x86 (``avx2``: no AVX-512; ``default``: no AVX), so one setting caps both."""
    flags = ["-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
        if cap == "avx2":
            flags.append("-mno-avx512f")
        elif cap == "default":
            flags.append("-mno-avx")
    return flags


def _cpu_signature() -> str:
    """The CPU's feature flags (Linux), else the platform's description."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("CFMODULES_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cfmodules"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _build(name: str, flags: list[str] | None = None) -> tuple[ctypes.CDLL | None, str]:
    """Build (or take from the cache) and load ``name``; ``flags`` replace the
    ``-march=native`` tries (tests build other instruction sets this way)."""
    src = _HERE / KERNELS[name]
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    try:
        version = _run([*cc, "--version"]).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc[0]} does not run: {e}"
    source = src.read_bytes()
    for extra in ([flags] if flags is not None else [_native_flags(), []]):
        # -march=native, then without it if the compiler refuses it
        flags = _FLAGS + extra
        key = hashlib.sha256(b"\0".join([
            source, version.encode(), " ".join(cc + flags).encode(),
            _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:20]
        built, why = _compile_cached(cc, flags, src, f"{name}-{key}.so")
        if built is not None:
            try:
                return ctypes.CDLL(str(built)), (
                    f"built {'now ' if why == 'compiled' else ''}with {' '.join(cc + flags)} "
                    f"({built})")
            except OSError as e:
                why = f"the build of {src.name} does not load: {e}"
    return None, why


def _compile_cached(cc: list[str], flags: list[str], src: Path, filename: str
                    ) -> tuple[Path | None, str]:
    """The cached build ``filename``, compiled now if absent; (None, why) on failure."""
    for folder in (_cache_dir(), None):  # the cache, else a folder of this process
        try:
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="cfmodules-native-"))
                _remove_at_exit(folder)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / filename
            if target.exists():
                return target, "cached"
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            out = _run([*cc, *flags, "-o", tmp, str(src)])
            if out.returncode != 0:
                return None, (f"compiling {src.name} failed: "
                              f"{(out.stderr or out.stdout).strip()[-500:]}")
            os.replace(tmp, target)
            return target, "compiled"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"compiling {src.name} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, "no writable folder for the build"


def _remove_at_exit(folder: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library ``name`` (a key of ``KERNELS``), built if needed.

    None when kernels are off (``CFMODULES_NATIVE=0``) or cannot be built here;
    :func:`status` says why. The result is cached for the process.
    """
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name], _why[name] = _build(name)
        return _loaded[name]


def status(name: str) -> str:
    """Why kernel ``name`` is or is not in use (builds it if it was not tried yet)."""
    if not enabled():
        return "off (CFMODULES_NATIVE=0)"
    lib = load(name)
    return ("in use: " if lib is not None else "not in use: ") + _why[name]


def build_in_background(name: str) -> threading.Thread | None:
    """Start building kernel ``name`` in a thread (the compiler runs as a subprocess, beside
    this process's work), so that a later :func:`load` finds it ready; None when kernels
    are off or it is loaded already. The thread is not a daemon: the interpreter waits for
    it at exit, so an interrupted build still removes its temporary file."""
    if not enabled() or name in _loaded:
        return None
    thread = threading.Thread(target=load, args=(name,), name=f"cfmodules-build-{name}")
    thread.start()
    return thread
