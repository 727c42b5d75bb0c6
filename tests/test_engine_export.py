"""The torch.export capture: fast path against hook path on published forward styles."""

from __future__ import annotations

import copy
import logging
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from cfmodules import GeneratorAdapter
from cfmodules.engine import engine_of, explain, split
from cfmodules.errors import ConfigError
from cfmodules.hybrid import hybridize
from cfmodules.influence import influence_maps
from conftest import no_hooks_left
from engine_helpers import (
    ConditionalDCGAN,
    DictOut,
    DropoutGen,
    FloatArgument,
    InPlace,
    SkipDecoder,
    StyleLike,
    TupleOut,
    Twice,
    assert_paths_agree,
    cond_adapter,
    float_argument_adapter,
    init,
)

pytestmark = pytest.mark.numerics  # the exported graph against the hook path


def _exported(ad: GeneratorAdapter, layer: str) -> GeneratorAdapter:
    """``ad`` made to capture with torch.export only, checked to do so at ``layer``."""
    engine_of(ad).captures = ("export",)
    ex = explain(ad, layer)
    assert ex.capture == "torch.export graph of the forward", str(ex)
    (attempt,) = ex.attempts
    assert attempt.kind == "export" and attempt.error is None and attempt.seconds > 0
    return ad


def test_dim_control_flow_cat_view_and_standard_modules_lifted():
    ad = _exported(cond_adapter(), "main.5")
    gm = engine_of(ad).graph("main.5")
    modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    # each Conv/BN/ReLU/Dropout call is one module node again, so the fast passes apply
    assert {"main.0", "main.1", "main.2", "main.3", "main.4", "main.5", "main.6",
            "main.7", "main.8"} <= modules
    assert_paths_agree(ad, "main.5")
    assert explain(ad, "main.2").path == "linear shortcut"  # found on the lifted graph
    assert_paths_agree(ad, "main.2")
    z = ad.sample_latents(1)  # one sample: the graph holds for 2 and more, run padded
    s = split(ad, "main.5")
    st = s.prefix(z)
    torch.testing.assert_close(s.suffix(st, st.activation), ad.generate(z))
    assert no_hooks_left(ad.generator)


@pytest.mark.parametrize("model, transform", [
    (DictOut, lambda o: o["image"]), (TupleOut, lambda o: o[0])])
def test_dict_and_tuple_outputs(model, transform):
    ad = _exported(GeneratorAdapter(init(model(), 1), (4,), output_transform=transform), "act")
    raw_split = split(ad, "act").inner
    st = raw_split.prefix(ad.sample_latents(2))
    raw = raw_split.suffix(st, st.activation)
    assert type(raw) is type(init(model(), 1)(torch.zeros(2, 4)))  # the forward's structure
    assert_paths_agree(ad, "act")


def test_in_place_ops_module_called_twice_and_skip_decoder():
    ad = _exported(GeneratorAdapter(init(InPlace(), 4), (4, 1, 1)), "act")
    assert_paths_agree(ad, "act")
    s, z = split(ad, "act"), ad.sample_latents(2)
    st = s.prefix(z)
    before = st.activation.clone()
    s.suffix(st, st.activation)
    torch.testing.assert_close(st.activation, before, rtol=0, atol=0)  # state not clobbered
    ad = _exported(GeneratorAdapter(init(Twice(), 5), (4, 1, 1)), "block:1")
    assert_paths_agree(ad, "block:0")
    assert_paths_agree(ad, "block:1")
    ad = _exported(GeneratorAdapter(init(SkipDecoder(), 3), (4,),
                                    forward=lambda g, z: g(z * 2.0)), "act")
    assert_paths_agree(ad, "act")


def test_stylegan_like_with_shape_unpacking_that_fx_cannot_trace():
    class Unpacking(StyleLike):
        """StyleGAN2's official style: ``*x.shape[1:]`` (fx cannot star-unpack a shape)."""

        def forward(self, z, noise0, noise1):
            w = self.mapping(z)
            x = self.const.expand(z.shape[0], *self.const.shape[1:])
            x = self.conv1(nn.functional.interpolate(self.conv0(x, w, noise0),
                                                     scale_factor=2), w, noise1)
            return self.to_rgb(x)

    ad = GeneratorAdapter(init(Unpacking(), 2), ((4,), (1, 4, 4), (1, 8, 8)))
    ex = explain(ad, "conv0")
    assert ex.path == "split" and ex.capture == "torch.export graph of the forward"
    kinds = [(a.kind, a.error is None) for a in ex.attempts]
    assert kinds == [("graph", False), ("partial", False), ("export", True)] or (
        kinds[0] == ("graph", False) and kinds[-1] == ("export", True))
    assert engine_of(ad).linear_plan("conv0") is None  # sample-dependent weights
    assert_paths_agree(ad, "conv0")
    assert_paths_agree(ad, "mapping.2")  # the folded batch is recomputed per hybrid


def test_export_error_is_listed_and_another_capture_runs(capsys):
    ad = float_argument_adapter()  # a float out of a tensor: data-dependent for export
    engine_of(ad).captures = ("export", "graph", "partial")
    ex = explain(ad, "inner.act")
    assert capsys.readouterr().err == ""  # torch prints the partial graph; kept quiet
    export = ex.attempts[0]
    assert export.kind == "export" and export.error and export.seconds is not None
    assert f"tried {export}" in str(ex)
    assert ex.capture == "partial at 'inner'"
    assert_paths_agree(ad, "inner.act")
    with pytest.raises(ConfigError, match="captures"):
        engine_of(ad).captures = ("jit",)


def test_a_failed_export_silences_its_own_thread_only(capsys):
    """torch prints a failed export's partial graph to stderr and logs warnings; the export
    keeps those quiet without swallowing what another thread prints or logs meanwhile
    (a notebook's output, a training loop's logs), and leaves stderr and the loggers as
    they were."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    seen: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(collect)

    def logger_filters() -> dict[str, list]:
        return {name: list(lg.filters) for name, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger)}

    stderr, filters = sys.stderr, logger_filters()

    def other_thread() -> None:
        print("printed by another thread", file=sys.stderr)
        log.warning("logged by another thread")

    class Chatty(FloatArgument):
        def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if isinstance(z.shape[0], torch.SymInt):  # only while torch.export traces
                print("printed by the exporting thread", file=sys.stderr)
                log.warning("logged by the exporting thread")
                worker = threading.Thread(target=other_thread)
                worker.start()
                worker.join()
            return super().forward(z, t)

    ad = float_argument_adapter(Chatty)
    engine_of(ad).captures = ("export",)
    try:
        ex = explain(ad, "inner.act")
        (attempt,) = ex.attempts
        assert attempt.kind == "export" and attempt.error  # it failed, so torch printed
        err = capsys.readouterr().err
        assert "printed by another thread\n" in err and "logged by another thread" in err
        assert "exporting thread" not in err and "def forward" not in err, err
        assert seen == ["logged by another thread"]
        assert sys.stderr is stderr
        assert filters == {n: f for n, f in logger_filters().items() if n in filters}
        print("after", file=sys.stderr)
        log.warning("after")
        assert "after\n" in capsys.readouterr().err
        assert seen == ["logged by another thread", "after"]
    finally:
        log.removeHandler(collect)


# ---------------------------------------------------------------------- following the generator
def test_python_attribute_and_replaced_submodule_are_seen():
    gen = init(DropoutGen(), 0)
    ad = _exported(GeneratorAdapter(gen, (4, 1, 1)), "relu")
    z1, z2 = ad.sample_latents(3, seed=1), ad.sample_latents(3, seed=2)
    hybridize(ad, z1, z2, {"relu": [0]})
    gen.gain = 3.0  # baked into the exported graph as a constant
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": []}), ad.generate(z1))
    gen.out = init(nn.Conv2d(6, 3, 1), 9)
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": []}), ad.generate(z1))
    fresh = GeneratorAdapter(copy.deepcopy(gen), (4, 1, 1))
    torch.testing.assert_close(hybridize(ad, z1, z2, {"relu": [0, 2]}),
                               hybridize(fresh, z1, z2, {"relu": [0, 2]}))


def test_training_steps_between_calls_match_a_fresh_copy():
    gen = init(ConditionalDCGAN(), 0)
    ad = _exported(GeneratorAdapter(gen, ((6, 1, 1), (3,))), "main.2")
    before = influence_maps(ad, "main.2", n_pairs=3, progress=False).maps
    opt = torch.optim.SGD(gen.parameters(), lr=0.5)
    gen.train()
    for _ in range(3):
        z = ad.sample_latents(4, seed=5)
        opt.zero_grad()
        gen(*z).square().mean().backward()
        opt.step()
    gen.eval()
    after = influence_maps(ad, "main.2", n_pairs=3, progress=False).maps
    fresh = GeneratorAdapter(copy.deepcopy(gen), ((6, 1, 1), (3,)))
    ref = influence_maps(fresh, "main.2", n_pairs=3, progress=False, algorithm="hook").maps
    assert np.abs(after - before).max() > 1e-3
    # the exported graph against the hook path: float32 rounding, absolute in image units
    np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-6)
