"""The decode step (every request adds one token): equal to the per-request path, KV appends in place."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsla.config import DSLAConfig
from dsla.model.loading import load_teacher
from dsla.model.state import KVState, append_one_token

CFG = DSLAConfig(feature_dim=8, chunk_size=8)
LENGTHS = (13, 5, 9, 1)  # prompts of different lengths, one of a single token


@pytest.fixture(params=[(0, 0), (4, 0), (4, 2)], ids=["pure", "window4", "window4-sinks2"])
def hybrid(tiny_dir, request):
    return make_hybrid(tiny_dir, *request.param)


def make_hybrid(tiny_dir, window: int, sinks: int = 0):
    """The tiny teacher with DSLA layers 0-2 (the given window and sinks), their parameters off their init."""
    torch.manual_seed(0)
    m = load_teacher(tiny_dir)
    m.add_dsla(range(3), dataclasses.replace(CFG, window=window, sinks=sinks))
    with torch.no_grad():  # gates and mix off their init: not a special case
        for mod in m.dsla.values():
            for p in mod.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return m


def run_batched(model, seqs, plans, prefills, convert_at=None):
    """Prefill ``prefills[r]`` tokens of sequence r, all in one step, then decode the rest of all of
    them together: one token per request per step, so the caches differ in length; a request drops
    out when its sequence ends. With ``convert_at`` = (step, layer), fold that layer in every cache
    before that decode step. Returns the logits of each request's last prefill token and decodes."""
    caches = [model.new_cache(p, capacity=4) for p in plans]  # small: the decode steps must regrow
    out = [[] for _ in seqs]
    with torch.no_grad():
        first = model(torch.cat([s[:n] for s, n in zip(seqs, prefills)]), list(prefills), caches)
        ends = torch.tensor(prefills).cumsum(0) - 1
        for r in range(len(seqs)):
            out[r].append(first[ends[r]])
        for step in range(max(len(s) - n for s, n in zip(seqs, prefills))):
            if convert_at is not None and step == convert_at[0]:
                for c in caches:
                    model.convert_layer(c, convert_at[1])
            live = [r for r, s in enumerate(seqs) if prefills[r] + step < len(s)]
            ids = torch.stack([seqs[r][prefills[r] + step] for r in live])
            logits = model(ids, [1] * len(live), [caches[r] for r in live])
            for j, r in enumerate(live):
                out[r].append(logits[j])
    return [torch.stack(o) for o in out], caches


def run_alone(model, seq, plan, prefill, convert_at=None):
    """The same request by itself, one token per forward (a batch of one)."""
    cache = model.new_cache(plan)
    with torch.no_grad():
        out = [model(seq[:prefill], [prefill], [cache])[-1]]
        for t in range(prefill, len(seq)):
            if convert_at is not None and t - prefill == convert_at[0]:
                model.convert_layer(cache, convert_at[1])
            out.append(model(seq[t: t + 1], [1], [cache])[0])
    return torch.stack(out)


@pytest.mark.parametrize("plans", [[[]] * 4, [[], [1], [0, 1, 2], [0, 2]]], ids=["attn", "mixed"])
@pytest.mark.parametrize("convert_at", [None, (3, 1)], ids=["static", "convert"])
def test_batched_decode_equals_each_request_alone_and_full_forward(hybrid, plans, convert_at):
    g = torch.Generator().manual_seed(5)
    extra = 12  # decode steps of the longest request
    seqs = [torch.randint(0, 97, (n + extra - i,), generator=g) for i, n in enumerate(LENGTHS)]
    got, caches = run_batched(hybrid, seqs, plans, LENGTHS, convert_at=convert_at)
    for s, p, n, o in zip(seqs, plans, LENGTHS, got):
        ref = run_alone(hybrid, s, p, prefill=n, convert_at=convert_at)
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(o.argmax(-1), ref.argmax(-1))  # greedy choices identical
        if convert_at is None:  # and both equal one stateless forward over the whole sequence
            with torch.no_grad():
                full = hybrid(s[None], dsla_layers=p)[0, n - 1:]
            torch.testing.assert_close(o, full, rtol=1e-4, atol=1e-4)
    for c, s in zip(caches, seqs):
        assert c.num_tokens == len(s)
        for st in c.layers:
            assert st.length == len(s)


@pytest.mark.parametrize("plans", [[[]] * 5, [[1], [], [1], [1], [1]]], ids=["attn", "mixed"])
def test_a_step_of_decodes_and_prefill_chunks_equals_each_request_alone(hybrid, plans, monkeypatch):
    """Requests 0 and 1 prefill; then one step where 0 and 1 decode while 2 and 4 prefill their
    prompts and 3 its single token (the decodes attend together, the chunks one by one); then
    decodes. With "mixed", layers 0 and 2 see that step in attention for 4 requests and layer 1
    splits it between attention and DSLA."""
    from dsla.model.llama import LlamaAttention
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (10, 12, 11, 6, 9)]
    prompt = [5, 7, 6, 1, 4]
    caches = [hybrid.new_cache(p, capacity=4) for p in plans]
    got = [[] for _ in seqs]
    seen = []  # the seq_lens of attention layers' mixed steps
    one_by_one = LlamaAttention._one_by_one
    monkeypatch.setattr(LlamaAttention, "_one_by_one", lambda self, q, k, v, lens, st: (
        seen.append(list(lens)), one_by_one(self, q, k, v, lens, st))[1])
    with torch.no_grad():
        hybrid(torch.cat([seqs[0][:5], seqs[1][:7]]), [5, 7], caches[:2])
        ids = torch.cat([seqs[0][5:6], seqs[1][7:8], seqs[2][:6], seqs[3][:1], seqs[4][:4]])
        seen.clear()
        logits = hybrid(ids, [1, 1, 6, 1, 4], caches)
        assert [6, 4] in seen  # the decodes went together, the two prefill chunks one by one
        for r, end in enumerate((0, 1, 7, 8, 12)):
            got[r].append(logits[end])
        pos = [6, 8, 6, 1, 4]
        for _ in range(3):
            logits = hybrid(torch.stack([s[p] for s, p in zip(seqs, pos)]), [1] * 5, caches)
            for r in range(5):
                got[r].append(logits[r])
            pos = [p + 1 for p in pos]
    for r, (s, p) in enumerate(zip(seqs, plans)):
        first = prompt[r] if r >= 2 else prompt[r] + 1  # 0 and 1 decoded their token in the mixed step
        ref = run_alone(hybrid, s[: first + 3], p, prefill=first)
        torch.testing.assert_close(torch.stack(got[r]), ref, rtol=1e-5, atol=1e-5)


def test_batched_decode_in_bf16_matches_fp32_tokens(tiny_dir):
    torch.manual_seed(0)
    m32 = load_teacher(tiny_dir)
    m16 = load_teacher(tiny_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 97, (n + 8,), generator=g) for n in LENGTHS]
    got16, _ = run_batched(m16, seqs, [[]] * 4, LENGTHS)
    got32, _ = run_batched(m32, seqs, [[]] * 4, LENGTHS)
    for a, b in zip(got16, got32):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)
    for s, n, a in zip(seqs, LENGTHS, got16):  # the decode path against the same bf16 request alone
        torch.testing.assert_close(a, run_alone(m16, s, [], prefill=n), rtol=0, atol=0)


def test_append_one_token_writes_in_place_and_regrows_like_append():
    g = torch.Generator().manual_seed(7)
    states = [KVState(2, 4, torch.float32, capacity=c) for c in (3, 5, 16)]
    twins = [KVState(2, 4, torch.float32, capacity=c) for c in (3, 5, 16)]
    for n, s, t in zip((3, 2, 0), states, twins):
        kv = torch.randn(2, 2, n, 4, generator=g)
        s.append(kv[0], kv[1])
        t.append(kv[0], kv[1])
    for _ in range(6):
        kv = torch.randn(2, 2, 3, 4, generator=g)  # (2, H, R, D)
        ptrs = [s._kv.data_ptr() for s in states]
        append_one_token(states, kv)
        for r, t in enumerate(twins):
            t.append(kv[0, :, r: r + 1], kv[1, :, r: r + 1])
        for s, t, p in zip(states, twins, ptrs):
            assert s.length == t.length and s.capacity == t.capacity and s.nbytes == t.nbytes
            assert torch.equal(s.k, t.k) and torch.equal(s.v, t.v)
            if s.length <= 16:  # no regrow needed: written in place, same buffer
                assert s.capacity != 16 or s._kv.data_ptr() == p
