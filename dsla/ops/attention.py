"""Causal softmax attention for one request, with an optional cached prefix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla.ops import cpu_kernels


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of L new queries over T >= L keys, the last L of which are the new tokens.

    q: (B, Hq, L, D); k, v: (B, Hkv, T, D) with Hq a multiple of Hkv (GQA). Query i sits at
    position T - L + i and sees keys 0..T-L+i. Returns (B, Hq, L, D). In bfloat16 on a CPU with
    AVX-512 BF16, our kernel (``dsla.ops.cpu_kernels.prefill_attention_cpu``), else torch's SDPA.
    """
    L, T = q.shape[-2], k.shape[-2]
    lib = cpu_kernels.prefill_kernel(q, k, v) if L > 1 else None
    if lib is not None:  # our bf16 kernel (AVX-512 BF16 CPUs): (B, L, Hq, D) buffers, returned as (B, Hq, L, D)
        outs = [cpu_kernels.prefill_attention_cpu(lib, q[b], k[b], v[b]) for b in range(q.shape[0])]
        return outs[0][None] if len(outs) == 1 else torch.stack([o.transpose(0, 1) for o in outs]).transpose(1, 2)
    if L == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if L == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # A chunk continuing a cached prefix: bottom-right aligned causal mask.
    mask = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(diagonal=T - L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
