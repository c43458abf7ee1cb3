"""A Llama causal LM in plain PyTorch whose layers can run softmax attention or DSLA, per request.

Parameter names follow the Hugging Face checkpoint (``model.layers.3.self_attn.q_proj.weight``),
so a teacher loads with ``strict=True`` and no rename table. DSLA layers live apart, in
``HybridLM.dsla`` (keyed by layer index), so the teacher's own weights stay untouched.

Every forward takes a *flattened* batch: the new tokens of R requests concatenated, (N,), with
``seq_lens`` giving each request's count. With ``caches`` each request continues from its own
cache (prefill chunks and decode steps can share one forward); without, each sequence starts
from scratch and ``plan`` says which layers run DSLA.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from dsla.config import DSLAConfig, LlamaConfig
from dsla.model.state import (DSLAState, KVBatch, KVState, LayerState, RequestCache, append_one_token,
                              room_for_one_more)
from dsla.ops.attention import causal_attention
from dsla.ops import cpu_kernels
from dsla.ops.cpu_kernels import decode_attention_cpu, cpu_kernels_lib, kernel_fits, kv_meta
from dsla.ops.rope import rope_cos_sin, rope_inv_freq, rope_tables, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # HF Llama's order: normalise in float32, round to x's dtype, then scale (torch's fused
        # rms_norm without a weight gives the same bits as the spelled-out float32 formula).
        # the same in one call (a last-bit rounding apart in ~3 per million elements; None: not here)
        fused = cpu_kernels.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(N, H*D) -> (H, N, D)."""
    return x.view(x.shape[0], num_heads, -1).transpose(0, 1)


def uniform_length(seq_lens: Sequence[int], states: Sequence | None) -> int | None:
    """The common length when a batch is stateless and rectangular (the fast batched path)."""
    if states is None and len(set(seq_lens)) == 1:
        return seq_lens[0]
    return None


class LlamaAttention(nn.Module):
    """Softmax attention with GQA and RoPE; one KVState per request when cached."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, Hq, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, Hq * D, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=False)
        self.o_proj = nn.Linear(Hq * D, cfg.hidden_size, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor,
                   rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keys before RoPE, keys after RoPE, values; each (Hkv, N, D). Shared with DSLA.
        ``rope``: ``rope_tables(cos, sin, x.dtype)`` when the caller already built them."""
        k2, v2 = self.kv(x)
        k_raw = split_heads(k2, self.cfg.num_key_value_heads)
        v = split_heads(v2, self.cfg.num_key_value_heads)
        return k_raw, rotate(k_raw, *(rope or rope_tables(cos, sin, x.dtype))), v

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """k (before RoPE) and v, (N, Hkv*D) each: one call of ``kv_proj`` where ``quantize_model``
        fused k_proj and v_proj into it (then views of its output), else the two projections."""
        if hasattr(self, "kv_proj"):
            kv = self.kv_proj(x)
            n = kv.shape[-1] // 2
            return kv[..., :n], kv[..., n:]
        return self.k_proj(x), self.v_proj(x)

    def new_state(self, dtype: torch.dtype, device: torch.device, capacity: int = 64) -> KVState:
        return KVState(self.cfg.num_key_value_heads, self.cfg.head_dim, dtype, device, capacity)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: Sequence[int],
                states: Sequence[KVState] | None = None) -> Tensor:
        """x: (N, hidden); cos/sin: (N, D); returns (N, hidden)."""
        rope = rope_tables(cos, sin, x.dtype)  # once for q and k
        q = rotate(split_heads(self.q_proj(x), self.cfg.num_attention_heads), *rope)  # (Hq, N, D)
        _, k, v = self.project_kv(x, cos, sin, rope)  # (Hkv, N, D)
        T = uniform_length(seq_lens, states)
        if states is not None and len(seq_lens) == x.shape[0]:  # every request adds one token
            o = decode_attention(q, k, v, states)
        elif T is not None:
            B = len(seq_lens)
            to_batch = lambda t: t.view(t.shape[0], B, T, -1).transpose(0, 1)  # noqa: E731  (B, H, T, D)
            o = causal_attention(to_batch(q), to_batch(k), to_batch(v))  # (B, Hq, T, D)
            o = o.transpose(1, 2).reshape(B * T, -1)
        elif states is not None and sum(L == 1 for L in seq_lens) >= 2:
            # a step mixing prefill chunks and decodes: the decodes attend together, as in a pure
            # decode step; the prefill chunks one by one below
            dec = [r for r, L in enumerate(seq_lens) if L == 1]
            rest = [r for r, L in enumerate(seq_lens) if L != 1]
            i_dec, i_rest = token_index(seq_lens, dec, x.device), token_index(seq_lens, rest, x.device)
            o = q.new_empty(x.shape[0], q.shape[0] * q.shape[2])
            o[i_dec] = decode_attention(q[:, i_dec], k[:, i_dec], v[:, i_dec], [states[r] for r in dec])
            o[i_rest] = self._one_by_one(q[:, i_rest], k[:, i_rest], v[:, i_rest], [seq_lens[r] for r in rest],
                                         [states[r] for r in rest])
        else:
            o = self._one_by_one(q, k, v, seq_lens, states)
        return self.o_proj(o)

    def _one_by_one(self, q: Tensor, k: Tensor, v: Tensor, seq_lens: Sequence[int],
                    states: Sequence[KVState] | None) -> Tensor:
        """Attention request by request: q (Hq, N, D) and k (Hkv, N, D) after RoPE, v (Hkv, N, D);
        the N tokens of ``seq_lens``'s requests in order; each request continues its state, if
        given. Returns (N, Hq*D)."""
        outs, start = [], 0
        for r, L in enumerate(seq_lens):
            qr, kr, vr = (t[:, start: start + L] for t in (q, k, v))
            if states is not None:
                kr, vr = states[r].append(kr, vr)  # (Hkv, T, D): prefix + new
            lib = cpu_kernels_lib() if L == 1 and states is not None and kernel_fits(qr, kr, vr, kr.dtype) else None
            if lib is not None:
                outs.append(decode_attention_cpu(lib, qr, kv_meta(states[r: r + 1]), self.cfg.num_key_value_heads))
            elif L == 1 and qr.dtype != torch.float32:
                # Decode: a group's G query heads become G "queries" of their KV head, so SDPA
                # runs on the KV heads directly. On CPU, enable_gqa in bf16/fp16 falls back to a
                # path ~6x slower; in fp32 it is fine and splits better over threads (9 heads, not 3).
                Hkv = self.cfg.num_key_value_heads
                o_r = F.scaled_dot_product_attention(qr.view(1, Hkv, -1, qr.shape[-1]), kr[None], vr[None])
                outs.append(o_r.reshape(1, -1))  # (1, Hkv, G, D) -> (1, Hq*D)
            else:
                o_r = causal_attention(qr[None], kr[None], vr[None])[0]  # (Hq, L, D)
                outs.append(o_r.transpose(0, 1).reshape(L, -1))
            start += L
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, states: Sequence[KVState]) -> Tensor:
    """One decode step of R requests: append each request's new key and value to its KVState
    (one copy call for all), then attend over each request's cache in place.

    q: (Hq, R, D) after RoPE; k, v: (Hkv, R, D). Returns (R, Hq*D). On the CPU, one call of our
    kernel (``dsla.ops.cpu_kernels``) reads every request's cache where it is. Without it (not
    built, turned off, another device or dtype): requests whose caches have one capacity share one
    SDPA call over their ``KVBatch`` (their buffers are rows of one tensor; lengths masked): at
    batch 8 and 512 tokens one call took 199 us against 315 us for eight. A request alone in its
    capacity gets its own call, on views of its cache.
    """
    Hq, R, D = q.shape
    Hkv = k.shape[0]
    lib = cpu_kernels_lib() if kernel_fits(q, k, v, states[0].dtype) else None
    if lib is not None:  # our CPU kernel: appends and attends with each cache where it is
        room_for_one_more(states)
        o = decode_attention_cpu(lib, q, kv_meta(states), Hkv, new_kv=(k, v))
        for s in states:
            s.length += 1
        return o
    append_one_token(states, torch.stack([k, v]))  # (2, Hkv, R, D)
    gqa = q.dtype == torch.float32  # enable_gqa is fine in fp32 and splits over 9 heads, not 3
    if gqa:
        qb = q.transpose(0, 1)[:, :, None]  # (R, Hq, 1, D)
    else:
        # A group's G query heads become G "queries" of their KV head, so SDPA runs on the KV heads
        # directly. On CPU, enable_gqa in bf16/fp16 falls back to a path ~6x slower.
        qb = q.view(Hkv, Hq // Hkv, R, D).permute(2, 0, 1, 3)  # (R, Hkv, G, D)
    by_capacity: dict[int, list[int]] = {}
    for r, s in enumerate(states):
        by_capacity.setdefault(s.capacity, []).append(r)
    if len(by_capacity) == 1 and R > 1:
        o = _attend_kv_batch(qb, states, gqa)
    else:
        outs: list[Tensor | None] = [None] * R
        for rows in by_capacity.values():
            if len(rows) == 1:
                r = rows[0]
                outs[r] = F.scaled_dot_product_attention(qb[r: r + 1], *states[r].batch_views(), enable_gqa=gqa)
            else:
                o = _attend_kv_batch(qb[rows], [states[r] for r in rows], gqa)
                for j, r in enumerate(rows):
                    outs[r] = o[j: j + 1]
        o = torch.cat(outs) if R > 1 else outs[0]
    return o.reshape(R, Hq * D)  # (R, Hkv, G, D) or (R, Hq, 1, D): head-major either way


def _attend_kv_batch(qb: Tensor, states: Sequence[KVState], gqa: bool) -> Tensor:
    """One SDPA call for requests of one capacity: their ``KVBatch`` up to the longest length,
    the shorter ones' rows past their length masked. qb (R, heads, queries, D)."""
    kv = KVBatch.of(states).kv
    lengths = [s.length for s in states]
    L = max(lengths)
    mask = None
    if min(lengths) != L:
        mask = (torch.arange(L, device=qb.device)[None] < torch.tensor(lengths, device=qb.device)[:, None])[:, None, None]
    return F.scaled_dot_product_attention(qb, kv[0, :, :, :L], kv[1, :, :, :L], attn_mask=mask, enable_gqa=gqa)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):  # gate_proj and up_proj fused by quantize_model: one call
            gu = self.gate_up_proj(x)
            n = gu.shape[-1] // 2
            return self.down_proj(F.silu(gu[..., :n]) * gu[..., n:])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)


class LlamaBackbone(nn.Module):
    """Holds the teacher's weights under HF names (``model.*``)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def token_index(seq_lens: Sequence[int], requests: Sequence[int], device: torch.device) -> Tensor:
    """Indices into a flattened batch of the tokens of ``requests`` (in that order)."""
    starts = torch.tensor([0, *seq_lens]).cumsum(0).tolist()
    return torch.cat([torch.arange(starts[r], starts[r + 1]) for r in requests]).to(device)


def mixed_attention(attn: nn.Module, dsla: nn.Module | None, x: Tensor, cos: Tensor, sin: Tensor,
                    seq_lens: Sequence[int], states: Sequence[LayerState]) -> Tensor:
    """Run one layer for requests whose state for it may be KVState or DSLAState (mixed batch)."""
    is_dsla = [isinstance(s, DSLAState) for s in states]
    if all(is_dsla) or not any(is_dsla):
        return (dsla if is_dsla[0] else attn)(x, cos, sin, seq_lens, states)
    if dsla is None:
        raise RuntimeError("a request holds a DSLA state for a layer that has no DSLA module")
    out = torch.empty_like(x)
    for want, module in ((False, attn), (True, dsla)):
        rs = [r for r in range(len(states)) if is_dsla[r] == want]
        idx = token_index(seq_lens, rs, x.device)
        out[idx] = module(x[idx], cos[idx], sin[idx], [seq_lens[r] for r in rs], [states[r] for r in rs])
    return out


class HybridLM(nn.Module):
    """Llama causal LM whose layer i runs attention or DSLA according to each request's cache."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dsla = nn.ModuleDict()  # str(layer index) -> DSLAAttention
        self.weights = "native"  # linear-layer storage: a dsla.model.quant preset (quantize_model sets it)
        # Training without caches: recompute each layer's activations in the backward pass instead of
        # keeping them (activation checkpointing; ``dsla distill --recompute``).
        self.recompute_layers = False
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    # ---- building hybrids -------------------------------------------------------------------
    def add_dsla(self, layers: Iterable[int], dsla_cfg: DSLAConfig | None = None) -> None:
        """Attach a fresh DSLA module (initialised from the teacher's attention) to each layer."""
        from dsla.model.dsla import DSLAAttention

        if self.weights != "native":
            raise ValueError(f"the model's weights are quantised ({self.weights}): add or load DSLA layers "
                             "before quantising (DSLA is initialised from the unquantised teacher)")
        for i in layers:
            self._check_layer(i)
            attn = self.model.layers[i].self_attn
            mod = DSLAAttention(attn, dsla_cfg or DSLAConfig())
            self.dsla[str(i)] = mod.to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)

    def dsla_layers(self) -> list[int]:
        """Layers that have a DSLA module (and so can be converted)."""
        return sorted(int(i) for i in self.dsla.keys())

    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.cfg.num_hidden_layers:
            raise ValueError(f"layer index {i} is out of range for a {self.cfg.num_hidden_layers}-layer model")

    def new_cache(self, dsla_layers: Iterable[int] = (), capacity: int = 64) -> RequestCache:
        """An empty cache for a new request; layers in ``dsla_layers`` run DSLA for it, the others
        get KV buffers with room for ``capacity`` tokens (they grow when needed; so do the KV
        buffers of DSLA layers' exact groups)."""
        dset = set(dsla_layers)
        for i in dset:
            self._check_layer(i)
            if str(i) not in self.dsla:
                raise ValueError(f"layer {i} has no DSLA module: add or load one before converting it")
        w = self.model.embed_tokens.weight
        return RequestCache([
            self.dsla[str(i)].new_state(w.device, capacity) if i in dset
            else self.model.layers[i].self_attn.new_state(w.dtype, w.device, capacity)
            for i in range(self.cfg.num_hidden_layers)])

    def convert_layer(self, cache: RequestCache, i: int) -> int:
        """Switch layer i of a live request to DSLA by folding its KV into state; return bytes freed."""
        s = cache.layers[i]
        if isinstance(s, DSLAState):
            return 0
        if str(i) not in self.dsla:
            raise ValueError(f"layer {i} has no DSLA module: add or load one before converting it")
        new = self.dsla[str(i)].fold(s, self.inv_freq)
        s.leave_batch()  # the other requests' rows of its KVBatch move out, so its row is freed with it
        cache.layers[i] = new
        return s.nbytes - new.nbytes

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, seq_lens: Sequence[int] | None = None,
                caches: Sequence[RequestCache] | None = None, dsla_layers: Iterable[int] = (),
                logits_for: Tensor | None = None) -> Tensor:
        """Logits for a flattened batch.

        input_ids: (N,) or (B, T) (then seq_lens defaults to [T]*B). caches: one per request,
        advanced in place; without caches each sequence starts at position 0 and the layers in
        ``dsla_layers`` run DSLA. logits_for: (M,) indices into N to compute logits for (default:
        all). Returns (M, vocab), or (B, T, vocab) for a (B, T) input with logits_for unset.
        """
        shape = input_ids.shape
        if input_ids.dim() == 2:
            seq_lens = [shape[1]] * shape[0] if seq_lens is None else seq_lens
            input_ids = input_ids.reshape(-1)
        if seq_lens is None:
            seq_lens = [input_ids.shape[0]]
        if sum(seq_lens) != input_ids.shape[0]:
            raise ValueError(f"seq_lens sum to {sum(seq_lens)} but there are {input_ids.shape[0]} tokens")
        if caches is not None and len(caches) != len(seq_lens):
            raise ValueError(f"{len(caches)} caches for {len(seq_lens)} requests")
        h = self.hidden_states(input_ids, seq_lens, caches, dsla_layers)
        if logits_for is not None:
            h = h[logits_for]
        logits = self.logits(h)
        if len(shape) == 2 and logits_for is None:
            logits = logits.view(*shape, -1)
        return logits

    def positions(self, seq_lens: Sequence[int], caches: Sequence[RequestCache] | None) -> Tensor:
        starts = [0] * len(seq_lens) if caches is None else [c.num_tokens for c in caches]
        return torch.cat([torch.arange(s, s + L) for s, L in zip(starts, seq_lens)])

    def hidden_states(self, input_ids: Tensor, seq_lens: Sequence[int],
                      caches: Sequence[RequestCache] | None = None, dsla_layers: Iterable[int] = ()) -> Tensor:
        """Final-norm hidden states (N, hidden); see ``forward``."""
        pos = self.positions(seq_lens, caches).to(input_ids.device)
        if caches is not None:
            limit = self.cfg.max_position_embeddings
            if int(pos.max()) >= limit:
                raise ValueError(f"position {int(pos.max())} exceeds the model's context of {limit} tokens")
        cos, sin = rope_cos_sin(pos, self.inv_freq)
        dset = set(dsla_layers)
        for i in dset if caches is None else ():
            if str(i) not in self.dsla:
                raise ValueError(f"layer {i} has no DSLA module: add or load one before converting it")
        recompute = self.recompute_layers and caches is None and torch.is_grad_enabled()
        x = self.model.embed_tokens(input_ids)
        for i in range(self.cfg.num_hidden_layers):
            if recompute:  # keep only each layer's input; its activations are recomputed in the backward pass
                x = torch.utils.checkpoint.checkpoint(self._layer, i, x, cos, sin, seq_lens, caches, i in dset,
                                                      use_reentrant=False)
            else:
                x = self._layer(i, x, cos, sin, seq_lens, caches, i in dset)
        if caches is not None:
            for c, L in zip(caches, seq_lens):
                c.num_tokens += L
        return self.model.norm(x)

    def _layer(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: Sequence[int],
               caches: Sequence[RequestCache] | None, converted: bool) -> Tensor:
        """Block i on the residual stream x (attention or DSLA, then the MLP)."""
        block = self.model.layers[i]
        h = block.input_layernorm(x)
        dsla = self.dsla[str(i)] if str(i) in self.dsla else None
        if caches is not None:
            h = mixed_attention(block.self_attn, dsla, h, cos, sin, seq_lens, [c.layers[i] for c in caches])
        elif converted:
            h = dsla(h, cos, sin, seq_lens, None)
        else:
            h = block.self_attn(h, cos, sin, seq_lens, None)
        x = x + h
        return x + block.mlp(block.post_attention_layernorm(x))

    def logits(self, h: Tensor) -> Tensor:
        if self.lm_head is None:  # tied to the embedding (a quantised model has its own lm_head module)
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)
