"""The command line: ``cfmodules analyze | layers | hybrids`` (also ``python -m cfmodules``).

A thin layer over the library: it parses arguments, loads the model, calls
:func:`cfmodules.analysis.analyze` / :func:`cfmodules.report.write_report` /
:func:`cfmodules.analysis.make_hybrids`, and turns the library's errors into a one-line
message on stderr with exit code 2 (never a traceback).

Examples::

    cfmodules layers dcgan-faces
    cfmodules analyze --out out                      # the pretrained DCGAN faces, main.8
    cfmodules analyze --model my_gan.py:make_generator --latent-shape 128 --layer block3 --out out
    cfmodules hybrids --modules out/results.npz --pairs 12 --out out/new_hybrids.png
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from cfmodules import checks
from cfmodules.errors import CfModulesError, ConfigError

__all__ = ["main", "load_model", "parse_latent_shape", "build_parser"]

PROG = "cfmodules"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends with one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- models
def parse_latent_shape(text: str) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """``"100,1,1"`` -> ``(100, 1, 1)``; ``"128;1000"`` -> ``((128,), (1000,))``.

    Dimensions are separated by ``,`` or ``x``; the inputs of a multi-input generator by
    ``;``.
    """
    try:
        shapes = []
        for part in text.split(";"):
            dims = tuple(int(d) for d in part.replace("x", ",").split(",") if d.strip())
            if not dims or any(d < 1 for d in dims):
                raise ValueError
            shapes.append(dims)
    except ValueError:
        raise ConfigError(
            f"--latent-shape must be positive integers separated by commas, e.g. 100,1,1 (and "
            f"';' between the inputs of a multi-input generator, e.g. 128;1000); got {text!r}."
        ) from None
    return shapes[0] if len(shapes) == 1 else tuple(shapes)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    checks.device(device, "--device")  # 'auto' is the CLI's own choice
    return device


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``"path/file.py:factory"`` -> (path, factory); None for a zoo name."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, name
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        raise ConfigError(
            f"--model {spec!r}: give a zoo name or path/to/file.py:factory, where factory is a "
            "function of that file returning an nn.Module or a GeneratorAdapter."
        )
    return None


def _call_factory(path: str, name: str, device: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--model: no file '{path}'.")
    if not name.isidentifier():
        raise ConfigError(f"--model: '{name}' is not a function name; use {path}:make_generator.")
    mod_name = f"_cfmodules_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--model: cannot import '{path}' as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == mod_name]
            from cfmodules.errors import did_you_mean

            raise ConfigError(f"--model: '{path}' has no function '{name}'."
                              f"{did_you_mean(name, public)}"
                              + (f" Functions: {', '.join(public[:8])}." if public else ""))
        try:
            takes_device = "device" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes_device = False
        return factory(device=device) if takes_device else factory()
    except CfModulesError:
        raise
    except Exception as e:
        raise ConfigError(f"--model {path}:{name} failed: {type(e).__name__}: "
                          f"{_first_line(e)}") from e
    finally:
        sys.path.remove(str(file.resolve().parent))


def load_model(spec: str, device: str = "auto", latent_shape: str | None = None):
    """Load ``spec`` (a zoo name or ``path/to/file.py:factory``) as a GeneratorAdapter.

    Parameters
    ----------
    spec : str
        Zoo name (``cfmodules.zoo.available()``) or ``file.py:factory``. The factory
        returns a GeneratorAdapter, or an nn.Module (then ``latent_shape`` is needed); it
        receives ``device=`` if it has such a parameter.
    device : str, default "auto"
        ``"auto"``: CUDA when available, else CPU.
    latent_shape : str, optional
        For a factory returning an nn.Module, e.g. ``"100,1,1"``.

    Returns
    -------
    GeneratorAdapter
        Checked by one forward pass of a single sample.

    Raises
    ------
    ConfigError, ModelNotAvailableError
    """
    import torch
    from torch import nn

    from cfmodules import zoo
    from cfmodules.adapter import GeneratorAdapter

    dev = _resolve_device(device)
    factory = _split_factory(spec)
    if factory is None:
        if latent_shape is not None:
            raise ConfigError(f"--latent-shape is for models given as file.py:factory; the zoo "
                              f"model '{spec}' knows its own.")
        adapter = zoo.load(spec, device=dev)
    else:
        obj = _call_factory(*factory, dev)
        if isinstance(obj, GeneratorAdapter):
            if latent_shape is not None:
                raise ConfigError(f"{spec} returned a GeneratorAdapter, which has its own latent "
                                  "shape; drop --latent-shape.")
            adapter = obj
            if device != "auto" and adapter.device != torch.device(dev):
                raise ConfigError(
                    f"{spec} returned an adapter on {adapter.device}, not {dev}; give the "
                    "factory a device parameter (it is then called with device=...).")
        elif isinstance(obj, nn.Module):
            if latent_shape is None:
                raise ConfigError(
                    f"{spec} returned an nn.Module ({type(obj).__name__}); give its per-sample "
                    "latent shape with --latent-shape (e.g. 100,1,1), or return a "
                    "cfmodules.GeneratorAdapter from the factory.")
            shape = parse_latent_shape(latent_shape)
            adapter = GeneratorAdapter(obj.to(dev), shape, device=dev,
                                       name=Path(factory[0]).stem)
        else:
            raise ConfigError(f"{spec} returned {type(obj).__name__}, not an nn.Module or a "
                              "GeneratorAdapter.")
    try:
        adapter.layers_cached()  # one forward of one sample: fail now, not mid-analysis
    except CfModulesError:
        raise
    except Exception as e:
        raise ConfigError(
            f"Running {spec} on one latent of shape {adapter.latent_shape} failed: "
            f"{type(e).__name__}: {_first_line(e)}. Check the latent shape (--latent-shape) "
            "or pass forward=/output_transform= to the GeneratorAdapter your factory returns."
        ) from e
    return adapter


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


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


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            ks = tuple(range(lo, hi + 1))
        else:
            ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"--stability-ks takes a range such as 2-6 or a list such as 2,3,5; "
                          f"got {text!r}.")
    return ks


# ---------------------------------------------------------------------- commands
def _cmd_layers(args: argparse.Namespace) -> int:
    from cfmodules.analysis import default_layer

    adapter = load_model(args.model, args.device, args.latent_shape)
    try:
        default = default_layer(adapter)
    except ConfigError:
        default = None
    print(f"{adapter!r}")
    print(f"{'layer':<24} {'kind':<18} {'output':<14} channels")
    for info in adapter.layers_cached():
        mark = "   <- default of `cfmodules analyze`" if info.name == default else ""
        print(f"{info}{mark}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from cfmodules.analysis import AnalysisSettings, analyze
    from cfmodules.report import write_report

    ks = () if args.no_stability else _parse_ks(args.stability_ks)
    methods = tuple(m.strip() for m in args.stability_methods.split(",") if m.strip())
    if not methods or any(m not in checks.CLUSTERING_METHODS for m in methods):
        raise ConfigError(f"--stability-methods takes nmf, kmeans or nmf,kmeans; got "
                          f"{args.stability_methods!r}.")
    settings = AnalysisSettings(
        n_pairs=args.pairs, n_modules=args.k, method=args.method, seed=args.seed,
        n_init=args.n_init, stability_ks=ks, stability_methods=methods,
        stability_repeats=args.stability_repeats, n_samples=args.samples,
        n_hybrids=args.hybrids)
    if args.layer and len(args.layer) > 2:
        raise ConfigError(f"--layer is given {len(args.layer)} times; give one layer, or two "
                          "for a two-layer intervention.")
    adapter = load_model(args.model, args.device, args.latent_shape)
    from cfmodules.hooks import resolve_layers
    from cfmodules.influence.distributed import init_from_env, world

    if args.layer:  # a typo fails before the output folder is made
        resolve_layers(adapter.generator, list(args.layer))

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
    result = analyze(adapter, args.layer, settings, checkpoint_dir=ckpt,
                     progress=not args.quiet, model_spec=_portable_spec(args.model),
                     model_options={"latent_shape": args.latent_shape}
                     if args.latent_shape else None)
    if result is None:  # a rank other than 0 has done its share of the influence maps
        return 0
    results_path = result.save(out / "results.npz")
    t_report = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [PROG, *args.argv])
    write_report(result, out, command=command, files={
        "results.npz": "maps, labels, templates, stability table, hybrids (numpy.load or "
                       "cfmodules.analysis.AnalysisResult.load)",
        "checkpoints/": "influence computation state: rerunning resumes from it"})
    report_s = time.perf_counter() - t_report
    if not args.quiet:
        print(repr(result), file=sys.stderr)
        print(f"report {report_s:.1f} s; total {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    print(f"Report:  {out / 'report.html'}")
    print(f"Results: {results_path}")
    return 0


def _portable_spec(spec: str) -> str:
    factory = _split_factory(spec)
    if factory is None:
        return spec
    return f"{Path(factory[0]).resolve()}:{factory[1]}"


def _cmd_hybrids(args: argparse.Namespace) -> int:
    from cfmodules.analysis import AnalysisResult, make_hybrids
    from cfmodules.plots import plot_hybrid_grid, save_figure

    result = AnalysisResult.load(args.modules)
    spec = args.model or result.model_spec
    shape = args.latent_shape or result.model_options.get("latent_shape")
    adapter = load_model(spec, args.device, shape)
    for layer in result.layers:
        n = adapter.layer_channels(layer)
        top = int(result.unit_channel[result.unit_layer == layer].max()) + 1
        if n != top:
            raise ConfigError(f"The modules of '{args.modules}' have {top} channels in layer "
                              f"'{layer}', but {spec} has {n} there: not the same model.")
    seed = result.settings.seed + 1 if args.seed is None else args.seed
    o1, o2, hy = make_hybrids(adapter, result.modules, args.pairs, seed, args.start)
    fig = plot_hybrid_grid(o1 / 255.0, o2 / 255.0, hy / 255.0, module_names=result.module_names)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = _writable_dir(str(out)) / "hybrids_new.png"
    else:
        _writable_dir(str(out.parent))
    save_figure(fig, out)
    print(f"Hybrids: {out}  ({args.pairs} pairs of seed {seed}, {result.n_modules} modules)")
    return 0


# ---------------------------------------------------------------------- parser
_EPILOG = """examples:
  cfmodules layers dcgan-faces
  cfmodules analyze --out out                  # pretrained DCGAN faces, layer main.8, K=3
  cfmodules analyze --model my_gan.py:make_generator --latent-shape 128 --layer block3 --out out
  cfmodules hybrids --modules out/results.npz --pairs 12 --out out/new_hybrids.png

`cfmodules COMMAND --help` describes each command."""

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cfmodules`` (subcommands analyze, layers, hybrids)."""
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
                        help="CPU threads for torch (default: torch's own choice); on a "
                             "busy machine --threads 1 can be several times faster")
        sp.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu, cuda, cuda:1, mps, or auto (CUDA when available; default)")

    a = sub.add_parser("analyze", help="influence maps, modules, stability, hybrids and an "
                       "HTML report", description="Run the whole analysis and write report.html, "
                       "the figures as PNG and results.npz to --out.")
    a.add_argument("--model", default="dcgan-faces", metavar="MODEL",
                   help="zoo name or path/to/file.py:factory (default dcgan-faces)")
    a.add_argument("--layer", action="append", metavar="LAYER",
                   help="layer whose channels are the units (default: the model's default, "
                        "main.8 for dcgan-faces); give it twice for a two-layer intervention")
    a.add_argument("--pairs", type=int, default=64, metavar="N",
                   help="latent pairs per influence map (default 64)")
    a.add_argument("--k", type=int, default=3, metavar="K", help="number of modules K (default 3)")
    a.add_argument("--method", choices=checks.CLUSTERING_METHODS, default="nmf",
                   help="clustering of the maps (default nmf)")
    a.add_argument("--seed", type=int, default=0, metavar="S",
                   help="latent stream and clustering seed (default 0)")
    a.add_argument("--out", default="cfmodules-report", metavar="DIR",
                   help="output folder (default ./cfmodules-report)")
    a.add_argument("--stability-ks", default="2-6", metavar="KS",
                   help="K of the stability sweep: a range 2-6 or a list 2,3,5 (default 2-6)")
    a.add_argument("--n-init", type=int, default=10, metavar="N",
                   help="restarts of the clustering, the best is kept (default 10)")
    a.add_argument("--stability-repeats", type=int, default=10, metavar="R",
                   help="random splits per K in the sweep (default 10; the paper used 20)")
    a.add_argument("--stability-methods", default="nmf,kmeans", metavar="METHODS",
                   help="methods compared in the sweep: nmf, kmeans or nmf,kmeans (default)")
    a.add_argument("--no-stability", action="store_true", help="skip the stability sweep")
    a.add_argument("--samples", type=int, default=16, metavar="N", help="samples shown (default 16)")
    a.add_argument("--hybrids", type=int, default=8, metavar="N",
                   help="new pairs hybridized per module (default 8)")
    a.add_argument("--fresh", action="store_true",
                   help="ignore the checkpoints of an earlier run in --out")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    model_args(a)
    a.set_defaults(func=_cmd_analyze)

    la = sub.add_parser("layers", help="the layers of a model, with output shape and channels",
                        description="List the layers of MODEL to choose --layer from.")
    model_args(la, positional=True)
    la.set_defaults(func=_cmd_layers)

    h = sub.add_parser("hybrids", help="a hybrid grid of new pairs from saved modules",
                       description="Hybridize new pairs with the modules of a results.npz "
                       "written by `cfmodules analyze` (no influence maps are recomputed).")
    h.add_argument("--modules", required=True, metavar="RESULTS",
                   help="results.npz written by cfmodules analyze")
    h.add_argument("--model", metavar="MODEL", help="model spec (default: the one stored in RESULTS)")
    h.add_argument("--pairs", type=int, default=8, metavar="N", help="pairs (columns, default 8)")
    h.add_argument("--seed", type=int, default=None, metavar="S",
                   help="latent stream (default: the analysis seed + 1, i.e. new samples)")
    h.add_argument("--start", type=int, default=0, metavar="P", help="first pair of the stream")
    h.add_argument("--out", default="hybrids_new.png", metavar="PATH", help="PNG file or folder")
    model_args(h)
    h.set_defaults(func=_cmd_hybrids)
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("pairs", "k", "n_init", "stability_repeats", "samples", "hybrids", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")
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
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)  # the user's explicit choice
        return int(args.func(args))
    except CfModulesError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())  # one line, whatever the message
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted. Run the same command again to resume "
              "from the checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
