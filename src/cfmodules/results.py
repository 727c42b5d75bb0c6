"""Result objects and their file format: ``.npz`` arrays plus a JSON header, never a pickle.

Every cfmodules result file is an ordinary NumPy ``.npz`` archive that opens with
``numpy.load(path, allow_pickle=False)`` alone:

- one array per named result (``maps``, ``stderr``, ...), and
- ``header``: a 0-d unicode array holding a JSON object with at least
  ``{"format": "cfmodules", "format_version": 1, "kind": "...", "version": "..."}``
  plus the settings of the run that made it.

:func:`write_npz` / :func:`read_npz` are the generic writer and reader (used for influence
maps, modules, stability results and checkpoints); :class:`InfluenceResult` is the result
of :func:`cfmodules.influence.influence_maps`. Files are written to a temporary name in the
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cfmodules.errors import ResultFileError, ShapeError

__all__ = ["FORMAT", "FORMAT_VERSION", "write_npz", "read_npz", "atomic_write", "InfluenceResult"]

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
    try:
        with np.load(path, allow_pickle=False) as f:
            if _HEADER not in f.files:
                raise ResultFileError(
                    f"'{path}' is an npz file but not a cfmodules result (it has no "
                    f"'{_HEADER}' entry; entries: {sorted(f.files)[:8]})."
                )
            header = json.loads(str(f[_HEADER]))
            arrays = {k: f[k] for k in f.files if k != _HEADER}
    except ResultFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ResultFileError(
            f"Cannot read '{path}' as a cfmodules result file (truncated or not an .npz "
            f"written by cfmodules): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ResultFileError(f"'{path}' is not a cfmodules result file (bad header).")
    if int(header.get("format_version", -1)) > FORMAT_VERSION:
        raise ResultFileError(
            f"'{path}' uses file format version {header.get('format_version')}, newer than "
            f"this cfmodules ({_library_version()}) reads ({FORMAT_VERSION}); upgrade cfmodules."
        )
    if kind is not None and header.get("kind") != kind:
        raise ResultFileError(
            f"'{path}' holds a '{header.get('kind')}' result, not '{kind}'."
        )
    return arrays, header


def _unit_json(channels: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    return {str(layer): [int(c) for c in chs] for layer, chs in channels.items()}


@dataclass
class InfluenceResult:
    """Influence maps of units or modules (Besserve et al. 2020, eq. 2, sec. 3.3-3.4).

    Row ``i`` is the influence map of ``units[i]``: the mean over latent pairs of
    ``|Y_{E <- z2}(z1) - Y(z1)|``, averaged over colour channels, at output resolution.

    Attributes
    ----------
    maps : ndarray (U, H, W) float32
        Influence maps (for single-channel units: elementary influence maps, EIMs).
    stderr : ndarray (U, H, W) float32
        Per-pixel standard error of ``maps`` over pairs (sample std / sqrt(n_pairs));
        NaN when ``n_pairs == 1``.
    n_pairs : int
        Number of (z1, z2) pairs the maps average over.
    units : list of dict
        ``units[i]`` maps layer name -> channel indices of row ``i``.
    names : list of str
        A name per row: ``"main.8[5]"`` for channel 5 of ``main.8``, or the module's name.
    layer : str or None
        The layer, when every row is a single channel of one layer (EIMs).
    model : str
        The adapter's name.
    settings : dict
        The settings of the run (seed, pairs per block, method, dtype, ...).
    version : str
        cfmodules version that computed the maps.
    """

    maps: np.ndarray
    stderr: np.ndarray
    n_pairs: int
    units: list[dict[str, list[int]]]
    names: list[str]
    layer: str | None = None
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    kind = "influence"

    def __post_init__(self) -> None:
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.stderr = np.asarray(self.stderr, dtype=np.float32)
        if self.maps.ndim != 3 or self.stderr.shape != self.maps.shape:
            raise ShapeError(
                f"maps and stderr must both be (U, H, W); got {self.maps.shape} and "
                f"{self.stderr.shape}."
            )
        if len(self.units) != self.maps.shape[0] or len(self.names) != self.maps.shape[0]:
            raise ShapeError(
                f"{self.maps.shape[0]} maps but {len(self.units)} units and "
                f"{len(self.names)} names."
            )
        self.units = [_unit_json(u) for u in self.units]
        self.names = [str(n) for n in self.names]
        if not self.version:
            self.version = _library_version()

    # ------------------------------------------------------------------ derived
    @property
    def influence(self) -> np.ndarray:
        """(U,) individual influence: each map's mean over pixels (sec. 3.3)."""
        return self.maps.mean(axis=(1, 2))

    @property
    def channels(self) -> np.ndarray | None:
        """(U,) channel index of each row when the rows are EIMs of one layer, else None."""
        if self.layer is None:
            return None
        return np.array([u[self.layer][0] for u in self.units], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, Any]:
        """The JSON header written to the file."""
        return {
            "kind": self.kind,
            "n_pairs": int(self.n_pairs),
            "units": self.units,
            "names": self.names,
            "layer": self.layer,
            "model": self.model,
            "settings": self.settings,
            "version": self.version,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``maps``, ``stderr``, ``influence`` (and ``channels`` for EIMs) to ``path``.

        The file opens with ``numpy.load(path, allow_pickle=False)``; see the module
        docstring for its keys.
        """
        arrays = {"maps": self.maps, "stderr": self.stderr, "influence": self.influence}
        if self.channels is not None:
            arrays["channels"] = self.channels
        return write_npz(path, arrays, self.header())

    @classmethod
    def load(cls, path: str | os.PathLike) -> InfluenceResult:
        """Read a file written by :meth:`save`."""
        arrays, header = read_npz(path, kind=cls.kind)
        try:
            return cls(
                maps=arrays["maps"], stderr=arrays["stderr"], n_pairs=int(header["n_pairs"]),
                units=header["units"], names=header["names"], layer=header.get("layer"),
                model=header.get("model", ""), settings=header.get("settings", {}),
                version=header.get("version", ""),
            )
        except (KeyError, ShapeError) as e:
            raise ResultFileError(f"'{path}' is an incomplete influence result: {e}") from e

    def __repr__(self) -> str:
        u, h, w = self.maps.shape
        what = f"layer={self.layer!r}" if self.layer is not None else f"{u} modules"
        infl = self.influence
        rng = f"{infl.min():.3g}..{infl.max():.3g}" if u else "-"
        se = float(np.nanmax(self.stderr)) if self.n_pairs > 1 and u else float("nan")
        return (f"InfluenceResult({what}, model={self.model!r}, maps {u}x{h}x{w}, "
                f"n_pairs={self.n_pairs}, influence {rng}, max stderr {se:.2g})")
