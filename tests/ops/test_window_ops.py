"""dsla.ops.window: the reference loop, the chunked form, the decode step and the fold agree.

Outputs, final states (dual states, window rows and their count) and gradients, in float64, over
T < W, T = W, T not a multiple of W or of the chunk size, W = 1, one or two states, with and
without an initial state (windows of different fills across the batch); a prefill continued by
another prefill and decode steps equals one pass.
"""

from __future__ import annotations

import pytest
import torch

from dsla.ops.window import WindowState, window_chunked, window_fold, window_reference, window_step

# (B, T, H, G, D, K, V, S, W, C)
CASES = [
    (2, 37, 2, 3, 8, 6, 5, 2, 8, 16),   # T not a multiple of W or C
    (1, 5, 1, 2, 4, 4, 3, 2, 8, 4),     # T < W
    (2, 8, 2, 1, 4, 4, 3, 1, 8, 8),     # T = W
    (1, 23, 1, 3, 4, 6, 4, 2, 1, 8),    # W = 1
    (2, 50, 1, 2, 6, 4, 4, 2, 16, 64),  # several blocks, one chunk
    (1, 1, 2, 2, 4, 4, 3, 2, 4, 8),     # one token
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_id(c) -> str:
    return "B{}-T{}-H{}-G{}-D{}-K{}-V{}-S{}-W{}-C{}".format(*c)


def make_inputs(B, T, H, G, D, K, V, S, W, init_state=True, dtype=torch.float64, seed=0):
    """q, k, v, fq, log_gates, mix, factor, phi weight P, state (or None)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, G, T, D), r(B, H, T, D), r(B, H, T, V)
    fq = r(B, H, G, T, K).exp() / K
    g = -2.0 * torch.rand(B, H, S, T, K, generator=gen, dtype=torch.float64)
    mix = torch.rand(H, G, S, generator=gen, dtype=torch.float64)
    factor = 0.5 + torch.rand(H, G, generator=gen, dtype=torch.float64)
    P = r(D, K)
    state = None
    if init_state:
        count = torch.tensor([(W, W // 2 + 1, 0)[b % 3] for b in range(B)])
        valid = (torch.arange(W)[None] >= (W - count)[:, None])[:, None, :, None]
        state = WindowState(r(B, H, S, K, V + 1).abs(), torch.where(valid, r(B, H, W, D), 0),
                            torch.where(valid, r(B, H, W, V), 0), count)
    cast = lambda x: x.to(dtype)  # noqa: E731
    if state is not None:
        state = WindowState(state.states, cast(state.k), cast(state.v), state.count)
    return (cast(q), cast(k), cast(v), cast(fq), g, mix, factor), P, state


def phi_of(P):
    """A positive feature map of keys, (B, H, N, D) -> (B, H, N, K), with a trainable weight."""
    return lambda x: torch.softmax(x @ P.to(x.dtype), dim=-1)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def close_state(a: WindowState, b: WindowState, tol=1e-10):
    close(a.states, b.states, tol)
    close(a.k, b.k, tol)
    close(a.v, b.v, tol)
    assert torch.equal(a.count, b.count)


@pytest.mark.parametrize("init_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_matches_reference(case, init_state):
    B, T, H, G, D, K, V, S, W, C = case
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W, init_state)
    u_ref, s_ref = window_reference(*x, phi_of(P), st, window=W)
    u, s = window_chunked(*x, phi_of(P), st, window=W, chunk_size=C)
    assert u.shape == (B, H, G, T, V + 1) and s.k.shape == (B, H, W, D) and s.v.shape == (B, H, W, V)
    close(u, u_ref)
    close_state(s, s_ref)
    n0 = torch.zeros(B, dtype=torch.long) if st is None else st.count
    assert torch.equal(s.count, (n0 + T).clamp(max=W))
    if T >= W:  # the window holds the last W new rows
        close(s.k, x[1][:, :, T - W:], 0)


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("T", [37, 64, 81])
def test_the_exact_part_in_query_segments_is_the_same(T, sinks, monkeypatch):
    """Queries in segments of 32 (two blocks of 16; T = 37 and 81 leave a short, padded last
    segment): equal to one segment for all T (the same blocks: equal up to the matmuls' summation
    order) and to the reference."""
    import dsla.ops.window as window_mod
    B, H, G, D, K, V, S, W, C = 2, 2, 3, 8, 6, 5, 2, 8, 16
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W, init_state=not sinks)
    u_one, s_one = window_chunked(*x, phi_of(P), st, window=W, sinks=sinks, chunk_size=C)
    monkeypatch.setattr(window_mod, "_BAND_SEGMENT", 32)
    u_seg, s_seg = window_chunked(*x, phi_of(P), st, window=W, sinks=sinks, chunk_size=C)
    close(u_seg, u_one, 1e-13)
    close_state(s_seg, s_one, 0)
    u_ref, _ = window_reference(*x, phi_of(P), st, window=W, sinks=sinks)
    close(u_seg, u_ref)


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_steps_and_fold_match_reference(case):
    B, T, H, G, D, K, V, S, W, C = case
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)
    q, k, v, fq, g, mix, f = x
    u_ref, s_ref = window_reference(*x, phi_of(P), st, window=W)
    outs, s = [], st
    for t in range(T):
        u_t, s = window_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fq[:, :, :, t:t + 1],
                             g[:, :, :, t:t + 1], mix, f, phi_of(P), s, window=W)
        outs.append(u_t)
    close(torch.cat(outs, dim=3), u_ref)
    close_state(s, s_ref)
    close_state(window_fold(k, v, g, phi_of(P), st, window=W, chunk_size=C), s_ref)


def test_prefill_prefill_decode_equals_one_pass():
    """Prefill 37 tokens, then 50 more, then 5 single decode steps == one pass over 92."""
    B, T, H, G, D, K, V, S, W = 2, 92, 2, 3, 8, 6, 5, 2, 16
    x, P, _ = make_inputs(B, T, H, G, D, K, V, S, W, init_state=False)
    q, k, v, fq, g, mix, f = x
    u_all, s_all = window_chunked(*x, phi_of(P), None, window=W, chunk_size=8)
    def sl(a, b):  # the inputs of tokens a..b-1
        return q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], fq[:, :, :, a:b], g[:, :, :, a:b], mix, f

    u1, s = window_chunked(*sl(0, 37), phi_of(P), None, window=W, chunk_size=8)
    u2, s = window_chunked(*sl(37, 87), phi_of(P), s, window=W, chunk_size=8)
    outs = [u1, u2]
    for t in range(87, 92):
        u_t, s = window_step(*sl(t, t + 1), phi_of(P), s, window=W)
        outs.append(u_t)
    close(torch.cat(outs, dim=3), u_all)
    close_state(s, s_all)
    close_state(window_fold(k, v, g, phi_of(P), None, window=W, chunk_size=8), s_all)


def _grads(fn, x, P, st, weights):
    """Gradients of a fixed random functional of (u, final states, window rows) w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (*x, P, st.states, st.k, st.v)]
    *xs, p, s0, k0, v0 = leaves
    u, s = fn(*xs, phi_of(p), WindowState(s0, k0, v0, st.count))
    loss = (u * weights[0]).sum() + (s.states * weights[1]).sum() + (s.k * weights[2]).sum()
    return torch.autograd.grad(loss, leaves)


NAMES = ["q", "k", "v", "fq", "log_gates", "mix", "factor", "phi", "states", "window_k", "window_v"]


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=case_id)
def test_gradients_match_reference(case):
    B, T, H, G, D, K, V, S, W, C = case
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(B, H, G, T, V + 1, generator=gen, dtype=torch.float64),
               torch.randn(B, H, S, K, V + 1, generator=gen, dtype=torch.float64),
               torch.randn(B, H, W, D, generator=gen, dtype=torch.float64)]
    d_ref = _grads(lambda *a: window_reference(*a, window=W), x, P, st, weights)
    d = _grads(lambda *a: window_chunked(*a, window=W, chunk_size=C), x, P, st, weights)
    for name, a, b in zip(NAMES, d, d_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d/d{name}: {m}")
    if T == 5:  # the decode step too (T = 5 keeps the loop short)
        def stepwise(q, k, v, fq, g, mix, f, phi, s):
            outs = []
            for t in range(T):
                u_t, s = window_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                     fq[:, :, :, t:t + 1], g[:, :, :, t:t + 1], mix, f, phi, s, window=W)
                outs.append(u_t)
            return torch.cat(outs, dim=3), s
        for name, a, b in zip(NAMES, _grads(stepwise, x, P, st, weights), d_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"step d/d{name}: {m}")


def test_reference_gradients_are_the_true_derivative():
    """Finite differences (torch.autograd.gradcheck) on a tiny case: the window max m_t is part
    of the function (the linear part is not rescaled by it), so its gradient must be included."""
    B, T, H, G, D, K, V, S, W = 1, 4, 1, 2, 3, 2, 2, 2, 2
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)

    def fn(q, k, v, fq, P, f):
        u, s = window_reference(q, k, v, fq, x[4], x[5], f, phi_of(P), st, window=W)
        return u, s.states

    inputs = [t.clone().requires_grad_(True) for t in (x[0], x[1], x[2], x[3], P, x[6])]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_bf16_rows_stay_bf16_and_states_float32():
    B, T, H, G, D, K, V, S, W = 1, 20, 2, 3, 8, 6, 5, 2, 8
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W, dtype=torch.float32)
    x32 = tuple(t.float() for t in x)
    st32 = WindowState(st.states.float(), st.k, st.v, st.count)
    u_ref, s_ref = window_reference(*x32, phi_of(P), st32, window=W)
    xb = tuple(t.bfloat16() if i < 4 else t.float() for i, t in enumerate(x32))
    stb = WindowState(st32.states, st.k.bfloat16(), st.v.bfloat16(), st.count)
    u, s = window_chunked(*xb, phi_of(P), stb, window=W)
    assert u.dtype == s.k.dtype == s.v.dtype == torch.bfloat16 and s.states.dtype == torch.float32
    torch.testing.assert_close(u.float(), u_ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(s.states, s_ref.states, rtol=5e-2, atol=5e-2)
    assert window_fold(xb[1], xb[2], xb[4], phi_of(P), stb, window=W).states.dtype == torch.float32


def test_empty_input_returns_the_state():
    x, P, st = make_inputs(2, 0, 2, 3, 4, 4, 3, 2, 4)
    u, s = window_chunked(*x, phi_of(P), st, window=4)
    assert u.shape == (2, 2, 3, 0, 4)
    close_state(s, st)


def test_fold_rejects_non_finite_window_rows():
    x, P, _ = make_inputs(1, 10, 2, 1, 4, 4, 3, 2, 16, init_state=False)
    k = x[1].clone()
    k[0, 0, 3, 0] = float("nan")  # still inside the window: not in the dual states
    with pytest.raises(ValueError, match="non-finite"):
        window_fold(k, x[2], x[4], phi_of(P), None, window=16)


def test_bad_input_is_named():
    x, P, st = make_inputs(2, 7, 2, 3, 4, 4, 3, 2, 4)
    q, k, v, fq, g, mix, f = x
    with pytest.raises(ValueError, match="window must be a positive"):
        window_chunked(*x, phi_of(P), st, window=0)
    with pytest.raises(ValueError, match=r"state.k must be \(2, 2, 5, 4\) for window 5"):
        window_chunked(*x, phi_of(P), st, window=5)
    with pytest.raises(ValueError, match="q must be"):
        window_chunked(q[..., :3], k, v, fq, g, mix, f, phi_of(P), st, window=4)
    with pytest.raises(ValueError, match="T = 7"):
        window_step(*x, phi_of(P), st, window=4)


@pytest.mark.parametrize("W", [1, 4, 8])
def test_ring_decode_equals_the_step(W):
    """window_decode on ring-buffer windows == window_step on right-aligned ones, over several
    steps, for a batch whose sequences have seen fewer, exactly and more than W tokens."""
    from dsla.ops.window import ordered_from_ring, ring_from_ordered, window_decode
    B, T, H, G, D, K, V, S = 3, 6, 2, 3, 4, 6, 5, 2
    x, P, st = make_inputs(B, T, H, G, D, K, V, S, W)
    q, k, v, fq, g, mix, f = x
    lengths = [W + 3, W // 2 + 1, 0]  # matches make_inputs' counts (W, W // 2 + 1, 0)
    rk = torch.stack([ring_from_ordered(st.k[b], n) for b, n in enumerate(lengths)])
    rv = torch.stack([ring_from_ordered(st.v[b], n) for b, n in enumerate(lengths)])
    s_step, s_ring = st, st.states
    for t in range(T):
        u_ref, s_step = window_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fq[:, :, :, t:t + 1],
                                    g[:, :, :, t:t + 1], mix, f, phi_of(P), s_step, window=W)
        u, s_ring = window_decode(q[:, :, :, t], k[:, :, t], v[:, :, t], fq[:, :, :, t], g[:, :, :, t], mix, f,
                                  phi_of(P), s_ring, rk, rv, torch.tensor(lengths))
        lengths = [n + 1 for n in lengths]
        close(u, u_ref[:, :, :, 0])
        close(s_ring, s_step.states)
        for b, n in enumerate(lengths):
            close(ordered_from_ring(rk[b], n), s_step.k[b])
            close(ordered_from_ring(rv[b], n), s_step.v[b])
