"""The self-contained HTML report of an analysis, and its figures as PNG files.

:func:`make_figures` turns an :class:`~cfmodules.analysis.AnalysisResult` into matplotlib
figures (see :mod:`cfmodules.plots`); :func:`render_html` lays PNG bytes out as one HTML
page with every image embedded as ``data:image/png;base64`` (it opens offline, can be
mailed, and needs no other file); :func:`write_report` does both and writes
``report.html`` and the PNGs to a folder.
"""

from __future__ import annotations

import base64
import html
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfmodules import plots
from cfmodules.files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from cfmodules.analysis import AnalysisResult

__all__ = ["make_figures", "figure_recipes", "draw_figures", "render_html", "write_report",
           "FIGURES", "render_window_html", "write_window_report"]

FIGURES = {
    "templates": "Modules at a glance: the template of each module, alone and over the mean "
                 "sample",
    "hybrids": "Hybrids: Original 1 with the channels of one module taken from Original 2",
    "influence_maps": "Influence maps of the channels, grouped by module (strongest first)",
    "stability": "Stability of the clustering against K (Fig. 9 of the paper)",
    "module_influence": "Influence of each module against its number of channels",
    "samples": "Samples of the model",
}
"""Figure name (PNG file stem) -> caption. Per-module hybrid grids are ``hybrids_module_k``;
an analysis whose layer was chosen by a scan (``--layer auto``) also has ``scan``, and a report
written with a scorecard ``scorecard``."""
SCORECARD_CAPTION = ("Scorecard: where each module's hybrids change the image (its mean "
                     "change map and change region, its reference region outlined) and each "
                     "statistic against random channel groups of the module's size (grey), "
                     "the module in red with its bootstrap CI shaded")
SCAN_CAPTION = ("Which layer, which K: modularity (label consistency x template similarity x "
                "locality) of every scanned layer and K, and the templates of each layer at "
                "its K")


def _float_images(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32) / 255.0


def figure_recipes(result: AnalysisResult) -> dict[str, tuple[Callable[..., Figure], tuple,
                                                               dict[str, Any]]]:
    """How to draw each figure of the report: name -> (plot function, args, kwargs).

    The arguments are plain arrays and dicts (picklable, light to send). Drawing them on
    the clustering's worker processes was measured and not kept: each worker first imports
    matplotlib, and on a busy 2-core machine the report took 5.6 s instead of 2.8 s.
    """
    names = result.module_names
    sizes = result.module_sizes
    labels = result.labels
    o1, o2 = _float_images(result.original1), _float_images(result.original2)
    hy = _float_images(result.hybrids)
    weight = result.weights[np.arange(len(labels)), labels]
    recipes: dict[str, tuple[Callable[..., Figure], tuple, dict[str, Any]]] = {
        "templates": (plots.plot_templates, (result.templates,), dict(
            background=result.mean_image, names=names, sizes=sizes)),
        "hybrids": (plots.plot_hybrid_grid, (o1, o2, hy), dict(
            module_names=names, templates=result.templates)),
    }
    for k in range(result.n_modules):
        recipes[f"hybrids_module_{k}"] = (plots.plot_hybrid_grid, (o1, o2, hy[k:k + 1]), dict(
            module_names=[names[k]], module_ids=[k], templates=result.templates[k:k + 1]))
    recipes["influence_maps"] = (plots.plot_influence_maps, (result.maps, labels), dict(
        names=result.unit_names, module_names=names, order=weight))
    if result.stability is not None:
        recipes["stability"] = (plots.plot_stability, (result.stability.to_dict(),),
                                dict(chosen_k=result.n_modules))
    recipes["module_influence"] = (plots.plot_module_influence,
                                   (sizes, result.module_influence), dict(names=names))
    recipes["samples"] = (plots.plot_images, (_float_images(result.samples),), {})
    if getattr(result, "scan", None) is not None:
        recipes["scan"] = (plots.plot_scan, (result.scan,), {})
    return recipes


def make_figures(result: AnalysisResult) -> dict[str, Figure]:
    """Every figure of the report, by name (see :data:`FIGURES`).

    Returns
    -------
    dict str -> matplotlib.figure.Figure
        ``templates``, ``hybrids``, ``hybrids_module_0`` .. ``hybrids_module_{K-1}``,
        ``influence_maps``, ``stability`` (when the sweep ran), ``module_influence``,
        ``samples``, and ``scan`` when a scan chose the layer.
    """
    return {name: fn(*args, **kwargs)
            for name, (fn, args, kwargs) in figure_recipes(result).items()}


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;
padding-bottom:.2em}h3{margin-bottom:.3em}
.lead{font-size:1.05em;color:#444}figure{margin:.6em 0 1.4em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555;margin-top:.3em}
table{border-collapse:collapse;margin:.5em 0 1em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f6f6f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sw{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:-1px;
margin-right:6px}code,pre{background:#f4f4f4;border-radius:3px;padding:1px 4px}
pre{padding:8px;overflow-x:auto}.note{color:#666;font-size:.9em}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(pngs: Mapping[str, bytes], name: str, caption: str) -> str:
    if name not in pngs:
        return ""
    return (f"<figure>{_img(pngs[name], caption)}<figcaption>{html.escape(caption)}"
            f"</figcaption></figure>")


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in pairs)


def _scorecard_html(card: Any, pngs: Mapping[str, bytes]) -> list[str]:
    """The report's scorecard section: a table of the statistics and the figure."""
    e = html.escape
    i = card.info
    p, pa = card.p_values(), card.p_adjusted()
    stats = [s for s in card.statistics if s in p or s.endswith("_ratio")]
    head = "".join(f"<th>{e(s.replace('_', ' '))}</th>" for s in stats)
    body = ""
    for k, m in enumerate(card.modules):
        cells = ""
        for s in stats:
            v, lo, hi = card.observed[s][k], card.ci_low[s][k], card.ci_high[s][k]
            ci = (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else " [n/a]")
            pv = (f"<br>p={p[s][k]:.3g}{' *' if pa[s][k] < i.get('alpha', 0.05) else ''}"
                  if s in p else "")
            cells += f"<td class='num'>{v:.3f}{ci}{pv}</td>"
        body += (f"<tr><td><span class='sw' style='background:{plots.module_color(k)}'></span>"
                 f"{e(m)}</td><td>{e(card.region_of(k) or '-')}</td>{cells}</tr>")
    out = ["<h2 id='scorecard'>Scorecard: modules against random channel groups</h2>",
           f"<p>Each module against {card.n_null} random groups of channels of its size at "
           f"its layer(s), on {i.get('n_pairs')} new pairs (seed {i.get('seed')}, from pair "
           f"{i.get('start')}). Values with {100 * i.get('confidence', 0.95):g}% bootstrap "
           "intervals over pairs; p: one-sided permutation p-value (the module scores "
           "higher than random groups); * Holm-adjusted over the modules of that statistic below "
           f"{i.get('alpha', 0.05)}. Reference regions: {e(str(i.get('masks') or 'none'))}."
           "</p>",
           f"<table><tr><th>module</th><th>region</th>{head}</tr>{body}</table>",
           _figure(pngs, "scorecard", SCORECARD_CAPTION),
           "<p class='note'>Definitions, the null and the multiple-comparison situation: "
           "docs/evaluation.md (Scorecard).</p>"]
    return out


def _module_table(result: AnalysisResult, per_layer: bool = True) -> str:
    """The table of modules: colour and name, channels, (channels per layer,) influence."""
    e = html.escape
    infl = result.module_influence
    rows = []
    for j, (name, size) in enumerate(zip(result.module_names, result.module_sizes)):
        layers = ", ".join(f"{la}: {len(ch)}" for la, ch in result.modules[j].items())
        rows.append(
            f"<tr><td><span class='sw' style='background:{plots.module_color(j)}'></span>"
            f"{e(name)}</td><td class='num'>{int(size)}</td>"
            + (f"<td>{e(layers)}</td>" if per_layer else "")
            + f"<td class='num'>{infl[j]:.4f}</td></tr>")
    return ("<table><tr><th>module</th><th>channels</th>"
            + ("<th>per layer</th>" if per_layer else "")
            + "<th>influence</th></tr>" + "".join(rows) + "</table>")


def render_html(result: AnalysisResult, pngs: Mapping[str, bytes], *,
                command: str | None = None, files: Mapping[str, str] | None = None,
                scorecard: Any = None) -> str:
    """The report as one HTML string, every image embedded.

    Parameters
    ----------
    result : AnalysisResult
    pngs : dict name -> PNG bytes
        The figures (names of :data:`FIGURES` and ``hybrids_module_k``); missing ones are
        left out.
    command : str, optional
        The command line that made the analysis, shown so it can be rerun.
    files : dict name -> description, optional
        The files written next to the report.
    scorecard : Scorecard, optional
        The modules' scorecard (:func:`cfmodules.evaluation.scorecard`): adds its section.

    Returns
    -------
    str
    """
    s = result.settings
    e = html.escape
    k = result.n_modules
    n_units = len(result.labels)
    title = f"cfmodules report: {result.model}, layer{'s' if len(result.layers) > 1 else ''} " \
            f"{' + '.join(result.layers)}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    out.append(
        f"<p class='lead'>The {n_units} channels of {e(' and '.join(result.layers))} were "
        f"each swapped between {s.n_pairs} pairs of samples (Original 1 takes the channel's "
        f"value from Original 2); the mean change of the image is the channel's "
        f"<em>influence map</em>. Clustering the maps ({e(s.method.upper() if s.method == 'nmf' else 'k-means')}"
        f", K={k}) groups the channels into <em>modules</em>; swapping a whole module gives "
        f"a <em>hybrid</em>. The name of each module says where its template lies in the "
        f"image.</p>")
    if result.sampler:
        out.append(f"<p class='lead'>{_sampler_sentence(result)}</p>")
    out.append(_module_table(result))
    sk = result.suggested_k()
    if sk is not None:
        verdict = ("the K used here" if sk == k else
                   f"K={k} was used; rerun with <code>--k {sk}</code> to compare")
        out.append(f"<p>The stability sweep suggests K={sk} ({verdict}); see "
                   f"<a href='#stability'>Choosing K</a>.</p>")

    scan = getattr(result, "scan", None)
    if scan is not None:
        out.append(f"<p>The layer and K were chosen by a scan of {len(scan.layers)} layers; "
                   f"see <a href='#scan'>Which layer, which K</a>.</p>")

    out.append("<h2>Modules at a glance</h2>")
    out.append(_figure(pngs, "templates", FIGURES["templates"]))
    out.append(_figure(pngs, "hybrids", FIGURES["hybrids"] + ". Each column is one pair; "
                       "the hybrids of new pairs, not used to compute the maps."))

    out.append("<h2>Hybrids, one module at a time</h2>")
    for j in range(k):
        out.append(f"<h3 style='color:{plots.module_color(j)}'>{e(result.module_names[j])}"
                   f" ({int(result.module_sizes[j])} channels)</h3>")
        out.append(_figure(pngs, f"hybrids_module_{j}",
                           "Original 1, Original 2, and Original 1 with this module's "
                           "channels from Original 2"))

    out.append("<h2>Influence maps</h2>")
    out.append(_figure(pngs, "influence_maps", FIGURES["influence_maps"] + "; each map is "
                       "scaled to its own maximum, captions give layer[channel]."))

    out.append("<h2 id='stability'>Choosing K</h2>")
    if result.stability is not None:
        st = result.stability
        out.append(_figure(pngs, "stability", FIGURES["stability"] + f": {st.consistency.shape[-1]} "
                           "random splits of the channels in three; two clusterings on two "
                           "thirds each, compared on the shared third. Error bars: standard "
                           "deviation over splits. Dashed line: the K used."))
        mc, sc = st.mean("consistency"), st.std("consistency")
        mo, so = st.mean("cosine"), st.std("cosine")
        head = "".join(f"<th>{e(m)} consistency</th><th>{e(m)} cosine</th>" for m in st.methods)
        body = ""
        for jj, kk in enumerate(st.ks):
            cells = "".join(f"<td class='num'>{mc[i, jj]:.3f} &plusmn; {sc[i, jj]:.3f}</td>"
                            f"<td class='num'>{mo[i, jj]:.3f} &plusmn; {so[i, jj]:.3f}</td>"
                            for i in range(len(st.methods)))
            body += f"<tr><td class='num'>{int(kk)}</td>{cells}</tr>"
        out.append(f"<table><tr><th>K</th>{head}</tr>{body}</table>")
        out.append("<p class='note'>A good K keeps both high; the suggestion is the largest K "
                   "whose consistency &times; cosine is within 0.02 of the best.</p>")
    else:
        out.append("<p class='note'>The stability sweep was not run.</p>")

    if scan is not None:
        out.append("<h2 id='scan'>Which layer, which K</h2>")
        out.append(_figure(pngs, "scan", SCAN_CAPTION + ". Boxed: each layer's K; black: "
                           "the suggestion, analysed here."))
        out.append(f"<pre>{e(scan.to_text())}</pre>")
        out.append("<p class='note'>The scan is a survey (fewer pairs, repetitions and, in "
                   "wide layers, a random subset of the channels); the sections above are "
                   "the full analysis of its suggestion. See docs/choosing.md.</p>")

    if scorecard is not None:
        out.extend(_scorecard_html(scorecard, pngs))

    out.append("<h2>Module influence</h2>")
    out.append(_figure(pngs, "module_influence", FIGURES["module_influence"] + " (all its "
                       "channels swapped together; dashed: least-squares line, as in Fig. 8 "
                       "right of the paper)."))

    out.append("<h2>Samples</h2>")
    out.append(_figure(pngs, "samples", FIGURES["samples"]))

    out.append("<h2>Settings</h2>")
    settings = [(key, str(v)) for key, v in s.to_dict().items()]
    settings += [(f"sampler {key}", str(v)) for key, v in result.sampler.items()
                 if key != "config"]
    out.append("<table>" + _rows([("model", result.model), ("model spec", result.model_spec),
                                  ("layers", ", ".join(result.layers))] + settings) + "</table>")
    if command:
        out.append(f"<p>Command:</p><pre>{e(command)}</pre>")
    out.append("<h3>Timings</h3>")
    steps = [(key, f"{v:.1f} s") for key, v in result.timings.items() if key != "total"]
    out.append("<table>" + _rows(steps + [("total (wall)", f"{result.total_seconds:.1f} s")])
               + "</table>")
    if sum(v for k, v in result.timings.items() if k != "total") > result.total_seconds + 0.05:
        out.append("<p>The stability sweep ran on worker processes beside the clustering, the "
                   "modules' influence maps and the hybrids (its time runs from its start to "
                   "its end), so the steps add up to more than the total.</p>")
    out.append("<h3>Versions</h3>")
    out.append("<table>" + _rows(_versions(result)) + "</table>")
    if files:
        out.append("<h3>Files</h3><table>" + _rows(list(files.items())) + "</table>")
    out.append("<p class='note'>Method: Besserve, Mehrjou, Sun, Sch&ouml;lkopf, "
               "<em>Counterfactuals uncover the modular structure of deep generative "
               "models</em>, ICLR 2020.</p></body></html>")
    return "\n".join(x for x in out if x)


def _sampler_sentence(result: AnalysisResult) -> str:
    """What a diffusion analysis swapped, in one sentence (HTML-escaped)."""
    sp = result.sampler
    steps, n = list(sp["window"]), int(sp["n_steps"])
    ts = sp.get("timesteps")
    when = (f" (timesteps {ts[steps[0]]} to {ts[steps[-1]]})" if ts else "")
    return html.escape(
        f"A diffusion model: each hybrid is Original 1's sampling chain ({sp.get('scheduler', 'own step')}, "
        f"{n} steps) in which, at each of the steps {result.window_name} = {steps}{when}, the "
        f"swapped channels take the values they have at that step of Original 2's own "
        f"chain; the other steps run as usual. Step 0 is the first, noisiest step.")


def render_window_html(results: Mapping[str, AnalysisResult], pngs: Mapping[str, bytes], *,
                       links: Mapping[str, str] | None = None, command: str | None = None
                       ) -> str:
    """The side-by-side page of a diffusion model's analyses, one column per window.

    Parameters
    ----------
    results : dict window name -> AnalysisResult
        E.g. :func:`cfmodules.analysis.analyze_windows`.
    pngs : dict ``"<window>/templates"`` and ``"<window>/hybrids"`` -> PNG bytes
    links : dict window name -> relative path of that window's full report, optional
    command : str, optional
    """
    e = html.escape
    first = next(iter(results.values()))
    title = (f"cfmodules report: {first.model}, layer {' + '.join(first.layers)}, modules per "
             "window of sampling steps")
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}"
           f"</title><style>{_CSS}body{{max-width:1500px}}.cols{{display:grid;"
           f"grid-template-columns:repeat({len(results)},1fr);gap:18px}}</style></head><body>",
           f"<h1>{e(title)}</h1>",
           "<p class='lead'>The same layer, the same pairs and settings; only the steps at "
           "which the channels are swapped differ. At every step of a window, the hybrid's "
           "channels take the values they have at that step of Original 2's own chain; "
           "before the window the hybrid is Original 1, after it the chain runs on from "
           "the hybrid's own state. Modules found early in the chain shape the layout; "
           "late ones, detail. See docs/diffusion.md.</p>", "<div class='cols'>"]
    for name, res in results.items():
        sp = res.sampler
        steps = list(sp.get("window", []))
        ts = sp.get("timesteps")
        col = [f"<div><h2>{e(name)}</h2><p class='note'>steps {e(str(steps))}"
               + (f", timesteps {ts[steps[0]]}..{ts[steps[-1]]}" if ts and steps else "")
               + "</p>"]
        col.append(_module_table(res, per_layer=False))
        col.append(_figure(pngs, f"{name}/templates", "Templates of the modules"))
        col.append(_figure(pngs, f"{name}/hybrids", "Original 1, Original 2, and the "
                           "hybrid of each module (new pairs)"))
        if links and name in links:
            col.append(f"<p><a href='{e(links[name])}'>Full report of this window</a></p>")
        out.append("\n".join(col) + "</div>")
    out.append("</div>")
    out.append("<h2>Settings</h2><table>" + _rows(
        [("model", first.model), ("layers", ", ".join(first.layers))]
        + [(key, str(v)) for key, v in first.settings.to_dict().items()]
        + [(f"sampler {key}", str(v)) for key, v in first.sampler.items()
           if key not in ("config", "window")]) + "</table>")
    if command:
        out.append(f"<p>Command:</p><pre>{e(command)}</pre>")
    out.append("</body></html>")
    return "\n".join(x for x in out if x)


def write_window_report(results: Mapping[str, AnalysisResult], out_dir: str | os.PathLike, *,
                        links: Mapping[str, str] | None = None, command: str | None = None,
                        dpi: int = 100) -> Path:
    """Write ``report.html`` (windows side by side) and ``window_<name>_<figure>.png``.

    Returns
    -------
    Path
        The report's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, bytes] = {}
    for name, res in results.items():
        recipes = figure_recipes(res)
        for fig in ("templates", "hybrids"):
            fn, args, kwargs = recipes[fig]
            png = plots.figure_to_png(fn(*args, **kwargs), dpi)
            pngs[f"{name}/{fig}"] = png
            atomic_write(out / f"window_{name.replace(' ', '_')}_{fig}.png", png)
    path = out / "report.html"
    atomic_write(path, render_window_html(results, pngs, links=links, command=command).encode())
    return path


def _versions(result: AnalysisResult) -> list[tuple[str, str]]:
    import sklearn
    import torch

    return [("cfmodules", result.version or "?"), ("created", result.created or "?"),
            ("python", platform.python_version()), ("torch", torch.__version__),
            ("numpy", np.__version__), ("scikit-learn", sklearn.__version__),
            ("platform", platform.platform(terse=True))]


def draw_figures(result: AnalysisResult, dpi: int = 100, skip: Iterable[str] = ()
                 ) -> dict[str, bytes]:
    """The report's figures (:func:`figure_recipes`) as PNG bytes, by name, but ``skip``.

    For drawing ahead: ``cfmodules analyze`` draws all but ``"stability"`` while the
    stability sweep runs, and hands them to :func:`write_report` (``drawn=``).
    """
    skip = set(skip)
    return {name: plots.figure_to_png(fn(*args, **kwargs), dpi)
            for name, (fn, args, kwargs) in figure_recipes(result).items() if name not in skip}


def write_report(result: AnalysisResult, out_dir: str | os.PathLike, *,
                 command: str | None = None, dpi: int = 100,
                 files: Mapping[str, str] | None = None, scorecard: Any = None,
                 drawn: Mapping[str, bytes] | None = None) -> Path:
    """Write ``report.html`` and every figure as ``<name>.png`` into ``out_dir``.

    Parameters
    ----------
    result : AnalysisResult
    out_dir : path
        Created if missing.
    command : str, optional
        The command line, shown in the report.
    dpi : int, default 100
    files : dict name -> description, optional
        Other files of the folder, listed in the report.
    scorecard : Scorecard, optional
        Adds the scorecard section and its figure (``scorecard.png``).
    drawn : dict name -> PNG bytes, optional
        Figures already drawn from this result at this ``dpi`` (:func:`draw_figures`);
        the others are drawn here.

    Returns
    -------
    Path
        The report's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listed = dict(files or {})
    recipes = figure_recipes(result)
    if scorecard is not None:
        from cfmodules.evaluation.plots import plot_scorecard

        recipes["scorecard"] = (plot_scorecard, (scorecard,), dict(background=result.mean_image))
    drawn = dict(drawn or {})
    pngs = {name: drawn[name] if name in drawn else plots.figure_to_png(fn(*args, **kwargs), dpi)
            for name, (fn, args, kwargs) in recipes.items()}
    for name, png in pngs.items():
        atomic_write(out / f"{name}.png", png)
        listed.setdefault(f"{name}.png", FIGURES.get(
            name, "the scorecard's figure" if name == "scorecard" else "hybrids of one module"))
    path = out / "report.html"
    atomic_write(path, render_html(result, pngs, command=command, files=listed,
                                   scorecard=scorecard).encode())
    return path

