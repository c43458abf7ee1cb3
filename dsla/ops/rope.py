"""Rotary position embedding (HF Llama convention: rotate the two halves of each head)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsla.config import RopeScaling
from dsla.ops import cpu_kernels


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """Inverse frequencies, (D/2,) float32, with optional Llama-3 scaling of long wavelengths."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        orig = scaling.original_max_position_embeddings
        low_wavelen = orig / scaling.low_freq_factor
        high_wavelen = orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(mid, smoothed, inv)
    return inv.float()


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin tables for the given positions: (N,) -> (N, D) float32 each."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (N, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # (N, D)
    return emb.cos(), emb.sin()


# the last call of rope_tables: (cos, sin, key, tables). A forward pass gives every layer the same
# cos and sin objects, so the tables are built once per pass instead of once per layer (5 ops each).
_LAST_TABLES: list = [None]


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


def rope_tables(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, and sin with its first half negated, in ``dtype``: the tables of ``rotate``. Built once
    for the same ``cos`` and ``sin`` objects (the last call's are kept)."""
    compiling = torch.compiler.is_compiling()  # a compiled graph must not guard on the memo
    # the same objects, unchanged in place, in the same inference mode (tables built under
    # inference_mode cannot be saved for a backward pass)
    key = None if compiling else (dtype, _version(cos), _version(sin), torch.is_inference_mode_enabled())
    last = None if compiling else _LAST_TABLES[0]
    if last is not None and last[0] is cos and last[1] is sin and last[2] == key:
        return last[3]
    c, s = cos.to(dtype), sin.to(dtype)
    half = s.shape[-1] // 2
    if 2 * half != s.shape[-1]:
        raise ValueError(f"RoPE needs an even head_dim, not {s.shape[-1]}")
    tables = (c, torch.cat([-s[..., :half], s[..., half:]], dim=-1))
    if not compiling:
        _LAST_TABLES[0] = (cos, sin, key, tables)
    return tables


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """``apply_rope`` on tables from ``rope_tables``; bit for bit the same result, in 3 ops instead of 7.

    The rotated halves [-x2, x1] times sin equal the rolled halves [x2, x1] times sin with its first
    half negated (a negation is exact), so no slice, negation or concatenation of x is needed.
    """
    fused = cpu_kernels.rope(x, cos, signed_sin) if x.dim() == 3 else None  # one call (None: not here)
    if fused is not None:
        return fused
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., N, D) by per-position cos/sin (N, D); computed in x's dtype like HF Llama."""
    return rotate(x, *rope_tables(cos, sin, x.dtype))


def unapply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of ``apply_rope`` (rotate by the negative angle): recovers pre-RoPE keys from a KV cache."""
    return apply_rope(x, cos, -sin)
