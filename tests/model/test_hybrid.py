"""The DSLA layer inside the hybrid model: cache invariants, folding, conversion, dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsla.config import DSLAConfig
from dsla.model.loading import load_teacher
from dsla.model.state import DSLAState, KVState

CFG = DSLAConfig(feature_dim=8, chunk_size=8)


@pytest.fixture(params=[(0, ()), (4, ()), (4, (1,)), (0, (0,))], ids=["pure", "window4", "window4_exact", "pure_exact"])
def hybrid(tiny_dir, request):
    """DSLA on all 3 layers; pure, or with an exact window of 4 tokens (shorter than the prompts);
    with ``exact``, layers 0 and 1 keep that KV group exact (layer 2 none)."""
    torch.manual_seed(0)
    window, exact = request.param
    m = load_teacher(tiny_dir)
    m.add_dsla(range(3), dataclasses.replace(CFG, window=window))
    for i in (0, 1):
        m.dsla[str(i)].set_exact_groups(exact)
    with torch.no_grad():  # move gates and mix off their init so the test is not a special case
        for mod in m.dsla.values():
            for p in mod.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return m


def decode_all(model, ids, chunks, plan):
    cache = model.new_cache(plan)
    out, start = [], 0
    for L in chunks:
        out.append(model(ids[start: start + L], [L], [cache]))
        start += L
    return torch.cat(out), cache


@pytest.mark.parametrize("plan", [[], [0, 1, 2], [1], [0, 2]], ids=["attn", "dsla", "mixed1", "mixed02"])
@pytest.mark.parametrize("chunks", [[30, 1, 1, 1, 1], [7, 9, 1, 17], [1] * 12], ids=["prefill+decode", "chunks", "steps"])
def test_cached_forward_equals_full_forward(hybrid, plan, chunks):
    ids = torch.randint(0, 97, (sum(chunks),), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hybrid(ids[None], dsla_layers=plan)[0]
        got, cache = decode_all(hybrid, ids, chunks, plan)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    assert [isinstance(s, DSLAState) for s in cache.layers] == [i in plan for i in range(3)]


def test_batch_mixing_attention_and_dsla_requests_for_a_layer(hybrid):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (12, 5, 9)]
    plans = [[], [1], [0, 1, 2]]
    with torch.no_grad():
        alone = [hybrid(s[None], dsla_layers=p)[0] for s, p in zip(seqs, plans)]
        caches = [hybrid.new_cache(p) for p in plans]
        pre = hybrid(torch.cat([s[:-1] for s in seqs]), [len(s) - 1 for s in seqs], caches)
        last = hybrid(torch.cat([s[-1:] for s in seqs]), [1, 1, 1], caches)
    torch.testing.assert_close(pre, torch.cat([a[:-1] for a in alone]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, torch.stack([a[-1] for a in alone]), rtol=1e-4, atol=1e-4)


def test_fold_equals_dsla_prefill_state(hybrid):
    ids = torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, attn_cache = decode_all(hybrid, ids, [37], [])
        _, dsla_cache = decode_all(hybrid, ids, [37], [1])
        folded = hybrid.dsla["1"].fold(attn_cache.layers[1], hybrid.inv_freq)
    assert folded.length == 37 and folded.state.dtype == torch.float32
    torch.testing.assert_close(folded.state, dsla_cache.layers[1].state, rtol=1e-4, atol=1e-5)
    assert folded.nbytes == dsla_cache.layers[1].nbytes == hybrid.dsla["1"].new_state().nbytes
    if hybrid.dsla["1"].cfg.window:  # the window rows are the last 4 cached k (after RoPE), v
        kv, heads = attn_cache.layers[1], list(hybrid.dsla["1"].dsla_groups)  # an exact group's rows: unused
        ok, ov = folded.ordered_window()  # stored as a ring buffer: token i at row i mod W
        assert torch.equal(ok[heads], kv.k[heads, -4:]) and torch.equal(ov[heads], kv.v[heads, -4:])
        torch.testing.assert_close(folded.window_k, dsla_cache.layers[1].window_k, rtol=0, atol=0)


def test_mid_request_conversion(hybrid):
    """Converting layer 1 mid-request frees its KV, leaves other layers alone, and the request
    continues exactly as if layer 1 had been DSLA from the start (the fold is exact)."""
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = hybrid.new_cache([])
        hybrid(ids[:20], [20], [cache])
        before = [(s.k.clone(), s.v.clone()) for s in cache.layers]
        kv_bytes = cache.layers[1].nbytes
        freed = hybrid.convert_layer(cache, 1)
        assert isinstance(cache.layers[1], DSLAState) and cache.layers[1].length == 20
        assert freed == kv_bytes - cache.layers[1].nbytes
        for i in (0, 2):
            assert isinstance(cache.layers[i], KVState)
            assert torch.equal(cache.layers[i].k, before[i][0]) and torch.equal(cache.layers[i].v, before[i][1])
        cont = torch.cat([hybrid(ids[t: t + 1], [1], [cache]) for t in range(20, 30)])
        # reference: layer 1 is attention for the prefix (its KV feeds later layers' inputs), then DSLA
        # state folded from that KV: identical to running the prefix with layer 1's KV and folding.
        ref_cache = hybrid.new_cache([])
        hybrid(ids[:20], [20], [ref_cache])
        ref_cache.layers[1] = hybrid.dsla["1"].fold(ref_cache.layers[1], hybrid.inv_freq)
        ref = torch.cat([hybrid(ids[t: t + 1], [1], [ref_cache]) for t in range(20, 30)])
    assert torch.isfinite(cont).all()
    torch.testing.assert_close(cont, ref, rtol=0, atol=0)
    assert cache.num_tokens == 30


def test_state_is_float32_and_close_under_bf16(tiny_dir):
    torch.manual_seed(0)
    m32 = load_teacher(tiny_dir)
    m32.add_dsla(range(3), CFG)
    m16 = load_teacher(tiny_dir, dtype=torch.bfloat16)
    m16.add_dsla(range(3), CFG)
    m16.dsla.load_state_dict(m32.dsla.state_dict())
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, c32 = decode_all(m32, ids, [20, 1, 1, 1, 1], [0, 1, 2])
        b, c16 = decode_all(m16, ids, [20, 1, 1, 1, 1], [0, 1, 2])
    for s in c16.layers:
        assert s.state.dtype == torch.float32
    assert (a.argmax(-1) == b.float().argmax(-1)).float().mean() > 0.8


def test_nan_inputs_never_reach_a_saved_state(hybrid):
    cache = hybrid.new_cache([])
    with torch.no_grad():
        hybrid(torch.randint(0, 97, (10,)), [10], [cache])
    cache.layers[0]._k[:, 3] = float("nan")  # a corrupted KV cache
    with pytest.raises((ValueError, FloatingPointError), match="(?i)finite|nan"):
        hybrid.convert_layer(cache, 0)
    assert isinstance(cache.layers[0], KVState), "a failed fold must leave the KV in place"
    dcache = hybrid.new_cache([0, 1, 2])
    saved = dcache.layers[0].state.clone()
    x = torch.full((1, 48), float("nan"))
    cos, sin = torch.ones(1, 8), torch.zeros(1, 8)
    with pytest.raises(FloatingPointError):
        hybrid.dsla["0"](x, cos, sin, [1], [dcache.layers[0]])
    assert torch.equal(dcache.layers[0].state, saved)


def test_bad_shapes_and_layers_are_named(tiny_dir):
    m = load_teacher(tiny_dir)
    with pytest.raises(ValueError, match="out of range"):
        m.add_dsla([5])
    with pytest.raises(ValueError, match="no DSLA module"):
        m.new_cache([1])


@pytest.mark.parametrize("window", [1, 4, 16])
def test_window_fold_then_continue_equals_window_dsla_from_the_start(tiny_dir, window):
    """Layer 1 converted mid-request (window rows kept, older KV folded) continues with the logits
    of a request whose layer 1 ran DSLA-with-window over the same k, v from the start."""
    torch.manual_seed(0)
    m = load_teacher(tiny_dir)
    m.add_dsla([1], dataclasses.replace(CFG, window=window))
    with torch.no_grad():
        for p in m.dsla.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (26,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        conv = m.new_cache([])
        m(ids[:9], [9], [conv])
        m.convert_layer(conv, 1)  # 9 tokens: more than 1 and 4, fewer than 16
        assert conv.layers[1].window_count == min(window, 9) and conv.layers[1].length == 9
        # the reference: same caches for layers 0 and 2, layer 1's state from a DSLA prefill over
        # the same layer-1 input (layer 0 is attention in both, so that input is identical)
        ref = m.new_cache([])
        m(ids[:9], [9], [ref])
        dsla_run = m.new_cache([1])
        m(ids[:9], [9], [dsla_run])
        ref.layers[1] = dsla_run.layers[1]
        got = torch.cat([m(ids[9:20], [11], [conv])] + [m(ids[t: t + 1], [1], [conv]) for t in range(20, 26)])
        want = torch.cat([m(ids[9:20], [11], [ref])] + [m(ids[t: t + 1], [1], [ref]) for t in range(20, 26)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert conv.layers[1].nbytes == m.dsla["1"].new_state().nbytes  # constant: no growth with T


def test_window_changes_the_output_and_w0_has_no_new_parameter(tiny_dir):
    torch.manual_seed(0)
    m = load_teacher(tiny_dir)
    m.add_dsla([0], CFG)
    m.add_dsla([1], dataclasses.replace(CFG, window=4))
    assert not any("window" in n for n in m.dsla["0"].state_dict())
    assert m.dsla["1"].window_log_scale.shape == (6,)
    st0, st1 = m.dsla["0"].new_state(), m.dsla["1"].new_state()
    assert st0.window == 0 and st1.window == 4 and st1.window_k.shape == (2, 4, 8)
    assert st1.nbytes == st0.nbytes + 2 * 2 * 4 * 8 * 4  # + k and v rows (float32 model)
    fork = st1.clone()  # what eval's fork_cache uses: an independent copy, window included
    fork.window_k.fill_(1.0)
    assert fork.window == 4 and not st1.window_k.any() and st0.clone().window_k is None
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = m(ids[None], dsla_layers=[0])
        b = m(ids[None], dsla_layers=[1])
        m.dsla["1"].window_log_scale.fill_(-30.0)  # window weight ~0: the dual states alone, shifted
        c = m(ids[None], dsla_layers=[1])
    assert not torch.allclose(a, b)
    assert torch.isfinite(c).all()


def test_window_is_validated():
    with pytest.raises(ValueError, match="window=-1"):
        DSLAConfig(window=-1)
    with pytest.raises(ValueError, match="window=2.5"):
        DSLAConfig(window=2.5)


@pytest.mark.parametrize("proj", ["k_proj", "v_proj"])
def test_a_non_finite_key_never_enters_a_window(tiny_dir, proj):
    """A key of -inf can leave u finite (its weight is 0): it must be refused before the ring is
    written; so must a non-finite value (checked in the same call)."""
    import dataclasses

    from dsla.config import DSLAConfig
    m = load_teacher(tiny_dir)
    m.add_dsla([0], dataclasses.replace(DSLAConfig(feature_dim=8, chunk_size=8), window=4))
    cache = m.new_cache([0])
    with torch.no_grad():
        m(torch.randint(0, 97, (6,)), [6], [cache])
        st = cache.layers[0]
        ring = st.window_k.clone(), st.window_v.clone()
        mod = m.dsla["0"]
        with torch.no_grad():
            getattr(mod.teacher, proj).weight.fill_(float("-inf"))
        with pytest.raises(FloatingPointError):
            m(torch.randint(0, 97, (1,)), [1], [cache])
    assert torch.equal(st.window_k, ring[0]) and torch.equal(st.window_v, ring[1]) and st.length == 6


def test_recomputed_layers_give_the_same_loss_and_gradients(hybrid):
    ids = torch.randint(0, hybrid.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    params = [p for mod in hybrid.dsla.values() for p in mod.parameters()]

    calls = []
    hybrid.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))

    def grads(recompute: bool):
        hybrid.recompute_layers = recompute
        calls.clear()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        loss = hybrid(ids, dsla_layers=[0, 2]).float().logsumexp(-1).mean()
        loss.backward()
        assert len(calls) == (2 if recompute else 1)  # the backward pass ran the layer again
        return loss.detach(), [p.grad.clone() for p in params if p.grad is not None]

    loss, g = grads(False)
    loss_r, g_r = grads(True)
    assert len(g) == len(g_r) > 0
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for a, b in zip(g_r, g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    hybrid.recompute_layers = False
    bare = hybrid.__class__(hybrid.cfg)  # no DSLA modules: named before any work
    with pytest.raises(ValueError, match="layer 2 has no DSLA module"):
        bare(ids, dsla_layers=[2])


@pytest.mark.parametrize("window", [0, 4])
def test_exact_groups_are_the_teachers_heads(tiny_dir, window):
    """With every KV group exact, a DSLA layer computes the teacher's attention, stateless and
    cached (prefill, chunks, decode steps, and after a fold); with one, only that group's query
    heads change, to the teacher's."""
    torch.manual_seed(0)
    m = load_teacher(tiny_dir)
    m.add_dsla(range(3), dataclasses.replace(CFG, window=window))
    ids = torch.randint(0, 97, (26,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        teacher = m(ids[None])[0]
        for i in range(3):
            m.dsla[str(i)].set_exact_groups([0, 1])
        torch.testing.assert_close(m(ids[None], dsla_layers=[0, 1, 2])[0], teacher, rtol=1e-5, atol=1e-5)
        got, cache = decode_all(m, ids, [9, 1, 7, 1, 1, 1, 6], [0, 1, 2])
        torch.testing.assert_close(got, teacher, rtol=1e-5, atol=1e-5)
        assert all(s.exact.length == 26 for s in cache.layers)
        half = m.new_cache([])
        m(ids[:13], [13], [half])
        for i in range(3):
            m.convert_layer(half, i)
        cont = torch.cat([m(ids[t: t + 1], [1], [half]) for t in range(13, 26)])
        torch.testing.assert_close(cont, teacher[13:], rtol=1e-5, atol=1e-5)

        # one group: its query heads (3 of 6) are the teacher's, the others DSLA's
        mod, att = m.dsla["1"], m.model.layers[1].self_attn
        x = torch.randn(20, 48)
        from dsla.ops.rope import rope_cos_sin
        cos, sin = rope_cos_sin(torch.arange(20), m.inv_freq)
        heads = lambda o: o @ torch.linalg.pinv(att.o_proj.weight.T)  # noqa: E731  back before o_proj
        mod.set_exact_groups([])
        dsla_only = heads(mod(x, cos, sin, [20]))
        mod.set_exact_groups([1])
        mixed, ref = heads(mod(x, cos, sin, [20])), heads(att(x, cos, sin, [20]))
    torch.testing.assert_close(mixed[:, 24:], ref[:, 24:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[:, :24], dsla_only[:, :24], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed[:, 24:], dsla_only[:, 24:], atol=1e-3)
    with pytest.raises(ValueError, match="out of range"):
        mod.set_exact_groups([2])
