"""Our C++ CPU kernels (dsla/ops/csrc): decode attention against its definition, the bfloat16 glue
(RMSNorm, RoPE) against the torch forms it replaces (RoPE bit for bit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsla.model.llama import decode_attention
from dsla.model.state import KVBatch, KVState
from dsla.ops import cpu_kernels
from tests.ops.conftest import needs_compiler
from dsla.ops.cpu_kernels import decode_attention_cpu, kv_meta

pytestmark = needs_compiler


def make_states(lengths, H, D, dtype, capacities=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = []
    for i, n in enumerate(lengths):
        s = KVState(H, D, dtype, capacity=capacities[i] if capacities else n + 3)
        s.append(torch.randn(H, n, D, generator=g).to(dtype), torch.randn(H, n, D, generator=g).to(dtype))
        states.append(s)
    return states


def definition(q, states, H):
    """Each request alone, in float64: softmax(q k^T / sqrt(D)) v over its cache."""
    Hq, R, D = q.shape
    G = Hq // H
    outs = []
    for r, s in enumerate(states):
        qr = q[:, r].double().view(H, G, D)
        w = torch.softmax(qr @ s.k.double().transpose(1, 2) / D ** 0.5, dim=-1)
        outs.append((w @ s.v.double()).reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,G,D", [(3, 3, 64), (2, 1, 32), (1, 4, 128), (2, 8, 64)])
def test_kernel_matches_the_definition(lib, dtype, tol, H, G, D):
    # lengths across the kernel's 128-token pieces (1, one piece, a piece and a bit, several)
    lengths = [1, 7, 128, 129, 300]
    states = make_states(lengths, H, D, dtype, capacities=[4, 20, 128, 160, 512])
    q = torch.randn(H * G, len(lengths), D).to(dtype)
    out = decode_attention_cpu(lib, q, kv_meta(states), H)
    assert out.shape == (len(lengths), H * G * D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), definition(q, states, H), atol=tol, rtol=tol)


def test_kernel_appends_the_new_token_first(lib):
    H, G, D = 3, 3, 64
    states = make_states([1, 127, 128, 200], H, D, torch.bfloat16, capacities=[2, 128, 256, 201])
    k_all, v_all = torch.randn(2, H, 9, D).to(torch.bfloat16)
    k, v = k_all[:, 3:7], v_all[:, 1:5]  # (H, 4, D), strided
    q = torch.randn(H * G, 4, D).to(torch.bfloat16)
    out = decode_attention_cpu(lib, q, kv_meta(states), H, new_kv=(k, v))
    for r, s in enumerate(states):
        s.length += 1
        torch.testing.assert_close(s.k[:, -1], k[:, r])
        torch.testing.assert_close(s.v[:, -1], v[:, r])
    torch.testing.assert_close(out.double(), definition(q, states, H), atol=2e-2, rtol=2e-2)


def test_kernel_reads_kv_batch_rows_and_strided_queries(lib):
    H, G, D = 3, 3, 64
    states = make_states([5, 40, 17], H, D, torch.bfloat16, capacities=[64, 64, 64])
    KVBatch(states)  # the buffers become rows of one tensor
    q_all = torch.randn(H * G, 7, D).to(torch.bfloat16)
    q = q_all[:, 2:5]  # not contiguous: the row stride is 7 * D
    out = decode_attention_cpu(lib, q, kv_meta(states), H)
    torch.testing.assert_close(out.double(), definition(q, states, H), atol=2e-2, rtol=2e-2)


def test_kernel_fits_only_what_it_handles():
    q, kv = torch.randn(9, 2, 64), torch.randn(3, 2, 64)
    assert cpu_kernels.kernel_fits(q, kv, kv, torch.float32)
    assert not cpu_kernels.kernel_fits(q, kv, kv, torch.bfloat16)  # the caches' dtype differs
    assert not cpu_kernels.kernel_fits(torch.randn(9, 2, 48), kv[..., :48], kv[..., :48], torch.float32)  # head dim
    assert not cpu_kernels.kernel_fits(torch.randn(12, 2, 64), kv[:1], kv[:1], torch.float32)  # 12 queries per KV head
    assert not cpu_kernels.kernel_fits(q, kv.clone().requires_grad_(), kv, torch.float32)  # a gradient wanted


def test_one_thread_and_two_agree(lib):
    H, G, D = 3, 3, 64
    states = make_states([300, 2, 77], H, D, torch.float32)
    q = torch.randn(H * G, 3, D)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention_cpu(lib, q, kv_meta(states), H)
        torch.set_num_threads(2)
        two = decode_attention_cpu(lib, q, kv_meta(states), H)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


def test_decode_attention_uses_the_kernel_and_agrees_with_sdpa(lib, monkeypatch):
    H, G, D, R = 3, 3, 64, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, R, D, generator=g).to(torch.bfloat16) for n in (H * G, H, H))
    outs = {}
    for mode in ("auto", "off"):
        monkeypatch.setitem(cpu_kernels._STATE, "mode", mode)
        calls = []
        real = cpu_kernels.decode_attention_cpu
        monkeypatch.setattr("dsla.model.llama.decode_attention_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        states = make_states([3, 50, 9, 200], H, D, torch.bfloat16, seed=2)
        outs[mode] = decode_attention(q, k, v, states)
        assert bool(calls) == (mode == "auto")
        assert [s.length for s in states] == [4, 51, 10, 201]  # the new token was appended either way
    torch.testing.assert_close(outs["auto"].float(), outs["off"].float(), atol=2e-2, rtol=2e-2)


def test_bad_calls_name_the_problem(lib):
    states = make_states([4], 1, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention_cpu(lib, torch.randn(1, 1, 48), kv_meta(states), 1)
    states = make_states([4], 2, 64, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        decode_attention_cpu(lib, torch.randn(3, 1, 64), kv_meta(states), 2)  # 3 query heads, 2 KV heads
    states[0].length = 0
    with pytest.raises(ValueError, match="no tokens"):
        decode_attention_cpu(lib, torch.randn(2, 1, 64), kv_meta(states), 2)
    states = make_states([5], 2, 64, torch.float32, capacities=[5])  # full
    with pytest.raises(ValueError, match="no room"):
        decode_attention_cpu(lib, torch.randn(2, 1, 64), kv_meta(states), 2,
                             new_kv=(torch.randn(2, 1, 64), torch.randn(2, 1, 64)))
    with pytest.raises(ValueError, match="new keys"):
        decode_attention_cpu(lib, torch.randn(2, 1, 64), kv_meta(states), 2,
                             new_kv=(torch.randn(2, 2, 64), torch.randn(2, 1, 64)))
    states = make_states([4], 2, 64, torch.bfloat16)  # a bf16 cache read by a float32 call: refused
    with pytest.raises(ValueError, match="differ from the call"):
        decode_attention_cpu(lib, torch.randn(2, 1, 64), kv_meta(states), 2)
    with pytest.raises(ValueError, match="'auto' or 'off'"):
        cpu_kernels.use_cpu_kernels("fast")


def test_kernel_shares_torch_openmp_runtime(lib):
    """A second OpenMP runtime would keep its own spinning threads beside torch's (on two cores,
    every parallel op then waits for a wake-up: speed.md 0f)."""
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_loading_the_kernel_keeps_subnormals(lib):
    """Linking with -ffast-math would flush subnormals to zero in the whole process (crtfastmath)."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert tiny.item() != 0.0 and (tiny * 0.5).item() != 0.0


def test_build_is_cached_and_a_missing_compiler_falls_back(lib, tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    assert first.is_file() and cpu_kernels.build(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="does not run"):
        cpu_kernels.build(tmp_path / "other")
    monkeypatch.setattr(cpu_kernels, "_STATE", {"mode": "auto", "lib": None, "tried": False})
    assert cpu_kernels.cpu_kernels_lib() is None  # a warning, then SDPA
    states = make_states([3], 3, 64, torch.float32)
    q, k, v = torch.randn(9, 1, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    assert decode_attention(q, k, v, states).shape == (1, 9 * 64)


@pytest.mark.parametrize("rows", [1, 24, 300])
def test_glue_matches_torchs_ops_in_bf16(lib, rows):
    from dsla.model.llama import RMSNorm
    from dsla.ops.rope import rope_cos_sin, rope_inv_freq, rope_tables

    g = torch.Generator().manual_seed(rows)
    bf = torch.bfloat16
    x = (torch.randn(rows, 576, generator=g) * 3).to(bf)
    w = (torch.rand(576, generator=g) + 0.5).to(bf)
    want = w * F.rms_norm(x.float(), (576,), None, 1e-5).to(bf)  # RMSNorm's torch form
    got = cpu_kernels.rms_norm(x, w, 1e-5)
    # the same bits but where the sum of squares, taken in another order, tips a rounding (~3 per
    # million elements measured): then one bf16 step, at most
    differ = got != want
    assert differ.float().mean() <= 1e-4
    assert ((got.float() - want.float()).abs()[differ] <= want.float().abs()[differ] * 2 ** -7).all()
    norm = RMSNorm(576, 1e-5).to(bf)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        assert torch.equal(norm(x), got)
    q = (torch.randn(rows, 9 * 64, generator=g) * 3).to(bf).view(rows, 9, 64).transpose(0, 1)  # (H, N, D) view
    cos, ssin = rope_tables(*rope_cos_sin(torch.arange(rows) + 1000, rope_inv_freq(64, 10000.0)), bf)
    out = cpu_kernels.rope(q, cos, ssin)
    assert torch.equal(out, q * cos + q.roll(32, -1) * ssin) and out.stride() == q.stride()


def test_glue_steps_aside_where_it_does_not_apply(lib):
    x = torch.randn(4, 64)
    assert cpu_kernels.rms_norm(x, torch.ones(64), 1e-5) is None  # float32: torch's ops
    xb = x.to(torch.bfloat16).requires_grad_()
    assert cpu_kernels.rms_norm(xb, torch.ones(64, dtype=torch.bfloat16), 1e-5) is None  # a gradient wanted
    with torch.no_grad():
        assert cpu_kernels.rms_norm(xb, torch.ones(64, dtype=torch.bfloat16), 1e-5) is not None
        assert cpu_kernels.rms_norm(xb.t(), torch.ones(4, dtype=torch.bfloat16), 1e-5) is None  # not contiguous
        q = torch.ones(2, 3, 64, dtype=torch.bfloat16)
        assert cpu_kernels.rope(q, torch.ones(3, 64), torch.ones(3, 64)) is None  # float32 tables


def test_quantised_model_fuses_kv_and_gate_up_with_the_same_logits(tmp_path):
    from dsla.model import quant
    from dsla.model.loading import load_teacher
    from tests.conftest import make_tiny_hf_dir

    if not quant.native_bf16_flags() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bf16 here: the packed bf16 path is not used")
    make_tiny_hf_dir(tmp_path, hidden_size=64, intermediate_size=128, head_dim=32, num_attention_heads=4,
                     num_key_value_heads=2)
    fused = load_teacher(tmp_path, dtype=torch.bfloat16)
    quant.quantize_model(fused, "packed", torch.bfloat16)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert hasattr(attn, "kv_proj") and not hasattr(attn, "k_proj") and not hasattr(mlp, "up_proj")
    ref = load_teacher(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # the same linears unfused (each packed on its own): logits within bf16 rounding of the unfused model
        torch.testing.assert_close(fused(ids).float(), ref(ids).float(), atol=0.05, rtol=0.05)
        caches = [fused.new_cache([], 32) for _ in range(2)]
        fused(ids[:10], [5, 5], caches)
        step = fused(ids[10:12], [1, 1], caches)  # decode: the fused kv feeds the attention kernel strided
        full = fused(torch.cat([ids[:5], ids[10:11]]), [6], None)[-1]
    torch.testing.assert_close(step[0].float(), full.float(), atol=0.05, rtol=0.05)


def test_kernel_uses_a_copied_cache_own_buffer(lib):
    """deepcopy of a cache (the decode benchmark forks caches so) must not leave the copy reading or
    writing the original's buffer: the kernel's addresses come from the buffer at call time."""
    import copy

    H, G, D = 3, 3, 64
    (orig,) = make_states([10], H, D, torch.bfloat16, capacities=[16])
    snapshot = orig._kv.clone()
    twin = copy.deepcopy(orig)
    del orig  # its buffer may be freed and reused: the twin must not care
    q = torch.randn(H * G, 1, D).to(torch.bfloat16)
    k, v = torch.randn(2, H, 1, D).to(torch.bfloat16)
    out = decode_attention_cpu(lib, q, kv_meta([twin]), H, new_kv=(k, v))
    twin.length += 1
    assert torch.equal(twin.k[:, :10], snapshot[0, :, :10]) and torch.equal(twin.k[:, 10], k[:, 0])
    torch.testing.assert_close(out.double(), definition(q, [twin], H), atol=2e-2, rtol=2e-2)


def test_a_copied_cache_is_written_in_its_own_buffer(lib):
    import copy

    (orig,) = make_states([4], 1, 32, torch.float32, capacities=[8])
    before = orig._kv.clone()
    twin = copy.deepcopy(orig)
    decode_attention_cpu(lib, torch.randn(1, 1, 32), kv_meta([twin]), 1,
                         new_kv=(torch.ones(1, 1, 32), torch.ones(1, 1, 32)))
    assert torch.equal(orig._kv, before)  # the original untouched
    assert torch.equal(twin._kv[:, :, 4], torch.ones(2, 1, 32))
