"""cfmodules: counterfactual discovery of the modular structure of deep generative models.

The method of Besserve et al., "Counterfactuals uncover the modular structure of deep
generative models", ICLR 2020: hybridize the hidden channels of a generator between two
latent samples, measure the influence map of each channel, and cluster the maps into
modules. Nothing heavy runs at import time; submodules load on first attribute access,
so the main verbs are at the top level without making ``import cfmodules`` slow::

    import cfmodules
    adapter = cfmodules.zoo.load("dcgan-faces")
    result = cfmodules.analyze(adapter)      # in a notebook: table, templates, hybrids
    cfmodules.show(result.hybrids)           # a batch of images as a grid
    cfmodules.explore(result)                # paint a region, see its hybrids live
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfmodules._lazy import lazy_names

__version__ = "0.1.0"

# name -> submodule that defines it; resolved lazily so `import cfmodules` stays cheap.
# A value of None means the name is itself a subpackage (``cfmodules.zoo``).
_EXPORTS: dict[str, str | None] = {
    "GeneratorAdapter": "cfmodules.adapter",
    "LayerInfo": "cfmodules.layers",
    "hybridize": "cfmodules.hybrid",
    "explain": "cfmodules.engine",
    "CfModulesError": "cfmodules.errors",
    "zoo": None,
    "analyze": "cfmodules.analysis",
    "AnalysisResult": "cfmodules.analysis",
    "influence_maps": "cfmodules.influence",
    "module_influence_maps": "cfmodules.influence",
    "ModuleClustering": "cfmodules.modules",
    "cluster_stability": "cfmodules.modules",
    "scan_layers": "cfmodules.scan",
    "ModularityMonitor": "cfmodules.monitor",
    "show": "cfmodules.display",
    "explore": "cfmodules.explorer",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from cfmodules import zoo
    from cfmodules.adapter import GeneratorAdapter
    from cfmodules.analysis import AnalysisResult, analyze
    from cfmodules.display import show
    from cfmodules.engine import explain
    from cfmodules.errors import CfModulesError
    from cfmodules.explorer import explore
    from cfmodules.hybrid import hybridize
    from cfmodules.influence import influence_maps, module_influence_maps
    from cfmodules.layers import LayerInfo
    from cfmodules.modules import ModuleClustering, cluster_stability
    from cfmodules.monitor import ModularityMonitor
    from cfmodules.scan import scan_layers


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)
