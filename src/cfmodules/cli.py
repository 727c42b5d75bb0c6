"""The command line: ``cfmodules analyze | layers | explain | scan | hybrids | score | explore``.

(also ``python -m cfmodules``)

A thin layer over the library: it parses arguments, loads the model, calls
:func:`cfmodules.analysis.analyze` / :func:`cfmodules.report.write_report` /
:func:`cfmodules.analysis.make_hybrids`, and turns the library's errors into a one-line
message on stderr with exit code 2 (never a traceback).

Examples::

    cfmodules layers dcgan-faces
    cfmodules explain dcgan-faces --layer main.8     # which path, why, FLOPs of a hybrid
    cfmodules analyze --out out                      # the pretrained DCGAN faces, main.8
    cfmodules analyze --model my_gan.py:make_generator --latent-shape 128 --layer block3 --out out
    cfmodules hybrids --modules out/results.npz --pairs 12 --out out/new_hybrids.png
    cfmodules scan dcgan-faces --out scan            # which layer, which K
    cfmodules score out/results.npz --out out/scorecard.npz   # modules against a null
    cfmodules explore out/results.npz
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from cfmodules import checks, models
from cfmodules.errors import CfModulesError, ConfigError

__all__ = ["main", "read_modules", "build_parser"]

PROG = "cfmodules"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends with one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"Cannot write to the output folder '{path}': "
                          f"{e.strerror or e}. Choose another --out.") from None
    return out


def _parse_ks(text: str, flag: str = "--stability-ks") -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            ks = tuple(range(lo, hi + 1))
        else:
            ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"{flag} takes a range such as 2-6 or a list such as 2,3,5; "
                          f"got {text!r}.")
    return ks


# ---------------------------------------------------------------------- commands
def _cmd_layers(args: argparse.Namespace) -> int:
    from cfmodules.analysis import default_layer

    adapter = models.load_model(args.model, args.device, args.latent_shape)
    try:
        default = default_layer(adapter)
    except ConfigError:
        default = None
    print(f"{adapter!r}")
    print(f"{'layer':<24} {'kind':<18} {'output':<14} channels")
    for info in adapter.layers_cached():
        here = default is not None and info.name == default.split(":")[0]
        print(f"{info}" + (f"   <- default of `cfmodules analyze` ({default})" if here else ""))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from cfmodules.engine import explain

    adapter = models.load_model(args.model, args.device, args.latent_shape)
    print(explain(adapter, args.layer, algorithm=args.algorithm))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    ks = () if args.no_stability else _parse_ks(args.stability_ks)
    if ks and "RANK" not in os.environ:  # under torchrun only rank 0 clusters, much later
        from cfmodules.modules.fits import check_jobs, start_workers

        start_workers(check_jobs(args.jobs))  # they start while torch loads and maps run
    from cfmodules import native

    native.build_in_background("fused_tail")  # a first run's compile, beside torch's import
    from cfmodules.analysis import AnalysisSettings, analyze
    from cfmodules.report import write_report
    from cfmodules.results import folder_update

    methods = tuple(m.strip() for m in args.stability_methods.split(",") if m.strip())
    if not methods or any(m not in checks.CLUSTERING_METHODS for m in methods):
        raise ConfigError(f"--stability-methods takes nmf, kmeans or nmf,kmeans; got "
                          f"{args.stability_methods!r}.")
    settings = AnalysisSettings(
        n_pairs=64 if args.pairs is None else args.pairs, n_modules=args.k or 3, stability_ks=ks,
        stability_methods=methods,
        stability_repeats=args.stability_repeats, n_samples=args.samples,
        n_hybrids=args.hybrids, stability_pool=args.stability_pool, **_clustering(args))
    # --layer main.5,main.8 and --layer main.5 --layer main.8 are the same; auto: the scan
    layers = [la.strip() for arg in args.layer or [] for la in arg.split(",") if la.strip()]
    if len(layers) > 2:
        raise ConfigError(f"--layer names {len(layers)} layers; give one layer, or two for a "
                          "two-layer intervention.")
    auto = layers == ["auto"]
    if "auto" in layers and not auto:
        raise ConfigError("--layer auto lets the scan choose one layer; do not combine it "
                          "with other layers.")
    adapter = models.load_model(args.model, args.device, args.latent_shape)
    from cfmodules.hooks import resolve_layers
    from cfmodules.influence.distributed import init_from_env, world

    if layers and not auto:  # a typo fails before the output folder is made
        resolve_layers(adapter.generator, layers)
    windows = _windows(args.step_window, adapter)
    if windows is not None and args.scorecard:
        raise ConfigError("--scorecard does not handle diffusion models (window hybrids) yet; "
                          "leave it out, or score a one-forward generator.")
    if windows is not None and args.pairs is None:  # each hybrid is a chain of steps
        import dataclasses

        settings = dataclasses.replace(settings, n_pairs=DIFFUSION_PAIRS)

    if init_from_env(adapter.device):  # under torchrun: each rank takes a shard of channels
        local = os.environ.get("LOCAL_RANK")
        if adapter.device.type == "cuda" and local is not None:
            adapter.to(f"cuda:{local}")
    rank, _ = world()
    out = _writable_dir(args.out) if rank == 0 else Path(args.out)
    ckpt = out / "checkpoints"
    if args.fresh and ckpt.exists():
        for f in ckpt.glob("eim_*.npz"):
            f.unlink(missing_ok=True)  # under torchrun every rank clears
    t0 = time.perf_counter()
    if windows is not None and len(windows) > 1:
        return _analyze_windows(args, adapter, "auto" if auto else (layers or None), settings,
                                windows, out, ckpt, t0)
    drawn: dict[str, bytes] = {}

    def draw_meanwhile(partial: Any) -> None:  # the report's figures, while the sweep runs
        from cfmodules.report import draw_figures

        drawn.update(draw_figures(partial, skip=("stability",)))

    try:
        result = analyze(adapter, "auto" if auto else (layers or None), settings,
                         during_sweep=draw_meanwhile,
                         step_window=windows[0] if windows else None,
                         checkpoint_dir=ckpt, progress=not args.quiet,
                         model_spec=_portable_spec(args.model),
                         model_options={"latent_shape": args.latent_shape}
                         if args.latent_shape else None, assume_same=args.assume_same,
                         n_jobs=args.jobs, max_memory=args.max_memory,
                         **({"n_modules": args.k} if auto and args.k else {}))
    finally:
        # the ranks' collectives are over: leave the group now, so that a rank done with
        # its shard does not exit with the group's threads alive (abort, SIGABRT, and
        # torchrun then kills rank 0 in the middle of its report)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result is None:  # a rank other than 0 has done its share of the influence maps
        return 0
    card = None
    if args.scorecard:
        t_card = time.perf_counter()
        from cfmodules.evaluation.scorecard import scorecard

        card = scorecard(result, adapter=adapter, masks="auto")
        result.timings["scorecard"] = time.perf_counter() - t_card
    t_report = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [PROG, *args.argv])
    # the results and the report are replaced together: never K=2 results beside K=3 figures
    with folder_update(out) as stage:
        result.save(stage / "results.npz")
        extra = {}
        if card is not None:
            card.save(stage / "scorecard.npz")
            extra["scorecard.npz"] = ("the modules' scorecard (cfmodules.evaluation."
                                      "Scorecard.load)")
        write_report(result, stage, command=command, scorecard=card, drawn=drawn, files={**extra,
            "results.npz": "maps, labels, templates, stability table, hybrids (numpy.load or "
                           "cfmodules.analysis.AnalysisResult.load)",
            "manifest.json": "the files of this report and their SHA-256, written last",
            "checkpoints/": "influence computation state: rerunning resumes from it"})
    results_path = out / "results.npz"
    report_s = time.perf_counter() - t_report
    if not args.quiet:
        print(repr(result), file=sys.stderr)
        print(f"report {report_s:.1f} s; total {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    print(f"Report:  {out / 'report.html'}")
    print(f"Results: {results_path}")
    return 0


DIFFUSION_PAIRS = 16
"""``cfmodules analyze``'s default pairs for a diffusion model (64 for other generators)."""


def _windows(text: str | None, adapter: Any) -> list[Any] | None:
    """``--step-window``: None (one-forward model), or the windows of a diffusion model."""
    from cfmodules.samplers import WINDOWS, is_diffusion, window_steps

    if not is_diffusion(adapter):
        if text is not None:
            raise ConfigError(f"--step-window is for diffusion models; {adapter.name} runs in "
                              "one forward. Leave --step-window out.")
        return None
    if text is None:
        return list(WINDOWS[1:])
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        steps = [int(p) for p in parts]
        window_steps(steps, adapter.n_steps)  # a step outside the schedule fails now
        return [steps]
    bad = [p for p in parts if p not in WINDOWS]
    if not parts or bad:
        raise ConfigError(f"--step-window takes window names ({', '.join(WINDOWS)}), separated by "
                          f"commas, or step indices such as 0,1,2; got {text!r}.")
    return parts


def _analyze_windows(args: argparse.Namespace, adapter: Any, layers: Any, settings: Any,
                     windows: list[Any], out: Path, ckpt: Path, t0: float) -> int:
    """``cfmodules analyze`` of a diffusion model: one analysis per window, side by side."""
    from cfmodules.report import write_report, write_window_report
    from cfmodules.results import folder_update
    from cfmodules.window_analysis import analyze_windows

    results = analyze_windows(adapter, layers, settings, windows=windows, checkpoint_dir=ckpt,
                              progress=not args.quiet, model_spec=_portable_spec(args.model),
                              assume_same=args.assume_same, n_jobs=args.jobs,
                              max_memory=args.max_memory)
    command = " ".join(shlex.quote(a) for a in [PROG, *args.argv])
    links = {}
    for name, result in results.items():
        folder = f"window-{name.replace(' ', '_')}"
        with folder_update(out / folder) as stage:
            result.save(stage / "results.npz")
            write_report(result, stage, command=command, files={
                "results.npz": "this window's maps, labels, templates, hybrids "
                               "(cfmodules.analysis.AnalysisResult.load)",
                "manifest.json": "the files of this report and their SHA-256, written last"})
        links[name] = f"{folder}/report.html"
        if not args.quiet:
            print(repr(result), file=sys.stderr)
    path = write_window_report(results, out, links=links, command=command)
    if not args.quiet:
        print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"Report:  {path}")
    for name, link in links.items():
        print(f"Results ({name}): {out / link.replace('report.html', 'results.npz')}")
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from cfmodules.plots import plot_scan, save_figure
    from cfmodules.scan import ScanSettings, scan_layers

    settings = ScanSettings(ks=_parse_ks(args.ks, "--ks"), n_pairs=args.pairs,
                            max_units=args.max_units, target_stderr=args.target_stderr,
                            n_repeats=args.repeats, **_clustering(args))
    adapter = models.load_model(args.model, args.device, args.latent_shape)
    layers = None
    if args.layers:
        from cfmodules.hooks import resolve_layers

        layers = [la.strip() for la in args.layers.split(",") if la.strip()]
        resolve_layers(adapter.generator, layers)  # a typo fails before the folder is made
    out = _writable_dir(args.out)
    t0 = time.perf_counter()
    result = scan_layers(adapter, layers, settings, progress=not args.quiet)
    path = result.save(out / "scan.npz")
    fig = save_figure(plot_scan(result, title=f"scan of {adapter.name}"), out / "scan.png")
    print(result.to_text())
    if not args.quiet:
        print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"Figure:  {fig}")
    print(f"Results: {path}")
    return 0


def _clustering(args: argparse.Namespace) -> dict[str, Any]:
    """The ClusteringSettings fields given on the command line (the rest keep their defaults)."""
    from dataclasses import fields

    from cfmodules.modules.settings import ClusteringSettings

    return {f.name: getattr(args, f.name) for f in fields(ClusteringSettings)
            if getattr(args, f.name, None) is not None}


def _portable_spec(spec: str) -> str:
    factory = models.split_spec(spec)
    if factory is None:
        return spec
    return f"{Path(factory[0]).resolve()}:{factory[1]}"


def read_modules(path: str, model: str | None = None, device: str = "auto",
                 latent_shape: str | None = None) -> tuple[Any, Any, int]:
    """The modules of ``path`` (a ``results.npz`` or a module ``.json``) and their model.

    Returns
    -------
    (ModuleFile, GeneratorAdapter, int)
        The modules, the model they were found in (``model`` overrides the recorded spec),
        checked to have the same layers and channel counts, and the analysis seed (0 for
        a module file).
    """
    from cfmodules.module_file import ModuleFile

    if str(path).lower().endswith(".json"):
        modules, seed = ModuleFile.load(path), 0
    else:
        from cfmodules.analysis import AnalysisResult

        result = AnalysisResult.load(path)
        modules, seed = ModuleFile.from_result(result), result.settings.seed
    return modules, models.load_model_for(modules, path, model, device, latent_shape), seed


def _cmd_hybrids(args: argparse.Namespace) -> int:
    from cfmodules.analysis import make_hybrids
    from cfmodules.plots import plot_hybrid_grid, save_figure

    modules, adapter, analysis_seed = read_modules(args.modules, args.model, args.device,
                                                   args.latent_shape)
    seed = analysis_seed + 1 if args.seed is None else args.seed
    o1, o2, hy = make_hybrids(adapter, list(modules.modules.values()), args.pairs, seed,
                              args.start)
    fig = plot_hybrid_grid(o1 / 255.0, o2 / 255.0, hy / 255.0, module_names=modules.names)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = _writable_dir(str(out)) / "hybrids_new.png"
    else:
        _writable_dir(str(out.parent))
    save_figure(fig, out)
    print(f"Hybrids: {out}  ({args.pairs} pairs of seed {seed}, {len(modules.names)} modules)")
    return 0


def _score_masks(choice: str) -> Any:
    """The ``masks`` argument of scorecard() for ``--masks`` (auto, faces, none or a file)."""
    if choice in ("auto", "faces", "none"):
        return None if choice == "none" else choice
    import numpy as np

    try:
        with np.load(choice, allow_pickle=False) as f:
            names = [str(n) for n in f["names"]] if "names" in f.files else None
            return dict(zip(names, f["masks"])) if names else f["masks"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--masks takes auto, faces, none or an .npz file with an array "
                          f"'masks' (and optionally 'names'); cannot read {choice!r}: "
                          f"{models.first_line(e)}") from None


def _cmd_score(args: argparse.Namespace) -> int:
    from cfmodules.analysis import AnalysisResult
    from cfmodules.evaluation.fer import load_fer_classifier
    from cfmodules.evaluation.plots import plot_scorecard
    from cfmodules.evaluation.scorecard import scorecard
    from cfmodules.module_file import ModuleFile
    from cfmodules.plots import save_figure

    result = AnalysisResult.load(args.results)
    adapter = models.load_model_for(ModuleFile.from_result(result), args.results, args.model,
                                    args.device, args.latent_shape)
    card = scorecard(result, adapter=adapter, masks=_score_masks(args.masks),
                     classifier=load_fer_classifier(adapter.device) if args.fer else None,
                     n_pairs=args.pairs, n_null=args.null, n_boot=args.boot, seed=args.seed)
    print(card.to_text())
    for path, what in ((args.out, "Scorecard"), (args.figure, "Figure")):
        if path:
            _writable_dir(str(Path(path).parent))
            card.save(path) if what == "Scorecard" else save_figure(
                plot_scorecard(card, background=result.mean_image), path)
            print(f"{what + ':':<11}{path}")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from cfmodules.analysis import AnalysisResult
    from cfmodules.explorer import Explorer, serve
    from cfmodules.module_file import ModuleFile

    result = AnalysisResult.load(args.results)
    adapter = models.load_model_for(ModuleFile.from_result(result), args.results, args.model,
                             args.device, args.latent_shape)
    explorer = Explorer(result, adapter)
    serve(explorer, host=args.host, port=args.port, open_browser=not args.no_browser)
    return 0


# ---------------------------------------------------------------------- parser
_EPILOG = """examples:
  cfmodules layers dcgan-faces
  cfmodules explain dcgan-faces --layer main.8 # which path hybrids take, why, their FLOPs
  cfmodules analyze --out out                  # pretrained DCGAN faces, layer main.8, K=3
  cfmodules analyze --model my_gan.py:make_generator --latent-shape 128 --layer block3 --out out
  cfmodules hybrids --modules out/results.npz --pairs 12 --out out/new_hybrids.png
  cfmodules scan dcgan-faces --out scan         # which layer, which K (scan.png, scan.npz)
  cfmodules score out/results.npz             # each module against random channel groups
  cfmodules explore out/results.npz           # paint on the image, see the hybrids live

`cfmodules COMMAND --help` describes each command."""

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cfmodules`` (subcommands analyze, layers, explain, scan,
    hybrids, score, explore)."""
    from cfmodules import __version__

    p = _Parser(prog=PROG, description="Counterfactual discovery of the modules of a deep "
                "generative model (Besserve et al., ICLR 2020).",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"cfmodules {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def model_args(sp: argparse.ArgumentParser, positional: bool = False) -> None:
        help_model = ("zoo name (e.g. dcgan-faces) or path/to/file.py:factory, a function "
                      "returning an nn.Module or a GeneratorAdapter")
        if positional:
            sp.add_argument("model", nargs="?", default="dcgan-faces", help=help_model +
                            " (default dcgan-faces)")
        sp.add_argument("--latent-shape", metavar="SHAPE",
                        help="per-sample latent shape when the factory returns an nn.Module, "
                             "e.g. 100,1,1 (';' between inputs of a multi-input generator)")
        sp.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own choice, or 1 "
                             "when other work already fills every core: several times faster)")
        sp.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu, cuda, cuda:1, mps, or auto (CUDA when available; default)")

    def clustering_args(sp: argparse.ArgumentParser, n_init: int, max_iter: str) -> None:
        """The fields of ClusteringSettings, as the same options in every command that
        clusters. Their values default to None: the command's settings class holds the
        defaults (the help repeats them; tests/test_cli.py checks that they agree)."""
        g = sp.add_argument_group("clustering", "the fields of ClusteringSettings")
        g.add_argument("--method", choices=checks.CLUSTERING_METHODS,
                       help="clustering of the maps (default nmf)")
        g.add_argument("--seed", type=int, metavar="S",
                       help="latent stream and clustering seed (default 0)")
        g.add_argument("--n-init", type=int, metavar="N",
                       help=f"restarts of each clustering, the best is kept (default {n_init})")
        g.add_argument("--max-iter", type=int, metavar="N",
                       help=f"iterations per restart (default {max_iter})")
        g.add_argument("--window", type=int, metavar="W",
                       help=f"smoothing window of the maps in pixels, odd (default "
                            f"{checks.DEFAULT_WINDOW})")
        g.add_argument("--percentile", type=float, metavar="P",
                       help=f"threshold percentile of each smoothed map (default "
                            f"{checks.DEFAULT_PERCENTILE:g})")
        g.add_argument("--backend", choices=checks.CLUSTERING_BACKENDS,
                       help="clustering engine: fast (default: k-means on the Gram matrix, NMF "
                            "by batched HALS) or sklearn (the reference, scikit-learn; slower)")

    a = sub.add_parser("analyze", help="influence maps, modules, stability, hybrids and an "
                       "HTML report", description="Run the whole analysis and write report.html, "
                       "the figures as PNG and results.npz to --out.")
    a.add_argument("--model", default="dcgan-faces", metavar="MODEL",
                   help="zoo name or path/to/file.py:factory (default dcgan-faces)")
    a.add_argument("--layer", action="append", metavar="LAYER",
                   help="layer whose channels are the units (default: the model's default, "
                        "main.8 for dcgan-faces); two layers (main.5,main.8 or --layer twice) "
                        "are clustered together; auto: `cfmodules scan` chooses the layer "
                        "and K")
    a.add_argument("--pairs", type=int, default=None, metavar="N",
                   help=f"latent pairs per influence map (default 64; {DIFFUSION_PAIRS} for a "
                        "diffusion model, whose every hybrid is a chain of steps)")
    a.add_argument("--k", type=int, default=None, metavar="K",
                   help="number of modules K (default 3; with --layer auto, the scan's)")
    a.add_argument("--out", default="cfmodules-report", metavar="DIR",
                   help="output folder (default ./cfmodules-report)")
    a.add_argument("--stability-ks", default="2-6", metavar="KS",
                   help="K of the stability sweep: a range 2-6 or a list 2,3,5 (default 2-6)")
    a.add_argument("--stability-repeats", type=int, default=10, metavar="R",
                   help="random splits per K in the sweep (default 10; the paper used 20)")
    a.add_argument("--stability-methods", default="nmf,kmeans", metavar="METHODS",
                   help="methods compared in the sweep: nmf, kmeans or nmf,kmeans (default)")
    a.add_argument("--no-stability", action="store_true", help="skip the stability sweep")
    a.add_argument("--stability-pool", type=int, default=1, metavar="P",
                   help="NMF of the sweep on P x P pixel blocks: P^2 times fewer pixels, an "
                        "approximation (default 1: exact)")
    a.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes for the clustering and the stability sweep (default: the "
                        "usable cores, at most --threads); the results do not depend on it")
    a.add_argument("--max-memory", metavar="SIZE", help="bound on the memory the influence "
                   "maps add, e.g. 2GB (default: half of the available memory)")
    a.add_argument("--samples", type=int, default=16, metavar="N", help="samples shown (default 16)")
    a.add_argument("--hybrids", type=int, default=8, metavar="N",
                   help="new pairs hybridized per module (default 8)")
    a.add_argument("--fresh", action="store_true",
                   help="ignore the checkpoints of an earlier run in --out")
    a.add_argument("--assume-same", action="store_true",
                   help="resume checkpoints in --out even where cfmodules cannot verify that "
                        "they were made by the same code (you state that they were)")
    a.add_argument("--step-window", default=None, metavar="WINDOWS",
                   help="diffusion models: the steps at which channels are swapped: windows "
                        "early,middle,late (default: the three, side by side), all, one of "
                        "them, or one window of step indices such as 0,1,2")
    a.add_argument("--scorecard", action="store_true",
                   help="also score each module against random channel groups (about 10-30 s "
                        "more on 2 cores; see cfmodules score) and add it to the report")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    clustering_args(a, n_init=10, max_iter="500; 300 in the stability sweep")
    model_args(a)
    a.set_defaults(func=_cmd_analyze)

    la = sub.add_parser("layers", help="the layers of a model, with output shape and channels",
                        description="List the layers of MODEL to choose --layer from.")
    model_args(la, positional=True)
    la.set_defaults(func=_cmd_layers)

    ex = sub.add_parser("explain", help="how counterfactuals at a layer are computed, and "
                        "what one hybrid costs",
                        description="Print which path the hybrids of LAYER take (linear "
                        "shortcut, split, partial or hook) and why, each capture of the "
                        "forward tried (torch.fx, a partial capture, torch.export) with its "
                        "error, the FLOPs of one hybrid against one full forward, and how "
                        "the batch shape of influence maps is chosen.")
    model_args(ex, positional=True)
    ex.add_argument("--layer", required=True, metavar="LAYER",
                    help="layer name (see `cfmodules layers`), e.g. main.8")
    ex.add_argument("--algorithm", choices=("auto", "split", "hook"), default="auto",
                    help="as for influence maps: auto may use the linear shortcut (default)")
    ex.set_defaults(func=_cmd_explain)

    sc = sub.add_parser("scan", help="which layer, which K: modularity of every layer and K",
                        description="Measure the influence maps of every candidate layer "
                        "(nonlinearities with >= 8 channels), score each (layer, K) by "
                        "label consistency x template similarity x locality, and suggest a "
                        "layer and K. Writes scan.png and scan.npz to --out.")
    model_args(sc, positional=True)
    sc.add_argument("--layers", metavar="L1,L2,...",
                    help="layers to scan, comma-separated (default: the candidates)")
    sc.add_argument("--ks", default="2-6", metavar="KS",
                    help="numbers of modules: a range 2-6 or a list 2,3,5 (default 2-6)")
    sc.add_argument("--pairs", type=int, default=16, metavar="N",
                    help="most latent pairs per influence map (default 16)")
    sc.add_argument("--max-units", type=int, default=64, metavar="N",
                    help="channels scanned per layer, drawn at random from larger layers "
                         "(default 64)")
    sc.add_argument("--target-stderr", type=float, default=0.05, metavar="E",
                    help="stop a layer's maps once every pixel's standard error is <= E "
                         "(default 0.05)")
    sc.add_argument("--repeats", type=int, default=4, metavar="R",
                    help="stability splits per layer and K (default 4)")
    sc.add_argument("--out", default="cfmodules-scan", metavar="DIR",
                    help="output folder (default ./cfmodules-scan)")
    sc.add_argument("--quiet", action="store_true", help="no progress lines")
    clustering_args(sc, n_init=2, max_iter="300")
    sc.set_defaults(func=_cmd_scan)

    h = sub.add_parser("hybrids", help="a hybrid grid of new pairs from saved modules",
                       description="Hybridize new pairs with the modules of a results.npz "
                       "written by `cfmodules analyze` (no influence maps are recomputed).")
    h.add_argument("--modules", required=True, metavar="RESULTS",
                   help="results.npz written by cfmodules analyze, or a module .json "
                        "downloaded from cfmodules explore")
    h.add_argument("--model", metavar="MODEL", help="model spec (default: the one stored in RESULTS)")
    h.add_argument("--pairs", type=int, default=8, metavar="N", help="pairs (columns, default 8)")
    h.add_argument("--seed", type=int, default=None, metavar="S",
                   help="latent stream (default: the analysis seed + 1, i.e. new samples)")
    h.add_argument("--start", type=int, default=0, metavar="P", help="first pair of the stream")
    h.add_argument("--out", default="hybrids_new.png", metavar="PATH", help="PNG file or folder")
    model_args(h)
    h.set_defaults(func=_cmd_hybrids)

    so = sub.add_parser("score", help="scorecard of the modules: localisation and effect "
                        "against random channel groups, with p-values and CIs",
                        description="Score each module of RESULTS against random channel "
                        "groups of its size at its layer(s): where its hybrids change the "
                        "image (IoU, specificity against reference regions; concentration), "
                        "how much (pixels; --fer: the expression classifier), one-sided "
                        "permutation p-values (raw, and Holm over the modules of each statistic) and bootstrap "
                        "CIs over pairs. See docs/evaluation.md.")
    so.add_argument("results", metavar="RESULTS", help="results.npz written by cfmodules analyze")
    so.add_argument("--model", metavar="MODEL", help="model spec (default: the one stored in RESULTS)")
    so.add_argument("--masks", default="auto", metavar="MASKS",
                    help="reference regions: auto (face parts for face generators, planted "
                         "regions for planted ones; default), faces, none, or an .npz with "
                         "'masks' (R, H, W) and optionally 'names'")
    so.add_argument("--fer", action="store_true",
                    help="also score the fer expression classifier's outputs (slower)")
    so.add_argument("--pairs", type=int, default=32, metavar="N", help="pairs (default 32)")
    so.add_argument("--null", type=int, default=100, metavar="N",
                    help="random groups per module (default 100, at least 19)")
    so.add_argument("--boot", type=int, default=1000, metavar="B",
                    help="bootstrap resamples of the pairs (default 1000)")
    so.add_argument("--seed", type=int, default=None, metavar="S",
                    help="latent stream (default: the analysis seed, on pairs it did not use)")
    so.add_argument("--out", default=None, metavar="PATH", help="write the scorecard (.npz)")
    so.add_argument("--figure", default=None, metavar="PATH", help="write its figure (.png)")
    model_args(so)
    so.set_defaults(func=_cmd_score)

    e = sub.add_parser("explore", help="a local web page to paint on the image and see the "
                       "hybrids of the channels under the brush",
                       description="Serve the explorer of an analysis on http://HOST:PORT "
                       "(needs flask: pip install 'cfmodules[explore]'). Ctrl-C stops it.")
    e.add_argument("results", metavar="RESULTS", help="results.npz written by cfmodules analyze")
    e.add_argument("--model", metavar="MODEL", help="model spec (default: the one stored in RESULTS)")
    e.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    e.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free port)")
    e.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    model_args(e)
    e.set_defaults(func=_cmd_explore)
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("pairs", "k", "n_init", "max_iter", "stability_repeats", "samples", "hybrids",
                 "threads", "repeats", "stability_pool", "max_units", "jobs", "boot"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}.")
    if getattr(args, "start", 0) < 0:
        raise ConfigError(f"--start must be >= 0, got {args.start}.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cfmodules``; returns the exit code (0 ok, 2 bad input, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.argv = argv
    try:
        _check_numbers(args)
        models.set_threads(getattr(args, "threads", None),  # else: 1 thread if machine busy
                           None if getattr(args, "quiet", False) else f"{PROG} {args.command}")
        # SIGTERM / SIGHUP end a command like Ctrl-C (its clean-up runs: the worker
        # processes are stopped, a half-written folder is left as it was), not at once
        from cfmodules.influence.interrupt import save_on_signals

        with save_on_signals():
            return int(args.func(args))
    except CfModulesError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())  # one line, whatever the message
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (Interrupted)
        print(f"{PROG} {args.command}: interrupted. Run the same command again to resume "
              "from the checkpoint.", file=sys.stderr)
        return int(getattr(e, "exit_code", EXIT_INTERRUPTED))
    except Exception as e:  # a bug, or an input no check foresaw: still one line
        if args.debug:
            raise
        print(f"{PROG} {args.command}: internal error: {type(e).__name__}: {models.first_line(e)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
