"""Our C++ DSLA decode step (csrc/dsla_decode.cpp, ``window_decode_cpu``) against the torch form it
replaces (``window_decode_layer``): outputs, states, rings and sinks, over lengths that cross the
sinks, the window and the point where tokens start entering the states."""

from __future__ import annotations

import pytest
import torch

from dsla.config import DSLAConfig, LlamaConfig
from dsla.model import dsla as dsla_mod
from dsla.model.dsla import DSLAAttention, window_decode_layer
from dsla.model.llama import LlamaAttention
from dsla.ops import cpu_kernels
from tests.ops.conftest import needs_compiler
from dsla.ops.cpu_kernels import window_decode_cpu
from dsla.ops.rope import rope_cos_sin

pytestmark = needs_compiler

W, NS = 16, 4
# before the sinks are full, inside the window, the window just full, tokens about to enter, entering, long
LENGTHS = (0, 2, 5, 14, 15, 16, 19, 20, 23, 57)


def make_layer(D, G, H, F, states, sinks, dtype, seed=0):
    torch.manual_seed(seed)
    lc = LlamaConfig(hidden_size=H * G * D, num_attention_heads=H * G, num_key_value_heads=H, head_dim=D,
                     num_hidden_layers=1, intermediate_size=32, vocab_size=32)
    mod = DSLAAttention(LlamaAttention(lc), DSLAConfig(num_states=states, feature_dim=F, window=W, sinks=sinks))
    with torch.no_grad():  # every map off its init, so no term is a special case
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mod.teacher.to(dtype)  # shared, not registered: not moved by mod.to
    return mod.to(dtype)


def random_states(mod, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        s = mod.new_state()
        s.length = n
        s.state.copy_(torch.rand(s.state.shape, generator=g))  # positive, as sums of features are
        for t in (s.window_k, s.window_v, s.sink_k, s.sink_v):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g))
        out.append(s)
    return out


def torch_step(mod, x, cos, sin, states):
    """The same step through window_decode_layer (eager), on copies; returns o and the new buffers."""
    k_raw, v = mod.teacher.kv(x)
    q = mod.q_proj(x)
    stack = lambda name: None if getattr(states[0], name) is None else torch.stack(  # noqa: E731
        [getattr(s, name).clone() for s in states])
    rk, rv, sk, sv = (stack(n) for n in ("window_k", "window_v", "sink_k", "sink_v"))
    lengths = torch.tensor([s.length for s in states])
    o, st, _, _ = window_decode_layer(q, k_raw, v, cos, sin, *mod._all_head_params(), stack("state"), rk, rv,
                                      lengths, mod.cfg.eps, sk, sv)
    return o, st, rk, rv, sk, sv


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D,G,H,F,S,sinks", [(64, 3, 3, 64, 2, NS), (32, 1, 2, 16, 1, 0), (128, 4, 1, 32, 2, 0),
                                             (64, 8, 2, 16, 2, 2)])
def test_kernel_matches_the_torch_step(lib, dtype, tol, D, G, H, F, S, sinks):
    mod = make_layer(D, G, H, F, S, sinks, dtype)
    states = random_states(mod, LENGTHS)
    R = len(states)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for step in range(3):  # three steps: each length moves across its boundary
            x = torch.randn(R, mod.lcfg.hidden_size, generator=g).to(dtype)
            cos, sin = rope_cos_sin(torch.tensor([s.length for s in states]), torch.rand(D // 2) + 0.01)
            ref = torch_step(mod, x, cos, sin, states)
            k_raw, v = mod.teacher.kv(x)
            qr, kr = dsla_mod.rope_qk(mod.q_proj(x), k_raw, cos, sin, H, D)
            buf = lambda name: None if getattr(states[0], name) is None else torch.stack(  # noqa: E731
                [getattr(s, name) for s in states])
            st, rk, rv, sk, sv = (buf(n) for n in ("state", "window_k", "window_v", "sink_k", "sink_v"))
            lengths = torch.tensor([s.length for s in states])
            o = window_decode_cpu(lib, qr, kr, k_raw.reshape(R, H, D).contiguous(), v.reshape(R, H, D).contiguous(),
                                  mod._all_head_params(), st, rk, rv, sk, sv, lengths, mod.cfg.eps)
            torch.testing.assert_close(o.float(), ref[0].float(), atol=tol, rtol=tol)
            assert (o.float() - ref[0].float()).abs().mean() < tol / 20  # a rounding here and there, no more
            torch.testing.assert_close(st, ref[1], atol=1e-5, rtol=1e-5)
            for got, want in zip((rk, rv, sk, sv), ref[2:]):
                if want is not None:
                    assert torch.equal(got, want)  # the same rows written
            for j, s in enumerate(states):  # carry on from the kernel's buffers
                s.state, s.window_k, s.window_v = st[j], rk[j], rv[j]
                if sinks:
                    s.sink_k, s.sink_v = sk[j], sv[j]
                s.length += 1


def test_decode_step_uses_the_kernel_and_agrees_with_torch(lib, monkeypatch):
    """Through the layer: kernels on (the default) and off give the same outputs over many steps,
    with the states kept as one batch between steps (updated in place) and exact KV groups."""
    D, G, H = 64, 3, 3
    outs = {}
    for mode in ("auto", "off"):
        monkeypatch.setitem(cpu_kernels._STATE, "mode", mode)
        calls = []
        real = dsla_mod.window_decode_cpu
        monkeypatch.setattr(dsla_mod, "window_decode_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        mod = make_layer(D, G, H, 64, 2, NS, torch.bfloat16)
        mod.set_exact_groups([1])
        states = random_states(mod, (0, 3, 15, 30))
        for s in states:  # the exact group's cache, as long as the request
            s.exact.append(torch.randn(1, s.length, D).bfloat16(), torch.randn(1, s.length, D).bfloat16())
        g = torch.Generator().manual_seed(5)
        got = []
        with torch.inference_mode():
            for _ in range(6):
                x = torch.randn(len(states), mod.lcfg.hidden_size, generator=g).bfloat16()
                cos, sin = rope_cos_sin(torch.tensor([s.length for s in states]), torch.rand(D // 2) + 0.01)
                got.append(mod(x, cos, sin, [1] * len(states), states))
        assert bool(calls) == (mode == "auto")
        assert [s.length for s in states] == [6, 9, 21, 36]
        outs[mode] = (torch.stack(got).float(), torch.stack([s.state for s in states]))
    torch.testing.assert_close(outs["auto"][0], outs["off"][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outs["auto"][1], outs["off"][1], atol=1e-4, rtol=1e-4)


def test_non_finite_state_is_refused(lib):
    mod = make_layer(64, 3, 3, 64, 2, NS, torch.bfloat16)
    states = random_states(mod, (40, 41))
    states[1].state[0, 0, 0, 0] = float("nan")
    x = torch.randn(2, mod.lcfg.hidden_size).bfloat16()
    cos, sin = rope_cos_sin(torch.tensor([40, 41]), torch.rand(32) + 0.01)
    with torch.inference_mode(), pytest.raises(FloatingPointError, match="non-finite"):
        mod(x, cos, sin, [1, 1], states)


def test_non_finite_state_is_refused_when_updated_in_place(lib):
    """After one step the states are rows of the step's batch, which the kernel updates in place:
    a NaN there still reaches o and raises."""
    mod = make_layer(64, 3, 3, 64, 2, NS, torch.bfloat16)
    states = random_states(mod, (40, 41))
    cos, sin = rope_cos_sin(torch.tensor([40, 41]), torch.rand(32) + 0.01)
    with torch.inference_mode():
        mod(torch.randn(2, mod.lcfg.hidden_size).bfloat16(), cos, sin, [1, 1], states)
        assert states[0].batch is not None and states[1].batch[0] is states[0].batch[0]  # one batch, kept
        states[1].state[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite"):
            mod(torch.randn(2, mod.lcfg.hidden_size).bfloat16(), cos, sin, [1, 1], states)


def test_bad_calls_name_the_problem(lib):
    mod = make_layer(64, 3, 3, 64, 2, 0, torch.bfloat16)
    states = random_states(mod, (3,))
    st, rk, rv = (getattr(states[0], n)[None] for n in ("state", "window_k", "window_v"))
    q, k = torch.zeros(1, 3, 3, 64).bfloat16(), torch.zeros(1, 3, 64).bfloat16()
    with pytest.raises(ValueError, match="states"):
        window_decode_cpu(lib, q, k, k, k, mod._all_head_params(), st.double(), rk, rv, None, None,
                          torch.tensor([3]), 1e-6)
    with pytest.raises(ValueError, match="ring_k"):
        window_decode_cpu(lib, q, k, k, k, mod._all_head_params(), st, rk.float(), rv, None, None,
                          torch.tensor([3]), 1e-6)
