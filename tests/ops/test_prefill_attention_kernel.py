"""Our bf16 prefill attention kernel (csrc/prefill_attention.cpp) against the definition of causal
attention, and ``causal_attention`` with and without it. It needs AVX-512 BF16: elsewhere these
tests check that SDPA serves instead."""

from __future__ import annotations

import pytest
import torch

from dsla.ops import cpu_kernels
from tests.ops.conftest import needs_compiler
from dsla.ops.attention import causal_attention
from dsla.ops.cpu_kernels import prefill_attention_cpu, prefill_kernel

pytestmark = needs_compiler


@pytest.fixture(scope="module")
def lib(lib):
    if not lib.dsla_prefill_attention_available():
        pytest.skip("this CPU has no AVX-512 BF16: SDPA serves prefill (test_sdpa_serves_where_the_kernel_does_not)")
    return lib


def definition(q, k, v):
    """float64, every query alone: softmax over keys 0..T-L+i."""
    Hq, L, D = q.shape
    H, T = k.shape[0], k.shape[1]
    G = Hq // H
    kk, vv = k.double().repeat_interleave(G, 0), v.double().repeat_interleave(G, 0)
    s = q.double() @ kk.transpose(1, 2) / D ** 0.5
    allowed = torch.arange(T)[None] <= (T - L + torch.arange(L))[:, None]
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv


@pytest.mark.parametrize("H,G,D", [(3, 3, 64), (2, 1, 32), (1, 4, 128), (2, 8, 64)])
@pytest.mark.parametrize("L,T", [(2, 2), (17, 17), (64, 64), (100, 100), (37, 300), (512, 1500), (1, 9)])
def test_kernel_matches_the_definition(lib, H, G, D, L, T):
    g = torch.Generator().manual_seed(L * 1000 + T + D)
    q = torch.randn(H * G, L, D, generator=g).bfloat16()
    k = (2 * torch.randn(H, T, D, generator=g)).bfloat16()  # peaked softmax: the max matters
    v = torch.randn(H, T, D, generator=g).bfloat16()
    out = prefill_attention_cpu(lib, q, k, v)
    assert out.shape == (H * G, L, D) and out.dtype == torch.bfloat16
    want = definition(q, k, v)
    err = (out.double() - want).abs()
    assert err.max() < 3e-2 and err.mean() < 3e-3, (err.max(), err.mean())


def test_kernel_reads_strided_caches_and_writes_token_major(lib):
    """k and v as a KV cache holds them (capacity past T), q as a projection gives it (token-major)."""
    H, G, D, L, T, cap = 3, 3, 64, 40, 90, 128
    g = torch.Generator().manual_seed(7)
    buf = torch.randn(2, H, cap, D, generator=g).bfloat16()
    k, v = buf[0, :, :T], buf[1, :, :T]
    q = torch.randn(L, H * G, D, generator=g).bfloat16().transpose(0, 1)  # (Hq, L, D), token-major
    out = prefill_attention_cpu(lib, q, k, v)
    torch.testing.assert_close(out, prefill_attention_cpu(lib, q.contiguous(), k.contiguous(), v.contiguous()),
                               atol=0, rtol=0)
    assert out.transpose(0, 1).is_contiguous()  # (L, Hq, D): the caller's reshape copies nothing
    assert (out.double() - definition(q, k, v)).abs().max() < 3e-2


def test_a_nan_key_makes_the_rows_that_see_it_nan(lib):
    """As in SDPA: a NaN key or value poisons exactly the queries that attend to it."""
    H, G, D, L, T = 2, 3, 64, 70, 90
    g = torch.Generator().manual_seed(11)
    q = torch.randn(H * G, L, D, generator=g).bfloat16()
    k, v = (torch.randn(H, T, D, generator=g).bfloat16() for _ in range(2))
    k[0, 40] = float("nan")  # position 40: query i sees it when T - L + i >= 40, i.e. i >= 20
    out = prefill_attention_cpu(lib, q, k, v)
    assert out[:G, 20:].isnan().all() and not out[:G, :20].isnan().any()
    assert not out[G:].isnan().any()  # the other KV head's queries


def test_prefill_kernel_refuses_other_dtypes(lib):
    q, k = torch.zeros(3, 4, 64), torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        prefill_attention_cpu(lib, q, k, k)


def test_causal_attention_uses_the_kernel_and_agrees_with_sdpa(lib, monkeypatch):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 50, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 80, 64, generator=g).bfloat16() for _ in range(2))
    calls = []
    real = cpu_kernels.prefill_attention_cpu
    monkeypatch.setattr(cpu_kernels, "prefill_attention_cpu", lambda *a: calls.append(1) or real(*a))
    ours = causal_attention(q, k, v)
    assert len(calls) == 2  # one call per batch row
    monkeypatch.setitem(cpu_kernels._STATE, "mode", "off")
    sdpa = causal_attention(q, k, v)
    assert len(calls) == 2 and ours.shape == sdpa.shape == (2, 6, 50, 64)
    assert (ours.float() - sdpa.float()).abs().max() < 3e-2


def test_sdpa_serves_where_the_kernel_does_not(monkeypatch):
    """float32, a gradient wanted, an unknown head dim, or a CPU without AVX-512 BF16: SDPA."""
    q, k, v = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    assert prefill_kernel(q, k, v) is None  # float32
    qb, kb, vb = q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16()
    assert prefill_kernel(qb, kb, vb) is None  # a gradient wanted
    assert prefill_kernel(qb.detach()[..., :48], kb[..., :48], vb[..., :48]) is None  # head dim 48

    class NoBF16:
        def dsla_prefill_attention_available(self):
            return 0

    monkeypatch.setattr(cpu_kernels, "cpu_kernels_lib", lambda: NoBF16())
    assert prefill_kernel(qb.detach(), kb, vb) is None
    out = causal_attention(qb.detach(), kb, vb)
    ref = torch.nn.functional.scaled_dot_product_attention(qb.detach(), kb, vb, is_causal=True, enable_gqa=True)
    assert torch.equal(out, ref)
