"""DSLA layers with an exact window served by the engine: continuous batching (prefill chunks and
decode steps in one step), a conversion mid-request, exact byte accounting, and the logprobs of a
plain forward over the same tokens."""

from __future__ import annotations

import pytest
import torch

from dsla.config import DSLAConfig
from dsla.model.state import DSLAState
from dsla.serve.engine import Collector
from dsla.sampling import SamplingParams
from tests.serve.test_conversion import finish, manual_engine, step_checked

W = 4  # shorter than the prompts: older tokens go through the states
PROMPTS = [list(range(5, 5 + n)) for n in (2, 40, 9, 23)]  # 2 < W: decodes batch windows of different fills
MAX_TOKENS = 10


@pytest.fixture(params=[((), 0), ((1,), 0), ((), 2)], ids=["window", "window_exact_group", "window_sinks"])
def model(serve_dir, request):
    """DSLA with the window on every layer; with an exact KV group in layers 0 and 1 (a KV cache
    of that head beside the states, kept from the teacher's cache when layer 1 folds), or with
    two attention sinks."""
    from dsla.model.loading import load_teacher

    groups, sinks = request.param
    torch.manual_seed(0)
    m = load_teacher(serve_dir)
    m.add_dsla(range(3), DSLAConfig(feature_dim=8, chunk_size=8, window=W, sinks=sinks))
    with torch.no_grad():  # off the init (window_log_scale included) so nothing is a special case
        for p in m.dsla.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for i in (0, 1):
        m.dsla[str(i)].set_exact_groups(groups)
    return m


def submit(engine, prompts):
    cols = [Collector() for _ in prompts]
    for p, c in zip(prompts, cols):
        engine.submit(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0), c)
    engine._drain(block=False)
    return cols


def check_logprobs(prompt, col, logp):
    """The engine's greedy tokens and their logprobs against log-softmaxed logits (T, vocab) of
    the same tokens, row p scoring token p + 1."""
    lps = [lp for o in col.outputs for lp in o.logprobs]
    assert len(col.token_ids) == MAX_TOKENS == len(lps)
    for i, (tok, lp) in enumerate(zip(col.token_ids, lps)):
        row = logp[len(prompt) + i - 1]
        assert tok == int(row.argmax())
        assert abs(lp.logprob - float(row[tok])) < 1e-4


def test_window_layers_served_with_continuous_batching_equal_one_forward(model, serve_tok):
    engine = manual_engine(model, serve_tok, plan=[0, 2], max_num_batched_tokens=16, max_num_seqs=4)
    cols = submit(engine, PROMPTS)
    mixed = False
    while engine.scheduler.running or engine.scheduler.num_waiting:
        lens = [r.num_tokens - r.num_computed_tokens for r in engine.scheduler.running]
        mixed |= any(n == 1 for n in lens) and any(n > 1 for n in lens)
        step_checked(engine)  # the scheduler's bytes equal the caches' (window rows included)
    finish(engine, cols)
    assert mixed, "no step mixed a prefill chunk with decode steps"
    for prompt, c in zip(PROMPTS, cols):
        ids = torch.tensor(prompt + c.token_ids[:-1])
        with torch.no_grad():
            logp = model(ids[None], dsla_layers=[0, 2])[0].log_softmax(-1)
        check_logprobs(prompt, c, logp)


def test_window_layer_converted_mid_request(model, serve_tok):
    """Layer 1 folds in flight (older KV into the states, the last W rows kept): bytes freed are
    exactly the KV minus the fixed-size state, and each request continues with the logprobs of a
    forward over its prefix (layer 1 attention) + fold + a forward over the rest."""
    engine = manual_engine(model, serve_tok, plan=[0, 2], max_num_batched_tokens=32, max_num_seqs=4)
    cols = submit(engine, PROMPTS)
    step_checked(engine, 2)  # the 23-token prompt still in prefill, a request with fewer than W tokens
    assert any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
    runner = engine.runner
    at = {rid: c.num_tokens for rid, c in runner.caches.items()}
    assert len(at) == 4 and max(at.values()) > W and min(at.values()) < W
    kv1 = sum(c.layers[1].nbytes for c in runner.caches.values())
    caps = {rid: c.layers[1].capacity for rid, c in runner.caches.items()}
    total = runner.cache_bytes()

    change = engine.set_plan([0, 1, 2], reason="test")

    # the fixed-size state, plus (exact group) that head's KV at the teacher buffer's capacity
    exact = model.dsla["1"].exact_groups
    per_request = {rid: model.dsla["1"].new_state(capacity=cap).nbytes for rid, cap in caps.items()}
    state_bytes = sum(per_request.values())
    assert change["freed_bytes"] == kv1 - state_bytes and change["in_flight_folded"] == 4
    assert runner.cache_bytes() == total - kv1 + state_bytes == engine.scheduler.cache_bytes()
    for rid, c in runner.caches.items():
        s = c.layers[1]
        assert isinstance(s, DSLAState) and s.window == W and s.window_count == min(W, c.num_tokens)
        assert s.nbytes == per_request[rid] and (s.exact is not None) == bool(exact)
    finish(engine, cols)
    for prompt, c in zip(PROMPTS, cols):
        n = at[c.outputs[0].request_id]
        ids = torch.tensor(prompt + c.token_ids[:-1])
        with torch.no_grad():
            cache = model.new_cache([0, 2])
            head = model(ids[:n], [n], [cache])
            model.convert_layer(cache, 1)
            tail = model(ids[n:], [len(ids) - n], [cache])
        check_logprobs(prompt, c, torch.cat([head, tail]).log_softmax(-1))
    assert runner.cache_bytes() == 0 and engine.scheduler.cache_bytes() == 0
