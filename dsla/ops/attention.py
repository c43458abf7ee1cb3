"""Causal softmax attention for one request, with an optional cached prefix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
