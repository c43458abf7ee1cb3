"""Dual-state gated linear attention (DSLA): the pure tensor functions.

Per batch b, KV head h and state s (S = num_states, 1 or 2):

    S_s[t] = diag(exp(g_s[t])) · S_s[t-1] + k[t]ᵀ v[t]        (K × V; g_s[t] ∈ R^K, g ≤ 0)
    o[t]   = Σ_s mix[h, j, s] · (q_j[t] · S_s[t])       (j: a query head of the KV head's group)

Four forms with one signature, ``fn(q, k, v, log_gates, mix, state=None, **kw) -> (o, state)``:

    q          (B, H, G, T, K)   feature-mapped queries; H KV heads, G query heads per KV head
    k          (B, H, T, K)      feature-mapped keys
    v          (B, H, T, V)
    log_gates  (B, H, S, T, K)   float, ≤ 0 (a precondition, not checked on the hot path)
    mix        (H, G, S)         per query head weights of the states (γ, 1-γ; ones for S = 1)
    state      (B, H, S, K, V)   or None for zeros
    returns o  (B, H, G, T, V) in q.dtype, and the final state (B, H, S, K, V)

The state and every accumulation are float32 (float64 when q is float64, for gradient checks);
q, k, v, log_gates and mix are cast up at the boundary and o is cast back to q.dtype.

- ``dsla_reference``: a per-step loop, the definition.
- ``dsla_chunked``: chunk-parallel prefill / training form (autograd through plain torch ops).
- ``dsla_step``: one decode step.
- ``dsla_fold``: the state a prefill over (k, v) would leave, with no queries (KV cache → state).

How ``dsla_chunked`` works, and why it is safe. With b the cumulative log-gate, a pair j ≤ i
in one chunk has weight exp(b_i - b_j) per key feature. The textbook chunk form factorises it
as exp(b_i) · exp(-b_j), and exp(-b_j) overflows float32 once a chunk decays past ~e^-88
(64 tokens at a log-gate of -1.4). Here no exponential ever has a positive argument, and no
difference of large cumulative sums is taken:

- inside a chunk the pairs i > j are split by a binary hierarchy. At level h = 1, 2, 4, ..,
  C/2 the chunk is cut into blocks of 2h; for i in the later half and j in the earlier half,
      exp(b_i - b_j) = d_i · e_j,   d_i = decay from the later half's start to i,
                                    e_j = decay from after j to the earlier half's end,
  both products of per-step decays exp(g) ≤ 1, carried up the levels by multiplication. The
  factor is rank-separable, so a level's scores are one batched matmul (q ⊙ d)(k ⊙ e)ᵀ.
  Every pair i > j lies in exactly one (level, block); the pair i = j has weight 1. The
  scores of all levels are written into one (C·G × C) matrix per chunk, applied to v by a
  single matmul.
- across chunks, o_i += (q_i ⊙ decay since the chunk start) · S_prev and
  S ← (chunk decay) ⊙ S + Σ_j (k_j ⊙ decay after j)ᵀ v_j, the factors the top level leaves.
  Only this state scan is sequential (one small op per chunk); everything else is batched
  over B, H, S and the chunks of a segment of ~_SEGMENT tokens (segments keep temporaries
  in cache and bound memory for long T).

Decays that underflow to 0 stand for weights below float32's range: their value to working
precision. Without autograd the decay factors are updated in place. bfloat16 inputs are
computed in float32 as well: on this project's AVX2 CPUs (no avx512_bf16 / AMX) a bfloat16
matmul runs ~30x slower than a float32 one, so "bf16 intra-chunk matmuls" would be a loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dsla_reference", "dsla_chunked", "dsla_step", "dsla_fold"]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation / state dtype: float32, or float64 when the inputs are float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q: Tensor | None, k: Tensor, v: Tensor, log_gates: Tensor,
           mix: Tensor | None, state: Tensor | None) -> tuple[int, ...]:
    """Validate shapes against k's; return (B, H, G, T, K, V, S) (G = 0 when q is None)."""
    if k.dim() != 4:
        raise ValueError(f"k must be (B, H, T, K), got shape {tuple(k.shape)}")
    B, H, T, K = k.shape
    G = 0
    if q is not None:
        if q.dim() != 5:
            raise ValueError(f"q must be (B, H, G, T, K), got shape {tuple(q.shape)}")
        if q.shape[1] != H:
            raise ValueError(f"k has {H} heads but q has {q.shape[1]} (KV heads); "
                             f"q must be (B, H, G, T, K) with H = {H}")
        G = q.shape[2]
        if (q.shape[0], q.shape[3], q.shape[4]) != (B, T, K):
            raise ValueError(f"q has shape {tuple(q.shape)} but k {tuple(k.shape)} "
                             f"needs (B, H, G, T, K) = ({B}, {H}, G, {T}, {K})")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"v must be (B, H, T, V) = ({B}, {H}, {T}, V) to match k "
                         f"{tuple(k.shape)}, got shape {tuple(v.shape)}")
    V = v.shape[3]
    S = log_gates.shape[2] if log_gates.dim() == 5 else 0
    if log_gates.dim() != 5 or tuple(log_gates.shape) != (B, H, S, T, K):
        raise ValueError(f"log_gates has shape {tuple(log_gates.shape)} but k {tuple(k.shape)} "
                         f"needs (B, H, S, T, K) = ({B}, {H}, S, {T}, {K})")
    if q is not None and (mix is None or tuple(mix.shape) != (H, G, S)):
        raise ValueError(f"mix must be (H, G, S) = ({H}, {G}, {S}), "
                         f"got {None if mix is None else tuple(mix.shape)}")
    if state is not None and tuple(state.shape) != (B, H, S, K, V):
        raise ValueError(f"state must be (B, H, S, K, V) = ({B}, {H}, {S}, {K}, {V}), "
                         f"got shape {tuple(state.shape)}")
    return B, H, G, T, K, V, S


def _initial_state(state: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    if state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return state.to(dtype)


def dsla_reference(q: Tensor, k: Tensor, v: Tensor, log_gates: Tensor, mix: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (float32 state). Slow; the definition the others match."""
    B, H, G, T, K, V, S = _check(q, k, v, log_gates, mix, state)
    out_dtype, acc = q.dtype, _acc_dtype(q)
    q, k, v, g, mix = (x.to(acc) for x in (q, k, v, log_gates, mix))
    st = _initial_state(state, (B, H, S, K, V), acc, q.device)             # (B, H, S, K, V)
    outs = []
    for t in range(T):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]                      # (B, H, K, V)
        st = g[:, :, :, t, :, None].exp() * st + kv[:, :, None]            # (B, H, S, K, V)
        per_state = torch.einsum("bhgk,bhskv->bhgsv", q[:, :, :, t], st)   # (B, H, G, S, V)
        outs.append(torch.einsum("bhgsv,hgs->bhgv", per_state, mix))       # (B, H, G, V)
    o = torch.stack(outs, dim=3) if outs else q.new_zeros(B, H, G, 0, V)  # (B, H, G, T, V)
    return o.to(out_dtype), st


def dsla_step(q: Tensor, k: Tensor, v: Tensor, log_gates: Tensor, mix: Tensor,
              state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode step (T must be 1): the recurrence, batched over B, H, S and G."""
    B, H, G, T, K, V, S = _check(q, k, v, log_gates, mix, state)
    if T != 1:
        raise ValueError(f"dsla_step takes exactly one token, got T = {T}; "
                         f"use dsla_chunked for T > 1")
    acc = _acc_dtype(q)
    st = _initial_state(state, (B, H, S, K, V), acc, q.device)
    kv = k[:, :, 0, :, None].to(acc) * v[:, :, 0, None, :].to(acc)        # (B, H, K, V)
    # Broadcasting may hand back a permuted layout (inputs sliced from bigger tensors): the state
    # is stored, so make it contiguous; reshape (not view) for the same reason.
    decay = log_gates[:, :, :, 0, :, None].to(acc).exp()                 # (B, H, S, K, 1)
    st = torch.addcmul(kv[:, :, None], decay, st).contiguous()            # (B, H, S, K, V)
    qm = q[:, :, :, 0, None, :].to(acc) * mix[..., None].to(acc)          # (B, H, G, S, K)
    o = qm.reshape(B, H, G, S * K) @ st.view(B, H, S * K, V)              # (B, H, G, V)
    return o.unsqueeze(3).to(q.dtype), st


def _chunk_len(chunk_size: int, T: int) -> int:
    """The chunk length used: the largest power of two ≤ chunk_size (the intra-chunk hierarchy
    halves it), shrunk to the smallest power of two ≥ T for short sequences. The result does
    not depend on it; only speed and memory do."""
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return min(1 << (int(chunk_size).bit_length() - 1), 1 << max(T - 1, 0).bit_length())


_SEGMENT = 512   # tokens per segment: dsla_chunked's temporaries stay cache-sized


def _segments(T: int, C: int):
    """(t0, t1, n): segments of about _SEGMENT tokens covering [0, T), with n = t1 - t0
    rounded up to whole chunks (only the last segment is ever padded)."""
    seg = C * max(1, _SEGMENT // C)
    for t0 in range(0, T, seg):
        t1 = min(t0 + seg, T)
        yield t0, t1, -(-(t1 - t0) // C) * C


def _load(x: Tensor, dim: int, t0: int, t1: int, n: int, dtype: torch.dtype) -> Tensor:
    """x[t0:t1] along the time dimension `dim`, cast to dtype, zero-padded to n steps.
    Padded steps have q = k = v = 0 and log-gate 0 (decay 1): they leave the state unchanged."""
    x = x.narrow(dim, t0, t1 - t0).to(dtype)
    if n == t1 - t0:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = n - (t1 - t0)
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _decays(g: Tensor, k: Tensor, C: int, on_level=None) -> tuple[Tensor, Tensor]:
    """Within-chunk decay factors, built bottom-up over a binary hierarchy of blocks.

    g (B, H, T, S, K) log-gates, k (B, H, T, K), T a multiple of C. With b the cumulative
    log-gate, on_level(h, d, ke) is called at h = 1, 2, 4, .., C/2 with, viewed as
    (B, H, T / 2h, 2, h, S, K) (blocks of 2h made of two halves of h):
        d[i]  = exp(b_i - b_{start of i's half - 1})   (q side, ≤ 1)
        ke[j] = k_j ⊙ exp(b_{end of j's half} - b_j)    (k side, ≤ 1)
    so for i in a later half and j in the earlier half of the same block,
    d[i] ⊙ ke[j] = k_j ⊙ exp(b_i - b_j). Each factor is a product of per-step decays exp(g):
    no exponential of a positive number, no difference of large cumulative sums.
    Returns the chunk-level factors d[i] = exp(b_i - b_{chunk start - 1}) and
    ke[j] = k_j ⊙ exp(b_{chunk end} - b_j), both (B, H, T, S, K).
    """
    B, H, T, S, K = g.shape
    # without autograd the factors are updated in place (half the memory traffic)
    inplace = not (torch.is_grad_enabled() and (g.requires_grad or k.requires_grad))
    d = g.exp()                                              # halves of 1: one step's decay
    ke = k[:, :, :, None].expand(B, H, T, S, K)              # halves of 1: nothing after j
    h = 1
    while h < C:
        nb = T // (2 * h)
        dv = d.view(B, H, nb, 2, h, S, K)
        kev = ke.reshape(B, H, nb, 2, h, S, K)
        if on_level is not None:
            on_level(h, dv, kev)
        first = dv[:, :, :, :1, h - 1:]                      # decay over the earlier half
        second = dv[:, :, :, 1:, h - 1:]                     # decay over the later half
        # up one level: later halves' d now starts at the block start, earlier halves' ke
        # now runs to the block end
        if inplace and h > 1:               # (ke is still a view of k at h = 1)
            kev[:, :, :, :1] *= second      # before d changes: second is a view of d
            dv[:, :, :, 1:] *= first
        else:
            one = torch.ones_like(first)
            d = (dv * torch.cat([one, first], dim=3)).view(B, H, T, S, K)
            ke = (kev * torch.cat([second, one], dim=3)).view(B, H, T, S, K)
        h *= 2
    return d, ke.expand(B, H, T, S, K)


def _chunk_updates(d: Tensor, ke: Tensor, v: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """From _decays' chunk-level factors: each chunk's state update Σ_j ke_jᵀ v_j
    (B, H, N, S*K, V) and its total decay (B, H, N, S*K, 1)."""
    B, H, T, S, K = d.shape
    N = T // C
    upd = ke.reshape(B, H, N, C, S * K).mT @ v.view(B, H, N, C, -1)        # (B, H, N, S*K, V)
    return upd, d.view(B, H, N, C, S * K)[:, :, :, -1, :, None]


def _scan(upd: Tensor, decay: Tensor, st: Tensor,
          keep: bool = True) -> tuple[Tensor | None, Tensor]:
    """Carry the state over the chunks: st ← decay_n ⊙ st + upd_n for n = 0..N-1.

    upd (B, H, N, S*K, V), decay (B, H, N, S*K, 1), st (B, H, S*K, V). Returns the state
    before each chunk (B, H, N, S*K, V) (None unless keep) and the final state.
    """
    prev = []
    for n in range(upd.shape[2]):           # the only sequential part: N small ops
        if keep:
            prev.append(st)
        st = torch.addcmul(upd[:, :, n], decay[:, :, n], st)
    return (torch.stack(prev, dim=2) if keep else None), st


def _segment(q: Tensor, k: Tensor, v: Tensor, g: Tensor, mix: Tensor, st: Tensor,
             C: int) -> tuple[Tensor, Tensor]:
    """DSLA over one segment of whole chunks: q (B, H, T, G, K), k (B, H, T, K), v (B, H, T, V),
    g (B, H, T, S, K), mix (H, G, S), st (B, H, S*K, V) the state before it.
    Returns o (B, H, T, G, V) and the state after the segment."""
    B, H, T, G, K = q.shape
    S, V, N = g.shape[3], v.shape[3], T // C
    qm = q[:, :, :, :, None] * mix[None, :, None, :, :, None]             # (B, H, T, G, S, K)
    # scores of the pairs j ≤ i inside each chunk, rows (i, g), columns j: o_intra = scores @ v
    scores = q.new_zeros(B, H, N, C, G, C)
    # i = j: the decay weight is 1 in every state, so the mix just sums over s
    qk = (q * k[:, :, :, None]).sum(-1) * mix.sum(-1)[None, :, None]       # (B, H, T, G)
    torch.diagonal(scores, dim1=3, dim2=5).copy_(qk.view(B, H, N, C, G).transpose(3, 4))

    def pairs(h: int, dv: Tensor, kev: Tensor) -> None:
        # i in the later half, j in the earlier half of each block of 2h
        nb, nbc = T // (2 * h), C // (2 * h)
        ql = qm.view(B, H, nb, 2, h, G, S * K)[:, :, :, 1]                # (B, H, nb, h, G, S*K)
        if h == 1:      # a single key: cheaper to put the q-side decay on it than on G queries
            w = dv[:, :, :, 1] * kev[:, :, :, 0]                           # (B, H, nb, 1, S, K)
            a = (ql * w.view(B, H, nb, 1, 1, S * K)).sum(-1)               # (B, H, nb, 1, G)
        else:
            qs = ql.view(B, H, nb, h, G, S, K) * dv[:, :, :, 1, :, None]   # (B, H, nb, h, G, S, K)
            ks = kev[:, :, :, 0].reshape(B, H, nb, h, S * K)               # (B, H, nb, h, S*K)
            a = qs.view(B, H, nb, h * G, S * K) @ ks.mT                    # (B, H, nb, h*G, h)
        # write a into the (later half, earlier half) corner of each 2h block on the chunk's
        # diagonal: rows i = (blk, half, r), columns j = (blk', half', c), blk = blk'
        blocks = torch.diagonal(scores.view(B, H, N, nbc, 2, h, G, nbc, 2, h), dim1=3, dim2=7)
        a = a.view(B, H, N, nbc, h, G, h).permute(0, 1, 2, 4, 5, 6, 3)  # (B, H, N, h, G, h, nbc)
        blocks[:, :, :, 1, :, :, 0].copy_(a)

    d, ke = _decays(g, k, C, pairs)
    # across chunks: o_i += Σ_s mix_s (q_i ⊙ exp(b_i - b_{chunk start - 1})) · S_prev
    qi = qm.view(B, H, N, C, G, S, K) * d.view(B, H, N, C, 1, S, K)       # (B, H, N, C, G, S, K)
    prev, st = _scan(*_chunk_updates(d, ke, v, C), st)                      # (B, H, N, S*K, V)
    o = torch.baddbmm(scores.view(B * H * N, C * G, C) @ v.view(B * H * N, C, V),
                      qi.view(B * H * N, C * G, S * K), prev.view(B * H * N, S * K, V))
    return o.view(B, H, T, G, V), st


def dsla_chunked(q: Tensor, k: Tensor, v: Tensor, log_gates: Tensor, mix: Tensor,
                 state: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Chunk-parallel DSLA for prefill and training; equals dsla_reference.

    Any T ≥ 0 (the last chunk is zero-padded internally). chunk_size is rounded down to a
    power of two and shrunk for short sequences; it changes speed, not the result. Every
    exponential has a non-positive argument (see the module docstring), so strong decay over
    long sequences stays finite. Differentiable through plain torch ops.
    """
    B, H, G, T, K, V, S = _check(q, k, v, log_gates, mix, state)
    out_dtype, acc = q.dtype, _acc_dtype(q)
    C = _chunk_len(chunk_size, T)
    st = _initial_state(state, (B, H, S, K, V), acc, k.device).reshape(B, H, S * K, V)
    mix = mix.to(acc)
    outs = []
    for t0, t1, n in _segments(T, C):       # segments keep the temporaries cache-sized
        qs = _load(q, 3, t0, t1, n, acc).transpose(2, 3).contiguous()      # (B, H, n, G, K)
        gs = _load(log_gates, 3, t0, t1, n, acc).transpose(2, 3).contiguous()  # (B, H, n, S, K)
        o, st = _segment(qs, _load(k, 2, t0, t1, n, acc), _load(v, 2, t0, t1, n, acc), gs,
                         mix, st, C)
        outs.append(o[:, :, :t1 - t0].transpose(2, 3).to(out_dtype))       # (B, H, G, t, V)
    if len(outs) != 1:
        o = torch.cat(outs, dim=3) if outs else q.new_zeros(B, H, G, 0, V)  # (B, H, G, T, V)
    else:
        o = outs[0].contiguous()
    return o, st.view(B, H, S, K, V)


def dsla_fold(k: Tensor, v: Tensor, log_gates: Tensor, state: Tensor | None = None,
              chunk_size: int = 64) -> Tensor:
    """The state (B, H, S, K, V) that a DSLA prefill over (k, v) would leave behind.

    Used to turn a layer's KV cache into DSLA state mid-request. Raises ValueError when the
    result is not finite, naming the non-finite input(s): a NaN must never be saved in a state.
    """
    B, H, _, T, K, V, S = _check(None, k, v, log_gates, None, state)
    acc = _acc_dtype(k)
    C = _chunk_len(chunk_size, T)
    st = _initial_state(state, (B, H, S, K, V), acc, k.device).reshape(B, H, S * K, V)
    for t0, t1, n in _segments(T, C):
        gs = _load(log_gates, 3, t0, t1, n, acc).transpose(2, 3).contiguous()  # (B, H, n, S, K)
        d, ke = _decays(gs, _load(k, 2, t0, t1, n, acc), C)
        _, st = _scan(*_chunk_updates(d, ke, _load(v, 2, t0, t1, n, acc), C), st, keep=False)
    st = st.view(B, H, S, K, V)
    if not torch.isfinite(st).all():
        named = {"k": k, "v": v, "log_gates": log_gates, "state": state}
        bad = [n for n, x in named.items() if x is not None and not torch.isfinite(x).all()]
        raise ValueError("dsla_fold produced a non-finite state; non-finite input(s): "
                         f"{', '.join(bad) or 'none (overflow: are the log-gates ≤ 0?)'}")
    return st
