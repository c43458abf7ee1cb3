"""The decode attention kernel: ``decode_attention_math`` (compiled) equals SDPA over padded caches."""

from __future__ import annotations

import pytest
import torch

from dsla.ops import attention, compiled
from tests.model.test_compiled_decode import compile_works


@pytest.fixture
def restore_eager():
    yield
    compiled.use_compiled_decode(False)


def _inputs(R, H, G, L, D, dtype, lengths):
    g = torch.Generator().manual_seed(R * 100 + L)
    q = torch.randn(R, H, G, D, generator=g).to(dtype)
    kv = torch.randn(2, R, H, L + 5, D, generator=g).to(dtype)  # capacity past L: views, as a KVBatch's
    return q, kv[0, :, :, :L], kv[1, :, :, :L], torch.tensor(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,H,lengths", [(1, 2, [7]), (3, 2, [7, 3, 5]), (4, 1, [9, 9, 2, 9]), (2, 3, [33, 33])])
def test_compiled_decode_attention_equals_sdpa(R, H, lengths, dtype, restore_eager):
    if compile_works():
        pytest.skip(compile_works())
    q, k, v, lens = _inputs(R, H, 3, max(lengths), 16, dtype, lengths)
    ref = attention.decode_attention_sdpa(q, k, v, lens)
    for r, n in enumerate(lengths):  # each request alone, on its own keys only
        alone = torch.nn.functional.scaled_dot_product_attention(q[r: r + 1], k[r: r + 1, :, :n], v[r: r + 1, :, :n])
        torch.testing.assert_close(ref[r: r + 1], alone)
    compiled.use_compiled_decode(True)
    fn = attention.decode_attention_fn()
    got = fn(q, k, v, lens)
    assert fn.compiled, "compiling fell back to eager"
    assert got.dtype == dtype and got.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(got, ref, **tol)


def test_the_switch_off_means_sdpa():
    compiled.use_compiled_decode(False)
    assert attention.decode_attention_fn() is attention.decode_attention_sdpa
