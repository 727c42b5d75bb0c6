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
same folder and renamed (:func:`cfmodules.files.atomic_write`), so a crash never leaves a half-written file under the final name.

Reading an influence file with numpy only::

    import json, numpy as np
    f = np.load("eim.npz", allow_pickle=False)
    header = json.loads(str(f["header"]))
    maps, stderr = f["maps"], f["stderr"]      # (U, H, W) float32
    influence = f["influence"]                 # (U,) mean of each map over pixels
    header["units"]                            # one {"name", "channels": {layer: [..]}} per row
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from cfmodules.display import HtmlRepr
from cfmodules.errors import ResultFileError, ShapeError
from cfmodules.files import atomic_write

__all__ = ["FORMAT", "FORMAT_VERSION", "write_npz", "read_npz", "Result",
           "folder_update", "finish_folder_update", "check_folder", "MANIFEST"]

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
    ``nested`` is stored flat, as ``<name>_<key>``; a dict of arrays -- e.g. one array per
    classifier -- as one array per key, named ``<name>/<key>``), and :meth:`load` reads it
    back, so the file format follows the fields without a second list. A field's
    ``metadata["dtype"]`` applies to each array of a dict of arrays too.
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
                dtype = f.metadata["dtype"]
                value = ({str(k): np.asarray(v, dtype=dtype) for k, v in value.items()}
                         if isinstance(value, Mapping) else np.asarray(value, dtype=dtype))
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
            elif _array_dict(value):
                arrays.update({f"{key}{KEY_SEP}{sub}": v for sub, v in value.items()})
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
        cls._validate(path, arrays, header)
        data: dict[str, Any] = {**header}
        for key, value in arrays.items():
            name, sep, sub = key.partition(KEY_SEP)
            if sep:  # one array of a dict of arrays
                group = data.get(name)
                data[name] = group = group if isinstance(group, dict) else {}
                group[sub] = value
            else:
                data[key] = value
        for name in cls.nested:
            prefix = f"{name}_"
            parts = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
            data[name] = parts or data.get(name)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ResultFileError(f"'{path}' is an incomplete {cls.kind} result: missing or "
                                  f"bad {e}") from e

    @classmethod
    def _validate(cls, path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                  header: Mapping[str, Any]) -> None:
        """Refuse a file whose arrays do not fit together (raise ResultFileError)."""

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        """A plain-text summary (what ``print(result)`` shows)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.to_text()


KEY_SEP = "/"
"""In a result file, ``<field>/<key>`` is the array ``key`` of a field holding a dict of arrays."""


def _array_dict(value: Any) -> bool:
    """Whether ``value`` is a non-empty dict whose values are all numpy arrays."""
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(v, np.ndarray) for v in value.values()))


def _json_ready(value: Any) -> Any:
    """numpy scalars and tuples as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- folders
MANIFEST = "manifest.json"
"""Written last into a report folder: its files and their SHA-256 (see docs/file_format.md)."""
_STAGING = ".cfmodules-staging"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def folder_update(out: str | os.PathLike) -> Iterator[Path]:
    """Replace the set of files of a folder all at once: readers see the old set or the new.

    Yields a staging folder (``<out>/.cfmodules-staging``) to write the new files into.
    When the block ends without an error, a manifest of the new files (names and
    SHA-256) is written into the staging folder -- the commit point -- and
    :func:`finish_folder_update` moves the files into ``out``, deletes the files of the
    old set that the new one lacks, and moves the manifest last. A kill before the commit
    point leaves the old set untouched (the staging folder is discarded by the next
    update); a kill after it is finished by the next update, and until then
    :func:`check_folder` tells readers the folder is being updated. Files of ``out`` that
    no manifest lists (checkpoints, the user's own) are never touched.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    finish_folder_update(out)  # an earlier committed update first, else discard its staging
    stage = out / _STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    names = sorted(p.name for p in stage.iterdir() if p.is_file() and p.name != MANIFEST)
    old = _manifest(out / MANIFEST).get("files", {})
    manifest = {"format": "cfmodules-folder", "format_version": 1,
                "files": {n: _sha256(stage / n) for n in names},
                "removes": sorted(set(old) - set(names))}
    atomic_write(stage / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    finish_folder_update(out)


def finish_folder_update(out: str | os.PathLike) -> None:
    """Finish an update of ``out`` that was committed but interrupted (idempotent)."""
    out = Path(out)
    stage = out / _STAGING
    new = _manifest(stage / MANIFEST)
    if not new:  # nothing committed: an interrupted staging, the old set is intact
        shutil.rmtree(stage, ignore_errors=True)
        return
    (out / MANIFEST).unlink(missing_ok=True)  # from here on, the folder says "being updated"
    page = "report.html"
    if (stage / page).exists():
        (out / page).unlink(missing_ok=True)  # no page shows old figures beside new ones
    for name in sorted(new["files"], key=lambda n: n == page):  # the page comes last
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    for name in new.get("removes", []):
        (out / name).unlink(missing_ok=True)
    os.replace(stage / MANIFEST, out / MANIFEST)
    shutil.rmtree(stage, ignore_errors=True)


def check_folder(out: str | os.PathLike, name: str | None = None) -> None:
    """Check that the files of a report folder belong together (or raise ResultFileError).

    Parameters
    ----------
    out : path
        The folder.
    name : str, optional
        Check only this file (when the manifest lists it): present and unchanged.
    """
    out = Path(out)
    if _manifest(out / _STAGING / MANIFEST):
        raise ResultFileError(
            f"The folder '{out}' is half-way through an update that was interrupted; run the "
            "same `cfmodules analyze --out` again to finish it (nothing is recomputed).")
    files = _manifest(out / MANIFEST).get("files")
    if files is None:
        return  # a folder without a manifest: files written one by one (older versions)
    for n in [name] if name is not None else list(files):
        if n not in files:
            continue  # a file the report does not own
        if not (out / n).exists() or _sha256(out / n) != files[n]:
            raise ResultFileError(
                f"'{out / n}' is not the file the report in '{out}' was written with (it was "
                "changed or replaced); run `cfmodules analyze` again to rewrite the folder.")


def _manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}
