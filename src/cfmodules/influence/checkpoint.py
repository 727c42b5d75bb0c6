"""Checkpoints of an influence run: running statistics plus what they were computed with.

A checkpoint is a cfmodules ``.npz`` file (kind ``"influence-checkpoint"``) holding the
float64 running count, mean and M2 of every unit after a whole number of blocks of
pairs, and a header with the identity of the run: the model (name and a SHA-256 of its
state_dict), the latent shapes, the units, the seed, the block size, the dtype, the
method, and fingerprints of the code that decides the numbers (the generator's classes,
the adapter's ``forward``, ``output_transform``, prior and subclass methods; see
:mod:`cfmodules.influence.identity`). Resuming from a checkpoint whose identity differs
raises :class:`~cfmodules.errors.CheckpointError` naming what differs; so does a part
that could not be fingerprinted, unless the caller passes ``assume_same=True``, and a
file whose arrays do not fit the run (wrong shapes, dtypes or pair count).
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfmodules.errors import CheckpointError, ResultFileError
from cfmodules.influence.identity import UNVERIFIABLE, model_fingerprint
from cfmodules.results import read_npz, write_npz

__all__ = ["KIND", "model_fingerprint", "save_checkpoint", "load_checkpoint"]

KIND = "influence-checkpoint"


def save_checkpoint(path: str | os.PathLike, identity: dict[str, Any], n_done: int,
                    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
    """Write the running statistics after ``n_done`` pairs (atomically)."""
    write_npz(
        path,
        {"count": count.cpu().numpy(), "mean": mean.cpu().numpy(), "m2": m2.cpu().numpy()},
        {"kind": KIND, "identity": identity, "n_pairs_done": int(n_done)},
    )


def load_checkpoint(path: str | os.PathLike, identity: dict[str, Any], *,
                    n_units: int | None = None, assume_same: bool = False
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """Read a checkpoint if ``path`` exists; check it belongs to this run.

    Parameters
    ----------
    path : path
    identity : dict
        This run's identity (see :func:`cfmodules.influence.maps.influence_maps`).
    n_units : int, optional
        Rows the statistics must have.
    assume_same : bool, default False
        Accept parts of the identity that could not be fingerprinted (the caller states
        the run is the same); parts that were fingerprinted must still match.

    Returns
    -------
    (n_done, count (U,), mean (U, H, W), m2 (U, H, W)) or None when there is no file.

    Raises
    ------
    CheckpointError
        The file is not a checkpoint, was made with another model, layer, units, settings
        or code (the message lists what differs), cannot be verified, or holds arrays that
        do not fit.
    """
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise CheckpointError(f"The checkpoint path '{path}' is a folder; give a file name "
                              "(e.g. run.ckpt) for the checkpoint.")
    try:
        arrays, header = read_npz(path, kind=KIND)
    except ResultFileError as e:
        raise CheckpointError(f"Cannot resume from '{path}': {e} Delete it or pass "
                              "another checkpoint path.") from e
    saved = header.get("identity", {})
    if not isinstance(saved, dict):
        saved = {}
    diffs, unverified = [], []
    for key in sorted(set(identity) | set(saved)):
        a, b = saved.get(key), identity.get(key)
        why = next((x[UNVERIFIABLE] for x in (b, a) if isinstance(x, dict) and UNVERIFIABLE in x),
                   None)
        if why is not None:
            unverified.append(f"{key}: {why}")
        elif a != b:
            diffs.append(f"{key}: checkpoint has {_short(a)}, this run has {_short(b)}")
    if diffs:
        raise CheckpointError(
            f"The checkpoint '{path}' belongs to another run and was not used:\n  "
            + "\n  ".join(diffs)
            + "\nPass another checkpoint path, or delete the file to start afresh."
        )
    if unverified and not assume_same:
        raise CheckpointError(
            f"Cannot verify that the checkpoint '{path}' was made by this run, so it was not "
            "used:\n  " + "\n  ".join(unverified)
            + "\nIf you are sure the code and settings are the same, pass assume_same=True "
            "(cfmodules analyze --assume-same); else delete the file to start afresh."
        )
    return _checked_arrays(path, arrays, header, n_units)


def _checked_arrays(path: Path, arrays: dict[str, np.ndarray], header: dict[str, Any],
                    n_units: int | None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"The checkpoint '{path}' is damaged ({what}) and was not "
                               "used; delete it to start afresh.")

    n_done = header.get("n_pairs_done")
    if isinstance(n_done, bool) or not isinstance(n_done, numbers.Integral) or n_done < 1:
        raise bad(f"n_pairs_done is {n_done!r}, not a positive integer")
    for key in ("count", "mean", "m2"):
        if key not in arrays:
            raise bad(f"no '{key}' array")
        if arrays[key].dtype != np.float64:
            raise bad(f"'{key}' has dtype {arrays[key].dtype}, not float64")
    count, mean, m2 = arrays["count"], arrays["mean"], arrays["m2"]
    units = mean.shape[0] if mean.ndim else 0
    if mean.ndim != 3:
        raise bad(f"'mean' has shape {mean.shape}, not (units, H, W)")
    if n_units is not None and units != n_units:
        raise bad(f"'mean' has {units} rows for a run of {n_units} units")
    if m2.shape != mean.shape:
        raise bad(f"'m2' has shape {m2.shape}, 'mean' {mean.shape}")
    if count.shape != (units,):
        raise bad(f"'count' has shape {count.shape}, not ({units},)")
    if not (count == n_done).all():
        raise bad(f"'count' does not equal n_pairs_done={n_done} for every unit")
    if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
        raise bad("the statistics are not finite")
    return int(n_done), count, mean, m2


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
