"""DSLA with an exact sliding window: softmax over the last W tokens, the dual states for older ones.

Tokens leave the window and enter the states. For a query at position t (letters as in
dsla/ops/dsla.py, plus D the head dim of q and k):

    exact part    keys j in (t-W, t]:   s_tj = q_t · k_j / √D,   w_tj = exp(s_tj - m_t),
                                        m_t = max of s_tj over the window
    linear part   token j enters the states at time j + W (nothing enters while t < W):
                  S_s[t] = diag(exp(g_s[t])) S_s[t-1] + φ(k_{t-W})ᵀ [v_{t-W}, 1]
                  u_lin[t] = Σ_s mix_s · φ(q_t) S_s[t]                         (V+1 wide)
    combined      u[t] = u_lin[t] + f · [Σ_j w_tj v_j, Σ_j w_tj]
                  o[t] = u[t, :V] / (u[t, V] + eps)                      (the caller divides)

Attention sinks (``sinks`` = S ≥ 0, keyword of every form): the first S tokens of a sequence
never enter the states. Once token j < S has left the window it stays exact, a key every later
query scores alongside the window's (same m_t, same f): the exact part's keys are then
(t-W, t] ∪ {j < S : j ≤ t-W}. Softmax models put much of their attention on the first token;
without this, that mass would be folded into decaying states once the token left the window.

The decays g[t] come from the current token t, as without a window; so the linear part is exactly
``dsla_*`` run over φ(k), [v, 1] shifted right by W (zero rows where nothing enters: a zero key
adds nothing) with unshifted queries and gates, and the forms below reuse those functions. m_t is
a deterministic function of the window's scores, so every form computes the same u.

Forms with one signature, ``fn(q, k, v, fq, log_gates, mix, factor, feature, state=None, *,
window, ...) -> (u, state)`` (the fold, like ``dsla_fold``, takes no queries and returns the state):

    q          (B, H, G, T, D)   queries after RoPE (exact part)
    k          (B, H, T, D)      keys after RoPE
    v          (B, H, T, V)
    fq         (B, H, G, T, K)   feature-mapped queries (linear part)
    log_gates  (B, H, S, T, K)   ≤ 0, computed from the current tokens
    mix        (H, G, S)         per query head weights of the states
    factor     (H, G)            f > 0, the window's weight per query head
    feature    callable (B, H, N, D) -> (B, H, N, K): φ of keys (applied to the rows entering
               the states; a function so the same keys serve the window and, W tokens later, φ)
    state      ``WindowState`` or None (zero states, empty window)
    window     W ≥ 1
    sinks      S ≥ 0 (default 0); with S > 0 the state carries the sink rows and the token count
    returns u  (B, H, G, T, V+1) in fq.dtype and the final ``WindowState``

- ``window_reference``: a per-step loop over t with a list of the last W (k, v) rows; the definition.
- ``window_chunked``: prefill and training. The exact part is banded attention over blocks of
  Q = min(T, 16) queries against the W keys before the block plus its own (never T × T); the
  linear part is ``dsla_chunked`` over the shifted rows.
- ``window_step``: one decode step (batched over requests with different window fills).
- ``window_fold``: the state a prefill over (k, v) would leave, with no queries (KV cache → state).
- ``window_decode``: the serving engine's decode step, equal to ``window_step`` but on windows
  kept as ring buffers (token i at row i mod W, see ``ring_from_ordered``), updated in place: no
  O(W) shift per token, and a few batched ops for R requests (the step's cost is op count).

Accumulation is float32 (float64 for float64 fq, for gradient checks); the window rows keep k's
and v's dtype (the model dtype), so a prefill and a fold store the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from dsla.ops.dsla import _acc_dtype, dsla_chunked, dsla_fold, dsla_reference, dsla_step

__all__ = ["WindowState", "ordered_from_ring", "ring_from_ordered", "window_chunked", "window_decode",
           "window_fold", "window_reference", "window_step"]

Feature = Callable[[Tensor], Tensor]


class WindowState(NamedTuple):
    """Dual states plus the last W keys and values of a batch of sequences.

    The window rows are right-aligned: rows W - count .. W - 1 hold the last ``count`` tokens,
    oldest first; the rows before them are zeros (and ignored).
    """

    states: Tensor  # (B, H, S, K, V+1) float32 (float64 for float64 inputs)
    k: Tensor  # (B, H, W, D) keys after RoPE
    v: Tensor  # (B, H, W, V)
    count: Tensor  # (B,) int64, valid rows, ≤ W
    # with attention sinks only (None without): the first ``sinks`` tokens' keys and values (row j
    # is token j; rows of tokens not yet seen are zeros) and the tokens seen, of which count = min(seen, W)
    sink_k: Tensor | None = None  # (B, H, sinks, D)
    sink_v: Tensor | None = None  # (B, H, sinks, V)
    seen: Tensor | None = None  # (B,) int64


def _check(q: Tensor | None, k: Tensor, v: Tensor, fq: Tensor | None, log_gates: Tensor,
           state: WindowState | None, window: int, sinks: int = 0) -> tuple[int, ...]:
    """Validate what dsla's own checks do not see; return (B, H, T, D, V, W)."""
    if int(window) < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window}; "
                         "window 0 is plain DSLA (dsla.ops.dsla)")
    if int(sinks) < 0:
        raise ValueError(f"sinks must be a number of tokens >= 0, got {sinks}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k must be (B, H, T, D) and v (B, H, T, V) alike, got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, H, T, D = k.shape
    V, W = v.shape[3], int(window)
    if q is not None:
        if q.dim() != 5 or (q.shape[0], q.shape[1], q.shape[3], q.shape[4]) != (B, H, T, D):
            raise ValueError(f"q must be (B, H, G, T, D) = ({B}, {H}, G, {T}, {D}) to match k "
                             f"{tuple(k.shape)}, got shape {tuple(q.shape)}")
        if fq is None or fq.dim() != 5 or tuple(fq.shape[:4]) != tuple(q.shape[:4]):
            raise ValueError(f"fq must be (B, H, G, T, K) with (B, H, G, T) = {tuple(q.shape[:4])}, "
                             f"got {None if fq is None else tuple(fq.shape)}")
    if log_gates.dim() != 5 or log_gates.shape[3] != T:
        raise ValueError(f"log_gates must be (B, H, S, T, K) with T = {T}, got shape {tuple(log_gates.shape)}")
    if state is not None:
        want = {"k": (B, H, W, D), "v": (B, H, W, V), "count": (B,)}
        if sinks:
            want |= {"sink_k": (B, H, sinks, D), "sink_v": (B, H, sinks, V), "seen": (B,)}
        for name, shape in want.items():
            if getattr(state, name) is None:
                raise ValueError(f"state.{name} is missing: a state for {sinks} attention sinks carries "
                                 "sink_k, sink_v and seen")
            got = tuple(getattr(state, name).shape)
            if got != shape:
                raise ValueError(f"state.{name} must be {shape} for window {W}, got {got}")
    return B, H, T, D, V, W


def _initial(state: WindowState | None, k: Tensor, v: Tensor, log_gates: Tensor, W: int,
             acc: torch.dtype, sinks: int = 0) -> WindowState:
    B, H, _, D = k.shape
    V = v.shape[3]
    if state is None:
        S, K = log_gates.shape[2], log_gates.shape[4]
        extra = ()
        if sinks:
            extra = (k.new_zeros(B, H, sinks, D), v.new_zeros(B, H, sinks, V),
                     torch.zeros(B, dtype=torch.long, device=k.device))
        return WindowState(torch.zeros(B, H, S, K, V + 1, dtype=acc, device=k.device),
                           k.new_zeros(B, H, W, D), v.new_zeros(B, H, W, V),
                           torch.zeros(B, dtype=torch.long, device=k.device), *extra)
    extra = ()
    if sinks:
        extra = (state.sink_k.to(k.dtype), state.sink_v.to(v.dtype),
                 state.seen.to(device=k.device, dtype=torch.long))
    return WindowState(state.states.to(acc), state.k.to(k.dtype), state.v.to(v.dtype),
                       state.count.to(device=k.device, dtype=torch.long), *extra)


def _sink_rows(st: WindowState, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The sink rows after the T new tokens: row j takes new token j - seen when 0 ≤ j - seen < T."""
    sk, sv, seen = st.sink_k, st.sink_v, st.seen
    B, T = k.shape[0], k.shape[2]
    if T == 0:
        return sk.clone(), sv.clone()
    b = torch.arange(B, device=k.device)
    ks, vs = [], []
    for j in range(sk.shape[2]):
        i = j - seen  # (B,) the new token that is sink j
        take = ((i >= 0) & (i < T))[:, None, None]
        ic = i.clamp(0, T - 1)
        ks.append(torch.where(take, k[b, :, ic], sk[:, :, j]))
        vs.append(torch.where(take, v[b, :, ic], sv[:, :, j]))
    return torch.stack(ks, dim=2), torch.stack(vs, dim=2)


def _not_sinks(st: WindowState, T: int, sinks: int) -> Tensor:
    """(B, T): False where the row entering the states at new token t is a sink (token seen - W + t < S)."""
    W = st.k.shape[2]
    return st.seen[:, None] - W + torch.arange(T, device=st.seen.device)[None] >= sinks


def _sinks_visible(seen: Tensor, T: int, W: int, sinks: int) -> Tensor:
    """(B, T, S): whether new token t (token seen + t) scores sink j: j has left its window, j ≤ seen + t - W."""
    t = seen[:, None, None] + torch.arange(T, device=seen.device)[None, :, None]
    return torch.arange(sinks, device=seen.device)[None, None] <= t - W


def _concat(st: WindowState, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The window rows followed by the new ones, (B, H, W+T, ·), invalid rows zeroed, and the
    validity of each row (B, W+T): row i is a token iff i ≥ W - count."""
    W, T = st.k.shape[2], k.shape[2]
    valid = torch.arange(W + T, device=k.device)[None] >= (W - st.count)[:, None]  # (B, W+T)
    vm = valid[:, None, :W, None]  # only window rows can be empty
    kc = torch.cat([torch.where(vm, st.k, 0), k], dim=2)  # (B, H, W+T, D)
    vc = torch.cat([torch.where(vm, st.v, 0), v], dim=2)  # (B, H, W+T, V)
    return kc, vc, valid


def _entering(kc: Tensor, vc: Tensor, valid: Tensor, T: int, feature: Feature,
              acc: torch.dtype, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """φ(k) and [v, 1] of the rows that enter the states during the T new tokens: row i of the
    concatenation enters at new token i (it is W tokens older). Zero where no token enters;
    ``keep`` (B, T), if given, also zeroes the rows it marks False (sinks)."""
    m = valid[:, :T] if keep is None else valid[:, :T] & keep
    m = m[:, None, :, None]  # (B, 1, T, 1)
    fk = torch.where(m, feature(kc[:, :, :T]).to(acc), 0)  # (B, H, T, K)
    v = vc[:, :, :T].to(acc)
    v1 = torch.where(m, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1), 0)  # (B, H, T, V+1)
    return fk, v1


def _next_window(kc: Tensor, vc: Tensor, st: WindowState, T: int,
                 sinks: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, ...]:
    """The last W rows (copies: a view would keep the whole concatenation alive) and their count;
    with sinks, then the new sink rows and the tokens seen."""
    W = st.k.shape[2]
    out = (kc[:, :, -W:].clone(memory_format=torch.contiguous_format),
           vc[:, :, -W:].clone(memory_format=torch.contiguous_format), (st.count + T).clamp(max=W))
    return out if sinks is None else (*out, *sinks, st.seen + T)


def _combine(u_lin: Tensor, num: Tensor, den: Tensor, factor: Tensor) -> Tensor:
    """u_lin (B, H, G, T, V+1) + f · [num, den]; num (B, H, G, T, V), den (B, H, G, T, 1)."""
    f = factor.to(u_lin.dtype)[None, :, :, None, None]  # (1, H, G, 1, 1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u_lin, num, den, f)):
        return u_lin + f * torch.cat([num, den], dim=-1)
    V = num.shape[-1]  # without autograd in place: no (B, H, G, T, V+1) temporaries
    u_lin[..., :V].addcmul_(f, num)
    u_lin[..., V:].addcmul_(f, den)
    return u_lin


def window_reference(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, log_gates: Tensor, mix: Tensor,
                     factor: Tensor, feature: Feature, state: WindowState | None = None, *,
                     window: int, sinks: int = 0) -> tuple[Tensor, WindowState]:
    """Token by token, per sequence: a list of the last W rows; the oldest leaves and enters the
    states (one dsla_reference step), unless it is one of the first ``sinks`` tokens: those stay
    in a list of exact rows. Slow; the definition the other forms match."""
    B, H, T, D, V, W = _check(q, k, v, fq, log_gates, state, window, sinks)
    acc = _acc_dtype(fq)
    st = _initial(state, k, v, log_gates, W, acc, sinks)
    G = q.shape[2]
    us, finals, ks, vs, sks, svs = [], [], [], [], [], []
    for b in range(B):
        n = int(st.count[b])
        seen = int(st.seen[b]) if sinks else 0
        rows = [(st.k[b, :, i], st.v[b, :, i]) for i in range(W - n, W)]  # (H, D), (H, V) each
        sink = {j: (st.sink_k[b, :, j], st.sink_v[b, :, j]) for j in range(min(sinks, seen))}
        s = st.states[b:b + 1]  # (1, H, S, K, V+1)
        ub = []
        for t in range(T):
            p = seen + t  # this token's position in its sequence
            rows.append((k[b, :, t], v[b, :, t]))
            if p < sinks:
                sink[p] = (k[b, :, t], v[b, :, t])
            fk = fq.new_zeros(1, H, 1, fq.shape[-1], dtype=acc)
            v1 = fq.new_zeros(1, H, 1, V + 1, dtype=acc)
            if len(rows) > W:  # token p - W leaves the window and enters the states (a sink: stays exact)
                ke, ve = rows.pop(0)
                if not sinks or p - W >= sinks:
                    fk = feature(ke[None, :, None]).to(acc)  # (1, H, 1, K)
                    v1 = torch.cat([ve.to(acc), ve.new_ones(H, 1, dtype=acc)], dim=-1)[None, :, None]
            u_lin, s = dsla_reference(fq[b:b + 1, :, :, t:t + 1].to(acc), fk, v1,
                                      log_gates[b:b + 1, :, :, t:t + 1], mix, s)  # (1, H, G, 1, V+1)
            exact = rows + [sink[j] for j in sorted(sink) if j <= p - W]  # the window, then sinks outside it
            kw = torch.stack([r[0] for r in exact], dim=1).to(acc)  # (H, n, D)
            vw = torch.stack([r[1] for r in exact], dim=1).to(acc)  # (H, n, V)
            sc = q[b, :, :, t].to(acc) @ kw.mT / math.sqrt(D)  # (H, G, n)
            w = (sc - sc.amax(-1, keepdim=True)).exp()
            ub.append(_combine(u_lin, (w @ vw)[None, :, :, None], w.sum(-1)[None, :, :, None, None], factor))
        us.append(torch.cat(ub, dim=3) if ub else fq.new_zeros(1, H, G, 0, V + 1, dtype=acc))
        finals.append(s)
        kb, vb = st.k.new_zeros(H, W, D), st.v.new_zeros(H, W, V)
        if rows:
            kb[:, W - len(rows):] = torch.stack([r[0] for r in rows], dim=1)
            vb[:, W - len(rows):] = torch.stack([r[1] for r in rows], dim=1)
        ks.append(kb)
        vs.append(vb)
        if sinks:
            skb, svb = st.sink_k.new_zeros(H, sinks, D), st.sink_v.new_zeros(H, sinks, V)
            for j, (kj, vj) in sink.items():
                skb[:, j], svb[:, j] = kj, vj
            sks.append(skb)
            svs.append(svb)
    u = torch.cat(us).to(fq.dtype)
    extra = (torch.stack(sks), torch.stack(svs), st.seen + T) if sinks else ()
    return u, WindowState(torch.cat(finals), torch.stack(ks), torch.stack(vs), (st.count + T).clamp(max=W), *extra)


_QUERY_BLOCK = 16  # queries per block of the banded exact part: each block computes W + Q scores
#                   per query, W + 1 of them in the band; on CPU 16 beat 64 (about 2x) and 8 at W = 64


_BAND_SEGMENT = 512  # queries per call of _band_segment: its scores stay cache-sized. At T = 8192,
#                     W = 512 (2-core AVX-512 CPU) one call for all took 264-267 ms per layer, 512-query
#                     segments 127-132 ms; the same blocks, so equal up to the matmuls' summation order
assert _BAND_SEGMENT % _QUERY_BLOCK == 0, "segments must hold whole query blocks"


def _band(q: Tensor, kc: Tensor, vc: Tensor, valid: Tensor, W: int,
          sink: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Exact part for T new queries over the concatenation kc (W window rows, then the T new):
    ``_band_segment`` over segments of ``_BAND_SEGMENT`` queries (a multiple of the query block,
    so the blocks, and the result, are those of one call over all T)."""
    T = q.shape[3]
    if T <= _BAND_SEGMENT:
        return _band_segment(q, kc, vc, valid, W, sink)
    Q = min(T, _QUERY_BLOCK)  # for every segment, the last (shorter) one too
    nums, dens = [], []
    for t0 in range(0, T, _BAND_SEGMENT):
        t1 = min(t0 + _BAND_SEGMENT, T)
        seg_sink = None if sink is None else (sink[0], sink[1], sink[2][:, t0:t1])
        num, den = _band_segment(q[:, :, :, t0:t1], kc[:, :, t0:t1 + W], vc[:, :, t0:t1 + W], valid[:, t0:t1 + W],
                                 W, seg_sink, Q)
        nums.append(num)
        dens.append(den)
    return torch.cat(nums, dim=3), torch.cat(dens, dim=3)


def _band_segment(q: Tensor, kc: Tensor, vc: Tensor, valid: Tensor, W: int,
                  sink: tuple[Tensor, Tensor, Tensor] | None = None, Q: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact part for T new queries over the concatenation kc (W window rows, then the T new).

    Queries in blocks of Q (default min(T, _QUERY_BLOCK)); block n's keys are concatenation rows
    nQ .. nQ+W+Q-1 (the W before the block and its own Q). Query a of a block sees key c of its
    keys iff a < c ≤ W + a (the band) and the key row is a token. ``sink``: (sink_k (B, H, S, D),
    sink_v (B, H, S, V), visible (B, T, S)), extra keys each query sees where visible. Returns
    num (B, H, G, T, V) and den (B, H, G, T, 1), computed in q's dtype.
    """
    B, H, G, T, D = q.shape
    V = vc.shape[3]
    Q = Q or min(T, _QUERY_BLOCK)
    nb = -(-T // Q)
    P = nb * Q
    pad = P - T
    if pad:  # the padded queries see real or zero keys on their diagonal: no empty rows
        q = torch.cat([q, q.new_zeros(B, H, G, pad, D)], dim=3)
        kc = torch.cat([kc, kc.new_zeros(B, H, pad, D)], dim=2)
        vc = torch.cat([vc, vc.new_zeros(B, H, pad, V)], dim=2)
        valid = torch.cat([valid, valid.new_ones(B, pad)], dim=1)
    qb = q.view(B, H, G, nb, Q, D).transpose(2, 3).reshape(B, H, nb, G * Q, D) / math.sqrt(D)
    kb = kc.unfold(2, W + Q, Q)  # (B, H, nb, D, W+Q)
    vb = vc.unfold(2, W + Q, Q).transpose(-1, -2)  # (B, H, nb, W+Q, V)
    grad = torch.is_grad_enabled() and (qb.requires_grad or kb.requires_grad or vb.requires_grad)
    s = _block_matmul(qb, kb, grad).view(B, H, nb, G, Q, W + Q)  # scores
    a = torch.arange(Q, device=q.device)[:, None]
    c = torch.arange(W + Q, device=q.device)[None]
    band = (c > a) & (c <= a + W)  # (Q, W+Q)
    off = ~(band & valid.unfold(1, W + Q, Q)[:, None, :, None, None, :])  # (B, 1, nb, 1, Q, W+Q)
    ss = None
    if sink is not None:  # sink scores (B, H, nb, G, Q, S): more keys of the same softmax
        sk, sv, vis = sink
        S = sk.shape[2]
        if pad:
            vis = torch.cat([vis, vis.new_zeros(B, pad, S)], dim=1)
        ss = (qb @ sk.to(qb.dtype).mT[:, :, None]).view(B, H, nb, G, Q, S)
        ss = ss.masked_fill(~vis.view(B, 1, nb, 1, Q, S), float("-inf"))
    s = s.masked_fill(off, float("-inf")) if grad else s.masked_fill_(off, float("-inf"))
    m = s.amax(-1, keepdim=True)  # finite: the diagonal is in the band
    if ss is not None:
        m = torch.maximum(m, ss.amax(-1, keepdim=True))
    # without autograd in place: the scores are the biggest temporary
    w = (s - m).exp() if grad else s.sub_(m).exp_()  # (B, H, nb, G, Q, W+Q)
    num = _block_matmul(w.view(B, H, nb, G * Q, W + Q), vb, grad).view(B, H, nb, G, Q, V)
    den = w.sum(-1)
    if ss is not None:
        ws = (ss - m).exp()
        num = num + (ws.view(B, H, nb, G * Q, S) @ sv.to(vb.dtype)[:, :, None]).view(B, H, nb, G, Q, V)
        den = den + ws.sum(-1)
    num = num.transpose(2, 3).reshape(B, H, G, P, V)[:, :, :, :T]
    den = den.transpose(2, 3).reshape(B, H, G, P, 1)[:, :, :, :T]
    return num, den


def _block_matmul(a: Tensor, b: Tensor, grad: bool) -> Tensor:
    """a @ b for (B, H, nb, ·, ·) operands whose b holds overlapping ``unfold`` views. Without
    autograd, one ``bmm`` per sequence and head takes the views as they are; a matmul batched over
    (B, H, nb) would first copy them, each key once per block."""
    if grad:
        return a @ b
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    for i in range(a.shape[0]):
        for h in range(a.shape[1]):
            torch.bmm(a[i, h], b[i, h], out=out[i, h])
    return out


def window_chunked(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, log_gates: Tensor, mix: Tensor,
                   factor: Tensor, feature: Feature, state: WindowState | None = None, *,
                   window: int, sinks: int = 0, chunk_size: int = 64) -> tuple[Tensor, WindowState]:
    """Prefill / training form; equals window_reference. Any T ≥ 0; continues from ``state``
    (its window rows go in front of the new tokens). Differentiable through plain torch ops."""
    *_, T, _, _, W = _check(q, k, v, fq, log_gates, state, window, sinks)
    acc = _acc_dtype(fq)
    st = _initial(state, k, v, log_gates, W, acc, sinks)
    kc, vc, valid = _concat(st, k, v)
    fk, v1 = _entering(kc, vc, valid, T, feature, acc, _not_sinks(st, T, sinks) if sinks else None)
    u_lin, states = dsla_chunked(fq.to(acc), fk, v1, log_gates, mix, st.states, chunk_size=chunk_size)
    new_sinks = _sink_rows(st, k, v) if sinks else None
    if T:
        sink = None if not sinks else (*new_sinks, _sinks_visible(st.seen, T, W, sinks))
        u = _combine(u_lin, *_band(q.to(acc), kc.to(acc), vc.to(acc), valid, W, sink), factor)
    else:
        u = u_lin
    return u.to(fq.dtype), WindowState(states, *_next_window(kc, vc, st, T, new_sinks))


def window_step(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, log_gates: Tensor, mix: Tensor,
                factor: Tensor, feature: Feature, state: WindowState | None = None, *,
                window: int, sinks: int = 0) -> tuple[Tensor, WindowState]:
    """One decode step (T must be 1), batched over B sequences whose windows may hold different
    numbers of rows."""
    *_, T, D, _, W = _check(q, k, v, fq, log_gates, state, window, sinks)
    if T != 1:
        raise ValueError(f"window_step takes exactly one token, got T = {T}; use window_chunked for T > 1")
    acc = _acc_dtype(fq)
    st = _initial(state, k, v, log_gates, W, acc, sinks)
    kc, vc, valid = _concat(st, k, v)  # (B, H, W+1, ·): row 0 leaves the window, rows 1..W are it
    fk, v1 = _entering(kc, vc, valid, 1, feature, acc, _not_sinks(st, 1, sinks) if sinks else None)
    u_lin, states = dsla_step(fq.to(acc), fk, v1, log_gates, mix, st.states)  # (B, H, G, 1, V+1)
    keys, vals, ok = kc[:, :, 1:], vc[:, :, 1:], valid[:, 1:]
    new_sinks = None
    if sinks:  # the sinks outside the window are more keys of the same softmax
        new_sinks = _sink_rows(st, k, v)
        keys, vals = torch.cat([keys, new_sinks[0]], dim=2), torch.cat([vals, new_sinks[1]], dim=2)
        ok = torch.cat([ok, _sinks_visible(st.seen, 1, W, sinks)[:, 0]], dim=1)
    s = (q[:, :, :, 0].to(acc) / math.sqrt(D)) @ keys.to(acc).mT  # (B, H, G, W[+S])
    s = s.masked_fill(~ok[:, None, None], float("-inf"))
    w = (s - s.amax(-1, keepdim=True)).exp()
    num = (w @ vals.to(acc))[:, :, :, None]  # (B, H, G, 1, V)
    u = _combine(u_lin, num, w.sum(-1)[..., None, None], factor)
    return u.to(fq.dtype), WindowState(states, *_next_window(kc, vc, st, 1, new_sinks))


def window_fold(k: Tensor, v: Tensor, log_gates: Tensor, feature: Feature,
                state: WindowState | None = None, *, window: int, sinks: int = 0,
                chunk_size: int = 64) -> WindowState:
    """The ``WindowState`` a prefill over (k, v) would leave behind (KV cache → state): the rows
    older than the window folded into the states (but the first ``sinks`` tokens, kept), the last
    min(W, count + T) rows kept.

    Raises ValueError when a result is not finite: a NaN must never be saved in a state.
    """
    *_, T, _, _, W = _check(None, k, v, None, log_gates, state, window, sinks)
    acc = _acc_dtype(log_gates)
    st = _initial(state, k, v, log_gates, W, acc, sinks)
    kc, vc, valid = _concat(st, k, v)
    fk, v1 = _entering(kc, vc, valid, T, feature, acc, _not_sinks(st, T, sinks) if sinks else None)
    states = dsla_fold(fk, v1, log_gates, st.states, chunk_size=chunk_size)
    out = _next_window(kc, vc, st, T, _sink_rows(st, k, v) if sinks else None)
    if not all(torch.isfinite(t).all() for t in out[:2] + out[3:5]):
        raise ValueError("window_fold produced non-finite window rows; non-finite input(s): k or v "
                         "(the first or last tokens of the cache)")
    return WindowState(states, *out)


# ---- ring-buffer windows (the serving engine's layout) ----------------------------------------
def ring_from_ordered(rows: Tensor, length: int) -> Tensor:
    """Right-aligned window rows (``WindowState`` layout, (..., W, D)) of a sequence that has
    seen ``length`` tokens -> the ring layout, token i at row i mod W (a copy)."""
    W = rows.shape[-2]
    return rows.roll(length % W, dims=-2) if length % W else rows.clone()


def ordered_from_ring(rows: Tensor, length: int) -> Tensor:
    """Inverse of ``ring_from_ordered``."""
    W = rows.shape[-2]
    return rows.roll(-(length % W), dims=-2) if length % W else rows.clone()


def window_decode(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, log_gates: Tensor, mix: Tensor,
                  factor: Tensor, feature: Feature, states: Tensor, ring_k: Tensor, ring_v: Tensor,
                  lengths: Tensor, sink_k: Tensor | None = None,
                  sink_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode step of R sequences on ring-buffer windows; equals ``window_step``.

    q (R, H, G, D) after RoPE; k (R, H, D) after RoPE; v (R, H, V); fq (R, H, G, K);
    log_gates (R, H, S, K); mix (H, G, S); factor (H, G); states (R, H, S, K, V+1) float32;
    ring_k (R, H, W, D), ring_v (R, H, W, V): the windows, token i at row i mod W; lengths (R,)
    int64: tokens each sequence has seen before this one. The token leaving the window (t - W, at
    row t mod W) enters the states, and the new key and value are written over it, in place.
    sink_k (R, H, S, D), sink_v (R, H, S, V): with attention sinks, the first S tokens (row j is
    token j), written in place while t < S; a sink leaving the window does not enter the states.
    Returns u (R, H, G, V+1) in fq's dtype and the new states (a new tensor). No branch depends
    on the data (masks instead), so ``torch.compile`` does not recompile per step or per length.
    """
    R, H, W, D = ring_k.shape
    if lengths.shape != (R,) or q.dim() != 4 or k.shape != (R, H, D) or states.shape[:2] != (R, H):
        raise ValueError(f"window_decode: q (R, H, G, D), k (R, H, D), states (R, H, ...) and lengths (R,) must "
                         f"match the rings {tuple(ring_k.shape)}, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"states {tuple(states.shape)}, lengths {tuple(lengths.shape)}")
    if (sink_k is None) != (sink_v is None) or (sink_k is not None and (
            sink_k.shape[:2] != (R, H) or sink_k.shape[:3] != sink_v.shape[:3] or sink_k.shape[3] != D
            or sink_v.shape[3] != v.shape[-1])):
        raise ValueError(f"window_decode: sink_k (R, H, S, D) and sink_v (R, H, S, V) go together and match the "
                         f"rings {tuple(ring_k.shape)}, got {None if sink_k is None else tuple(sink_k.shape)} and "
                         f"{None if sink_v is None else tuple(sink_v.shape)}")
    return window_decode_math(q, k, v, fq, log_gates, mix, factor, feature, states, ring_k, ring_v, lengths,
                              sink_k, sink_v)


def window_decode_math(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, log_gates: Tensor, mix: Tensor,
                       factor: Tensor, feature: Feature, states: Tensor, ring_k: Tensor, ring_v: Tensor,
                       lengths: Tensor, sink_k: Tensor | None = None,
                       sink_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``window_decode`` without its checks (for callers that validated once, and for compiling)."""
    R, H, W, D = ring_k.shape
    S = 0 if sink_k is None else sink_k.shape[2]
    acc = _acc_dtype(fq)
    rows = torch.arange(R, device=k.device)
    pos = lengths % W
    # the token leaving the window enters the states (none while the window is not yet full, nor a sink)
    k_out, v_out = ring_k[rows, :, pos], ring_v[rows, :, pos]  # (R, H, D), (R, H, V)
    entering = (lengths >= W + S).to(acc)[:, None, None]  # (R, 1, 1)
    fk = feature(k_out[:, :, None])[:, :, 0].to(acc) * entering  # (R, H, K)
    v1 = torch.cat([v_out.to(acc), torch.ones_like(v_out[..., :1], dtype=acc)], dim=-1)  # (R, H, V+1)
    st = states * log_gates.to(acc).exp()[..., None]  # (R, H, S, K, V+1), contiguous like states (stored)
    st.addcmul_(fk[:, :, None, :, None], v1[:, :, None, None, :])  # + φ(k)ᵀ [v, 1], both states
    G = fq.shape[2]
    qm = fq.to(acc)[:, :, :, None] * mix.to(acc)[None, :, :, :, None]  # (R, H, G, S, K)
    u_lin = qm.reshape(R, H, G, -1) @ st.view(R, H, -1, st.shape[-1])  # (R, H, G, V+1)
    # the exact part over the window, the new token written in place of the one that left
    ring_k[rows, :, pos] = k.to(ring_k.dtype)
    ring_v[rows, :, pos] = v.to(ring_v.dtype)
    valid = torch.arange(W, device=k.device)[None] <= lengths[:, None]  # (R, W): rows written so far
    qs = q.to(acc) / math.sqrt(D)
    s = (qs @ ring_k.to(acc).mT).masked_fill(~valid[:, None, None], float("-inf"))  # (R, H, G, W)
    m = s.amax(-1, keepdim=True)
    if S:  # the new token is sink `lengths` while lengths < S (else its row is rewritten unchanged)
        at = lengths.clamp(max=S - 1)
        is_sink = (lengths < S)[:, None, None]
        sink_k[rows, :, at] = torch.where(is_sink, k.to(sink_k.dtype), sink_k[rows, :, at])
        sink_v[rows, :, at] = torch.where(is_sink, v.to(sink_v.dtype), sink_v[rows, :, at])
        outside = torch.arange(S, device=k.device)[None] <= (lengths - W)[:, None]  # (R, S): sinks left the window
        # scored apart from the ring, not concatenated to it: a cat copies the whole window per step
        # (at 8 requests it made this function ~4x slower)
        s_sink = (qs @ sink_k.to(acc).mT).masked_fill(~outside[:, None, None], float("-inf"))  # (R, H, G, S)
        m = torch.maximum(m, s_sink.amax(-1, keepdim=True))
    w = (s - m).exp()
    num, den = w @ ring_v.to(acc), w.sum(-1, keepdim=True)
    if S:
        w_sink = (s_sink - m).exp()
        num, den = num + w_sink @ sink_v.to(acc), den + w_sink.sum(-1, keepdim=True)
    exact = torch.cat([num, den], dim=-1)  # (R, H, G, V+1)
    u = u_lin + factor.to(acc)[None, :, :, None] * exact
    return u.to(fq.dtype), st
