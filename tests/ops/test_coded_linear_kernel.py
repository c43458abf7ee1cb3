"""Our linear layer over one-byte weight codes (csrc/coded_linear.cpp, ``CodedLinear``): the codes
give back a GGUF-dequantised weight exactly, the kernel matches a float32 linear over the same bf16
weight, and every output row is computed alone (the same bits whatever else is in the batch). It
needs AVX-512 BF16: elsewhere these tests check that the packed bf16 weight serves instead."""

from __future__ import annotations

import pytest
import torch

from dsla.model import quant
from dsla.ops import cpu_kernels
from dsla.ops.cpu_kernels import coded_linear_cpu
from tests.model.test_quant import BF16_PACKED, q4_1_weight


@pytest.fixture(scope="module")
def lib():
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here (the packed weight serves)")
    lib = cpu_kernels.cpu_kernels_lib()
    assert lib is not None, "the kernels did not build on a machine with a C++ compiler"
    if not lib.dsla_coded_linear_available():
        pytest.skip("this CPU has no AVX-512 BF16: the packed weight serves (test_packed_serves_where_the_kernel_does_not)")
    return lib


def q8_0_weight(N: int, K: int, seed: int = 0) -> torch.Tensor:
    """A weight built like a dequantised GGUF Q8_0 tensor: float16 d per block of 32, q in -127..127
    with one end reached in each block (as the quantiser makes them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K // 32, 32), generator=g)
    q[..., 3] = 127
    d = (torch.rand(N, K // 32, generator=g) * 0.002 + 1e-4).half().float()
    return (q.float() * d[..., None]).view(N, K)


def check_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y against x W^T in float64 over the bf16 weight: within the final rounding to bf16 (half a
    step, at most 2^-8 relative) plus float32 sums' error (bounded by K 2^-24 sum |x| |w|), as a float32
    linear rounded to bf16 is."""
    wb = w.to(torch.bfloat16).double()
    exact, size = x.double() @ wb.t(), x.double().abs() @ wb.abs().t()
    bound = 2.0 ** -8 * exact.abs() + x.shape[1] * 2.0 ** -24 * size
    ref = (x.float() @ wb.float().t()).bfloat16()
    assert ((ref.double() - exact).abs() <= bound).all()  # the bound holds for torch's own linear
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("make", [lambda N, K: q4_1_weight(N, K, seed=N + K)[0], q8_0_weight], ids=["q4_1", "q8_0"])
def test_codes_give_back_the_bf16_weight_exactly(make):
    w = make(128, 96)
    codes, dm = quant.pack_codes(w)
    assert codes.shape == (2, 48, 64, 2) and codes.dtype == torch.int8
    assert dm.shape == (2, 3, 2, 64) and dm.dtype == torch.float32
    lin = quant.CodedLinear(codes, dm)
    assert torch.equal(lin.weight().bfloat16(), w.bfloat16())


def test_codes_layout_is_the_kernels():
    """codes[b, p, j, i] = q[64 b + j, 2 p + i]; dm[b, g, :, j] = (d, m) of column 64 b + j, group g."""
    w, q, d, m = q4_1_weight(128, 64, seed=2)
    codes, dm = quant.pack_codes(w)
    for b, p, j, i in ((0, 0, 0, 0), (1, 31, 63, 1), (0, 5, 17, 1), (1, 16, 2, 0)):
        assert codes[b, p, j, i] == q[64 * b + j, 2 * p + i]
    for b, g, j in ((0, 0, 0), (1, 1, 63), (0, 1, 40)):
        assert dm[b, g, 0, j] == d[64 * b + j, g] and dm[b, g, 1, j] == m[64 * b + j, g]


def test_codes_refuse_weights_they_would_not_give_back():
    g = torch.Generator().manual_seed(0)
    assert quant.pack_codes(torch.randn(64, 64, generator=g)) is None  # a trained weight: no grid
    assert quant.pack_codes(q4_1_weight(48, 64)[0]) is None  # 48 columns: not a multiple of 64
    assert quant.pack_codes(q4_1_weight(64, 64)[0].bfloat16()) is None  # rounded already: not float32
    assert quant.pack_codes(torch.zeros(64, 48)) is None  # 48 inputs: not a multiple of 32
    w = q4_1_weight(64, 128)[0]
    assert torch.equal(quant.pack_codes(w.t().contiguous().t())[0], quant.pack_codes(w)[0])  # any strides


@pytest.mark.parametrize("N,K", [(64, 32), (128, 96), (576, 576), (384, 1536)], ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 9, 13, 48, 100])
def test_kernel_matches_a_float32_linear(lib, M, N, K):
    w = q4_1_weight(N, K, seed=M + N)[0]
    codes, dm = quant.pack_codes(w)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    y = coded_linear_cpu(lib, x, codes, dm)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    check_linear(y, x, w)


def test_kernel_gives_each_weight_exactly(lib):
    """x = I picks each weight alone (one bf16 product, no sum): the kernel's weights are
    bf16(fl(d q) + m) bit for bit, the rounding ``CodedLinear.weight`` and ``pack_codes`` use. With
    full float32 d (not a float16's) d q is inexact, so a fused multiply-add would differ."""
    g = torch.Generator().manual_seed(11)
    N, K = 1024, 512  # ~2^19 weights: a fused multiply-add would round a few of them differently
    q = torch.randint(0, 16, (N, K), generator=g)
    d, m = torch.rand(N, K // 32, generator=g) * 0.01 + 1e-3, -torch.rand(N, K // 32, generator=g) * 0.1
    codes = q.to(torch.int8).view(N // 64, 64, K // 2, 2).permute(0, 2, 1, 3).contiguous()
    dm = torch.stack([d, m], 1).view(N // 64, 64, 2, K // 32).permute(0, 3, 2, 1).contiguous()
    w = quant.CodedLinear(codes, dm).weight()
    assert torch.equal(w, (q.float().view(N, -1, 32) * d[..., None] + m[..., None]).view(N, K))
    y = coded_linear_cpu(lib, torch.eye(K, dtype=torch.bfloat16), codes, dm)
    assert torch.equal(y, w.bfloat16().t())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M", [25, 37, 48])
def test_every_row_is_computed_alone(lib, threads, M):
    """Blocks, row tiles and the split over threads (rows too, where 9 blocks do not divide among the
    threads) only decide who computes an output, never how: each row has the bits it has alone."""
    w = q4_1_weight(576, 576, seed=3)[0]
    codes, dm = quant.pack_codes(w)
    x = torch.randn(M, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        batch = coded_linear_cpu(lib, x, codes, dm)
        torch.set_num_threads(1)
        alone = torch.cat([coded_linear_cpu(lib, x[i:i + 1], codes, dm) for i in range(M)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(batch, alone)
    check_linear(batch, x, w)


def test_rows_may_be_strided(lib):
    w = q8_0_weight(128, 64, seed=1)
    codes, dm = quant.pack_codes(w)
    wide = torch.randn(9, 100, generator=torch.Generator().manual_seed(2)).bfloat16()
    x = wide[:, 10:74]  # row stride 100
    assert torch.equal(coded_linear_cpu(lib, x, codes, dm), coded_linear_cpu(lib, x.contiguous(), codes, dm))


def test_bad_calls_are_refused(lib):
    codes, dm = quant.pack_codes(q4_1_weight(64, 64)[0])
    with pytest.raises(ValueError, match="bfloat16"):
        coded_linear_cpu(lib, torch.randn(2, 64), codes, dm)
    with pytest.raises(ValueError, match="layout for K=32"):
        coded_linear_cpu(lib, torch.randn(2, 32).bfloat16(), codes, dm)
    with pytest.raises(ValueError, match="layout"):
        coded_linear_cpu(lib, torch.randn(2, 64).bfloat16(), codes, dm.bfloat16())


def test_module_runs_the_kernel_and_falls_back_when_kernels_are_off(lib):
    w = q4_1_weight(128, 64, seed=9)[0]
    lin = quant.dense_linear(w, torch.bfloat16)
    assert isinstance(lin, quant.CodedLinear)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = lin(x)
    assert y.shape == (3, 5, 128) and torch.equal(y.view(15, 128), coded_linear_cpu(lib, x.view(15, 64), lin.codes, lin.dm))
    cpu_kernels.use_cpu_kernels("off")
    try:  # the weight decoded once into oneDNN's packed form: the packed model's values
        assert torch.equal(lin(x), quant.PackedLinear(w, torch.bfloat16)(x))
    finally:
        cpu_kernels.use_cpu_kernels("auto")
    assert not list(lin.children())  # the decoded fallback stays outside the module tree
    lin.to(dtype=torch.bfloat16)  # a model cast leaves the float32 scales alone
    assert lin.dm.dtype == torch.float32 and torch.equal(lin(x), y)
    with pytest.raises(TypeError, match="float32"):
        lin(x.float())


@BF16_PACKED
def test_packed_serves_where_the_kernel_does_not(monkeypatch):
    w = q4_1_weight(128, 64)[0]
    monkeypatch.setattr(cpu_kernels, "coded_linear_kernel", lambda: None)
    assert isinstance(quant.dense_linear(w, torch.bfloat16), quant.PackedLinear)
    assert isinstance(quant.dense_linear(torch.randn(128, 64), torch.bfloat16), quant.PackedLinear)


def test_mixed_model_runs_many_rows_on_the_codes(lib, tmp_path):
    """A teacher whose linears are dequantised Q4_1 blocks: under ``mixed`` each keeps its int4
    kernel for few rows and codes (not a second bf16 copy) for many, and a prefill's logits are the
    packed bf16 model's up to the order of float32 sums."""
    from dsla.model.loading import load_teacher
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)

    def load():
        m = load_teacher(tmp_path, dtype=torch.float32)
        with torch.no_grad():
            for i, mod in enumerate(m.model.layers.modules()):
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(q4_1_weight(*mod.weight.shape, seed=i)[0])
        return m

    mixed, packed = load(), load()
    quant.quantize_model(mixed, "mixed", torch.bfloat16)
    quant.quantize_model(packed, "packed", torch.bfloat16)
    block = mixed.model.layers[0]
    for mod in (block.self_attn.q_proj, block.self_attn.kv_proj, block.mlp.gate_up_proj, block.mlp.down_proj):
        assert isinstance(mod, quant.Int4Linear) and isinstance(mod.dense, quant.CodedLinear)
    assert isinstance(mixed.lm_head.dense, quant.PackedLinear)  # 97 outputs: not a multiple of 64
    ids = torch.randint(0, 97, (1, 4 * quant.MIXED_MAX_ROWS), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(mixed(ids).float(), packed(ids).float(), rtol=0.03, atol=0.03)
