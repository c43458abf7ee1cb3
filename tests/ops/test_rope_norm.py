"""RoPE and RMSNorm in their few-op forms give the same bits as the formulas spelled out (HF Llama's)."""

import pytest
import torch

from dsla.model.llama import RMSNorm
from dsla.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, rope_tables, rotate, unapply_rope


def spelled_out_rope(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_bitwise_the_spelled_out_formula(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 64, generator=g) * 4).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(100, 117), rope_inv_freq(64, 10000.0))
    want = spelled_out_rope(x, cos, sin)
    assert torch.equal(rotate(x, *rope_tables(cos, sin, dtype)), want)
    assert torch.equal(apply_rope(x, cos, sin), want)
    # any sin table, not only the symmetric ones rope_cos_sin builds
    odd_sin = torch.randn(17, 64, generator=g)
    assert torch.equal(apply_rope(x, cos, odd_sin), spelled_out_rope(x, cos, odd_sin))
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, as the DSLA decode step passes it
    assert not xt.is_contiguous() and torch.equal(apply_rope(xt, cos, sin), want)
    if dtype == torch.float32:
        torch.testing.assert_close(unapply_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-5, rtol=1e-5)


def test_rope_gradients_are_bitwise_the_spelled_out_formula():
    g = torch.Generator().manual_seed(2)
    cos, sin = rope_cos_sin(torch.arange(9), rope_inv_freq(32, 10000.0))
    grads = []
    for f in (spelled_out_rope, apply_rope):
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
        f(x, cos, sin).float().mul(torch.randn(2, 9, 32, generator=g)).sum().backward()
        grads.append(x.grad)
        g.manual_seed(2)
    assert torch.equal(*grads)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(torch.zeros(1, 2, 5), torch.zeros(2, 5), torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_bitwise_the_spelled_out_formula(dtype):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(40, 96, generator=g) * torch.rand(40, 1, generator=g) * 8).to(dtype)

    def spelled_out(t):
        h = t.float()
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    assert torch.equal(norm(x), spelled_out(x))
    # and the same gradients (training runs bf16 autograd through every norm)
    w = torch.randn(40, 96, generator=g)
    gx = []
    for f in (norm, spelled_out):
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        (f(xi).float() * w).sum().backward()
        gx.append((xi.grad, norm.weight.grad.clone()))
    assert torch.equal(gx[0][0], gx[1][0]) and torch.equal(gx[0][1], gx[1][1])
