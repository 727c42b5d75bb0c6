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
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar

import numpy as np

from cfmodules._deprecation import moved_names
from cfmodules.display import HtmlRepr
from cfmodules.errors import ResultFileError, ShapeError

__all__ = ["FORMAT", "FORMAT_VERSION", "write_npz", "read_npz", "atomic_write", "Result"]

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


R = TypeVar("R", bound="Result")


class Result(HtmlRepr):
    """The verbs every cfmodules result answers: ``save`` / ``load``, ``to_dict`` /
    ``from_dict``, ``to_text`` (also what ``str()`` prints), and ``_repr_html_`` (a
    notebook shows ``to_text()`` and the figures a subclass names in ``_html_figures``,
    see :class:`cfmodules.display.HtmlRepr`).

    A result is a dataclass deriving from this class. Its dataclass fields *are* its
    content, listed once: :meth:`to_dict` walks them (arrays as numpy arrays, a field's
    ``metadata["dtype"]`` fixing the array's dtype, nested results as their own dicts) and
    adds the derived values of :meth:`_derived`; :meth:`from_dict` builds the object back from
    the fields it finds (``metadata["from_dict"]`` converts a nested value) and ignores
    everything else. :meth:`save` writes ``to_dict()`` with :func:`write_npz` (every numpy
    array an array of the file, everything else the JSON header; a nested result named in
    ``nested`` is stored flat, as ``<name>_<key>``), and :meth:`load` reads it back, so the
    file format follows the fields without a second list.
    """

    kind: ClassVar[str] = ""
    """The ``kind`` of the file (``read_npz`` checks it)."""
    nested: ClassVar[tuple[str, ...]] = ()
    """Fields that hold a nested result stored flat in the file."""
    compress: ClassVar[bool] = False

    # ------------------------------------------------------------------ dicts
    def _derived(self) -> dict[str, Any]:
        """Values computed from the fields that ``to_dict`` (and the file) also carry."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """Every field (arrays as numpy arrays, nested results as dicts) and derived values."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif "dtype" in f.metadata:
                value = np.asarray(value, dtype=f.metadata["dtype"])
            out[f.name] = value
        out.update(self._derived())
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """Inverse of :meth:`to_dict`; keys that are not fields are ignored."""
        kw = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.init and f.name in data:
                value = data[f.name]
                convert = f.metadata.get("from_dict")
                kw[f.name] = convert(value) if convert is not None and value is not None else value
        return cls(**kw)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to one ``.npz`` file (arrays + JSON header, no pickle).

        ``numpy.load(path, allow_pickle=False)`` opens it; see ``docs/file_format.md``.
        """
        arrays: dict[str, np.ndarray] = {}
        header: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key in self.nested and isinstance(value, Mapping):
                for sub, v in value.items():
                    (arrays if isinstance(v, np.ndarray) else header)[f"{key}_{sub}"] = v
            else:
                (arrays if isinstance(value, np.ndarray) else header)[key] = value
        header = {k: _json_ready(v) for k, v in header.items()}
        if not header.get("version"):
            header.pop("version", None)  # write_npz writes this library's version
        return write_npz(path, arrays, {**header, "kind": self.kind}, compress=self.compress)

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a file written by :meth:`save` (raises ResultFileError if it is not one)."""
        arrays, header = read_npz(path, kind=cls.kind)
        data: dict[str, Any] = {**header, **arrays}
        for name in cls.nested:
            prefix = f"{name}_"
            parts = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
            data[name] = parts or data.get(name)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ResultFileError(f"'{path}' is an incomplete {cls.kind} result: missing or "
                                  f"bad {e}") from e

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        """A plain-text summary (what ``print(result)`` shows)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.to_text()


def _json_ready(value: Any) -> Any:
    """numpy scalars and tuples as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value


__getattr__ = moved_names(__name__, {"InfluenceResult": "cfmodules.influence.result:InfluenceResult"})
