"""Result objects and their file format: ``.npz`` arrays plus a JSON header, never a pickle.

Every cfmodules result file is an ordinary NumPy ``.npz`` archive that opens with
``numpy.load(path, allow_pickle=False)`` alone:

- one array per named result (``maps``, ``stderr``, ...), and
- ``header``: a 0-d unicode array holding a JSON object with at least
  ``{"format": "cfmodules", "format_version": 1, "kind": "...", "version": "..."}``
  plus the settings of the run that made it.

:func:`write_npz` / :func:`read_npz` are the generic writer and reader (used for influence
maps, modules, stability results and checkpoints); every result object
(:class:`cfmodules.influence.InfluenceResult`, ...) saves and loads through them. Files are written to a temporary name in the
same folder and renamed, so a crash never leaves a half-written file under the final name.

Reading an influence file with numpy only::

    import json, numpy as np
    f = np.load("eim.npz", allow_pickle=False)
    header = json.loads(str(f["header"]))
    maps, stderr = f["maps"], f["stderr"]      # (U, H, W) float32
    influence = f["influence"]                 # (U,) mean of each map over pixels
    header["units"]                            # one {"name", "channels": {layer: [..]}} per row
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cfmodules._deprecation import moved_names
from cfmodules.errors import ResultFileError, ShapeError

__all__ = ["FORMAT", "FORMAT_VERSION", "write_npz", "read_npz", "atomic_write"]

FORMAT = "cfmodules"
FORMAT_VERSION = 1
_HEADER = "header"


def _library_version() -> str:
    from cfmodules import __version__

    return __version__


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
              header: Mapping[str, Any], *, compress: bool = False) -> Path:
    """Write ``arrays`` and a JSON ``header`` to ``path`` atomically (temp file + rename).

    Parameters
    ----------
    path : str or PathLike
        Destination; the name is used as given (no ``.npz`` is appended).
    arrays : dict str -> array
        Numeric or string arrays (object arrays are refused: they would need pickle).
    header : dict
        JSON-serializable; must contain ``"kind"``. ``format``, ``format_version`` and
        ``version`` (cfmodules version) are added when missing.
    compress : bool, default False
        Use ``np.savez_compressed``.

    Returns
    -------
    Path
        The path written.
    """
    path = Path(path)
    if _HEADER in arrays:
        raise ShapeError(f"'{_HEADER}' is reserved for the JSON header; rename that array.")
    if "kind" not in header:
        raise ShapeError("The header of a result file needs a 'kind' (e.g. 'influence').")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "version": _library_version(), **header}
    try:
        text = json.dumps(full, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"The header of a result file must be JSON-serializable: {e}") from e
    payload: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ShapeError(f"Array '{key}' has dtype object; results are stored without pickle.")
        payload[key] = arr
    payload[_HEADER] = np.array(text)
    return atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(
        f, **payload))


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The content goes to a temporary file in the same folder, is flushed to disk, gets the
    permissions of a newly created file (``0o666`` less the umask) and is renamed over
    ``path``: readers see the old file or the whole new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0o600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def read_npz(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`write_npz`.

    Parameters
    ----------
    path : str or PathLike
    kind : str, optional
        Expected ``header["kind"]``; another kind raises :class:`ResultFileError`.

    Returns
    -------
    arrays : dict str -> ndarray
    header : dict

    Raises
    ------
    ResultFileError
        Missing, truncated or foreign file, unknown format version, or wrong kind.
    """
    path = Path(path)
    if not path.exists():
        raise ResultFileError(f"No result file at '{path}'.")
    if path.is_dir():
        raise ResultFileError(f"'{path}' is a folder; give the .npz file inside it (e.g. "
                              f"'{path / 'results.npz'}').")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ResultFileError(
                f"'{path}' is a plain .npy array, not an .npz file written by cfmodules; "
                "give the results.npz that cfmodules wrote.")
        with loaded as f:
            if _HEADER not in f.files:
                raise ResultFileError(
                    f"'{path}' is an npz file but not a cfmodules result (it has no "
                    f"'{_HEADER}' entry; entries: {sorted(f.files)[:8]})."
                )
            raw = f[_HEADER]
            try:
                header = json.loads(str(raw)) if raw.dtype.kind == "U" and raw.ndim == 0 else None
            except ValueError:
                header = None
            if header is None:
                raise ResultFileError(f"'{path}' has a damaged header (not a JSON text); it "
                                      "was not written by cfmodules or was edited.")
            arrays = {k: f[k] for k in f.files if k != _HEADER}
    except ResultFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ResultFileError(
            f"Cannot read '{path}' as a cfmodules result file (truncated or not an .npz "
            f"written by cfmodules): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ResultFileError(f"'{path}' is not a cfmodules result file (its header is not "
                              "a cfmodules header).")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResultFileError(
            f"'{path}' has a damaged header: format_version is {version!r}, not a positive "
            "integer. The file was not written by cfmodules or was edited; write it again.")
    if version > FORMAT_VERSION:
        raise ResultFileError(
            f"'{path}' uses file format version {version}, newer than "
            f"this cfmodules ({_library_version()}) reads ({FORMAT_VERSION}); upgrade cfmodules."
        )
    if kind is not None and header.get("kind") != kind:
        raise ResultFileError(
            f"'{path}' holds a '{header.get('kind')}' result, not '{kind}'."
        )
    return arrays, header


__getattr__ = moved_names(__name__, {"InfluenceResult": "cfmodules.influence.result:InfluenceResult"})
