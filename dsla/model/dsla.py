"""The DSLA layer: dual-state linear attention built from, and sharing weights with, a teacher layer.

Per KV head h, with phi a learned feature map and a_t, b_t learned decays in (0, 1)^K:
    S_hist[t] = diag(a_t) S_hist[t-1] + phi(k_t)^T [v_t, 1]
    S_rec[t]  = diag(b_t) S_rec[t-1]  + phi(k_t)^T [v_t, 1]
    u_t       = phi(q_t) (gamma S_hist[t] + (1 - gamma) S_rec[t])          (V + 1 wide)
    o_t       = u_t[:V] / (u_t[V] + eps)
The appended ones-column makes the last column of each state the running normaliser
sum_j decay * phi(k_j), so the layer is a decayed, normalised (softmax-like) attention.

With ``DSLAConfig.window`` = W > 0, the last W tokens are attended exactly (softmax scores
q.k/sqrt(D), minus their max, times a learned per-query-head factor exp(window_log_scale)) and a
token enters the states only when it leaves the window, sharing the normaliser:
    o_t = (u_t[:V] + f sum_j w_tj v_j) / (u_t[V] + f sum_j w_tj + eps)
(see dsla/ops/window.py). W = 0 is the pure DSLA above.

Exact KV groups (``exact_groups``, DuoAttention-style, empty by default): the query heads of
those KV heads keep the teacher's softmax attention over every earlier token, so a request holds
a KV cache of those heads only (``DSLAState.exact``) beside the states of the others. Prefill and
fold run DSLA on the other heads only (``dsla_groups``); the states keep a row per KV head (an
exact group's rows unused), so the compiled decode step, which runs every head and then replaces
the exact groups' outputs, is one graph for every layer.

Foldable by construction: k_t and v_t are the teacher's own k_proj / v_proj outputs (shared, not
copied) with the same RoPE, and the gates and phi(k) depend on k alone, so the states can be
rebuilt exactly from a request's KV cache (``fold``). q_proj and o_proj start as copies of the
teacher's and are trained, with phi, the gates and gamma.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsla.config import DSLAConfig
from dsla.model.llama import LlamaAttention, decode_attention, split_heads, token_index, uniform_length
from dsla.model.state import DSLAState, KVState
from dsla.ops.attention import causal_attention
from dsla.ops.compiled import decode_kernel
from dsla.ops.cpu_kernels import cpu_kernels_lib, window_decode_cpu, window_decode_fits
from dsla.ops.dsla import dsla_chunked, dsla_fold, dsla_step
from dsla.ops.rope import rope_cos_sin, rope_tables, rotate, unapply_rope
from dsla.ops.window import WindowState, ring_from_ordered, window_chunked, window_decode_math, window_fold


class HeadParams(NamedTuple):
    """A DSLA layer's per-head maps as tensors (``DSLAAttention.head_params``): the feature maps'
    and gates' weights (H, D, ·) and biases (H, 1, ·) per KV head, the state mix and window scale
    (H*G,) per query head; None where the layer has no such map."""

    w_fq: Tensor
    w_fk: Tensor
    w_hist: Tensor
    b_hist: Tensor
    w_rec: Tensor | None
    b_rec: Tensor | None
    mix_logits: Tensor | None
    window_log_scale: Tensor | None


class HeadwiseLinear(nn.Module):
    """The parameters of a separate small linear map per KV head, (H, ..., I) -> (H, ..., O):
    weight (H, I, O) and optional bias (H, 1, O). Applied by ``feature_map`` / ``log_decays``,
    functions of the weights, so the compiled decode step can take them as arguments."""

    def __init__(self, heads: int, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(heads, 1, d_out)) if bias else None


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class DSLAAttention(nn.Module):
    """Dual-state (or, with num_states=1, single-state) linear attention replacing one layer."""

    def __init__(self, teacher: LlamaAttention, cfg: DSLAConfig) -> None:
        super().__init__()
        lc = teacher.cfg
        self.cfg, self.lcfg = cfg, lc
        # Shared with the teacher, deliberately not registered: no extra memory, not saved.
        object.__setattr__(self, "teacher", teacher)
        self.q_proj = copy.deepcopy(teacher.q_proj)
        self.o_proj = copy.deepcopy(teacher.o_proj)
        H, D, Fd = lc.num_key_value_heads, lc.head_dim, cfg.feature_dim
        self.feature_q = HeadwiseLinear(H, D, Fd, bias=False)
        self.feature_k = HeadwiseLinear(H, D, Fd, bias=False)
        with torch.no_grad():
            eye = torch.eye(D, Fd) if Fd <= D else torch.eye(Fd)[:D]
            self.feature_q.weight.copy_(eye.expand(H, D, Fd))
            self.feature_k.weight.copy_(eye.expand(H, D, Fd))
        K = 2 * Fd
        self.history_gate = HeadwiseLinear(H, D, K, bias=True)
        nn.init.constant_(self.history_gate.bias, logit(cfg.history_decay_init))
        if cfg.num_states == 2:
            self.recency_gate = HeadwiseLinear(H, D, K, bias=True)
            nn.init.constant_(self.recency_gate.bias, logit(cfg.recency_decay_init))
            self.mix_logits = nn.Parameter(torch.full((lc.num_attention_heads,), logit(cfg.history_mix_init)))
        if cfg.window:  # only then, so a W = 0 layer's parameters (and artifacts) are unchanged
            self.window_log_scale = nn.Parameter(torch.zeros(lc.num_attention_heads))
        self.set_exact_groups(())  # KV heads kept exact; not a parameter (the student's manifest names them)

    def set_exact_groups(self, groups) -> None:
        """Keep the query heads of these KV heads on the teacher's softmax attention over every
        token (their KV cached in full); the other heads stay DSLA. () turns it off."""
        H = self.lcfg.num_key_value_heads
        gs = tuple(sorted({int(g) for g in groups}))
        bad = [g for g in gs if not 0 <= g < H]
        if bad:
            raise ValueError(f"exact KV groups {bad} are out of range: the layer has {H} KV heads (0..{H - 1})")
        self.exact_groups = gs
        # the KV heads that run DSLA in prefill and fold (``head_params`` are theirs); the states keep a
        # row for every KV head, so the decode step is one compiled graph whatever the layer's groups
        self.dsla_groups = tuple(h for h in range(H) if h not in gs)
        self._head_index: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor, Tensor]] = {}
        self._params_cache: tuple[tuple, HeadParams] | None = None

    def _heads(self, groups: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices of these KV heads and of their query heads (head-major), built once per device."""
        key = (groups, device)
        if key not in self._head_index:
            G = self.lcfg.group_size
            kh = torch.tensor(groups, device=device, dtype=torch.long)
            self._head_index[key] = kh, (kh[:, None] * G + torch.arange(G, device=device)).flatten()
        return self._head_index[key]

    def _exact_heads(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices of the exact groups' KV heads and of their query heads."""
        return self._heads(self.exact_groups, device)

    def _dsla_heads(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices of the DSLA heads (the KV heads not exact) and of their query heads."""
        return self._heads(self.dsla_groups, device)

    def _rows(self, t: Tensor) -> Tensor:
        """The DSLA heads' rows (dim 0) of a state tensor that has a row per KV head."""
        return t if not self.exact_groups else t.index_select(0, self._dsla_heads(t.device)[0])

    def _merged(self, full: Tensor, rows: Tensor) -> Tensor:
        """``full`` (a row per KV head) with the DSLA heads' rows replaced by ``rows``, out of place
        (``rows`` itself without exact groups)."""
        return rows if not self.exact_groups else full.index_copy(0, self._dsla_heads(full.device)[0], rows)

    def _put_rows(self, full: Tensor, rows: Tensor) -> None:
        """Write the DSLA heads' rows of ``full`` (a row per KV head) in place."""
        full.copy_(rows) if not self.exact_groups else full.index_copy_(0, self._dsla_heads(full.device)[0], rows)

    def head_params(self) -> HeadParams:
        """The per-head maps of the DSLA heads: the parameters as they are without exact groups,
        else their rows of those heads (an exact group's maps are never used, so prefill and fold
        skip its heads). Cached outside autograd while the parameters are unchanged."""
        full = self._all_head_params()
        if not self.exact_groups:
            return full
        grad = torch.is_grad_enabled() or any(t.is_inference() for t in full if t is not None)  # no _version
        key = None if grad else tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in full if t is not None)
        if not grad and self._params_cache is not None and self._params_cache[0] == key:
            return self._params_cache[1]
        kd, qd = self._dsla_heads(full.w_fq.device)
        per_query = {"mix_logits", "window_log_scale"}  # (Hq,) parameters; the others (H, ...)
        p = HeadParams(*(None if t is None else t.index_select(0, qd if name in per_query else kd)
                         for name, t in zip(HeadParams._fields, full)))
        if not grad:
            self._params_cache = (key, p)
        return p

    def _all_head_params(self) -> HeadParams:
        """The per-head maps of every KV head, the parameters themselves."""
        rec = self.recency_gate if self.cfg.num_states == 2 else None
        return HeadParams(self.feature_q.weight, self.feature_k.weight, self.history_gate.weight,
                          self.history_gate.bias, None if rec is None else rec.weight, None if rec is None else rec.bias,
                          self.mix_logits if rec is not None else None,
                          self.window_log_scale if self.cfg.window else None)

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        """(H, S, K, V+1) of one request's state, H every KV head (an exact group's rows stay unused:
        see ``attend``)."""
        lc = self.lcfg
        return lc.num_key_value_heads, self.cfg.num_states, 2 * self.cfg.feature_dim, lc.head_dim + 1

    def new_state(self, device: torch.device | str = "cpu", capacity: int = 64) -> DSLAState:
        """A zero state; with a window, its W rows of k and v (model dtype) allocated up front;
        with exact groups, their KV buffer with room for ``capacity`` tokens (it grows as needed)."""
        st = torch.zeros(self.state_shape, dtype=torch.float32, device=device)
        lc, dtype = self.lcfg, self.feature_q.weight.dtype  # the model dtype (q_proj may be quantised)
        exact = KVState(len(self.exact_groups), lc.head_dim, dtype, device, capacity) if self.exact_groups else None
        W = self.cfg.window
        if not W:
            return DSLAState(st, exact=exact)
        rows = lambda n: torch.zeros(lc.num_key_value_heads, n, lc.head_dim, dtype=dtype, device=device)  # noqa: E731
        S = self.cfg.sinks
        return DSLAState(st, 0, rows(W), rows(W), exact=exact, sink_k=rows(S) if S else None,
                         sink_v=rows(S) if S else None)

    # ---- the pieces that depend on k alone (and so can be recomputed from a KV cache) ----------
    # These take and give the DSLA heads only (``dsla_groups``, H of them; all KV heads without
    # exact groups).
    def key_side(self, k_raw: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """phi(k) (H, N, K), values with a ones column (H, N, V+1), log decays (H, S, N, K) fp32."""
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        return feature_map(k, self.head_params().w_fk), v1, self.log_gates(k_raw)

    def log_gates(self, k_raw: Tensor) -> Tensor:
        """Log decays (H, S, N, K) float32 from the keys before RoPE (H, N, D)."""
        p = self.head_params()
        return log_decays(k_raw.float(), p.w_hist, p.b_hist, p.w_rec, p.b_rec)

    def key_feature(self, k: Tensor) -> Tensor:
        """phi of keys laid out (B, H, N, D) -> (B, H, N, K): the window ops' ``feature``."""
        return feature_map(k.transpose(0, 1), self.head_params().w_fk).transpose(0, 1)

    def mix(self) -> Tensor:
        """(H, G, S) weights of the states in the output: gamma, 1 - gamma per query head."""
        return state_mix(self.head_params().mix_logits, len(self.dsla_groups), self.lcfg.group_size,
                         self.feature_q.weight.device)

    def window_factor(self) -> Tensor:
        """(H, G) weight f = exp(window_log_scale) of the exact window per query head."""
        return self.head_params().window_log_scale.float().exp().view(len(self.dsla_groups), self.lcfg.group_size)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: Sequence[int],
                states: Sequence[DSLAState] | None = None) -> Tensor:
        """Same contract as ``LlamaAttention.forward``: x (N, hidden) -> (N, hidden)."""
        if states is not None and self.cfg.window and 1 in seq_lens:
            if len(seq_lens) == x.shape[0]:  # every request adds one token
                return self._decode_step(x, cos, sin, states)
            return self._split_decodes(x, cos, sin, seq_lens, states)
        rope = rope_tables(cos, sin, x.dtype)  # once for q and k
        q = rotate(split_heads(self.q_proj(x), self.lcfg.num_attention_heads), *rope)  # (Hq, N, D)
        o = self.attend(q, *self.teacher.project_kv(x, cos, sin, rope), seq_lens, states)  # (Hq, N, D)
        return self.o_proj(o.transpose(0, 1).reshape(x.shape[0], -1).to(x.dtype))

    def attend(self, q: Tensor, k_raw: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int],
               states: Sequence[DSLAState] | None = None) -> Tensor:
        """Per-head outputs before o_proj, the counterpart of softmax attention's.

        q: (Hq, N, D) after RoPE; k_raw / k: (Hkv, N, D) before / after RoPE; v: (Hkv, N, D).
        Returns (Hq, N, D).
        """
        lc, cfg = self.lcfg, self.cfg
        H, G, V = len(self.dsla_groups), lc.group_size, lc.head_dim
        qd, kd_raw, kd, vd = q, k_raw, k, v
        if self.exact_groups:  # the DSLA part runs on the other heads only
            if states is not None:  # the DSLA part checks its heads' k / v before storing; these go to caches too
                check_finite(k, v)
            kh, qh = self._dsla_heads(q.device)
            qd, kd_raw, kd, vd = q.index_select(0, qh), k_raw.index_select(0, kh), k.index_select(0, kh), \
                v.index_select(0, kh)
        if not H:  # every KV group exact: no DSLA part, the states only count the tokens
            for st, L in zip(states or (), seq_lens):
                st.length += L
            return self._attend_exact(q.new_zeros(0, q.shape[1], V), q, k, v, seq_lens, states)
        fq = feature_map(qd.view(H, G, -1, V), self.head_params().w_fq)  # (H, G, N, K)
        if cfg.window:
            u = self._attend_window(qd.view(H, G, -1, V), kd_raw, kd, vd, fq, seq_lens, states)
        else:
            u = self._attend_dsla(fq, kd_raw, kd, vd, seq_lens, states)  # (H, G, N, V+1)
        o = u[..., :V] / (u[..., V:].float() + cfg.eps).to(u.dtype)  # (H, G, N, V)
        o = o.reshape(H * G, -1, V)  # (H*G, N, V)
        return self._attend_exact(o, q, k, v, seq_lens, states) if self.exact_groups else o

    def _attend_exact(self, o: Tensor, q: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int],
                      states: Sequence[DSLAState] | None) -> Tensor:
        """All heads (Hq, N, V): the DSLA heads' outputs ``o`` (their query heads, in order) and
        the exact groups' softmax attention over each request's tokens (and, with states, its
        cached ones: the tokens are appended)."""
        kh, qh = self._exact_heads(q.device)
        qe, ke, ve = q.index_select(0, qh), k.index_select(0, kh), v.index_select(0, kh)
        T = uniform_length(seq_lens, states)
        if T is not None:  # stateless rectangular batch: one call
            B = len(seq_lens)
            to_batch = lambda t: t.view(t.shape[0], B, T, -1).transpose(0, 1)  # noqa: E731  (B, n, T, D)
            e = causal_attention(to_batch(qe), to_batch(ke), to_batch(ve))  # (B, nG, T, D)
            e = e.transpose(0, 1).reshape(qe.shape[0], B * T, -1)
        else:
            outs, start = [], 0
            for r, L in enumerate(seq_lens):
                qr, kr, vr = (t[:, start: start + L] for t in (qe, ke, ve))
                if states is not None:
                    kr, vr = states[r].exact.append(kr, vr)  # (n, T, D): prefix + new
                outs.append(causal_attention(qr[None], kr[None], vr[None])[0])  # (nG, L, D)
                start += L
            e = torch.cat(outs, dim=1)
        out = o.new_zeros(q.shape[0], *o.shape[1:])  # out of place: autograd sees both parts
        return out.index_copy(0, self._dsla_heads(q.device)[1], o).index_copy(0, qh, e.to(o.dtype))

    def _attend_dsla(self, fq: Tensor, k_raw: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int],
                     states: Sequence[DSLAState] | None) -> Tensor:
        """Pure DSLA (window 0): the unnormalised output u (H, G, N, V+1)."""
        H, G, _, _ = fq.shape
        V = v.shape[-1]
        fk, v1, g = self.key_side(k_raw, k, v)
        mix = self.mix()
        T = uniform_length(seq_lens, states)
        if T is None:
            return self._run_requests(fq, fk, v1, g, mix, seq_lens, states)
        B = len(seq_lens)  # stateless rectangular batch: one chunked call
        u, _ = dsla_chunked(
            fq.view(H, G, B, T, -1).permute(2, 0, 1, 3, 4),  # (B, H, G, T, K)
            fk.view(H, B, T, -1).transpose(0, 1),  # (B, H, T, K)
            v1.view(H, B, T, -1).transpose(0, 1),  # (B, H, T, V+1)
            g.view(H, -1, B, T, g.shape[-1]).permute(2, 0, 1, 3, 4),  # (B, H, S, T, K)
            mix, None, chunk_size=self.cfg.chunk_size)
        return u.permute(1, 2, 0, 3, 4).reshape(H, G, B * T, V + 1)  # (H, G, N, V+1)

    def _attend_window(self, q: Tensor, k_raw: Tensor, k: Tensor, v: Tensor, fq: Tensor,
                       seq_lens: Sequence[int], states: Sequence[DSLAState] | None) -> Tensor:
        """DSLA with the exact window: u (H, G, N, V+1). q (H, G, N, D); k, v (H, N, D)."""
        H, G, _, D = q.shape
        V = v.shape[-1]
        g = self.log_gates(k_raw)  # (H, S, N, K)
        T = uniform_length(seq_lens, states)
        if T is None:
            return self._run_window_requests(q, k, v, fq, g, seq_lens, states)
        B = len(seq_lens)  # stateless rectangular batch (training): one chunked call
        u, _ = window_chunked(
            q.view(H, G, B, T, D).permute(2, 0, 1, 3, 4),  # (B, H, G, T, D)
            k.view(H, B, T, D).transpose(0, 1), v.view(H, B, T, V).transpose(0, 1),  # (B, H, T, D)
            fq.view(H, G, B, T, -1).permute(2, 0, 1, 3, 4),  # (B, H, G, T, K)
            g.view(H, -1, B, T, g.shape[-1]).permute(2, 0, 1, 3, 4),  # (B, H, S, T, K)
            self.mix(), self.window_factor(), self.key_feature, None,
            window=self.cfg.window, sinks=self.cfg.sinks, chunk_size=self.cfg.chunk_size)
        return u.permute(1, 2, 0, 3, 4).reshape(H, G, B * T, V + 1)  # (H, G, N, V+1)

    def _run_window_requests(self, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, g: Tensor,
                             seq_lens: Sequence[int], states: Sequence[DSLAState] | None) -> Tensor:
        """Each request's tokens as one chunked call continuing from its state (single-token
        decodes with a state never get here: ``forward`` sends them to ``_decode_step``)."""
        H, G, N, _ = q.shape
        V = v.shape[-1]
        u = fq.new_empty(H, G, N, V + 1)
        starts = torch.tensor([0, *seq_lens]).cumsum(0).tolist()
        for r in range(len(seq_lens)):
            sl = slice(starts[r], starts[r + 1])  # one request: a batch of 1
            s0 = None
            if states is not None:
                st = states[r]
                sinks = () if not self.cfg.sinks else (self._rows(st.sink_k)[None], self._rows(st.sink_v)[None],
                                                        torch.tensor([st.length], device=q.device))
                s0 = WindowState(self._rows(st.state)[None], *(self._rows(t)[None] for t in st.ordered_window()),
                                 torch.tensor([st.window_count], device=q.device), *sinks)
            ur, s1 = window_chunked(q[:, :, None, sl].permute(2, 0, 1, 3, 4), k[None, :, sl], v[None, :, sl],
                                    fq[:, :, None, sl].permute(2, 0, 1, 3, 4), g[None, :, :, sl],
                                    self.mix(), self.window_factor(), self.key_feature, s0,
                                    window=self.cfg.window, sinks=self.cfg.sinks, chunk_size=self.cfg.chunk_size)
            u[:, :, sl] = ur[0]
            if states is None:
                continue
            check_finite(s1.states, k[:, sl], v[:, sl])  # rows already in a window were checked when they came
            st.state, st.length = self._merged(st.state, s1.states[0]), st.length + seq_lens[r]
            heads = self._dsla_heads(q.device)[0] if self.exact_groups else None
            st.set_ordered_window(s1.k[0], s1.v[0], heads)  # the rows stay in their preallocated buffers
            if self.cfg.sinks:
                self._put_rows(st.sink_k, s1.sink_k[0])
                self._put_rows(st.sink_v, s1.sink_v[0])
        return u

    def _split_decodes(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: Sequence[int],
                       states: Sequence[DSLAState]) -> Tensor:
        """A step mixing decodes (one token) with prefill chunks: the decodes through
        ``_decode_step``, the chunks through the chunked path; outputs back in token order."""
        dec = [r for r, L in enumerate(seq_lens) if L == 1]
        rest = [r for r, L in enumerate(seq_lens) if L != 1]
        i_dec, i_rest = token_index(seq_lens, dec, x.device), token_index(seq_lens, rest, x.device)
        out = x.new_empty(x.shape[0], self.o_proj.out_features)
        out[i_dec] = self._decode_step(x[i_dec], cos[i_dec], sin[i_dec], [states[r] for r in dec])
        out[i_rest] = self(x[i_rest], cos[i_rest], sin[i_rest], [seq_lens[r] for r in rest], [states[r] for r in rest])
        return out

    def _decode_step(self, x: Tensor, cos: Tensor, sin: Tensor, states: Sequence[DSLAState]) -> Tensor:
        """A pure decode step (one token per request) with the exact window: the projections,
        then everything between them in one call of our CPU kernel (``window_decode_cpu``) where
        it applies, else ``window_decode_layer`` (compiled when ``use_compiled_decode(True)``), on
        the requests' ring buffers.

        The requests' states and windows are left as the rows of one (R, ...) tensor each
        (``DecodeBatch``), so the next step with the same requests in the same order uses them as
        they are: no stacking copy, and the window rows are written in place. Non-finite k / v
        are refused before the rows are written. Non-finite states reach o, which raises
        ``FloatingPointError``: the torch step then has not stored the new states, the kernel
        has (it updates them in place), so after that error the requests' states are not to be
        used again (the engine fails the step's requests and drops their caches)."""
        k_raw, v = self.teacher.kv(x)
        check_finite(k_raw, v)  # before the ring is written: a key of -inf could hide behind w = 0
        lengths = torch.tensor([s.length for s in states], device=x.device)
        batch = DecodeBatch.of(states)
        s0 = batch.states if batch else torch.stack([s.state for s in states])  # (R, H, S, K, V+1)
        rk = batch.k if batch else torch.stack([s.window_k for s in states])  # (R, H, W, D)
        rv = batch.v if batch else torch.stack([s.window_v for s in states])
        sk = sv = None
        if self.cfg.sinks:  # (R, H, S, D)
            sk = batch.sk if batch else torch.stack([s.sink_k for s in states])
            sv = batch.sv if batch else torch.stack([s.sink_v for s in states])
        q = self.q_proj(x)
        p = self._all_head_params()
        lib = self._window_kernel(q, p, s0, rk, rv, sk, sv)
        if lib is not None:  # our C++ step: the states updated in place (s0 is this batch's own tensor)
            lc = self.lcfg
            qr, kr = rope_qk(q, k_raw, cos, sin, lc.num_key_value_heads, lc.head_dim)
            o = window_decode_cpu(lib, qr.contiguous(), kr.contiguous(), k_raw.reshape(kr.shape).contiguous(),
                                  v.reshape(kr.shape).contiguous(), p, s0, rk, rv, sk, sv, lengths, self.cfg.eps)
            s1 = s0
        else:
            o, s1, qr, kr = decode_layer_fn()(q, k_raw, v, cos, sin, *p, s0, rk, rv, lengths, self.cfg.eps, sk, sv)
        check_finite(o)  # NaN / inf in the states reach o; the engine then fails the step's requests and
        # drops their caches (the ring row is written, and with the kernel the states too)
        DecodeBatch(s1, rk, rv, sk, sv).assign(states)
        if self.exact_groups:  # their heads of o: softmax over each request's cached KV of those heads
            lc, R = self.lcfg, o.shape[0]
            kh, qh = self._exact_heads(x.device)
            # q and k as the step rotated them (R, H, G, D), (R, H, D): the heads of the exact groups
            qe = qr.reshape(R, lc.num_attention_heads, -1).index_select(1, qh).transpose(0, 1)  # (nG, R, D)
            ke = kr.index_select(1, kh).transpose(0, 1)  # (n, R, D)
            ve = v.view(R, lc.num_key_value_heads, -1).index_select(1, kh).transpose(0, 1)
            e = decode_attention(qe, ke, ve, [s.exact for s in states])  # (R, nG*D)
            o = o.view(R, lc.num_attention_heads, -1).index_copy(1, qh, e.view(R, len(qh), -1))
            o = o.view(R, -1)
        return self.o_proj(o)

    def _window_kernel(self, q: Tensor, p: HeadParams, *buffers: Tensor | None):
        """Our CPU kernel library when it takes this decode step (``window_decode_cpu``), else None
        (kernels off or not built, another device or dtype, a gradient wanted, odd sizes or layouts)."""
        lc, cfg = self.lcfg, self.cfg
        if q.device.type != "cpu" or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                q.requires_grad or any(t is not None and t.requires_grad for t in p))):
            return None
        if not window_decode_fits(q.dtype, lc.head_dim, lc.num_attention_heads // lc.num_key_value_heads,
                                  cfg.feature_dim, cfg.num_states, cfg.window, cfg.sinks) \
                or any(t is not None and (t.dtype != q.dtype or not t.is_contiguous()) for t in p) \
                or any(t is not None and not t.is_contiguous() for t in buffers):
            return None
        return cpu_kernels_lib()

    def _run_requests(self, fq: Tensor, fk: Tensor, v1: Tensor, g: Tensor, mix: Tensor,
                      seq_lens: Sequence[int], states: Sequence[DSLAState] | None) -> Tensor:
        """Per-request chunked prefill; all single-token decodes batched into one step call."""
        H, G, N, _ = fq.shape
        u = fq.new_empty(H, G, N, v1.shape[-1])
        starts = torch.tensor([0, *seq_lens]).cumsum(0).tolist()
        decode = [r for r, L in enumerate(seq_lens) if L == 1 and states is not None]
        if decode:
            idx = torch.tensor([starts[r] for r in decode], device=fq.device)
            s0 = torch.stack([self._rows(states[r].state) for r in decode])  # (R, H, S, K, V+1)
            ur, s1 = dsla_step(fq[:, :, idx].permute(2, 0, 1, 3)[:, :, :, None],  # (R, H, G, 1, K)
                               fk[:, idx].transpose(0, 1)[:, :, None],  # (R, H, 1, K)
                               v1[:, idx].transpose(0, 1)[:, :, None],
                               g[:, :, idx].permute(2, 0, 1, 3)[:, :, :, None], mix, s0)
            check_finite(s1)
            u[:, :, idx] = ur[:, :, :, 0].permute(1, 2, 0, 3)
            for j, r in enumerate(decode):
                states[r].state, states[r].length = self._merged(states[r].state, s1[j]), states[r].length + 1
        for r, L in enumerate(seq_lens):
            if r in decode:
                continue
            sl = slice(starts[r], starts[r + 1])
            s0 = None if states is None else self._rows(states[r].state)[None]
            ur, s1 = dsla_chunked(fq[None, :, :, sl], fk[None, :, sl], v1[None, :, sl], g[None, :, :, sl],
                                  mix, s0, chunk_size=self.cfg.chunk_size)
            u[:, :, sl] = ur[0]
            if states is not None:
                check_finite(s1)
                states[r].state, states[r].length = self._merged(states[r].state, s1[0]), states[r].length + L
        return u

    def fold(self, kv: KVState, inv_freq: Tensor) -> DSLAState:
        """The DSLA state (and window) this layer would hold after a prefill over the cached k, v;
        the exact groups' rows of the cache are kept as they are (same capacity)."""
        st = self._fold(kv, inv_freq)
        if self.exact_groups:
            kh = self._exact_heads(kv.k.device)[0]
            st.exact = KVState(len(kh), kv.k.shape[-1], kv.k.dtype, kv.k.device, kv.capacity)
            st.exact.append(kv.k.index_select(0, kh), kv.v.index_select(0, kh))
        return st

    def _fold(self, kv: KVState, inv_freq: Tensor) -> DSLAState:
        T = kv.length
        if T == 0:
            return self.new_state(kv.k.device)  # fold replaces its exact groups' buffer
        cos, sin = rope_cos_sin(torch.arange(T, device=kv.k.device), inv_freq)
        k, v = kv.k, kv.v  # (Hkv, T, D)
        if self.exact_groups:  # the DSLA heads' rows
            kd = self._dsla_heads(k.device)[0]
            k, v = k.index_select(0, kd), v.index_select(0, kd)
        out = self.new_state(kv.k.device)  # zeros: an exact group's rows stay so
        out.length = T
        if not self.dsla_groups:
            return out
        with torch.no_grad():
            if self.cfg.window:  # tokens older than the window into the states, the last W rows kept
                ws = window_fold(k[None], v[None], self.log_gates(unapply_rope(k, cos, sin))[None],
                                 self.key_feature, None, window=self.cfg.window, sinks=self.cfg.sinks,
                                 chunk_size=self.cfg.chunk_size)
                self._put_rows(out.state, ws.states[0])
                for full, rows in [(out.window_k, ring_from_ordered(ws.k[0], T)), (out.window_v, ring_from_ordered(ws.v[0], T))] \
                        + ([(out.sink_k, ws.sink_k[0]), (out.sink_v, ws.sink_v[0])] if self.cfg.sinks else []):
                    self._put_rows(full, rows)
                return out
            fk, v1, g = self.key_side(unapply_rope(k, cos, sin), k, v)
            s = dsla_fold(fk[None], v1[None], g[None], None, chunk_size=self.cfg.chunk_size)
        self._put_rows(out.state, s[0])
        return out


# ---- the layer's maps as functions of their weights (shared with window_decode_layer) ---------
def feature_map(x: Tensor, w: Tensor) -> Tensor:
    """Hedgehog-style positive features per KV head, [softmax(xW), softmax(-xW)]: x (H, ..., D),
    w (H, D, F) -> (H, ..., 2F) in x's dtype (the projection in x's dtype, the softmax in fp32)."""
    y = torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), w.to(x.dtype)).float()  # (H, M, F)
    return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1).to(x.dtype).view(*x.shape[:-1], -1)


def log_decays(z: Tensor, w_hist: Tensor, b_hist: Tensor, w_rec: Tensor | None, b_rec: Tensor | None) -> Tensor:
    """Log decays (H, S, N, K) float32 from float keys before RoPE z (H, N, D): logsigmoid of the
    history gate (and, for two states, the recency gate), each a per-head linear map plus bias."""
    gates = [F.logsigmoid(torch.matmul(z, w_hist.float()) + b_hist.float())]
    if w_rec is not None:
        gates.append(F.logsigmoid(torch.matmul(z, w_rec.float()) + b_rec.float()))
    return torch.stack(gates, dim=1)


def state_mix(mix_logits: Tensor | None, heads: int, group: int, device: torch.device) -> Tensor:
    """(H, G, S) weights of the states per query head: [gamma, 1 - gamma], or ones for one state."""
    if mix_logits is None:
        return torch.ones(heads, group, 1, device=device)
    gamma = torch.sigmoid(mix_logits.float()).view(heads, group, 1)
    return torch.cat([gamma, 1 - gamma], dim=-1)


def window_decode_layer(q: Tensor, k_raw: Tensor, v: Tensor, cos: Tensor, sin: Tensor, w_fq: Tensor, w_fk: Tensor,
                        w_hist: Tensor, b_hist: Tensor, w_rec: Tensor | None, b_rec: Tensor | None,
                        mix_logits: Tensor | None, window_log_scale: Tensor, states: Tensor, ring_k: Tensor,
                        ring_v: Tensor, lengths: Tensor, eps: float, sink_k: Tensor | None = None,
                        sink_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A DSLA layer's decode step between its projections, for R requests, as one pure function
    of tensors (the module's parameters are arguments, so one ``torch.compile`` serves every
    layer): RoPE, the feature maps and gates (``feature_map``, ``log_decays``, ``state_mix``, as
    the module computes them), ``window_decode_math``, the normalisation.

    q (R, Hq*D), k_raw / v (R, Hkv*D) straight from q_proj / k_proj / v_proj; cos, sin (R, D);
    states, rings, lengths and sinks as ``window_decode`` takes them (rings and sinks are written in place).
    Returns o (R, Hq*D) in q's dtype, ready for o_proj, the new states, and q and k after RoPE,
    (R, H, G, D) and (R, H, D) (the exact KV groups' heads attend with them).
    """
    R = q.shape[0]
    H, D, _ = w_fq.shape
    G = q.shape[1] // (H * D)
    dt = q.dtype

    def phi(t: Tensor, w: Tensor) -> Tensor:  # (R, H, n, D) -> (R, H, n, 2F)
        return feature_map(t.transpose(0, 1), w).transpose(0, 1)

    qr, k = rope_qk(q, k_raw, cos, sin, H, D)
    k_raw = k_raw.view(R, H, D)
    log_gates = log_decays(k_raw.float().transpose(0, 1), w_hist, b_hist, w_rec, b_rec).permute(2, 0, 1, 3)  # (R, H, S, K)
    mix = state_mix(mix_logits, H, G, q.device)
    factor = window_log_scale.float().exp().view(H, G)  # as DSLAAttention.window_factor
    u, st = window_decode_math(qr, k, v.view(R, H, -1), phi(qr, w_fq), log_gates, mix, factor,
                               lambda t: phi(t, w_fk), states, ring_k, ring_v, lengths, sink_k, sink_v)
    V = u.shape[-1] - 1
    o = u[..., :V] / (u[..., V:].float() + eps).to(u.dtype)  # (R, H, G, V)
    return o.reshape(R, -1).to(dt), st, qr, k


def rope_qk(q: Tensor, k_raw: Tensor, cos: Tensor, sin: Tensor, heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """q (R, Hq*D) and k (R, H*D) of a decode step after RoPE, as (R, H, G, D) and (R, H, D)."""
    R, D = q.shape[0], head_dim
    tables = rope_tables(cos, sin, q.dtype)  # once for q and k (both come from x, in q's dtype)

    def rope(t: Tensor) -> Tensor:  # (R, n, D): rotate takes the positions second to last
        return rotate(t.transpose(0, 1), *tables).transpose(0, 1)

    return rope(q.view(R, -1, D)).view(R, heads, -1, D), rope(k_raw.reshape(R, heads, D))


# the arguments of window_decode_layer with one row per request (dim 0): q, k_raw, v, cos, sin,
# states, ring_k, ring_v, lengths, sink_k, sink_v
_PER_REQUEST = (0, 1, 2, 3, 4, 13, 14, 15, 16, 18, 19)


def decode_layer_fn():
    """``window_decode_layer``, compiled or not (``dsla.ops.compiled.use_compiled_decode``)."""
    # dynamic=None: sizes are specialised but the number of requests, which SafeCompiled marks
    # dynamic. dynamic=True made every size symbolic (heads, window, dims), and inductor's kernels
    # for that were ~1.6x slower (161 vs 258 us per layer at 1 request, 489 vs 774 at 8; student
    # shapes, 2 threads, AVX-512)
    return decode_kernel(window_decode_layer, dynamic=None, batch_args=_PER_REQUEST)


def warm_up_decode(model) -> bool:
    """Run a DSLA layer's decode step on zero states for 1, then 2 requests (``model`` a
    ``HybridLM`` with DSLA modules), so that with ``use_compiled_decode(True)`` the compiler's wait
    (the graph for one request and the one for any number) happens now, not at the first
    conversion under load. Nothing of the model changes; the states are thrown away. Returns
    whether the step is now compiled (False: the switch is off, no layer has a window, or
    compiling failed and the step runs eagerly)."""
    mod = next((m for m in model.dsla.values() if m.cfg.window), None)
    if mod is None:  # the compiled step serves window layers only
        return False
    dtype, device = mod.feature_q.weight.dtype, mod.feature_q.weight.device
    with torch.inference_mode():
        for R in (1, 2):
            cos, sin = rope_cos_sin(torch.zeros(R, dtype=torch.long, device=device), model.inv_freq)
            mod(torch.zeros(R, mod.lcfg.hidden_size, dtype=dtype, device=device), cos, sin, [1] * R,
                [mod.new_state(device) for _ in range(R)])
    return getattr(decode_layer_fn(), "compiled", False)


class DecodeBatch:
    """The states and windows of R requests after a decode step, as (R, ...) tensors whose rows
    the requests hold (``DSLAState.batch`` points here). Rebuilding the stack every step copied
    every request's state and window in every DSLA layer; this keeps them stacked while the batch
    stays the same. Identity checks only: cheap next to the copies they save."""

    __slots__ = ("states", "k", "v", "sk", "sv", "rows")

    def __init__(self, states: Tensor, k: Tensor, v: Tensor, sk: Tensor | None = None,
                 sv: Tensor | None = None) -> None:
        self.states, self.k, self.v, self.sk, self.sv = states, k, v, sk, sv
        R = states.shape[0]
        sinks = (sk.unbind(0), sv.unbind(0)) if sk is not None else ((None,) * R, (None,) * R)
        self.rows = list(zip(states.unbind(0), k.unbind(0), v.unbind(0), *sinks))

    def assign(self, states: Sequence[DSLAState]) -> None:
        """Advance each request by one token, its state, window and sinks now this batch's rows."""
        for j, (s, rows) in enumerate(zip(states, self.rows)):
            s.state, s.window_k, s.window_v, s.sink_k, s.sink_v = rows
            s.length += 1
            s.batch = (self, j)

    @staticmethod
    def of(states: Sequence[DSLAState]) -> DecodeBatch | None:
        """The batch these requests' rows still are, in this order, or None."""
        first = states[0].batch
        if first is None or len(first[0].rows) != len(states):
            return None
        batch = first[0]
        for j, s in enumerate(states):
            st, wk, wv, sk, sv = batch.rows[j]
            if s.batch is None or s.batch[0] is not batch or s.batch[1] != j or s.state is not st \
                    or s.window_k is not wk or s.window_v is not wv or s.sink_k is not sk or s.sink_v is not sv:
                return None
        return batch


def check_finite(*tensors: Tensor) -> None:
    """Raise FloatingPointError when any of ``tensors`` holds a NaN or an infinity.

    Their minima and maxima (NaN propagates through both) in one ``aminmax`` pass each, read back
    with one sync and checked in Python: ``isfinite(t).all()`` allocates a bool tensor the size of
    the state and costs ~13x more (757 vs 58 us for 8 requests' states, one thread), and
    ``isfinite`` on the two scalars is itself four small ops, paid per tensor in every DSLA layer
    of a decode step."""
    ends = [end for t in tensors if t.numel() for end in torch.aminmax(t)]
    if ends and not all(map(math.isfinite, torch.stack(ends).tolist())):
        raise FloatingPointError(
            "DSLA state became non-finite (NaN/inf in this step's inputs); the state was not saved")
