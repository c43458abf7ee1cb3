"""Attention sinks in dsla.ops.window: the first S tokens never enter the states and stay exact.

The reference loop is checked against the definition written out directly (a zero state), then
the chunked form, the decode step, the ring decode and the fold against the reference, in
float64, from zero states and from states whose sequences have seen fewer than S tokens, some
sinks still inside the window, or every sink outside it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.ops.test_window_ops import close, make_inputs, phi_of

from dsla.ops.dsla import dsla_reference
from dsla.ops.window import (WindowState, ordered_from_ring, ring_from_ordered, window_chunked, window_decode,
                             window_fold, window_reference, window_step)

# (B, T, H, G, D, K, V, S(states), W, C, sinks)
CASES = [
    (3, 37, 2, 3, 8, 6, 5, 2, 8, 16, 3),   # T not a multiple of W or C
    (3, 5, 1, 2, 4, 4, 3, 2, 8, 4, 4),     # T < W
    (3, 23, 1, 3, 4, 6, 4, 2, 1, 8, 1),    # W = 1
    (2, 50, 1, 2, 6, 4, 4, 1, 16, 64, 4),  # several blocks, one state
]


def case_id(c) -> str:
    return "B{}-T{}-H{}-G{}-D{}-K{}-V{}-S{}-W{}-C{}-sinks{}".format(*c)


def sink_state(B, H, D, V, W, st: WindowState, sinks: int) -> WindowState:
    """``st`` (counts W, W // 2 + 1, 0 by batch row, see make_inputs) with sink rows and seen:
    row 0 has seen W + 2 tokens (sinks 0..2 left the window), row 1 W // 2 + 1 (inside it, some
    not seen yet when sinks > W // 2 + 1), row 2 none."""
    gen = torch.Generator().manual_seed(7)
    seen = torch.tensor([(W + 2, W // 2 + 1, 0)[b % 3] for b in range(B)])
    filled = (torch.arange(sinks)[None] < seen[:, None])[:, None, :, None]
    sk = torch.where(filled, torch.randn(B, H, sinks, D, generator=gen, dtype=torch.float64), 0)
    sv = torch.where(filled, torch.randn(B, H, sinks, V, generator=gen, dtype=torch.float64), 0)
    return WindowState(st.states, st.k, st.v, st.count, sk.to(st.k.dtype), sv.to(st.v.dtype), seen)


def close_sink_state(a: WindowState, b: WindowState, tol=1e-10):
    close(a.states, b.states, tol)
    for name in ("k", "v", "sink_k", "sink_v"):
        close(getattr(a, name), getattr(b, name), tol)
    assert torch.equal(a.count, b.count) and torch.equal(a.seen, b.seen)


def test_reference_is_the_definition():
    """From a zero state, written out: token j enters the states at t = j + W unless j < sinks;
    query t's exact keys are (t-W, t] and the sinks j ≤ t - W, with one max."""
    B, T, H, G, D, K, V, S, W, sinks = 1, 30, 2, 2, 4, 4, 3, 2, 6, 3
    x, P, _ = make_inputs(B, T, H, G, D, K, V, S, W, init_state=False)
    q, k, v, fq, g, mix, f = x
    u, _ = window_reference(*x, phi_of(P), None, window=W, sinks=sinks)
    fk = torch.zeros(B, H, T, K, dtype=torch.float64)
    v1 = torch.zeros(B, H, T, V + 1, dtype=torch.float64)
    for t in range(W + sinks, T):  # token t - W enters at t
        fk[:, :, t] = phi_of(P)(k[:, :, t - W][:, :, None])[:, :, 0]
        v1[:, :, t] = torch.cat([v[:, :, t - W], torch.ones(B, H, 1, dtype=torch.float64)], dim=-1)
    u_lin, _ = dsla_reference(fq, fk, v1, g, mix, None)
    for t in range(T):
        keys = [j for j in range(T) if t - W < j <= t or (j < sinks and j <= t - W)]
        s = q[:, :, :, t] @ k[:, :, keys].mT / math.sqrt(D)  # (B, H, G, n)
        w = (s - s.amax(-1, keepdim=True)).exp()
        exact = torch.cat([w @ v[:, :, keys], w.sum(-1, keepdim=True)], dim=-1)
        close(u[:, :, :, t], u_lin[:, :, :, t] + f[None, :, :, None] * exact)


def test_sinks_change_nothing_while_the_window_holds_every_token():
    x, P, _ = make_inputs(2, 12, 2, 3, 4, 4, 3, 2, 16, init_state=False)
    u0, _ = window_chunked(*x, phi_of(P), None, window=16)
    u4, s4 = window_chunked(*x, phi_of(P), None, window=16, sinks=4)
    close(u4, u0, 0)
    close(s4.sink_k, x[1][:, :, :4], 0)
    assert s4.seen.tolist() == [12, 12]


@pytest.mark.parametrize("init_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_steps_and_fold_match_reference(case, init_state):
    B, T, H, G, D, K, V, S, W, C, sinks = case
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W, init_state)
    if st is not None:
        st = sink_state(B, H, D, V, W, st, sinks)
    q, k, v, fq, g, mix, f = x
    u_ref, s_ref = window_reference(*x, phi_of(P), st, window=W, sinks=sinks)
    u, s = window_chunked(*x, phi_of(P), st, window=W, sinks=sinks, chunk_size=C)
    close(u, u_ref)
    close_sink_state(s, s_ref)
    outs, s = [], st
    for t in range(T):
        u_t, s = window_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fq[:, :, :, t:t + 1],
                             g[:, :, :, t:t + 1], mix, f, phi_of(P), s, window=W, sinks=sinks)
        outs.append(u_t)
    close(torch.cat(outs, dim=3), u_ref)
    close_sink_state(s, s_ref)
    close_sink_state(window_fold(k, v, g, phi_of(P), st, window=W, sinks=sinks, chunk_size=C), s_ref)
    # the sinks made a difference (else this test would not see them): T > W + sinks from zero
    if not init_state and T > W + sinks:
        u_none, _ = window_reference(*x, phi_of(P), None, window=W)
        assert not torch.allclose(u_none, u_ref)


def test_prefill_prefill_decode_equals_one_pass():
    B, T, H, G, D, K, V, S, W, sinks = 2, 60, 2, 3, 8, 6, 5, 2, 8, 4
    x, P, _ = make_inputs(B, T, H, G, D, K, V, S, W, init_state=False)
    q, k, v, fq, g, mix, f = x
    u_all, s_all = window_chunked(*x, phi_of(P), None, window=W, sinks=sinks, chunk_size=8)

    def sl(a, b):
        return q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], fq[:, :, :, a:b], g[:, :, :, a:b], mix, f

    u1, s = window_chunked(*sl(0, 2), phi_of(P), None, window=W, sinks=sinks, chunk_size=8)  # fewer than sinks
    u2, s = window_chunked(*sl(2, 55), phi_of(P), s, window=W, sinks=sinks, chunk_size=8)
    outs = [u1, u2]
    for t in range(55, 60):
        u_t, s = window_step(*sl(t, t + 1), phi_of(P), s, window=W, sinks=sinks)
        outs.append(u_t)
    close(torch.cat(outs, dim=3), u_all)
    close_sink_state(s, s_all)


@pytest.mark.parametrize("W", [1, 4, 8])
def test_ring_decode_equals_the_step(W):
    B, T, H, G, D, K, V, S, sinks = 3, 9, 2, 3, 4, 6, 5, 2, 3
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)
    st = sink_state(B, H, D, V, W, st, sinks)
    q, k, v, fq, g, mix, f = x
    lengths = st.seen.tolist()
    rk = torch.stack([ring_from_ordered(st.k[b], n) for b, n in enumerate(lengths)])
    rv = torch.stack([ring_from_ordered(st.v[b], n) for b, n in enumerate(lengths)])
    sk, sv = st.sink_k.clone(), st.sink_v.clone()
    s_step, s_ring = st, st.states
    for t in range(T):
        u_ref, s_step = window_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fq[:, :, :, t:t + 1],
                                    g[:, :, :, t:t + 1], mix, f, phi_of(P), s_step, window=W, sinks=sinks)
        u, s_ring = window_decode(q[:, :, :, t], k[:, :, t], v[:, :, t], fq[:, :, :, t], g[:, :, :, t], mix, f,
                                  phi_of(P), s_ring, rk, rv, torch.tensor(lengths), sk, sv)
        lengths = [n + 1 for n in lengths]
        close(u, u_ref[:, :, :, 0])
        close(s_ring, s_step.states)
        close(sk, s_step.sink_k)
        close(sv, s_step.sink_v)
        for b, n in enumerate(lengths):
            close(ordered_from_ring(rk[b], n), s_step.k[b])


def test_gradients_match_reference():
    B, T, H, G, D, K, V, S, W, C, sinks = CASES[0]
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)
    st = sink_state(B, H, D, V, W, st, sinks)
    gen = torch.Generator().manual_seed(1)
    wu = torch.randn(B, H, G, T, V + 1, generator=gen, dtype=torch.float64)
    ws = torch.randn(B, H, S, K, V + 1, generator=gen, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (*x, P, st.sink_k, st.sink_v)]
        *xs, p, sk, sv = leaves
        u, s = fn(*xs, phi_of(p), st._replace(sink_k=sk, sink_v=sv))
        return torch.autograd.grad((u * wu).sum() + (s.states * ws).sum(), leaves)

    d_ref = grads(lambda *a: window_reference(*a, window=W, sinks=sinks))
    d = grads(lambda *a: window_chunked(*a, window=W, sinks=sinks, chunk_size=C))
    for a, b in zip(d, d_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert d[-2].abs().sum() > 0  # the sinks' keys reach the output


def test_bad_sink_state_is_named():
    x, P, st = make_inputs(2, 7, 2, 3, 4, 4, 3, 2, 4)
    with pytest.raises(ValueError, match="sinks must be"):
        window_chunked(*x, phi_of(P), None, window=4, sinks=-1)
    with pytest.raises(ValueError, match="state.sink_k is missing"):
        window_chunked(*x, phi_of(P), st, window=4, sinks=2)
