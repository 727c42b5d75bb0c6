"""cfmodules: counterfactual discovery of the modular structure of deep generative models.

The method of Besserve et al., "Counterfactuals uncover the modular structure of deep
generative models", ICLR 2020: hybridize the hidden channels of a generator between two
latent samples, measure the influence map of each channel, and cluster the maps into
modules. Nothing heavy runs at import time; submodules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> submodule that defines it; resolved lazily so `import cfmodules` stays cheap.
_EXPORTS = {
    "GeneratorAdapter": "cfmodules.adapter",
    "LayerInfo": "cfmodules.adapter",
    "hybridize": "cfmodules.hybrid",
    "CfModulesError": "cfmodules.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules.adapter import GeneratorAdapter, LayerInfo
    from cfmodules.errors import CfModulesError
    from cfmodules.hybrid import hybridize


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cfmodules' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
