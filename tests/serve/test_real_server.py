"""A real uvicorn on a loopback port: the official `openai` client, and aborts on client disconnect."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import make_engine, serve_in_thread, wait_for

MODEL = "tiny"


@pytest.fixture
def server(serve_model, serve_tok):
    """(base url, engine) of a uvicorn serving the tiny model on 127.0.0.1, an ephemeral port."""
    from dsla.serve.api import create_app

    engine = make_engine(serve_model, serve_tok)
    url, stop = serve_in_thread(create_app(engine, MODEL, api_key="k"))
    yield url, engine
    stop()
    engine.shutdown()


def test_openai_client(server, serve_model, serve_tok):
    import openai

    from dsla.generate import generate
    from dsla.sampling import SamplingParams

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    prompt = "The quick brown fox"
    want = serve_tok.decode(list(generate(serve_model, serve_tok.encode(prompt), SamplingParams(max_tokens=16, temperature=0),
                                          stop_ids=serve_model.cfg.eos_token_id)))
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert c.choices[0].text == want and c.usage.completion_tokens >= 1
    pieces = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    assert pieces[-1].usage.total_tokens == c.usage.total_tokens
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=3)
    assert "n=3" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_streaming_client_disconnect_aborts(server):
    import httpx

    url, engine = server
    body = {"model": MODEL, "prompt": "A hybrid", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
    assert wait_for(lambda: engine.metrics.snapshot()["requests_finished"].get("abort") == 1)
    assert wait_for(lambda: not engine.runner.caches and engine.scheduler.num_running == 0)


def test_non_streaming_client_disconnect_aborts(server):
    import httpx

    url, engine = server
    gate = threading.Event()
    engine.run_between_steps(lambda e: gate.wait(30))  # keep the request queued while the client gives up
    body = {"model": MODEL, "prompt": "A hybrid", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=0.5)
    assert wait_for(lambda: engine._inbox.qsize() >= 2)  # the request's add, then its abort: the client left
    gate.set()
    assert wait_for(lambda: engine.metrics.snapshot()["requests_finished"].get("abort") == 1)
    assert engine.metrics.snapshot()["generation_tokens_total"] < 400
    assert wait_for(lambda: not engine.runner.caches)


def test_bench_client_against_the_server(server, serve_tok):
    """`dsla bench serve`'s load loop: every request completes with its exact output length."""
    import asyncio
    import random

    from dsla.bench.serve import cut_prompts, lognormal_lengths, run_load, summarize
    from dsla.bench.timeline import token_fractions
    from dsla.bench.trace import poisson_trace

    url, _ = server
    rng = random.Random(0)
    plens = lognormal_lengths(rng, 6, 20, 0.8, 4, 60)
    olens = lognormal_lengths(rng, 6, 8, 0.6, 2, 30)
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "A hybrid model mixes attention. " * 30]
    prompts = cut_prompts(texts, serve_tok, plens, rng)
    trace = poisson_trace(random.Random(1), 50.0, plens, olens)
    records, wall, plan = asyncio.run(run_load(url, MODEL, prompts, trace, timeout=60, api_key="k", poll_s=0.05))
    s = summarize(records, wall)
    assert s["completed"] == 6 and s["failed"] == 0 and s["rejected"] == 0, s["errors"]
    assert [r.output_tokens for r in records] == olens  # ignore_eos honoured, usage counted
    assert s["ttft_p50_s"] > 0 and s["output_token_throughput"] > 0 and s["per_token_latency_mean_s"] > 0
    assert plan["plan_before"]["policy"] == "static" and plan["timeline"]  # the server's plan was polled
    assert token_fractions(plan["plan_before"], plan["plan_after"]) == {"0.000": 1.0}
    bad, _, _ = asyncio.run(run_load(url, MODEL, prompts[:1], trace[:1], timeout=60, api_key="wrong"))
    assert bad[0].status == 401 and not bad[0].ok
