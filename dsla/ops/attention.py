"""Softmax attention: causal over a request's new tokens (with an optional cached prefix), and one
decode step over cached keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla.ops.compiled import decode_kernel


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of L new queries over T >= L keys, the last L of which are the new tokens.

    q: (B, Hq, L, D); k, v: (B, Hkv, T, D) with Hq a multiple of Hkv (GQA). Query i sits at
    position T - L + i and sees keys 0..T-L+i. Returns (B, Hq, L, D).
    """
    L, T = q.shape[-2], k.shape[-2]
    if L == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if L == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # A chunk continuing a cached prefix: bottom-right aligned causal mask.
    mask = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(diagonal=T - L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_attention_math(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """Softmax attention of one decode step over each request's cached keys, in float32.

    q: (R, H, G, D), the G query heads of each of the H KV heads; k, v: (R, H, L, D); lengths:
    (R,) int64, request r's keys past ``lengths[r]`` are padding (a ``KVBatch`` row) and masked.
    Returns (R, H, G, D) in q's dtype.

    The form ``torch.compile`` turns into fused loop nests (one over the scores, one over the
    values) that read each cache once. On a 2-core AVX-512 CPU in bf16 it took 0.6-0.7x the time of
    SDPA's one-query kernel at 4-48 requests and 0.25-4k tokens (``scripts/bench_decode_attention.py``).
    Eagerly it would materialise an (R, H, G, L, D) product: eager callers use
    ``decode_attention_sdpa``.
    """
    L = k.shape[2]
    s = (q.float()[:, :, :, None, :] * k.float()[:, :, None]).sum(-1) * q.shape[-1] ** -0.5  # (R, H, G, L)
    pad = torch.arange(L, device=q.device)[None] >= lengths[:, None]  # (R, L)
    p = torch.softmax(s.masked_fill(pad[:, None, None], float("-inf")), dim=-1)
    return (p[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)


def decode_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """``decode_attention_math`` through SDPA (the eager form): same arguments and result."""
    L = k.shape[2]
    mask = None
    if bool((lengths != L).any()):
        mask = (torch.arange(L, device=q.device)[None] < lengths[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention_fn():
    """The decode attention kernel: ``decode_attention_math`` compiled when the decode kernels
    are (``dsla.ops.compiled.use_compiled_decode``), else ``decode_attention_sdpa``. Every size is
    dynamic (requests and cache lengths change at every step), so a few graphs serve all steps."""
    return decode_kernel(decode_attention_math, decode_attention_sdpa, dynamic=True)
