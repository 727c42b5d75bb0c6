"""A scorecard of modules: localisation and causal effect, each against a null, with CIs.

For every module (a group of channels found by the clustering, or any given group) the
scorecard measures, on ``n_pairs`` pairs (Original 1, Original 2) of
:func:`cfmodules.latents.pair_latents`, the change map ``d_p = mean over colours of
|hybrid_p - Original 1_p|`` (the hybrid takes the module's channels from Original 2), and
from it:

Localisation (where the hybrids change the image)
    ``maps[k]``: the mean of ``d_p`` over pairs. Its *change region* is that map smoothed
    and thresholded exactly as the clustering treats influence maps
    (:func:`cfmodules.modules.preprocess.preprocess`: ``window``, then the pixels above
    the ``percentile``-th percentile).

    - ``concentration``: share of the map's mass (sum of ``maps[k]``) inside its own change
      region. Needs no reference: a module that changes one part of the image is
      concentrated, a group that changes a little everywhere is not.
    - With reference region masks (planted regions of a synthetic generator, face parts,
      or the user's ``masks``), each module is assigned the region where its change per
      pixel stands out most: the region of largest ``specificity`` (below; a per-pixel
      contrast, so a large region is not favoured for its size, as it would be by IoU).
    - ``specificity``: ``(in - out) / (in + out)`` with ``in`` / ``out`` the mean change
      per pixel inside / outside the assigned region: 1 when the hybrids change the
      region only, 0 when they change it no more than the rest, negative when less.
    - ``iou``: intersection over union between the assigned region and the module's top
      pixels. By default the top pixels of the map are as many as the region has
      (``iou_area="region"``: the threshold is the percentile that leaves the region's
      area, so IoU measures *where* the change is, not how large an area the clustering's
      percentile assumes). This reads the map itself, unsmoothed: a mean over pairs is
      smooth enough, and the clustering's smoothing, needed for single-channel maps,
      would spread the change ``window // 2`` pixels across the region's border (on a
      16x16 image, IoU 0.90 instead of 1.00 for a module that changes exactly its
      region). ``iou_area="clustering"`` compares the change region instead.
    - ``mass_share``: share of the map's mass inside the assigned region.

Causal effect (how much the hybrids change)
    - ``pixel_effect``: mean over pairs and pixels of ``d_p`` (in the generator's output
      units); ``pixel_effect_ratio``: the same over the mean of the null groups'.
    - ``classifier_effect`` (with ``classifier``): mean over pairs of the total variation
      distance ``0.5 * sum_c |P(c | hybrid) - P(c | Original 1)|`` between the classifier's
      class probabilities (in [0, 1]); ``classifier_effect_ratio`` likewise.

The statistics
--------------
**Null.** For each module, ``n_null`` random channel groups of the same size at the same
layer(s): as many channels per layer as the module has there, drawn uniformly without
replacement from all the channels of that layer (the module's own channels included: a
random relabelling of the channels, under which the module is one more draw). Modules of
the same size at the same layer(s) share one set of random groups (their p-values are then
dependent, which the Holm adjustment below allows). Every
statistic is computed for the null groups exactly as for the module, **on the same pairs**
(a paired design); statistics that need a region use, for a null group, the region it is
itself assigned by the same rule (largest specificity), so choosing the best of several
regions is part of the null and not a source of bias.

**p-values** are one-sided (the module scores *higher* than random groups: more
localised, more specific, larger effect), Monte-Carlo permutation p-values
``p = (1 + #{null >= observed}) / (1 + n_null)``, valid at every ``n_null`` (the smallest
attainable is ``1 / (1 + n_null)``: 0.0099 with the default 100 groups). They are
conditional on the pairs: the question is whether *this grouping* of the channels beats
random groupings on the same images. ``percentile`` is the share of null groups that
score strictly lower. A module that holds every channel of its layer has no null (every
random group is itself) and gets p = 1.

**Multiple comparisons.** A scorecard makes ``K x S`` tests (K modules, S tested
statistics: up to 5), which are not independent (the statistics of one module are
correlated; modules of one size share their null). Raw p-values are reported for each;
:meth:`Scorecard.p_adjusted` adjusts them by Holm's step-down method over the K modules
of each statistic, a family per question ("more specific than random groups?", "larger
effect?"), which controls the family-wise error rate of each statistic at ``alpha`` under
any dependence. Nothing is adjusted across the S statistics, nor across several
scorecards (layers, K): for one verdict over a whole table compare the adjusted values
with ``alpha / S``. With ``n_null`` random groups the smallest Holm-adjusted p-value is
``K / (1 + n_null)`` (0.03 for K = 3 and the default 100); a family over the whole table
would need ``n_null >= K * S / alpha`` (300 for K = 3, S = 5) to ever reach 0.05.

**Confidence intervals** are bias-corrected percentile bootstrap intervals (Efron 1981)
over pairs (``n_boot`` resamples of the pairs with replacement, seeded): for each resample
the module's map and effects are recomputed; localisation statistics keep the region
assigned on all pairs. The bias correction matters for the localisation statistics: the
mean map of a resample (with repeated pairs) is noisier, hence more peaked, than the
mean map of the pairs, and plain percentiles could then miss the estimate itself. Where
the estimate lies outside every resample the interval is NaN (shown as "n/a"): the
statistic is then too biased by resampling for a bootstrap interval.
``*_ratio`` intervals recompute the null groups' mean on the same resample. The intervals
describe the uncertainty due to the sample of pairs, for the given grouping of channels;
they do not include the clustering's own variability (see the stability sweep for that).

Pairs: with an :class:`~cfmodules.analysis.AnalysisResult`, the default pairs come after
the ones the analysis used for its maps and hybrids (``start = n_pairs + n_hybrids`` of
its seed), so the modules are scored on images that did not shape them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cfmodules import checks
from cfmodules import latents as L
from cfmodules.adapter import GeneratorAdapter
from cfmodules.engine import plan_swaps
from cfmodules.errors import ConfigError, GeneratorOutputError, ModuleError, ShapeError
from cfmodules.evaluation._run import EvalNoGrad
from cfmodules.evaluation.references import auto_masks, check_masks, reference_masks
from cfmodules.evaluation.scorecard_result import STATISTICS, TESTED, Scorecard, holm
from cfmodules.hybrid import module_channels
from cfmodules.modules.preprocess import smooth, threshold

__all__ = ["Scorecard", "scorecard", "null_groups", "reference_masks", "holm",
           "STATISTICS", "TESTED"]

_DEFAULT_ROWS = 128
"""Hybrids per call at most (a batch of DCGAN main.8 hybrids then stays ~32 MiB at the cut)."""


# ---------------------------------------------------------------------- groups
def _null_groups(channels: Mapping[str, torch.Tensor], widths: Mapping[str, int],
                 n_null: int, rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
    """Random groups with the module's number of channels in each of its layers."""
    out = []
    for _ in range(n_null):
        out.append({la: torch.as_tensor(np.sort(rng.choice(widths[la], len(idx),
                                                            replace=False)), dtype=torch.long)
                    for la, idx in channels.items()})
    return out


def _draw_null(adapter: GeneratorAdapter, channels: Mapping[str, Mapping[str, torch.Tensor]],
               n_null: int, seed: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each module's random groups; modules of the same size per layer share one set."""
    rng = np.random.default_rng([seed, 24, 1])
    drawn: dict[tuple, list[dict[str, torch.Tensor]]] = {}
    out = {}
    for n, ch in channels.items():
        sig = _signature(ch)
        if sig not in drawn:
            drawn[sig] = _null_groups(ch, {la: adapter.layer_channels(la) for la in ch},
                                      n_null, rng)
        out[n] = drawn[sig]
    return out


def _signature(channels: Mapping[str, torch.Tensor]) -> tuple[tuple[str, int], ...]:
    """What a random group must match: the number of channels in each layer."""
    return tuple(sorted((la, len(idx)) for la, idx in channels.items()))


def null_groups(adapter: GeneratorAdapter, modules: Any, n_null: int = 100, seed: int = 0
                ) -> dict[str, list[dict[str, list[int]]]]:
    """The random channel groups :func:`scorecard` compares each module with.

    Same ``modules``, ``n_null`` and ``seed`` as the scorecard (whose default seed is the
    analysis seed for a result), the same groups: group ``i`` of module ``m`` is row ``i``
    of ``Scorecard.null[statistic][m]``.
    """
    named = checks.modules(modules, allow_empty=False, allow_single=True)
    channels = {n: module_channels(adapter, m, f"module '{n}'", allow_empty=False)
                for n, m in named.items()}
    drawn = _draw_null(adapter, channels, checks.integer(n_null, "n_null", low=1),
                       checks.seed(seed))
    return {n: [{la: idx.tolist() for la, idx in g.items()} for g in gs]
            for n, gs in drawn.items()}


def _probabilities(classifier: Callable[[torch.Tensor], Any], images: torch.Tensor,
                   outputs: str) -> torch.Tensor:
    from cfmodules.evaluation.robustness import _probabilities as probs

    return torch.from_numpy(probs(classifier, images, outputs, "classifier"))


# ---------------------------------------------------------------------- localisation
def _binary(smoothed: np.ndarray, q: float) -> np.ndarray:
    """(G, H, W) -> (G, HW) bool: the clustering's threshold of each map at percentile q."""
    g = len(smoothed)
    out = np.zeros((g, smoothed[0].size), dtype=bool)
    live = smoothed.reshape(g, -1).max(1) > 0
    if live.any():
        out[live] = threshold(smoothed[live], q).reshape(int(live.sum()), -1) > 0
    return out


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _region_stats(maps: np.ndarray, regions: np.ndarray, top: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of ``top`` with ``regions``, mass share and specificity; all (G, HW) inputs."""
    inter = (top & regions).sum(1)
    union = (top | regions).sum(1)
    iou = _ratio(inter, union)
    total = maps.sum(1)
    inside = (maps * regions).sum(1)
    share = _ratio(inside, total)
    n_in = regions.sum(1)
    n_out = regions.shape[1] - n_in
    m_in, m_out = _ratio(inside, n_in), _ratio(total - inside, n_out)
    spec = _ratio(m_in - m_out, m_in + m_out)
    return iou, share, spec


def _localisation(maps: np.ndarray, masks: np.ndarray | None, window: int | tuple[int, int],
                  percentile: float, iou_area: str, fixed: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """Localisation statistics of mean change maps ``(G, H, W)``.

    ``fixed``: the region index of each map (else each map gets its region of largest
    specificity).
    """
    g = len(maps)
    flat = maps.reshape(g, -1)
    live = flat.max(1) > 0
    smoothed = np.zeros_like(maps)
    if live.any():
        smoothed[live] = smooth(maps[live], window)
    change = _binary(smoothed, percentile)
    out = {"change": change.reshape(maps.shape),
           "concentration": _ratio((flat * change).sum(1), flat.sum(1))}
    if masks is None:
        return out
    regions = masks.reshape(len(masks), -1)
    if fixed is None:  # the region where the change per pixel stands out most
        specs = np.stack([_region_stats(flat, np.broadcast_to(regions[r], flat.shape),
                                        change)[2] for r in range(len(masks))], axis=1)
        fixed = specs.argmax(1)  # (G,); ties: the first region
    fixed = np.asarray(fixed, dtype=np.int64)
    top = np.zeros_like(change)
    for r in np.unique(fixed):
        rows = fixed == r
        if iou_area == "region":  # as many top pixels of the map as the region has
            q = 100.0 * (1.0 - regions[r].sum() / regions.shape[1])
            top[rows] = _binary(maps[rows], q)
        else:
            top[rows] = change[rows]
    iou, share, spec = _region_stats(flat, regions[fixed], top)
    out.update(region=np.asarray(fixed, dtype=np.int64), iou=iou, mass_share=share,
               specificity=spec)
    return out


def _bc_interval(boot: np.ndarray, observed: float, confidence: float) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval (Efron 1981).

    The percentiles are shifted by ``z0 = Phi^-1(share of resamples below the estimate)``
    (ties count half), which corrects for a statistic whose resampled values sit on one
    side of it (e.g. the concentration of a noisier, resampled mean map).
    """
    from scipy.stats import norm

    boot = np.asarray(boot, dtype=np.float64)
    if not np.isfinite(observed) or np.all(boot == observed):
        return float(observed), float(observed)
    n = len(boot)
    if np.all(boot > observed) or np.all(boot < observed):
        # the estimate lies outside every resample: resampling biases this statistic so
        # much that no percentile interval can be trusted; say so rather than guess
        return float("nan"), float("nan")
    below = (np.sum(boot < observed) + 0.5 * np.sum(boot == observed)) / n
    z0 = norm.ppf(np.clip(below, 0.5 / n, 1 - 0.5 / n))
    z = norm.ppf(0.5 + confidence / 2)
    lo, hi = norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)
    return tuple(float(x) for x in np.percentile(boot, [100 * lo, 100 * hi]))  # type: ignore


# ---------------------------------------------------------------------- main
def _source(source: Any, modules: Any, adapter: Any) -> tuple[GeneratorAdapter, dict, dict]:
    """(adapter, named modules, defaults taken from an analysis result)."""
    defaults: dict[str, Any] = {}
    if isinstance(source, GeneratorAdapter):
        if adapter is not None and adapter is not source:
            raise ConfigError("Give the adapter once: as the first argument or as adapter=.")
        adapter = source
        if modules is None:
            raise ModuleError("Give the modules to score: a dict name -> {layer: channels} "
                              "or a list of such modules (or pass an AnalysisResult).")
    elif hasattr(source, "modules") and hasattr(source, "settings") and hasattr(
            source, "module_names"):
        if not isinstance(adapter, GeneratorAdapter):
            raise ConfigError("Scoring an AnalysisResult needs its generator: pass "
                              "adapter=GeneratorAdapter (e.g. cfmodules.zoo.load(result."
                              "model_spec)).")
        if modules is None:
            modules = dict(zip(source.module_names, source.modules))
        s = source.settings
        defaults = {"seed": s.seed, "start": s.n_pairs + s.n_hybrids, "window": s.window,
                    "percentile": s.percentile}
    else:
        raise ConfigError(f"scorecard() takes a GeneratorAdapter or an AnalysisResult, got "
                          f"{type(source).__name__}.")
    if isinstance(modules, Mapping) and not modules:
        raise ModuleError("No modules given (K=0); pass at least one {layer: channels} module.")
    if isinstance(modules, Sequence) and not isinstance(modules, (str, bytes)) and not modules:
        raise ModuleError("No modules given (K=0); pass at least one {layer: channels} module.")
    named = checks.modules(modules, allow_empty=False, allow_single=True)
    return adapter, named, defaults


def scorecard(
    source: Any,
    modules: Any = None,
    *,
    adapter: GeneratorAdapter | None = None,
    masks: Any = None,
    mask_names: Sequence[str] | None = None,
    classifier: Callable[[torch.Tensor], Any] | None = None,
    classifier_outputs: str = "logits",
    n_pairs: int = 32,
    n_null: int = 100,
    n_boot: int = 1000,
    seed: int | None = None,
    start: int | None = None,
    window: int | tuple[int, int] | None = None,
    percentile: float | None = None,
    iou_area: str = "region",
    confidence: float = 0.95,
    alpha: float = 0.05,
    pairs_per_block: int = 16,
    algorithm: str = "auto",
) -> Scorecard:
    """Score each module: localisation and causal effect against random channel groups.

    Parameters
    ----------
    source : GeneratorAdapter or AnalysisResult
        With a result, its modules (named by ``module_names``), clustering window and
        percentile, and fresh pairs of its seed are the defaults; its generator is
        ``adapter``.
    modules : dict name -> module, list of modules, or one module
        A module maps layer -> channel indices (as for :func:`cfmodules.hybridize`);
        every module needs at least one channel.
    adapter : GeneratorAdapter
        The generator, when ``source`` is a result.
    masks : array (R, H, W) of bool, dict name -> (H, W) mask, "faces", "auto", optional
        Reference regions at the images' resolution. ``"faces"``: the face parts
        (eyes, brows, nose, mouth, face, hair and background) found by a landmark model
        on the Original 1 images of the pairs (:func:`cfmodules.evaluation.face_parts.
        face_part_masks`; needs ``libdlib-data`` and ``dlib-bin``); ``"auto"``: those
        for a generator whose name says "face" when they are installed. Default: the planted
        regions of a synthetic generator (:func:`reference_masks`), else none (no IoU,
        mass share or specificity; the reference-free ``concentration`` is always
        computed).
    mask_names : list of R str, optional
    classifier : callable, optional
        ``classifier(images (N, C, H, W) in [0, 1]) -> (N, classes)`` logits (or
        probabilities with ``classifier_outputs="probabilities"``); nn.Modules run in
        eval mode under no_grad. E.g. :func:`cfmodules.evaluation.fer.load_fer_classifier`.
    classifier_outputs : "logits" or "probabilities"
    n_pairs : int, default 32
        Pairs (Original 1, Original 2); every module and null group uses the same ones.
    n_null : int, default 100
        Random groups per module (>= 19; the smallest p-value is ``1 / (1 + n_null)``).
    n_boot : int, default 1000
        Bootstrap resamples of the pairs.
    seed : int, optional
        Latent stream of the pairs (default: the analysis seed, else 0); also seeds the
        random groups and the bootstrap, so a scorecard is reproducible.
    start : int, optional
        First pair (default: the first pair the analysis did not use, else 0).
    window, percentile : optional
        The clustering's smoothing window and threshold percentile (default: the
        analysis's, else 3 and 75): they define each map's change region.
    iou_area : "region" or "clustering", default "region"
        How many top pixels IoU compares with a region: as many as the region has, or
        the change region.
    confidence : float, default 0.95
        Level of the bootstrap intervals.
    alpha : float, default 0.05
        Level at which the text marks a Holm-adjusted p-value.
    pairs_per_block : int, default 16
        Pairs whose prefix runs together (the result does not depend on it but by float
        rounding).
    algorithm : {"auto", "split", "hook"}
        How hybrids are computed (:func:`cfmodules.influence.influence_maps`).

    Returns
    -------
    Scorecard

    Raises
    ------
    ModuleError
        No modules, or a module without channels or with a channel out of range.
    ShapeError
        Masks that are not (R, H, W) booleans at the images' resolution.
    ConfigError
        Bad numbers, a region that is empty or the whole image.
    """
    import time

    t0 = time.perf_counter()
    adapter, named, defaults = _source(source, modules, adapter)
    channels = {name: module_channels(adapter, m, f"module '{name}'", allow_empty=False)
                for name, m in named.items()}
    n_pairs = checks.positive_int(n_pairs, "n_pairs")
    n_null = checks.integer(n_null, "n_null", low=19)
    n_boot = checks.integer(n_boot, "n_boot", low=1)
    pairs_per_block = checks.positive_int(pairs_per_block, "pairs_per_block")
    seed = checks.seed(defaults.get("seed", 0) if seed is None else seed)
    start = checks.integer(defaults.get("start", 0) if start is None else start, "start", low=0)
    window = checks.window(defaults.get("window", checks.DEFAULT_WINDOW)
                           if window is None else window)
    percentile = checks.percentile(defaults.get("percentile", checks.DEFAULT_PERCENTILE)
                                   if percentile is None else percentile)
    iou_area = checks.one_of(iou_area, "iou_area", ("region", "clustering"))
    confidence = checks.real(confidence, "confidence", low=0, high=1, low_open=True,
                             high_open=True)
    alpha = checks.real(alpha, "alpha", low=0, high=1, low_open=True, high_open=True)
    if classifier_outputs not in ("logits", "probabilities"):
        raise ConfigError(f"classifier_outputs must be 'logits' or 'probabilities', got "
                          f"{classifier_outputs!r}.")
    if classifier is not None and not callable(classifier):
        raise ConfigError("classifier must be a callable: images (N, C, H, W) in [0, 1] -> "
                          "(N, classes) scores.")
    if isinstance(masks, str) and masks == "auto":
        masks = auto_masks(adapter)
    faces = isinstance(masks, str)
    if faces and masks != "faces":
        raise ConfigError(f"masks must be an array (R, H, W), a dict name -> mask, 'faces', "
                          f"'auto' or None; got {masks!r}.")
    if faces:
        ref = None  # found on the pairs' Original 1 below
    elif masks is None:
        found = reference_masks(adapter)
        ref = (found[0], found[1] if mask_names is None else list(mask_names)) if found else None
        if ref is not None:
            ref = check_masks(*ref)
    else:
        ref = check_masks(masks, mask_names)

    names = list(named)
    k_mod = len(names)
    groups: list[dict[str, torch.Tensor]] = [channels[n] for n in names]
    first_null: dict[tuple, int] = {}  # one block of n_null rows per module size
    null_rows = []
    for n, drawn in _draw_null(adapter, channels, n_null, seed).items():
        sig = _signature(channels[n])
        if sig not in first_null:
            first_null[sig] = len(groups)
            groups += drawn
        null_rows.append(np.arange(first_null[sig], first_null[sig] + n_null))
    n_groups = len(groups)

    from cfmodules.samplers import is_diffusion

    if is_diffusion(adapter):  # plan_swaps would hook a layer that runs at every step
        raise ConfigError("The scorecard does not handle diffusion models (window hybrids, "
                          "cfmodules.samplers) yet; score a one-forward generator.")
    planned = plan_swaps(adapter, groups, algorithm, what="scorecard")
    z1_all, z2_all = L.pair_latents(adapter, n_pairs, seed, start)
    if faces:  # the parts of the faces whose hybrids are measured
        from cfmodules.evaluation.face_parts import face_part_masks

        with torch.inference_mode():
            found_parts = face_part_masks(adapter.to_unit(adapter.generate(z1_all)))
        parts, part_names = found_parts[0], list(found_parts[1])
        # the inner features together too (a module may hold all of them)
        parts = np.concatenate([parts, parts[:4].any(0, keepdims=True)])
        part_names.append("eyes, brows, nose, mouth")
        kept = parts.reshape(len(parts), -1).any(1)  # parts that won pixels
        ref = check_masks(parts[kept], [n for n, k in zip(part_names, kept) if k])
    e_pix = np.zeros((n_groups, n_pairs))
    e_clf = np.zeros((n_groups, n_pairs)) if classifier is not None else None
    map_sum: np.ndarray | None = None
    module_maps: np.ndarray | None = None  # (K, P, H, W): the modules' maps of each pair
    largest = max([int(np.prod(i.shape)) for i in adapter.layers_cached() if i.shape] + [1])
    rows_per_call = max(1, min(_DEFAULT_ROWS, (32 * 2**20) // (4 * largest)))
    clf_ctx = EvalNoGrad(classifier) if classifier is not None else None
    with torch.inference_mode():
        if clf_ctx is not None:
            clf_ctx.__enter__()
        try:
            for p0 in range(0, n_pairs, pairs_per_block):
                n_p = min(pairs_per_block, n_pairs - p0)
                z1, z2 = L.select(z1_all, slice(p0, p0 + n_p)), L.select(z2_all, slice(p0, p0 + n_p))
                for swaps, rows in planned:
                    y = swaps.begin_block(z1, z2)
                    if y.dim() != 4:
                        raise GeneratorOutputError(
                            f"The scorecard needs image outputs (N, C, H, W); the generator "
                            f"returned shape {tuple(y.shape)}.")
                    hw = tuple(y.shape[-2:])
                    if ref is not None and ref[0].shape[1:] != hw:
                        raise ShapeError(f"The masks are {ref[0].shape[1]}x{ref[0].shape[2]} "
                                         f"but the images are {hw[0]}x{hw[1]}; give masks at "
                                         "the images' resolution.")
                    if map_sum is None:
                        map_sum = np.zeros((n_groups, *hw))
                        module_maps = np.zeros((k_mod, n_pairs, *hw), dtype=np.float32)
                    p_o1 = (_probabilities(classifier, adapter.to_unit(y), classifier_outputs)
                            if classifier is not None else None)
                    per = max(1, rows_per_call // n_p)
                    for u0 in range(0, len(rows), per):
                        us = slice(u0, min(u0 + per, len(rows)))
                        n_u = us.stop - us.start
                        h = swaps.hybrids(us, slice(0, n_p))
                        if classifier is not None:
                            ph = _probabilities(classifier, adapter.to_unit(h),
                                                classifier_outputs).view(n_u, n_p, -1)
                            tv = 0.5 * (ph - p_o1[None]).abs().sum(-1)
                            e_clf[rows[us], p0:p0 + n_p] = tv.double().numpy()
                        d = (h.view(n_u, n_p, *h.shape[1:]) - y[None]).abs().mean(2)
                        d64 = d.double().cpu().numpy()
                        per_pair = d64.mean((2, 3))  # NaN or inf anywhere shows here
                        if not np.isfinite(per_pair).all():
                            raise GeneratorOutputError(
                                "A hybrid contains NaN or inf (the generator's output after the "
                                "intervention is not finite); the scorecard would be meaningless.")
                        idx = rows[us]
                        e_pix[idx, p0:p0 + n_p] = per_pair
                        map_sum[idx] += d64.sum(1)
                        for j, g in enumerate(idx):
                            if g < k_mod:
                                module_maps[g, p0:p0 + n_p] = d64[j]
        finally:
            if clf_ctx is not None:
                clf_ctx.__exit__(None, None, None)
    assert map_sum is not None and module_maps is not None
    mean_maps = map_sum / n_pairs
    for k, n in enumerate(names):
        if not mean_maps[k].any():
            raise ModuleError(f"Module '{n}' does not change the images (its hybrids equal "
                              "Original 1 on every pair): there is nothing to score. Check "
                              "its layer and channels.")

    masks_arr = ref[0] if ref is not None else None
    loc = _localisation(mean_maps, masks_arr, window, percentile, iou_area)
    per_group: dict[str, np.ndarray] = {"pixel_effect": e_pix.mean(1)}
    if e_clf is not None:
        per_group["classifier_effect"] = e_clf.mean(1)
    for s in ("iou", "mass_share", "specificity", "concentration"):
        if s in loc:
            per_group[s] = loc[s]
    observed = {s: v[:k_mod].astype(np.float64) for s, v in per_group.items()}
    null = {s: np.stack([per_group[s][rows] for rows in null_rows])
            for s in TESTED if s in per_group}
    for s in ("pixel_effect", "classifier_effect"):
        if s in observed:
            observed[f"{s}_ratio"] = _ratio(observed[s], null[s].mean(1))
    region = loc["region"][:k_mod] if "region" in loc else np.full(k_mod, -1, dtype=np.int64)

    # bootstrap over pairs (the region of each module stays the one chosen on all pairs)
    boot_rng = np.random.default_rng([seed, 24, 2])
    draws = boot_rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    weights = np.stack([np.bincount(r, minlength=n_pairs) for r in draws]).astype(np.float64)
    weights /= n_pairs
    ci_low: dict[str, np.ndarray] = {s: np.zeros(k_mod) for s in observed}
    ci_high: dict[str, np.ndarray] = {s: np.zeros(k_mod) for s in observed}
    eff = {"pixel_effect": e_pix} | ({"classifier_effect": e_clf} if e_clf is not None else {})
    for k in range(k_mod):
        boot: dict[str, np.ndarray] = {}
        for s, e in eff.items():
            boot[s] = weights @ e[k]
            boot[f"{s}_ratio"] = _ratio(boot[s], (weights @ e[null_rows[k]].T).mean(1))
        bmaps = (weights @ module_maps[k].reshape(n_pairs, -1)).reshape(n_boot, *mean_maps.shape[1:])
        bl = _localisation(bmaps, masks_arr, window, percentile, iou_area,
                           fixed=np.full(n_boot, region[k]) if masks_arr is not None else None)
        for s in ("iou", "mass_share", "specificity", "concentration"):
            if s in bl:
                boot[s] = bl[s]
        for s, v in boot.items():
            ci_low[s][k], ci_high[s][k] = _bc_interval(v, observed[s][k], confidence)
    per_pair = {s: e[:k_mod].copy() for s, e in eff.items()}
    info = {"model": adapter.name, "seed": seed, "start": start, "n_pairs": n_pairs,
            "n_null": n_null, "null_groups": n_groups - k_mod, "n_boot": n_boot, "window": list(window), "percentile": percentile,
            "iou_area": iou_area, "confidence": confidence, "alpha": alpha,
            "classifier": None if classifier is None else getattr(
                classifier, "__name__", type(classifier).__name__),
            "classifier_outputs": classifier_outputs,
            "masks": "face parts (dlib 68 landmarks, majority over the pairs' Original 1)"
            if faces else ("given" if masks is not None else
                           ("planted regions" if ref is not None else None)),
            "seconds": time.perf_counter() - t0}
    return Scorecard(
        modules=names, module_channels={n: {la: [int(c) for c in idx] for la, idx in ch.items()}
                                        for n, ch in channels.items()},
        regions=ref[1] if ref is not None else [],
        masks=masks_arr if masks_arr is not None else np.zeros((0, *mean_maps.shape[1:]), bool),
        maps=mean_maps[:k_mod].astype(np.float32), change=loc["change"][:k_mod].astype(bool),
        region=np.asarray(region, dtype=np.int64), observed=observed, null=null,
        ci_low=ci_low, ci_high=ci_high, per_pair=per_pair, info=info)
