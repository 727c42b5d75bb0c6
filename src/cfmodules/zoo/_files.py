"""Find a data file inside an installed package without importing (running) the package;
read a model's JSON configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from cfmodules.errors import CheckpointError, ModelNotAvailableError

__all__ = ["package_file", "read_json_config"]


def read_json_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a model's configuration); CheckpointError otherwise."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a configuration (a JSON object).")
    return data


def package_file(package: str, relative: str, install: str) -> Path:
    """Path of ``relative`` inside the installed top-level ``package``.

    ``importlib.util.find_spec`` locates a top-level package without executing its
    ``__init__``, so packages that download, print or import TensorFlow at import time
    are never run.

    Raises
    ------
    ModelNotAvailableError
        Naming the ``install`` command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for root in locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    where = f"package '{package}' is not installed" if not locations else (
        f"'{relative}' is missing from the installed package '{package}'"
    )
    raise ModelNotAvailableError(f"The model file cannot be found: {where}. Install it with: {install}")
