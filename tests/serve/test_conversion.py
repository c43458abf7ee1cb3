"""Layer conversions inside the engine: in-flight folds, exact byte accounting, reverts, the controller."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from dsla.generate import generate
from dsla.model.state import DSLAState, KVState
from dsla.sampling import SamplingParams
from dsla.serve.engine import Collector, Engine
from dsla.serve.runner import ModelRunner
from dsla.serve.scheduler import SchedulerConfig

PROMPTS = [list(range(5, 5 + n)) for n in (40, 9, 23)]


@pytest.fixture
def model(serve_dir):
    from dsla.model.loading import load_teacher

    torch.manual_seed(0)
    m = load_teacher(serve_dir)
    m.add_dsla(range(3))
    with torch.no_grad():  # move the untrained DSLA layers off their init so folds are not a special case
        for mod in m.dsla.values():
            for p in mod.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return m


def manual_engine(model, tok, plan=(), controller=None, **config) -> Engine:
    """An engine stepped by the test (no thread): every plan change is between steps by construction."""
    return Engine(ModelRunner(model, plan), tok, SchedulerConfig(**config), controller=controller)


def submit(engine, prompts, max_tokens):
    cols = [Collector() for _ in prompts]
    for p, c in zip(prompts, cols):
        engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), c)
    engine._drain(block=False)
    return cols


def step_checked(engine, n=1):
    """Step, checking after each step that the scheduler's byte accounting equals the caches' bytes."""
    for _ in range(n):
        engine.step()
        assert engine.scheduler.cache_bytes() == engine.runner.cache_bytes()


def finish(engine, cols, limit=500):
    for _ in range(limit):
        if all(c.outputs and c.outputs[-1].finished for c in cols):
            return
        step_checked(engine)
        for c in cols:
            while not c._q.empty():
                c.outputs.append(c._q.get())
    raise AssertionError("requests did not finish")


def test_conversion_mid_stream_frees_exactly_that_layers_kv_and_requests_finish(model, serve_tok):
    engine = manual_engine(model, serve_tok, max_num_batched_tokens=16, max_num_seqs=4)
    cols = submit(engine, PROMPTS, 12)
    step_checked(engine, 5)  # 40-token prompt still in prefill (16-token chunks), others decoding
    runner = engine.runner
    assert len(runner.caches) == 3
    before = {rid: [(s.k.clone(), s.v.clone()) for s in c.layers] for rid, c in runner.caches.items()}
    kv1 = sum(c.layers[1].nbytes for c in runner.caches.values())
    state_bytes = model.dsla["1"].new_state().nbytes
    total = runner.cache_bytes()

    change = engine.set_plan([1], reason="test")

    assert runner.cache_bytes() == total - kv1 + 3 * state_bytes
    assert change["freed_bytes"] == kv1 - 3 * state_bytes and change["in_flight_folded"] == 3
    assert engine.scheduler.cache_bytes() == runner.cache_bytes()  # re-priced per request
    for rid, c in runner.caches.items():
        assert isinstance(c.layers[1], DSLAState) and c.layers[1].length == c.num_tokens
        for i in (0, 2):  # the other layers' KV is untouched
            assert torch.equal(c.layers[i].k, before[rid][i][0]) and torch.equal(c.layers[i].v, before[rid][i][1])
    finish(engine, cols)
    for c in cols:
        assert c.outputs[-1].finish_reason.value == "length" and len(c.token_ids) == 12
    snap = engine.metrics.snapshot()
    assert snap["layer_conversions_total"] == 1 and snap["conversion_freed_bytes_total"] == kv1 - 3 * state_bytes
    assert snap["layer_is_dsla"] == {"0": 0, "1": 1, "2": 0}
    assert sum(snap["generation_tokens_by_dsla_layers_total"].values()) == 36
    assert runner.cache_bytes() == 0 and engine.scheduler.cache_bytes() == 0


def test_folded_state_gives_the_logits_of_dsla_over_the_same_cached_kv(model, serve_tok):
    """Engine fold vs the one-step-at-a-time DSLA recurrence over the request's cached k, v."""
    from dsla.ops.dsla import dsla_reference
    from dsla.ops.rope import rope_cos_sin, unapply_rope

    engine = manual_engine(model, serve_tok)
    submit(engine, PROMPTS[:2], 8)
    step_checked(engine, 3)
    rid = next(iter(engine.runner.caches))
    pre = copy.deepcopy(engine.runner.caches[rid])
    engine.set_plan([1], reason="test")
    folded = copy.deepcopy(engine.runner.caches[rid])

    kv, dsla = pre.layers[1], model.dsla["1"]
    T = kv.length
    cos, sin = rope_cos_sin(torch.arange(T), model.inv_freq)
    with torch.no_grad():
        fk, v1, g = dsla.key_side(unapply_rope(kv.k, cos, sin), kv.k, kv.v)  # (H, T, K), (H, T, V+1), (H, S, T, K)
        H, G = fk.shape[0], model.cfg.num_attention_heads // fk.shape[0]
        q = fk.new_zeros(1, H, G, T, fk.shape[-1])
        _, st = dsla_reference(q, fk[None], v1[None], g[None], torch.ones(H, G, g.shape[1]))
    ref = copy.deepcopy(pre)
    ref.layers[1] = DSLAState(st[0].float(), length=T)
    torch.testing.assert_close(folded.layers[1].state, ref.layers[1].state, rtol=1e-4, atol=1e-5)

    req = next(r for r in engine.scheduler.running if r.request_id == rid)
    nxt = torch.tensor(req.token_ids(req.num_computed_tokens, req.num_computed_tokens + 1))
    with torch.no_grad():
        got = model(nxt, [1], [folded])
        want = model(nxt, [1], [ref])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(pre.layers[1], KVState)


def alone(model, prompt, n, dsla_layers=()):
    return list(generate(model, prompt, SamplingParams(max_tokens=n, temperature=0), stop_ids=(), dsla_layers=dsla_layers))


def test_revert_applies_to_new_requests_only(model, serve_tok):
    engine = manual_engine(model, serve_tok, plan=[1])
    first = submit(engine, [PROMPTS[1]], 10)
    step_checked(engine, 3)
    engine.set_plan([], reason="test")
    rid_a = next(iter(engine.runner.caches))
    assert isinstance(engine.runner.caches[rid_a].layers[1], DSLAState)  # in flight: keeps DSLA
    second = submit(engine, [PROMPTS[2]], 10)
    step_checked(engine, 1)
    rid_b = next(r for r in engine.runner.caches if r != rid_a)
    assert isinstance(engine.runner.caches[rid_b].layers[1], KVState)  # new: attention again
    assert isinstance(engine.runner.caches[rid_a].layers[1], DSLAState)
    finish(engine, first + second)
    assert first[0].token_ids == alone(model, PROMPTS[1], 10, dsla_layers=[1])
    assert second[0].token_ids == alone(model, PROMPTS[2], 10)
    snap = engine.metrics.snapshot()
    assert snap["layer_reverts_total"] == 1 and snap["dsla_layers"] == 0
    assert [e["reverted"] for e in engine.plan_view()["history"]] == [[1]]


def exact_prefill_then_fold(model, prompt, n, layers):
    """Greedy tokens of a prompt read with attention in every layer, ``layers`` then folded into
    DSLA state, the rest decoded with them (what ``--dsla-prefill fold`` promises)."""
    cache = model.new_cache((), capacity=len(prompt) + n)
    with torch.no_grad():
        toks = [int(model(torch.tensor(prompt), [len(prompt)], [cache])[-1].argmax())]
        for i in layers:
            model.convert_layer(cache, i)
        while len(toks) < n:
            toks.append(int(model(torch.tensor(toks[-1:]), [1], [cache])[-1].argmax()))
    return toks


def test_fold_prefill_reads_prompts_exactly_then_decodes_with_the_plan(model, serve_tok):
    engine = Engine(ModelRunner(model, [1, 2], dsla_prefill="fold"), serve_tok,
                    SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    runner = engine.runner
    assert engine.scheduler.cost == runner.cache_cost(())  # admitted at the price of a full KV cache
    cols = submit(engine, PROMPTS, 8)
    seen_prefill = set()
    for _ in range(200):
        if all(c.outputs and c.outputs[-1].finished for c in cols):
            break
        step_checked(engine)  # the scheduler's bytes equal the caches' after every fold too
        for req in engine.scheduler.running:
            layers = runner.dsla_layers_of(req.request_id)
            if req.num_computed_tokens < req.num_prompt_tokens:  # prompt not done: attention everywhere
                assert layers == ()
                seen_prefill.add(req.request_id)
            else:  # the first token sampled: the plan's layers are DSLA state, their KV freed
                assert layers == (1, 2) and req.cache_cost == runner.cache_cost((1, 2))
        for c in cols:
            while not c._q.empty():
                c.outputs.append(c._q.get())
    assert len(seen_prefill) == 3  # each was seen mid-prompt (16 tokens a step: the prompts queue)
    for c, prompt in zip(cols, PROMPTS):
        assert c.token_ids == exact_prefill_then_fold(model, prompt, 8, [1, 2])
    assert engine.metrics.snapshot()["prefill_folds_total"] == 3
    assert runner.cache_bytes() == 0 and engine.scheduler.cache_bytes() == 0


def test_fold_prefill_keeps_a_prompt_exact_through_a_plan_change(model, serve_tok):
    """A conversion while a prompt is being read leaves that request on attention; its layers
    are folded to the plan of the moment its prompt is done."""
    engine = Engine(ModelRunner(model, [], dsla_prefill="fold"), serve_tok,
                    SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4))
    cols = submit(engine, [PROMPTS[0]], 6)  # 40 tokens: three 16-token steps
    step_checked(engine)
    rid = next(iter(engine.runner.caches))
    change = engine.set_plan([1, 2], reason="test")
    assert change["in_flight_folded"] == 0 and engine.runner.dsla_layers_of(rid) == ()
    assert engine.scheduler.cache_bytes() == engine.runner.cache_bytes()
    step_checked(engine)
    assert engine.runner.dsla_layers_of(rid) == ()  # still reading its prompt
    finish(engine, cols)
    assert cols[0].token_ids == exact_prefill_then_fold(model, PROMPTS[0], 6, [1, 2])
    assert engine.metrics.snapshot()["prefill_folds_total"] == 1


def test_fold_prefill_is_checked(model):
    with pytest.raises(ValueError, match="--dsla-prefill='later'"):
        ModelRunner(model, [1], dsla_prefill="later")


def test_bad_plans_change_nothing(model, serve_tok, serve_dir):
    from dsla.model.loading import load_teacher

    engine = manual_engine(model, serve_tok)
    with pytest.raises(ValueError, match="out of range"):
        engine.set_plan([3], reason="test")
    bare = manual_engine(load_teacher(serve_dir), serve_tok)
    with pytest.raises(ValueError, match="no DSLA module"):
        bare.set_plan([0], reason="test")
    assert engine.runner.plan == () and bare.runner.plan == () and not engine.plan_history
    assert engine.layers_for_ratio(0.67) == [0, 1] and engine.layers_for_ratio(0) == []
    with pytest.raises(ValueError, match="only 0 layers"):
        bare.layers_for_ratio(0.5)


def test_adaptive_controller_converts_under_load_and_reverts_after(model, serve_tok):
    """A queue of 6 long prompts overloads a small engine: layers convert in order while requests are
    in flight, all finish, and once the engine is idle the layers are reverted one by one."""
    from dsla.serve.control import Controller
    from dsla.serve.policy import PolicyConfig

    cfg = PolicyConfig(quality_budget=None, convert_queued_tokens=100, revert_queued_tokens=10, convert_queue_depth=3,
                       revert_queue_depth=0, calm_s=0.2, cooldown_s=0.05, interval_s=0.0, max_ratio=0.67,
                       max_step_layers=1)
    engine = Engine(ModelRunner(model), serve_tok, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16),
                    controller=Controller(cfg, order=[2, 0, 1])).start()
    try:
        cols = [Collector() for _ in range(6)]
        for n, c in enumerate(cols):
            engine.submit(list(range(5, 65 + n)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), c)
        for c in cols:
            assert c.wait(120)[-1].finish_reason.value == "length" and len(c.token_ids) == 8
        deadline = time.monotonic() + 30
        while engine.runner.plan and time.monotonic() < deadline:
            time.sleep(0.05)
        view = engine.plan_view()
        converted = [layer for e in view["history"] for layer in e["converted"]]
        reverted = [layer for e in view["history"] for layer in e["reverted"]]
        assert converted == [2, 0] and reverted == [0, 2]  # in order, never twice, capped at 2 of 3; LIFO
        assert any(e["in_flight_folded"] > 0 for e in view["history"] if e["converted"])
        assert view["policy"] == "adaptive" and view["dsla_layers"] == [] and engine.error is None
        tokens = view["generation_tokens_by_dsla_layers"]
        assert sum(tokens.values()) == 48 and set(tokens) - {"0"}  # some tokens were made with DSLA layers
    finally:
        engine.shutdown()
