"""What the explorer computes, without the web: selections, hybrids, maps.

:class:`Explorer` holds an analysis (:class:`~cfmodules.analysis.AnalysisResult`) and its
model. It answers the page's questions:

- which channels lie under a painted region (:meth:`Explorer.select_region`): those whose
  influence map, pre-processed as for the clustering (smoothed, thresholded at the
  analysis's percentile), puts at least ``threshold`` of its mass inside the region;
- the hybrids of a selection for 8 pairs (:meth:`Explorer.hybrids`): Original 1 with the
  selected channels taken from Original 2. For a selection in one layer the prefix of
  each pair is computed once and cached, so a request re-runs only the layers after the
  cut, through the engine's accelerated suffix (:class:`~cfmodules.engine.fast.FastSplit`:
  BatchNorm folded, GEMM transposed convolutions), on ``threads`` CPU threads;
- each channel's influence map as an image (:meth:`Explorer.map_image`).

Every argument coming from a request is checked here and refused with an error of the
library's family (:class:`~cfmodules.errors.ConfigError`, ``ChannelError``,
``LayerNotFoundError``) saying what was wrong.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from cfmodules import checks
from cfmodules.errors import ChannelError, ConfigError, LayerNotFoundError, ShapeError, did_you_mean
from cfmodules.samplers import is_diffusion

__all__ = ["Explorer", "MAX_REGION_FRACTION", "MAX_START"]

MAX_REGION_FRACTION = 0.5
"""Largest share of the image a painted region may cover: beyond it, a channel whose map is
spread evenly over the image would already put most of its mass inside the region."""

MAX_START = 10**6
"""Largest first pair index accepted from a request."""

_CACHE_PAIRS = 4  # pair blocks whose prefixes stay cached


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``n`` intra-op threads in the calling thread only (torch's setting is per thread)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _with_window(result: Any, adapter: Any) -> Any:
    """A diffusion model set to the window of the result's analysis (else ``adapter``).

    Raises ConfigError when the model's sampler is not the one the analysis ran with.
    """
    sampler = dict(getattr(result, "sampler", None) or {})
    if not is_diffusion(adapter):
        if sampler:
            raise ConfigError("The result is an analysis of a diffusion model, but the model "
                              f"given ({adapter.name}) is not one; load the model analysed.")
        return adapter
    if not sampler:
        raise ConfigError(f"{adapter.name} is a diffusion model, but the result has no "
                          "sampler settings (it was made with a one-forward generator).")
    own = adapter.identity()
    differs = [k for k in ("scheduler", "n_steps", "timesteps", "eta", "stochastic")
               if k in sampler and sampler[k] != own.get(k)]
    if differs:
        raise ConfigError(f"The model's sampler differs from the analysis's in {differs}; "
                          f"load it with the settings of the analysis ({sampler.get('scheduler')},"
                          f" {sampler.get('n_steps')} steps, eta {sampler.get('eta')}).")
    return adapter.with_window(sampler["window"])


class Explorer:
    """The state behind the explorer page: an analysis, its model and cached pairs.

    Parameters
    ----------
    result : AnalysisResult
        Its ``maps`` give the channels' influence maps, its ``modules`` the modules.
    adapter : GeneratorAdapter
        The model the analysis was made on (``cfmodules.cli.read_modules`` loads and
        checks it).
    n_pairs : int, default 8
        Pairs shown at once.
    seed : int, optional
        Latent stream of the pairs; default the analysis seed + 1 (pairs never used to
        compute the maps).
    threads : int or None, default 1
        CPU threads torch uses for one request, set in the request's own thread only
        (torch's thread count is per thread, so a notebook's setting is left alone). A
        batch of 8 small images gains little from more, and on a busy machine OpenMP
        threads that wait for each other cost ten times more (measured in
        ``benchmarks/bench_explorer.py``). None: torch's current setting.
    """

    def __init__(self, result: Any, adapter: Any, n_pairs: int = 8, seed: int | None = None,
                 threads: int | None = 1):
        from cfmodules.modules import preprocess

        n_pairs = checks.integer(n_pairs, "n_pairs", low=1, high=65)
        adapter = _with_window(result, adapter)
        self.threads = None if threads is None else checks.positive_int(threads, "threads")
        self.result, self.adapter, self.n_pairs = result, adapter, n_pairs
        # default: the stream after the analysis's, so the pairs are new samples
        self.seed = ((int(result.settings.seed) + 1) % checks.SEED_LIMIT if seed is None
                     else checks.seed(seed))
        self.layers = list(result.layers)
        self.layer_channels = {la: int(adapter.layer_channels(la)) for la in self.layers}
        self.map_shape = tuple(int(d) for d in result.maps.shape[1:])
        rows = {(str(la), int(c)): i for i, (la, c) in
                enumerate(zip(result.unit_layer, result.unit_channel))}
        self._row = rows
        binary = preprocess(result.maps, result.settings.window, result.settings.percentile)
        flat = binary.reshape(len(binary), -1)
        total = flat.sum(axis=1, keepdims=True)
        self._mass = np.divide(flat, total, out=np.zeros_like(flat), where=total > 0)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._splits: dict[str, Any] = {}
        self._map_scale = float(np.percentile(result.maps, 99.5)) or 1.0

    # ------------------------------------------------------------------ checks
    def check_layer(self, layer: Any) -> str:
        """``layer`` if the analysis has it, else LayerNotFoundError with a suggestion."""
        if not isinstance(layer, str) or layer not in self.layer_channels:
            raise LayerNotFoundError(
                f"Layer {layer!r} is not a layer of this analysis."
                f"{did_you_mean(str(layer), self.layers)} Layers: {', '.join(self.layers)}.")
        return layer

    def check_channel(self, layer: str, channel: Any) -> int:
        """``channel`` if it is a channel of ``layer`` that has an influence map."""
        n = self.layer_channels[layer]
        try:
            c = checks.integer(channel, "channel", low=0, high=n)
        except ConfigError:
            raise ChannelError(f"Channel {channel!r} is out of range for layer '{layer}', which "
                               f"has channels 0..{n - 1}.") from None
        if (layer, c) not in self._row:
            raise ChannelError(f"Channel {c} of layer '{layer}' has no influence map in "
                               "this analysis.")
        return c

    def check_selection(self, selection: Any) -> dict[str, list[int]]:
        """A selection ``{layer: [channels]}`` from a request, validated and sorted.

        Raises
        ------
        ConfigError, LayerNotFoundError, ChannelError
        """
        if not isinstance(selection, Mapping):
            raise ConfigError(f"A selection maps layer names to channel lists, e.g. "
                              f"{{\"{self.layers[0]}\": [3, 17]}}; got {type(selection).__name__}.")
        out: dict[str, list[int]] = {}
        for layer, chans in selection.items():
            self.check_layer(layer)
            if not isinstance(chans, (list, tuple)):
                raise ConfigError(f"The channels of layer '{layer}' must be a list of integers, "
                                  f"got {type(chans).__name__}.")
            out[layer] = sorted({self.check_channel(layer, c) for c in chans})
        return {la: ch for la, ch in out.items() if ch}

    def check_start(self, start: Any) -> int:
        """The first pair index of a request (0 .. MAX_START)."""
        return checks.integer(start, "start (the first pair)", low=0, high=MAX_START + 1)

    def check_threshold(self, threshold: Any) -> float:
        """A mass share in (0, 1]."""
        return checks.real(threshold, "threshold", low=0, high=1, low_open=True,
                           meaning="the share of a map's mass inside the region")

    # ------------------------------------------------------------------ queries
    def info(self) -> dict[str, Any]:
        """What the page needs to draw itself (JSON-able)."""
        r = self.result
        units = [{"layer": str(la), "channel": int(c), "module": int(k),
                  "influence": round(float(v), 6)}
                 for la, c, k, v in zip(r.unit_layer, r.unit_channel, r.labels, r.influence)]
        return {
            "model": r.model, "model_spec": r.model_spec, "n_pairs": self.n_pairs,
            "seed": self.seed, "map_shape": list(self.map_shape),
            "layers": [{"name": la, "channels": n} for la, n in self.layer_channels.items()],
            "modules": [{"name": n, "channels": m} for n, m in zip(r.module_names, r.modules)],
            "units": units, "max_region_fraction": MAX_REGION_FRACTION,
        }

    def select_region(self, mask: Any, threshold: float = 0.5) -> dict[str, Any]:
        """The channels whose maps put at least ``threshold`` of their mass in ``mask``.

        Parameters
        ----------
        mask : array (H, W) of 0/1 (or bool), H, W = the maps' shape
            The painted region.
        threshold : float in (0, 1], default 0.5
            "Most of their mass": 0.5.

        Returns
        -------
        dict
            ``selection`` ({layer: [channels]}), ``scores`` (the 16 best channels with
            their share of mass inside the region) and ``area`` (the region's share of
            the image).

        Raises
        ------
        ShapeError, ConfigError
            A mask of the wrong shape or values, an empty region, or one covering more
            than :data:`MAX_REGION_FRACTION` of the image.
        """
        threshold = self.check_threshold(threshold)
        try:
            m = np.asarray(mask)
        except (TypeError, ValueError):
            m = np.asarray(None)
        if m.shape != self.map_shape or m.dtype.kind not in "biu":
            raise ShapeError(f"The region must be a {self.map_shape[0]}x{self.map_shape[1]} "
                             f"array of 0 and 1 (rows of the maps' pixels); got shape "
                             f"{m.shape} of {m.dtype}.")
        if ((m != 0) & (m != 1)).any():
            raise ShapeError("The region's pixels must be 0 or 1.")
        inside = m.reshape(-1).astype(bool)
        area = float(inside.mean())
        if not inside.any():
            raise ConfigError("The painted region is empty: paint over the part of the image "
                              "whose channels you want.")
        if area > MAX_REGION_FRACTION:
            raise ConfigError(
                f"The painted region covers {area:.0%} of the image, more than "
                f"{MAX_REGION_FRACTION:.0%}: a channel whose map is spread evenly would put "
                "most of its mass inside it. Paint a smaller region, or pick a module.")
        share = self._mass[:, inside].sum(axis=1)
        r = self.result
        selection: dict[str, list[int]] = {}
        for i in np.flatnonzero(share >= threshold - 1e-12):
            selection.setdefault(str(r.unit_layer[i]), []).append(int(r.unit_channel[i]))
        best = np.argsort(-share, kind="stable")[:16]
        scores = [{"layer": str(r.unit_layer[i]), "channel": int(r.unit_channel[i]),
                   "share": round(float(share[i]), 4)} for i in best]
        return {"selection": {la: sorted(ch) for la, ch in selection.items()},
                "scores": scores, "area": round(area, 4), "threshold": threshold}

    # ------------------------------------------------------------------ images
    def _display(self, images: torch.Tensor) -> np.ndarray:
        from cfmodules.images import as_uint8

        return as_uint8(self.adapter.to_unit(images.detach().float()))

    def _pairs(self, start: int) -> dict[str, Any]:
        """Latents, originals and (lazily) per-layer prefixes of pairs start..start+n-1."""
        entry = self._cache.get(start)
        if entry is None:
            from cfmodules.latents import pair_latents

            z1, z2 = pair_latents(self.adapter, self.n_pairs, self.seed, start)
            y1 = self.adapter.generate(z1)
            y2 = self.adapter.generate(z2)
            entry = {"z1": z1, "z2": z2, "original1": self._display(y1),
                     "original2": self._display(y2), "prefix": {}}
            self._cache[start] = entry
            while len(self._cache) > _CACHE_PAIRS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(start)
        return entry

    def originals(self, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Original 1 and Original 2 of pairs ``start ..``, uint8 (n_pairs, C, H, W)."""
        start = self.check_start(start)
        with self._lock, _torch_threads(self.threads), torch.no_grad():
            e = self._pairs(start)
            return e["original1"], e["original2"]

    def hybrids(self, selection: Any, start: int = 0) -> np.ndarray:
        """Hybrids of ``selection`` for pairs ``start ..``, uint8 (n_pairs, C, H, W).

        Pair ``i``: Original 1 with the selected channels taking Original 2's values. An
        empty selection gives Original 1.
        """
        sel = self.check_selection(selection)
        start = self.check_start(start)
        with self._lock, _torch_threads(self.threads), torch.no_grad():
            e = self._pairs(start)
            if not sel:
                return e["original1"]
            if len(sel) > 1 or is_diffusion(self.adapter):  # window hybrids: hybridize
                from cfmodules.hybrid import hybridize

                return self._display(hybridize(self.adapter, e["z1"], e["z2"], sel))
            (layer, chans), = sel.items()
            split = self._split(layer)
            if layer not in e["prefix"]:
                e["prefix"][layer] = (split.prefix(e["z1"]), split.prefix(e["z2"]).activation)
            state, donor = e["prefix"][layer]
            idx = torch.tensor(chans, device=donor.device)
            act = state.activation.clone()
            act[:, idx] = donor[:, idx]
            return self._display(split.suffix(state, act, owned=False))

    def _split(self, layer: str) -> Any:  # one-forward generators only
        from cfmodules.engine.fast import FastSplit

        if layer not in self._splits:
            self._splits[layer] = FastSplit(self.adapter, layer)
        return self._splits[layer]

    def map_image(self, layer: Any, channel: Any) -> np.ndarray:
        """Influence map of one channel as an RGB image (H, W, 3) uint8 ("magma" colours).

        All maps share one colour scale (up to the 99.5th percentile of all maps), so
        their brightness compares across channels.
        """
        from matplotlib import colormaps

        layer = self.check_layer(layer)
        channel = self.check_channel(layer, channel)
        m = self.result.maps[self._row[(layer, channel)]] / self._map_scale
        rgba = colormaps["magma"](np.clip(m, 0, 1))
        return (rgba[..., :3] * 255).round().astype(np.uint8)

    def module_file(self, selection: Any, name: str = "selection") -> Any:
        """The selection as a :class:`~cfmodules.module_file.ModuleFile` (for download)."""
        from cfmodules.module_file import ModuleFile

        sel = self.check_selection(selection)
        if not sel:
            raise ConfigError("The selection is empty: select channels before downloading "
                              "it as a module.")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise ConfigError(f"A module name is a non-empty string of at most 100 characters, "
                              f"got {name!r}.")
        base = ModuleFile.from_result(self.result)
        return ModuleFile(modules={name.strip(): sel}, model=base.model,
                          model_spec=base.model_spec, model_options=base.model_options,
                          layer_channels=base.layer_channels)
