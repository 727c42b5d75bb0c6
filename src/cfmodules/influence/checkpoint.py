"""Checkpoints of an influence run: running statistics plus what they were computed with.

A checkpoint is a cfmodules ``.npz`` file (kind ``"influence-checkpoint"``) holding the
float64 running mean and M2 of every unit after a whole number of blocks of pairs, and a
header with the identity of the run: the model (name and a SHA-256 of its state_dict),
the latent prior and shapes, the units, the seed, the block size and the dtype. Resuming
from a checkpoint whose identity differs raises :class:`~cfmodules.errors.CheckpointError`
naming what differs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cfmodules.errors import CheckpointError, ResultFileError
from cfmodules.results import read_npz, write_npz

__all__ = ["KIND", "model_fingerprint", "save_checkpoint", "load_checkpoint"]

KIND = "influence-checkpoint"


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of a module's state_dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, identity: dict[str, Any], n_done: int,
                    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
    """Write the running statistics after ``n_done`` pairs (atomically)."""
    write_npz(
        path,
        {"count": count.cpu().numpy(), "mean": mean.cpu().numpy(), "m2": m2.cpu().numpy()},
        {"kind": KIND, "identity": identity, "n_pairs_done": int(n_done)},
    )


def load_checkpoint(path: str | os.PathLike, identity: dict[str, Any]
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """Read a checkpoint if ``path`` exists; check it belongs to this run.

    Returns
    -------
    (n_done, count, mean, m2) or None when there is no file.

    Raises
    ------
    CheckpointError
        The file is not a checkpoint or was made with another model, layer, units or
        settings (the message lists what differs).
    """
    if not Path(path).exists():
        return None
    try:
        arrays, header = read_npz(path, kind=KIND)
    except ResultFileError as e:
        raise CheckpointError(f"Cannot resume from '{path}': {e} Delete it or pass "
                              "another checkpoint path.") from e
    saved = header.get("identity", {})
    diffs = []
    for key in sorted(set(identity) | set(saved)):
        a, b = saved.get(key), identity.get(key)
        if a != b:
            diffs.append(f"{key}: checkpoint has {_short(a)}, this run has {_short(b)}")
    if diffs:
        raise CheckpointError(
            f"The checkpoint '{path}' belongs to another run and was not used:\n  "
            + "\n  ".join(diffs)
            + "\nPass another checkpoint path, or delete the file to start afresh."
        )
    try:
        return (int(header["n_pairs_done"]), arrays["count"], arrays["mean"], arrays["m2"])
    except KeyError as e:
        raise CheckpointError(f"The checkpoint '{path}' is incomplete (no {e}).") from e


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
