"""Engine + runner on a tiny random model: outputs equal the single-request loop, under any batching."""

from __future__ import annotations

import threading

import pytest
import torch

from dsla.generate import generate
from dsla.sampling import SamplingParams
from dsla.serve.engine import Collector
from tests.serve.conftest import make_engine

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 64, 1)]


def alone(model, prompt, max_tokens, dsla_layers=(), **kw) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **kw})
    return list(generate(model, prompt, params, stop_ids=model.cfg.eos_token_id, dsla_layers=dsla_layers))


def run_all(engine, prompts, max_tokens, **opts) -> list[Collector]:
    cols = []
    for p in prompts:
        c = Collector()
        engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=opts.pop("temperature", 0.0), **opts), c)
        cols.append(c)
    for c in cols:
        c.wait(60)
    return cols


def test_greedy_equals_generate(serve_model, engine):
    got = run_all(engine, [PROMPTS[2]], 24)[0]
    assert got.token_ids == alone(serve_model, PROMPTS[2], 24)
    assert got.outputs[-1].finished and got.outputs[-1].finish_reason.value in ("stop", "length")


def test_seeded_sampling_equals_generate(serve_model, engine):
    c = Collector()
    engine.submit(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=7), c)
    c.wait(60)
    assert c.token_ids == alone(serve_model, PROMPTS[1], 20, temperature=0.8, top_p=0.9, top_k=50, seed=7)


@pytest.mark.parametrize("batched_tokens,max_seqs", [(512, 32), (16, 4), (8, 8)])
def test_concurrent_requests_each_get_what_they_get_alone(serve_model, serve_tok, batched_tokens, max_seqs):
    # Small token budgets force chunked prefills that share steps with other requests' decodes.
    engine = make_engine(serve_model, serve_tok, max_num_batched_tokens=batched_tokens, max_num_seqs=max_seqs)
    try:
        lens = [30, 5, 12, 25, 8, 16]
        cols = [Collector() for _ in PROMPTS]
        for p, n, c in zip(PROMPTS, lens, cols):
            engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0), c)
        for p, n, c in zip(PROMPTS, lens, cols):
            c.wait(60)
            assert c.token_ids == alone(serve_model, p, n), f"prompt of {len(p)} tokens"
            assert c.outputs[-1].num_output_tokens == len(c.token_ids)
        assert max(lens) <= engine.metrics.snapshot()["steps_total"] < sum(lens)  # steps were shared
    finally:
        engine.shutdown()


def test_budget_preempts_instead_of_overflowing(serve_model, serve_tok):
    """A budget for ~2 requests' caches: all 6 finish with their solo outputs, never over budget."""
    engine = make_engine(serve_model, serve_tok, start=False, max_num_batched_tokens=64)
    cost = engine.scheduler.cost
    budget = 2 * cost.bytes(256) + 1  # room for two requests at 256 tokens of KV capacity
    engine = make_engine(serve_model, serve_tok, start=False, max_num_batched_tokens=64, cache_budget_bytes=budget,
                         decode_reserve_tokens=0)  # no output room reserved: decodes grow the caches
    seen = []
    real_step = engine.step

    def step():  # check the invariant after every step: real bytes == accounting <= budget
        real_step()
        seen.append(engine.runner.cache_bytes())
        assert engine.runner.cache_bytes() == engine.scheduler.cache_bytes() <= budget

    engine.step = step
    engine.start()
    try:
        prompts = [list(range(7, 7 + n)) for n in (60, 90, 40, 70, 100, 50)]
        cols = run_all(engine, prompts, 100)
        for p, c in zip(prompts, cols):
            assert c.token_ids == alone(serve_model, p, 100)
        assert engine.scheduler.num_preemptions > 0
        assert max(seen) <= budget
        assert engine.metrics.snapshot()["preemptions_total"] == engine.scheduler.num_preemptions
    finally:
        engine.shutdown()


def test_request_too_big_for_budget_is_refused(serve_model, serve_tok):
    engine = make_engine(serve_model, serve_tok, start=False, cache_budget_bytes=10_000)
    with pytest.raises(ValueError, match="cache budget"):
        engine.submit(list(range(5, 105)), SamplingParams(max_tokens=100), Collector())


def test_abort_frees_the_cache(serve_model, serve_tok):
    engine = make_engine(serve_model, serve_tok)
    try:
        got_first = threading.Event()
        outs = []

        def sink(out):
            outs.append(out)
            got_first.set()

        rid = engine.submit(PROMPTS[4], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True), sink)
        assert got_first.wait(30)
        assert rid in engine.runner.caches
        engine.abort(rid)
        engine.run_between_steps(lambda e: None).result(30)  # the inbox is FIFO: the abort is handled
        engine.run_between_steps(lambda e: None).result(30)  # ...and a step has freed the cache
        assert rid not in engine.runner.caches and engine.runner.cache_bytes() == 0
        assert engine.scheduler.num_running == 0 and not outs[-1].finished
        assert engine.metrics.snapshot()["requests_finished"].get("abort") == 1
    finally:
        engine.shutdown()


def test_stop_string_and_stop_token(serve_model, serve_tok, engine):
    ref = alone(serve_model, PROMPTS[2], 30)
    assert len(ref) >= 6, "the tiny model should not hit EOS this early"
    # stop token id: the 4th generated token ends the request, not emitted
    c = run_all(engine, [PROMPTS[2]], 30, stop_token_ids=(ref[3],))[0]
    assert c.token_ids == ref[: ref.index(ref[3])] and c.outputs[-1].finish_reason.value == "stop"
    # stop string: text ends right before it
    full = serve_tok.decode(ref)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        c = run_all(engine, [PROMPTS[2]], 30, stop=(stop,))[0]
        assert c.text == full[: full.index(stop)]
        assert c.outputs[-1].finish_reason.value == "stop"


def test_streamed_text_equals_full_decode(serve_model, serve_tok, engine):
    c = run_all(engine, [serve_tok.encode("Caf\u00e9 na\u00efve")], 40, ignore_eos=True)[0]
    assert c.text == serve_tok.decode(c.token_ids)
    assert len(c.outputs) > 5  # it did stream


def test_prompt_logprobs_match_a_direct_forward(serve_model, engine):
    prompt = PROMPTS[4]
    c = Collector()
    engine.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=2), c)
    out = c.wait(30)[-1]
    with torch.no_grad():
        lp = serve_model(torch.tensor(prompt)[None]).log_softmax(-1)[0]  # (T, vocab)
    want = lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    got = torch.tensor([x.logprob for x in out.prompt_logprobs])
    assert out.finished and out.num_output_tokens == 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert all(len(x.top) == 2 for x in out.prompt_logprobs)


def test_mixed_plan_equals_generate(serve_dir, serve_tok):
    """Layer 1 runs (untrained) DSLA: batched serving still equals the single-request loop."""
    from dsla.model.loading import load_teacher

    serve_model = load_teacher(serve_dir)
    serve_model.add_dsla([1])
    engine = make_engine(serve_model, serve_tok, dsla_layers=[1], max_num_batched_tokens=16, max_num_seqs=4)
    try:
        cols = run_all(engine, PROMPTS[:4], 12)
        for p, c in zip(PROMPTS[:4], cols):
            ref = alone(serve_model, p, 12, dsla_layers=[1])
            assert c.token_ids == ref
        cost = engine.scheduler.cost
        assert cost.fixed_bytes > 0  # DSLA state is counted in the budget
    finally:
        engine.shutdown()


def test_scheduler_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, dsla.serve.scheduler, dsla.serve.request; "
            "assert 'torch' not in sys.modules, 'scheduler pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_change_between_steps_applies_to_new_requests(serve_dir, serve_tok):
    from dsla.model.loading import load_teacher

    model = load_teacher(serve_dir)
    model.add_dsla([0, 2])
    engine = make_engine(model, serve_tok)
    try:
        before = run_all(engine, [PROMPTS[2]], 10)[0]
        assert before.token_ids == alone(model, PROMPTS[2], 10)
        engine.run_between_steps(lambda e: e.set_plan([0, 2], reason="test")).result(30)
        assert engine.scheduler.cost.fixed_bytes > 0 and engine.runner.plan == (0, 2)
        after = run_all(engine, [PROMPTS[2]], 10)[0]
        assert after.token_ids == alone(model, PROMPTS[2], 10, dsla_layers=[0, 2])
        snap = engine.metrics.snapshot()
        assert snap["layer_conversions_total"] == 2 and snap["dsla_layers"] == 2
    finally:
        engine.shutdown()
