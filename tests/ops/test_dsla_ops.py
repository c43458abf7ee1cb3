"""dsla.ops.dsla: the reference recurrence, the chunked form, the decode step and fold agree.

Outputs, final states and gradients, in float64 with tight tolerances, over odd lengths, chunk
sizes that do not divide T, one or two states, one or several query heads per KV head, with and
without an initial state; plus strong decay over long sequences, bf16 inputs and bad input.
"""

from __future__ import annotations

import pytest
import torch

from dsla.ops.dsla import dsla_chunked, dsla_fold, dsla_reference, dsla_step

# (B, T, H, G, K, V, S, C)
CASES = [
    (2, 37, 3, 3, 16, 8, 2, 8),
    (1, 1, 2, 1, 8, 4, 1, 64),
    (2, 7, 1, 3, 8, 5, 2, 4),
    (1, 100, 2, 3, 16, 8, 2, 16),
    (1, 100, 1, 1, 8, 8, 1, 64),
    (2, 37, 2, 1, 8, 8, 2, 64),
    (1, 37, 1, 2, 4, 3, 2, 1),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (and stalls badly on a
    busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_id(c) -> str:
    return "B{}-T{}-H{}-G{}-K{}-V{}-S{}-C{}".format(*c)


def make_inputs(B, T, H, G, K, V, S, dtype=torch.float64, init_state=True, decay=3.0, seed=0):
    """Random inputs; log-gates in [-decay, 0]; q, k, v of both signs (φ ≥ 0 is not needed)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, G, T, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, T, K, generator=gen, dtype=torch.float64) / K ** 0.5
    v = torch.randn(B, H, T, V, generator=gen, dtype=torch.float64)
    g = -decay * torch.rand(B, H, S, T, K, generator=gen, dtype=torch.float64)
    mix = torch.rand(H, G, S, generator=gen, dtype=torch.float64)
    st = torch.randn(B, H, S, K, V, generator=gen, dtype=torch.float64) if init_state else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(mix), cast(st)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("init_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_matches_reference(case, init_state):
    B, T, H, G, K, V, S, C = case
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S, init_state=init_state)
    o_ref, s_ref = dsla_reference(q, k, v, g, mix, st)
    o, s = dsla_chunked(q, k, v, g, mix, st, chunk_size=C)
    assert o.shape == (B, H, G, T, V) and s.shape == (B, H, S, K, V)
    assert o.dtype == s.dtype == torch.float64
    close(o, o_ref)
    close(s, s_ref)


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_step_by_step_matches_reference(case):
    B, T, H, G, K, V, S, _ = case
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S)
    o_ref, s_ref = dsla_reference(q, k, v, g, mix, st)
    outs = []
    for t in range(T):
        o_t, st = dsla_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                            g[:, :, :, t:t + 1], mix, st)
        outs.append(o_t)
    close(torch.cat(outs, dim=3), o_ref)
    close(st, s_ref)


def _grads(fn, inputs, weights):
    """Gradients of a fixed random functional of (o, final state) w.r.t. every input."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, s = fn(*leaves)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4], CASES[6]], ids=case_id)
def test_gradients_match_reference(case):
    B, T, H, G, K, V, S, C = case
    inputs = make_inputs(B, T, H, G, K, V, S)
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(B, H, G, T, V, generator=gen, dtype=torch.float64),
               torch.randn(B, H, S, K, V, generator=gen, dtype=torch.float64))
    o_ref, s_ref, d_ref = _grads(dsla_reference, inputs, weights)
    o, s, d = _grads(lambda *x: dsla_chunked(*x, chunk_size=C), inputs, weights)
    close(o, o_ref)
    close(s, s_ref)
    for name, a, b in zip(["q", "k", "v", "log_gates", "mix", "state"], d, d_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d/d{name}: {m}")


def test_step_gradients_match_reference():
    B, T, H, G, K, V, S = 1, 5, 2, 3, 8, 4, 2
    inputs = make_inputs(B, T, H, G, K, V, S)
    weights = (torch.randn(B, H, G, T, V, dtype=torch.float64),
               torch.randn(B, H, S, K, V, dtype=torch.float64))

    def stepwise(q, k, v, g, mix, st):
        outs = []
        for t in range(T):
            o_t, st = dsla_step(q[:, :, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                g[:, :, :, t:t + 1], mix, st)
            outs.append(o_t)
        return torch.cat(outs, dim=3), st

    _, _, d_ref = _grads(dsla_reference, inputs, weights)
    _, _, d = _grads(stepwise, inputs, weights)
    for a, b in zip(d, d_ref):
        close(a, b, 1e-9)


@pytest.fixture(scope="module")
def strong_decay():
    """log-gates around -20 per step (uniform in [-40, 0]) in one state, ~-0.05 in the other."""
    B, T, H, G, K, V, S = 1, 512, 2, 3, 16, 8, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S, dtype=torch.float32, decay=40.0)
    g[:, :, 1] = g[:, :, 1] / 400
    return (q, k, v, g, mix, st), dsla_reference(q, k, v, g, mix, st)


@pytest.mark.parametrize("C", [64, 16])
def test_strong_decay_long_sequence(C, strong_decay):
    """A chunk of 64 decays by ~e^-1280, far past float32's e^-88: the naive
    exp(b_i)·exp(-b_j) factorisation would produce inf and NaN here."""
    (q, k, v, g, mix, st), (o_ref, s_ref) = strong_decay
    o, s = dsla_chunked(q, k, v, g, mix, st, chunk_size=C)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dsla_fold(k, v, g, st, chunk_size=C), s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=case_id)
def test_fold_equals_final_state(case):
    B, T, H, G, K, V, S, C = case
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S)
    _, s_ref = dsla_reference(q, k, v, g, mix, st)
    _, s_chunked = dsla_chunked(q * 7 - 1, k, v, g, mix, st, chunk_size=C)   # q is irrelevant
    close(dsla_fold(k, v, g, st, chunk_size=C), s_ref)
    close(dsla_fold(k, v, g, st, chunk_size=C), s_chunked)
    close(dsla_fold(k, v, g, None, chunk_size=C),
          dsla_reference(q, k, v, g, mix, None)[1])


@pytest.mark.parametrize("split", [1, 13, 16, 50])
def test_split_sequence_equals_one_call(split):
    B, T, H, G, K, V, S = 2, 100, 2, 3, 16, 8, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S)
    o, s = dsla_chunked(q, k, v, g, mix, st, chunk_size=16)
    o1, s1 = dsla_chunked(q[:, :, :, :split], k[:, :, :split], v[:, :, :split],
                          g[:, :, :, :split], mix, st, chunk_size=16)
    o2, s2 = dsla_chunked(q[:, :, :, split:], k[:, :, split:], v[:, :, split:],
                          g[:, :, :, split:], mix, s1, chunk_size=16)
    close(torch.cat([o1, o2], dim=3), o)
    close(s2, s)


def test_long_sequence_several_segments():
    """T longer than one internal segment, with a partial last chunk."""
    B, T, H, G, K, V, S = 1, 1100, 1, 2, 4, 3, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S, decay=0.05)
    o_ref, s_ref = dsla_reference(q, k, v, g, mix, st)
    o, s = dsla_chunked(q, k, v, g, mix, st, chunk_size=32)
    close(o, o_ref, 1e-9)
    close(s, s_ref, 1e-9)


def test_non_contiguous_inputs_and_any_chunk_size():
    B, T, H, G, K, V, S = 2, 37, 2, 3, 8, 5, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S)
    o_ref, s_ref = dsla_reference(q, k, v, g, mix, st)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)         # same values, other strides
    gt = g.permute(3, 0, 1, 2, 4).contiguous().permute(1, 2, 3, 0, 4)
    for C in (48, 5, 3):                                        # not powers of two
        o, s = dsla_chunked(qt, k, v, gt, mix, st, chunk_size=C)
        close(o, o_ref)
        close(s, s_ref)


def test_bf16_inputs_give_float32_state():
    B, T, H, G, K, V, S = 1, 100, 2, 3, 16, 8, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S, dtype=torch.float32)
    o_ref, s_ref = dsla_reference(q, k, v, g, mix, st)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    o, s = dsla_chunked(qb, kb, vb, g, mix, st, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(o.float(), o_ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(s, s_ref, rtol=3e-2, atol=3e-2)
    o1, s1 = dsla_step(qb[:, :, :, :1], kb[:, :, :1], vb[:, :, :1], g[:, :, :, :1], mix, st)
    assert o1.dtype == torch.bfloat16 and s1.dtype == torch.float32
    assert dsla_fold(kb, vb, g, st).dtype == torch.float32


def test_empty_sequence_returns_the_state():
    q, k, v, g, mix, st = make_inputs(2, 0, 2, 3, 8, 4, 2)
    o, s = dsla_chunked(q, k, v, g, mix, st)
    assert o.shape == (2, 2, 3, 0, 4)
    close(s, st)
    close(dsla_fold(k, v, g, st), st)


@pytest.mark.parametrize("bad", ["k", "v", "log_gates", "state"])
def test_fold_rejects_non_finite(bad):
    q, k, v, g, mix, st = make_inputs(1, 37, 2, 1, 8, 4, 2)
    named = {"k": k, "v": v, "log_gates": g, "state": st}
    named[bad].view(-1)[5] = float("nan") if bad != "v" else float("inf")
    with pytest.raises(ValueError, match=bad):
        dsla_fold(named["k"], named["v"], named["log_gates"], named["state"], chunk_size=8)


def test_bad_shapes_raise_helpful_errors():
    q, k, v, g, mix, st = make_inputs(2, 7, 3, 2, 8, 4, 2)
    with pytest.raises(ValueError, match=r"k has 5 heads but q has 3 \(KV heads\)"):
        dsla_chunked(q, torch.randn(2, 5, 7, 8), v, g, mix, st)
    with pytest.raises(ValueError, match=r"v must be \(B, H, T, V\)"):
        dsla_chunked(q, k, v[:, :, :6], g, mix, st)
    with pytest.raises(ValueError, match=r"log_gates has shape \(2, 3, 2, 6, 8\)"):
        dsla_chunked(q, k, v, g[:, :, :, :6], mix, st)
    with pytest.raises(ValueError, match=r"mix must be \(H, G, S\) = \(3, 2, 2\), got \(3, 2\)"):
        dsla_chunked(q, k, v, g, mix[..., 0], st)
    with pytest.raises(ValueError, match=r"state must be \(B, H, S, K, V\) = \(2, 3, 2, 8, 4\)"):
        dsla_chunked(q, k, v, g, mix, st[:, :, :1])
    with pytest.raises(ValueError, match=r"q has shape \(2, 3, 2, 7, 6\)"):
        dsla_reference(q[..., :6], k, v, g, mix, st)
    with pytest.raises(ValueError, match="T = 7"):
        dsla_step(q, k, v, g, mix, st)
    with pytest.raises(ValueError, match="chunk_size"):
        dsla_chunked(q, k, v, g, mix, st, chunk_size=0)
    with pytest.raises(ValueError, match=r"k must be \(B, H, T, K\)"):
        dsla_fold(k[0], v, g)


def test_gradients_across_segments(monkeypatch):
    """The chunked form walks long sequences in segments; gradients flow through the state
    handed from one segment to the next."""
    import dsla.ops.dsla as ops

    monkeypatch.setattr(ops, "_SEGMENT", 32)
    B, T, H, G, K, V, S = 1, 100, 2, 3, 8, 4, 2
    inputs = make_inputs(B, T, H, G, K, V, S)
    weights = (torch.randn(B, H, G, T, V, dtype=torch.float64),
               torch.randn(B, H, S, K, V, dtype=torch.float64))
    o_ref, s_ref, d_ref = _grads(dsla_reference, inputs, weights)
    o, s, d = _grads(lambda *x: dsla_chunked(*x, chunk_size=8), inputs, weights)
    close(o, o_ref)
    close(s, s_ref)
    for a, b in zip(d, d_ref):
        close(a, b, 1e-9)


def test_step_accepts_sliced_inputs_and_returns_a_contiguous_state():
    """The layer hands dsla_step views gathered from (H, G, N, K)-shaped activations."""
    B, T, H, G, K, V, S = 3, 1, 2, 3, 8, 5, 2
    q, k, v, g, mix, st = make_inputs(B, T, H, G, K, V, S)
    o_ref, s_ref = dsla_step(q, k, v, g, mix, st)
    qp = q.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4)    # (B, H, G, 1, K) view
    kp = k.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    gp = g.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4)
    sp = st.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    o, s = dsla_step(qp, kp, v, gp, mix, sp)
    close(o, o_ref)
    close(s, s_ref)
    assert s.is_contiguous()
    _, s2 = dsla_chunked(qp, kp, v, gp, mix, sp)
    assert s2.is_contiguous() and dsla_fold(kp, v, gp, sp).is_contiguous()
