"""Find a data file inside an installed package without importing (running) the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cfmodules.errors import ModelNotAvailableError

__all__ = ["package_file"]


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
