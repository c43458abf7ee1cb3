"""Weight-only quantisation: reference formats, the fused-kernel modules, a quantised HybridLM, the rule."""

from __future__ import annotations

import pytest
import torch

from dsla.config import DSLAConfig
from dsla.model import quant
from dsla.model.loading import load_teacher

BF16 = frozenset({"avx512f", "avx512_bf16"})


def q4_1_weight(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight built like a dequantised GGUF Q4_1 tensor: float16 d and m per block of 32, each block
    using both ends of 0..15 (as llama.cpp's quantiser makes them). Returns (w, q, d, m)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K // 32, 32), generator=g, dtype=torch.int32)
    q[..., 0], q[..., -1] = 0, 15
    d = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(N, K // 32, generator=g) * 0.1).half().float()
    w = (q.float() * d[..., None] + m[..., None]).view(N, K)
    return w, q.view(N, K), d, m


@pytest.mark.parametrize("N,K", [(8, 32), (24, 96), (64, 576)], ids=lambda v: str(v))
def test_int4_recovers_q4_1_blocks_exactly(N, K):
    w, q, d, m = q4_1_weight(N, K)
    q2, d2, m2 = quant.quantize_int4(w)
    assert torch.equal(q2, q)
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=0)  # (max - min) / 15 in float32
    assert torch.equal(m2, m)
    torch.testing.assert_close(quant.dequantize_int4(q2, d2, m2), w, rtol=0, atol=1e-6)


def test_int4_rejects_a_dim_that_is_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        quant.quantize_int4(torch.randn(4, 40))


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (0, 64)], ids=["M5", "B2T3", "empty"])
def test_quantized_linear_equals_dequantized_reference(kind, dtype, shape):
    w, *_ = q4_1_weight(48, 64, seed=2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    mod = quant.quantized_linear(w, kind, dtype)
    if kind == "int4":
        q, d, m = quant.quantize_int4(w)
        # the kernel's scale and zero are in the activation dtype: the reference rounds them alike
        ref_w = (q.view(48, -1, 32).float() - 8) * d.to(dtype).float()[..., None] + (m + 8 * d).to(dtype).float()[..., None]
        ref_w = ref_w.view(48, 64)
    else:
        q, s = quant.quantize_int8(w)
        ref_w = q.float() * s.to(dtype).float()[:, None]
    y = mod(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
    ref = x.float() @ ref_w.t()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output rounding (~2^-8 relative)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()) if ref.numel() else 0)


@pytest.mark.parametrize("preset", ["int4", "int8"])
def test_quantized_hybrid_logits_close_to_native(tiny_dir, preset):
    # The tiny model's dims (48, 96, head dim 8) are multiples of 32 only for 96: int4 needs K % 32 == 0,
    # so the test model is built wider.
    from tests.conftest import make_tiny_hf_dir
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_hf_dir(Path(tmp), hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                         num_key_value_heads=2)
        native = load_teacher(tmp, dtype=torch.bfloat16)
        qmodel = load_teacher(tmp, dtype=torch.bfloat16)
    for m in (native, qmodel):
        torch.manual_seed(0)
        m.add_dsla([1], DSLAConfig(feature_dim=8, chunk_size=8))
    plan = quant.quantize_model(qmodel, preset)
    assert qmodel.weights == preset and plan == quant.WEIGHT_PRESETS[preset]
    assert isinstance(qmodel.model.layers[0].mlp.gate_up_proj, quant.Int4Linear if preset == "int4" else quant.Int8Linear)
    assert isinstance(qmodel.dsla["1"].q_proj, quant.Int8Linear)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for layers in ([], [1]):
            ref = native(ids, dsla_layers=layers).float()
            got = qmodel(ids, dsla_layers=layers).float()
            assert got.shape == ref.shape
            # random tiny weights are not on a 4-bit grid: int4 is lossy here, so the bound is loose
            rel = float((got - ref).norm() / ref.norm())
            assert rel < (0.15 if preset == "int4" else 0.03), rel
        # a cached decode runs through the same modules (and DSLA's state uses the model dtype)
        cache = qmodel.new_cache([1])
        qmodel(ids[0, :20], [20], [cache])
        step = qmodel(ids[0, 20:21], [1], [cache])
        full = qmodel(ids[:1, :21], dsla_layers=[1])[0, -1]
        assert float((step[0].float() - full.float()).norm() / full.float().norm()) < 1e-2  # bf16 rounding
    with pytest.raises(ValueError, match="before quantising"):
        qmodel.add_dsla([0])


BF16_PACKED = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                 reason="oneDNN has no bfloat16 on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16_PACKED)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (9, 64), (2, 3, 64), (0, 64)], ids=["M1", "M9", "B2T3", "empty"])
def test_packed_linear_equals_a_plain_linear(dtype, shape):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(8))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    mod = quant.PackedLinear(w, dtype)
    y = mod(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
    assert list(mod.state_dict()) == []  # the oneDNN tensor is not saved
    ref = torch.nn.functional.linear(x.float(), w.to(dtype).float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()) if ref.numel() else 0)


def test_packed_preset_keeps_the_model_s_logits():
    from tests.conftest import make_tiny_hf_dir
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_hf_dir(Path(tmp))
        native, packed = load_teacher(tmp), load_teacher(tmp)
    for m in (native, packed):
        torch.manual_seed(0)
        m.add_dsla([1], DSLAConfig(feature_dim=8, chunk_size=8))
    quant.quantize_model(packed, "packed")
    assert isinstance(packed.model.layers[0].self_attn.q_proj, quant.PackedLinear)
    assert isinstance(packed.lm_head, quant.PackedLinear) and isinstance(packed.dsla["1"].o_proj, quant.PackedLinear)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for layers in ([], [1]):
            torch.testing.assert_close(packed(ids, dsla_layers=layers), native(ids, dsla_layers=layers),
                                       rtol=1e-4, atol=1e-4)


def test_packed_is_refused_where_onednn_cannot_run_it():
    with pytest.raises(ValueError, match="CPU only"):
        quant.choose_weights("packed", torch.float32, "cuda", BF16)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        quant.check_packed("cpu", torch.float16)
    assert quant.choose_weights("packed", torch.float32, "cpu", frozenset()) == ("packed", "requested")


@BF16_PACKED
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_dense_copy_runs_calls_of_more_rows_than_its_bound(kind):
    w, *_ = q4_1_weight(48, 64, seed=5)
    mixed = quant.quantized_linear(w, kind, torch.bfloat16, dense_above=4)
    plain = quant.quantized_linear(w, kind, torch.bfloat16)
    assert plain.dense is None and "dense_above=4" in repr(mixed)
    g = torch.Generator().manual_seed(6)
    few, many = torch.randn(2, 2, 64, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
    assert torch.equal(mixed(few), plain(few))  # <= 4 rows: the quantised kernel
    assert torch.equal(mixed(many), quant.PackedLinear(w, torch.bfloat16)(many))  # 5 rows: the packed weight
    assert not torch.equal(plain(many), mixed(many))
    with pytest.raises(ValueError, match="dense_above=-1"):
        quant.quantized_linear(w, kind, torch.bfloat16, dense_above=-1)


@BF16_PACKED
def test_mixed_preset_quantises_like_int4_and_keeps_dense_weights(tmp_path):
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)
    m = load_teacher(tmp_path, dtype=torch.float32)
    plan = quant.quantize_model(m, "mixed", torch.bfloat16)
    assert plan.dense_above == quant.MIXED_MAX_ROWS and m.weights == "mixed"
    mod = m.model.layers[0].mlp.gate_up_proj
    assert isinstance(mod, quant.Int4Linear) and isinstance(m.lm_head, quant.Int8Linear)
    assert isinstance(mod.dense, quant.PackedLinear) and mod.dense.packed.dtype == torch.bfloat16
    ids = torch.randint(0, 97, (1, 3 * quant.MIXED_MAX_ROWS), generator=torch.Generator().manual_seed(7))
    int4 = load_teacher(tmp_path, dtype=torch.float32)
    quant.quantize_model(int4, "int4", torch.bfloat16)
    packed = load_teacher(tmp_path, dtype=torch.float32)
    quant.quantize_model(packed, "packed", torch.bfloat16)  # loaded the same way, packed in bf16
    with torch.no_grad():  # a prefill of many rows runs the packed weights: the packed model's logits
        torch.testing.assert_close(m(ids), packed(ids), rtol=0, atol=0)
        one = ids[:, :1]  # one row: the kernels, as int4
        torch.testing.assert_close(m(one), int4(one), rtol=0, atol=0)


def test_quantized_lm_head_of_an_untied_model(tmp_path):
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, tie=False, hidden_size=64, intermediate_size=128, head_dim=16,
                     num_attention_heads=4, num_key_value_heads=2)
    m = load_teacher(tmp_path, dtype=torch.bfloat16)
    w = m.lm_head.weight.clone()
    quant.quantize_model(m, "int4")
    assert isinstance(m.lm_head, quant.Int8Linear)
    h = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(m.logits(h).float(), (h.float() @ w.float().t()), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("requested,dtype,device,flags,want", [
    ("auto", torch.bfloat16, "cpu", BF16, "mixed"),
    ("auto", torch.bfloat16, "cpu", frozenset({"avx2"}), "native"),
    ("auto", torch.bfloat16, "cpu", frozenset({"amx_bf16"}), "mixed"),
    ("auto", torch.float32, "cpu", BF16, "native"),
    ("auto", torch.bfloat16, "cuda", BF16, "native"),
    ("native", torch.bfloat16, "cpu", BF16, "native"),
    ("int8", torch.bfloat16, "cpu", frozenset(), "int8"),
    ("int4", torch.bfloat16, "cpu", frozenset(), "int4"),
])
def test_choose_weights_is_deterministic(requested, dtype, device, flags, want):
    assert quant.choose_weights(requested, dtype, device, flags)[0] == want


@pytest.mark.parametrize("requested,dtype,device,match", [
    ("int4", torch.float32, "cpu", "needs --dtype bfloat16"),
    ("int8", torch.float32, "cpu", "needs --dtype bfloat16"),
    ("int4", torch.bfloat16, "cuda", "CPU only"),
    ("int3", torch.bfloat16, "cpu", "not one of auto, native, packed, int8, int4, mixed"),
])
def test_choose_weights_refuses_slow_or_unsupported_combinations(requested, dtype, device, match):
    with pytest.raises(ValueError, match=match):
        quant.choose_weights(requested, dtype, device, BF16)


def test_weights_flag_parses():
    import argparse

    from dsla.cliargs import add_weights_argument

    p = argparse.ArgumentParser()
    add_weights_argument(p)
    assert p.parse_args([]).weights == "auto"
    assert p.parse_args(["--weights", "int4"]).weights == "int4"
    with pytest.raises(SystemExit):
        p.parse_args(["--weights", "int2"])


def test_quantize_a_float32_model_into_bfloat16(tmp_path):
    """Served models load in float32 (exact blocks), then quantise and cast the rest to bfloat16."""
    from tests.conftest import make_tiny_hf_dir

    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)
    m = load_teacher(tmp_path, dtype=quant.load_dtype("int4", torch.bfloat16))
    assert m.model.embed_tokens.weight.dtype == torch.float32
    w = m.model.layers[0].mlp.down_proj.weight.clone()
    quant.quantize_model(m, "int4", torch.bfloat16)
    floats = [t for t in [*m.parameters(), *m.buffers()] if t.is_floating_point() and t is not m.inv_freq]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    sz = m.model.layers[0].mlp.down_proj.scales_and_zeros  # (K/G, N, 2): d from the float32 weight
    _, d, _ = quant.quantize_int4(w)
    assert torch.equal(sz[..., 0], d.t().bfloat16())
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    assert quant.load_dtype("native", torch.bfloat16) == torch.bfloat16


def test_resolve_weights_int4_needs_dims_on_the_group():
    from dsla.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    assert quant.resolve_weights("auto", torch.bfloat16, cfg, "cpu")[0] in ("int8", "native")  # never int4
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.resolve_weights("int4", torch.bfloat16, cfg, "cpu")
