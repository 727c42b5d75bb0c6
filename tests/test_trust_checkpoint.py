"""Issue 12 items 2 and 4: a checkpoint is resumed only by the run that wrote it, and an
interrupt at any point of the main loop leaves a checkpoint that resumes exactly."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

from cfmodules import GeneratorAdapter
from cfmodules.errors import CheckpointError
from cfmodules.influence import influence_maps, module_influence_maps
from cfmodules.influence import maps as maps_mod
from cfmodules.influence.checkpoint import KIND
from cfmodules.results import read_npz, write_npz
from influence_helpers import convt_adapter

KW = {"progress": False, "pairs_per_block": 3, "checkpoint_every": 0}


def _adapter(**kw) -> GeneratorAdapter:
    ad = convt_adapter()
    return GeneratorAdapter(ad.generator, ad.latent_shape, name=ad.name, **kw)


def _scale10(y):
    return 10 * y


def _scale1(y):
    return 1 * y


# ------------------------------------------------------------------ what decides the numbers
@pytest.mark.parametrize("first,second,what", [
    ({}, {"output_transform": _scale10}, "output_transform"),
    ({"output_transform": _scale1}, {"output_transform": _scale10}, "output_transform"),
    ({"output_transform": lambda y: 1 * y}, {"output_transform": lambda y: 10 * y},
     "output_transform"),
    ({}, {"forward": lambda g, z: g(2 * z)}, "forward"),
    ({"prior": lambda n, g: torch.randn((n, 6, 1, 1), generator=g)},
     {"prior": lambda n, g: 2 * torch.randn((n, 6, 1, 1), generator=g)}, "prior"),
])
def test_code_that_changes_the_numbers_is_part_of_the_identity(tmp_path, first, second, what):
    ck = tmp_path / "run.ckpt"
    influence_maps(_adapter(**first), "5", n_pairs=3, checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match=what):
        influence_maps(_adapter(**second), "5", n_pairs=6, checkpoint=ck, **KW)


def test_resuming_with_output_transform_10x_never_returns_the_old_maps(tmp_path):
    ck = tmp_path / "run.ckpt"
    influence_maps(_adapter(), "5", n_pairs=3, checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match="output_transform"):
        influence_maps(_adapter(output_transform=lambda y: 10 * y), "5", n_pairs=3,
                       checkpoint=ck, **KW)


def test_closure_values_and_globals_are_fingerprinted(tmp_path):
    ck = tmp_path / "run.ckpt"

    def make(gain):
        return lambda y: gain * y

    influence_maps(_adapter(output_transform=make(1.0)), "5", n_pairs=3, checkpoint=ck, **KW)
    influence_maps(_adapter(output_transform=make(1.0)), "5", n_pairs=6, checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match="output_transform"):
        influence_maps(_adapter(output_transform=make(2.0)), "5", n_pairs=9, checkpoint=ck, **KW)
    w = torch.ones(1)
    ck2 = tmp_path / "tensor.ckpt"
    influence_maps(_adapter(output_transform=lambda y: y * w), "5", n_pairs=3, checkpoint=ck2,
                   **KW)
    w2 = torch.full((1,), 3.0)
    with pytest.raises(CheckpointError, match="output_transform"):
        influence_maps(_adapter(output_transform=lambda y: y * w2), "5", n_pairs=6,
                       checkpoint=ck2, **KW)


class Mirrored(GeneratorAdapter):
    def images(self, raw, n=None):
        return super().images(raw, n).flip(-1)


class MirroredToo(GeneratorAdapter):
    def images(self, raw, n=None):
        return super().images(raw, n).flip(-2)


def test_subclass_overrides_are_part_of_the_identity(tmp_path):
    ck = tmp_path / "run.ckpt"
    ad = convt_adapter()
    influence_maps(Mirrored(ad.generator, ad.latent_shape, name=ad.name), "5", n_pairs=3,
                   checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match="adapter_class"):
        influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match="adapter_class"):
        influence_maps(MirroredToo(ad.generator, ad.latent_shape, name=ad.name), "5",
                       n_pairs=6, checkpoint=ck, **KW)


class Gain(torch.nn.Module):
    def __init__(self, inner, gain):
        super().__init__()
        self.inner, self.gain = inner, gain

    def forward(self, z):
        return self.inner(z) * self.gain


class GainPlusOne(Gain):
    def forward(self, z):
        return self.inner(z) * self.gain + 1


def test_generator_class_forward_and_attributes_are_part_of_the_identity(tmp_path):
    ck = tmp_path / "run.ckpt"
    inner = convt_adapter().generator
    influence_maps(GeneratorAdapter(Gain(inner, 1.0), (6, 1, 1), name="g"), "inner.5",
                   n_pairs=3, checkpoint=ck, **KW)
    for other in (Gain(inner, 3.0), GainPlusOne(inner, 1.0)):
        with pytest.raises(CheckpointError, match="generator"):
            influence_maps(GeneratorAdapter(other, (6, 1, 1), name="g"), "inner.5", n_pairs=6,
                           checkpoint=ck, **KW)


class Opaque:
    """An object whose effect on the numbers cfmodules cannot see."""

    def __init__(self, k):
        self.k = k

    def apply(self, y):
        return y * self.k


def test_unverifiable_code_is_refused_unless_the_user_says_the_run_is_the_same(tmp_path):
    ck = tmp_path / "run.ckpt"
    obj = Opaque(1.0)
    ad = _adapter(output_transform=lambda y: obj.apply(y))
    first = influence_maps(ad, "5", n_pairs=3, checkpoint=ck, **KW)  # writing is fine
    with pytest.raises(CheckpointError, match=r"(?s)output_transform.*Opaque.*assume_same"):
        influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)
    resumed = influence_maps(ad, "5", n_pairs=6, checkpoint=ck, assume_same=True, **KW)
    full = influence_maps(ad, "5", n_pairs=6, **KW)
    np.testing.assert_array_equal(resumed.maps, full.maps)  # exact: same blocks, same path
    assert first.n_pairs == 3
    # what can be checked still is: another seed is refused even with assume_same
    with pytest.raises(CheckpointError, match="seed"):
        influence_maps(ad, "5", n_pairs=9, seed=1, checkpoint=ck, assume_same=True, **KW)


def test_same_code_resumes_in_another_process_and_partial_functions_work(tmp_path):
    ck = tmp_path / "run.ckpt"
    t = functools.partial(torch.mul, other=2.0)
    influence_maps(_adapter(output_transform=t), "5", n_pairs=3, checkpoint=ck, **KW)
    t2 = functools.partial(torch.mul, other=2.0)
    influence_maps(_adapter(output_transform=t2), "5", n_pairs=6, checkpoint=ck, **KW)
    with pytest.raises(CheckpointError, match="output_transform"):
        influence_maps(_adapter(output_transform=functools.partial(torch.mul, other=3.0)), "5",
                       n_pairs=9, checkpoint=ck, **KW)


# ------------------------------------------------------------------ malformed checkpoints
def _tamper(ck, **change):
    arrays, header = read_npz(ck, kind=KIND)
    for key, value in change.items():
        if key in arrays:
            arrays[key] = value
        else:
            header[key] = value
    write_npz(ck, arrays, header)


@pytest.mark.parametrize("change,match", [
    ({"n_pairs_done": "two"}, "n_pairs_done"),
    ({"n_pairs_done": True}, "n_pairs_done"),
    ({"n_pairs_done": -3}, "n_pairs_done"),
    ({"n_pairs_done": 2.5}, "n_pairs_done"),
    ({"mean": np.zeros((8, 3, 16))}, "mean"),
    ({"m2": np.zeros((5, 7, 7))}, "m2"),
    ({"count": np.zeros(3)}, "count"),
    ({"mean": None}, "mean"),
])
def test_malformed_checkpoint_of_the_right_run_is_refused(tmp_path, change, match):
    ad = convt_adapter()
    ck = tmp_path / "run.ckpt"
    influence_maps(ad, "5", n_pairs=3, checkpoint=ck, **KW)
    arrays, header = read_npz(ck, kind=KIND)
    if change.get("mean", 0) is None:
        arrays["mean"] = arrays["mean"].astype(np.float16)
        write_npz(ck, arrays, header)
    else:
        _tamper(ck, **change)
    with pytest.raises(CheckpointError, match=match):
        influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)


def test_checkpoint_of_another_image_size_is_refused(tmp_path):
    ad = convt_adapter()
    ck = tmp_path / "run.ckpt"
    influence_maps(ad, "5", n_pairs=3, checkpoint=ck, **KW)
    arrays, header = read_npz(ck, kind=KIND)
    u = arrays["mean"].shape[0]
    _tamper(ck, mean=np.zeros((u, 3, 3)), m2=np.zeros((u, 3, 3)))
    with pytest.raises(CheckpointError, match="shape"):
        influence_maps(ad, "5", n_pairs=6, checkpoint=ck, **KW)


# ------------------------------------------------------------------ the Ctrl-C race
def _trace_run(fn, interrupt_at: int | None = None) -> int:
    """Run ``fn``, counting the lines ``_run`` executes; raise KeyboardInterrupt at one."""
    seen = 0

    def local(frame, event, arg):
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == interrupt_at:
                raise KeyboardInterrupt  # as a signal handler would, between two bytecodes
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is maps_mod._run.__code__ else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


def test_an_interrupt_at_any_line_of_the_main_loop_resumes_to_the_same_maps(tmp_path):
    """Ctrl-C between the statistics merge and the pair count must not lose or double a block.

    A KeyboardInterrupt is raised at every line the influence loop executes (through a trace
    function, as a signal handler would raise it between bytecodes); each time the run is
    resumed from the checkpoint written on the way out and must give the uninterrupted maps.
    """
    ad = convt_adapter()
    kw = {**KW, "n_pairs": 7, "checkpoint_every": 3600}  # saves on interrupt and at the end
    full = influence_maps(ad, "5", **kw)
    n_lines = _trace_run(lambda: influence_maps(ad, "5", **kw))
    assert n_lines > 20
    for k in range(1, n_lines + 1):
        ck = tmp_path / f"run{k}.ckpt"
        try:
            _trace_run(lambda ck=ck: influence_maps(ad, "5", checkpoint=ck, **kw), interrupt_at=k)
        except KeyboardInterrupt:
            pass
        resumed = influence_maps(ad, "5", checkpoint=ck, **kw)
        assert resumed.n_pairs == 7
        # exact by design: the same blocks of 3 pairs by the same code path
        np.testing.assert_array_equal(resumed.maps, full.maps, err_msg=f"interrupt at {k}")
        np.testing.assert_array_equal(resumed.stderr, full.stderr, err_msg=f"interrupt at {k}")


def test_an_interrupt_inside_the_merge_leaves_the_published_statistics_alone(tmp_path,
                                                                             monkeypatch):
    ad = convt_adapter()
    kw = {**KW, "n_pairs": 9, "checkpoint_every": 3600}
    full = module_influence_maps(ad, [{"5": [0, 1]}, {"5": [2]}], **kw)
    real = maps_mod.BlockSums.merge_into
    calls = 0

    def merge_then_interrupt(self, stats, n):
        nonlocal calls
        real(self, stats, n)  # the statistics are updated ...
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # ... and the interrupt lands before the count is
    monkeypatch.setattr(maps_mod.BlockSums, "merge_into", merge_then_interrupt)
    ck = tmp_path / "m.ckpt"
    with pytest.raises(KeyboardInterrupt):
        module_influence_maps(ad, [{"5": [0, 1]}, {"5": [2]}], checkpoint=ck, **kw)
    monkeypatch.setattr(maps_mod.BlockSums, "merge_into", real)
    arrays, header = read_npz(ck, kind=KIND)
    assert header["n_pairs_done"] == 3 and (arrays["count"] == 3).all()
    resumed = module_influence_maps(ad, [{"5": [0, 1]}, {"5": [2]}], checkpoint=ck, **kw)
    np.testing.assert_array_equal(resumed.maps, full.maps)  # exact: same blocks, same path


def test_closures_of_library_functions_are_fingerprinted_by_content():
    from cfmodules.influence.identity import fingerprint
    from cfmodules.zoo.biggan import _class_prior

    stub = torch.nn.Module()
    stub.embeddings = torch.nn.Linear(10, 4)  # 10 classes, z of 4
    a = fingerprint(_class_prior(stub, [1, 2], 0.4), "prior")
    assert a == fingerprint(_class_prior(stub, [1, 2], 0.4), "prior")
    assert a != fingerprint(_class_prior(stub, [1, 3], 0.4), "prior")
    assert a != fingerprint(_class_prior(stub, [1, 2], 0.5), "prior")


class OwnForward(GeneratorAdapter):
    """An adapter whose forward is one of its own methods."""

    def __init__(self, generator, gain):
        super().__init__(generator, (6, 1, 1), name="own", forward=self.run)
        self.gain = gain

    def run(self, generator, z):
        return generator(z) * 2


def test_a_forward_bound_to_the_adapter_is_verifiable():
    from cfmodules.influence.identity import adapter_fingerprints

    fp = adapter_fingerprints(OwnForward(convt_adapter().generator, 1.0))
    assert all(isinstance(v, str) for v in fp.values()), fp
