"""The compiled DSLA decode step (``use_compiled_decode``) equals the eager one, and falls back."""

from __future__ import annotations

import functools
import logging
import shutil

import pytest
import torch

from dsla.model import dsla as dsla_mod
from dsla.ops import compiled
from tests.model.test_decode import LENGTHS, make_hybrid, run_batched


@pytest.fixture(params=[(0, False), (2, False), (2, True)], ids=["window", "window-sinks", "window-sinks-exact"])
def hybrid(tiny_dir, request):
    sinks, exact = request.param
    m = make_hybrid(tiny_dir, 4, sinks)  # the shipped student has sinks and exact KV groups
    if exact:  # its q and k come out of the compiled step's RoPE
        m.dsla["1"].set_exact_groups([0])
    return m


@pytest.fixture
def restore_eager():
    yield
    compiled.use_compiled_decode(False)


def _seqs_plans(model, plans=None):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 97, (n + 6,), generator=g) for n in LENGTHS]
    return seqs, plans or [[0, 1, 2]] * len(seqs), list(LENGTHS)


@functools.cache
def compile_works() -> str | None:
    """None when torch.compile (inductor, CPU) builds and runs a tiny function here, else why not."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler"
    try:
        torch.compile(lambda t: (t * 2).sin())(torch.ones(3))
    except Exception as e:  # headers or toolchain missing: the eager fallback is tested below
        return f"torch.compile does not work here: {type(e).__name__}: {str(e)[:120]}"
    return None


@pytest.mark.parametrize("plans", [None, [[], [1], [0, 1, 2], [0, 2]]], ids=["dsla", "mixed"])
def test_compiled_decode_equals_eager(hybrid, plans, restore_eager):
    if compile_works():
        pytest.skip(compile_works())
    seqs, plans, prefills = _seqs_plans(hybrid, plans)
    eager, c_eager = run_batched(hybrid, seqs, plans, prefills)
    compiled.use_compiled_decode(True)
    comp, c_comp = run_batched(hybrid, seqs, plans, prefills)
    assert dsla_mod.decode_layer_fn().compiled, "compiling the DSLA step fell back to eager"
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for ca, cb, p in zip(c_comp, c_eager, plans):
        for i in p:
            sa, sb = ca.layers[i], cb.layers[i]
            torch.testing.assert_close(sa.state, sb.state, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sa.ordered_window(), sb.ordered_window(), rtol=1e-4, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(hybrid, restore_eager, monkeypatch, caplog):
    seqs, plans, prefills = _seqs_plans(hybrid)
    eager, _ = run_batched(hybrid, seqs, plans, prefills)

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    compiled.use_compiled_decode(True)
    with caplog.at_level(logging.WARNING):
        out, _ = run_batched(hybrid, seqs, plans, prefills)
    assert "compiled window_decode_layer failed" in caplog.text and "running eagerly" in caplog.text
    assert not dsla_mod.decode_layer_fn().compiled
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_warm_up_compiles_before_the_first_decode(hybrid, restore_eager):
    """``warm_up_decode`` (``dsla serve --compile-decode`` calls it before serving) builds the graph
    for one request and the one for any number, so decoding afterwards compiles nothing new, and
    gives the eager results."""
    if compile_works():
        pytest.skip(compile_works())
    from torch._dynamo.utils import counters

    seqs, plans, prefills = _seqs_plans(hybrid)
    eager, _ = run_batched(hybrid, seqs, plans, prefills)
    torch._dynamo.reset()  # no graph from an earlier test: only the warm-up's may exist
    compiled.use_compiled_decode(True)
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    dsla_mod.warm_up_decode(hybrid)
    assert all(torch.equal(v, before[k]) for k, v in hybrid.state_dict().items())
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():  # as the server's steps run (dsla.serve.runner)
        comp, _ = run_batched(hybrid, seqs, plans, prefills)
    assert counters["stats"]["unique_graphs"] == graphs, "decoding after the warm-up compiled a new graph"
    assert dsla_mod.decode_layer_fn().compiled
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
