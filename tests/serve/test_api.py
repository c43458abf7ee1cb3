"""The HTTP API through FastAPI's test client: results, streaming format, every error status."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from dsla.generate import generate
from dsla.sampling import SamplingParams

MODEL = "tiny"


@pytest.fixture
def client(make_client):
    return make_client()[0]


def solo(model, tok, text, n):
    return tok.decode(list(generate(model, tok.encode(text), SamplingParams(max_tokens=n, temperature=0),
                                    stop_ids=model.cfg.eos_token_id)))


def sse_events(resp) -> list:
    lines = [ln for ln in resp.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_completion_greedy_equals_generate(client, serve_model, serve_tok):
    prompt = "The quick brown fox"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == solo(serve_model, serve_tok, prompt, 20)
    u = body["usage"]
    assert u["prompt_tokens"] == len(serve_tok.encode(prompt)) and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_token_id_prompt_and_batch_of_prompts(client, serve_model, serve_tok):
    ids = serve_tok.encode("Serving many requests")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == solo(serve_model, serve_tok, "Serving many requests", 8)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["A hybrid", "The quick"], "max_tokens": 8,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"]
    assert [c["index"] for c in ch] == [0, 1]
    assert ch[0]["text"] == solo(serve_model, serve_tok, "A hybrid", 8)
    assert ch[1]["text"] == solo(serve_model, serve_tok, "The quick", 8)
    assert r.json()["usage"]["prompt_tokens"] == len(serve_tok.encode("A hybrid")) + len(serve_tok.encode("The quick"))


def test_streaming_completion_with_usage(client, serve_model, serve_tok):
    prompt = "A hybrid model"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r)
    text = "".join(c["text"] for e in ev for c in e["choices"])
    assert text == solo(serve_model, serve_tok, prompt, 12)
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] >= 1
    assert ev[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["usage"] is None for e in ev[:-1])


def test_chat_completion_and_stream(client, serve_model, serve_tok):
    msgs = [{"role": "user", "content": "hello there"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = solo(serve_model, serve_tok, serve_tok.apply_chat_template(msgs), 10)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 10,
                                                  "temperature": 0, "stream": True})
    ev = sse_events(r)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev) == want
    assert ev[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_logprobs_agree_with_a_direct_loglikelihood(client, serve_model, serve_tok):
    """The lm-eval path: echo + logprobs + max_tokens=0 scores context + continuation."""
    context, cont = "The quick brown fox", " jumps over the lazy dog"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": context + cont, "max_tokens": 0,
                                             "echo": True, "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["text"] == context + cont
    lp = ch["logprobs"]
    ids = serve_tok.encode(context + cont)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    n_ctx = len(serve_tok.encode(context))
    with torch.no_grad():
        logp = serve_model(torch.tensor(ids)[None]).log_softmax(-1)[0]  # (T, vocab)
    direct = sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
    served = sum(lp["token_logprobs"][n_ctx:])
    assert served == pytest.approx(direct, abs=1e-3)
    greedy = all(int(logp[t - 1].argmax()) == ids[t] for t in range(n_ctx, len(ids)))
    is_greedy = all(max(top.values()) == v for top, v in zip(lp["top_logprobs"][n_ctx:], lp["token_logprobs"][n_ctx:]))
    assert greedy == is_greedy
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]


def test_completion_logprobs_of_generated_tokens(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Numbers", "max_tokens": 5, "temperature": 0,
                                             "logprobs": 3, "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 and all(len(t) <= 3 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_models_health_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("dsla_requests_running", "dsla_requests_waiting", "dsla_prompt_tokens_total",
                 "dsla_generation_tokens_total", "dsla_time_to_first_token_seconds_bucket",
                 "dsla_time_per_output_token_seconds_count", "dsla_cache_bytes_used", "dsla_cache_budget_bytes",
                 "dsla_dsla_layers", 'dsla_requests_finished_total{finish_reason="'):
        assert name in m.text, name


ERRORS = [
    ("malformed json", b"{not json", "invalid_json", None),
    ("not an object", b"[1, 2]", "invalid_json", None),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, "model_not_found", "model"),
    ("missing prompt", {"model": MODEL}, "missing_field", "prompt"),
    ("missing model", {"prompt": "x"}, "missing_field", "model"),
    ("mistyped max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, "invalid_value", "max_tokens"),
    ("mistyped prompt", {"model": MODEL, "prompt": 5}, "invalid_value", "prompt"),
    ("temperature out of range", {"model": MODEL, "prompt": "x", "temperature": 7}, "invalid_value", "temperature"),
    ("top_p out of range", {"model": MODEL, "prompt": "x", "top_p": 0}, "invalid_value", "top_p"),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "invalid_value", "max_tokens"),
    ("logprobs too many", {"model": MODEL, "prompt": "x", "logprobs": 50}, "invalid_value", "logprobs"),
    ("n > 1", {"model": MODEL, "prompt": "x", "n": 2}, "unsupported_parameter", "n"),
    ("best_of", {"model": MODEL, "prompt": "x", "best_of": 3}, "unsupported_parameter", "best_of"),
    ("penalty", {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "unsupported_parameter", "presence_penalty"),
    ("prompt too long", {"model": MODEL, "prompt": list(range(5, 5 + 600))}, "context_length_exceeded", "prompt"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, None, "prompt"),
    ("token id out of vocab", {"model": MODEL, "prompt": [5, 100000]}, None, None),
    ("max_tokens 0 without echo", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, "max_tokens"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_400_with_openai_body(client, case):
    _, payload, code, param = case
    if isinstance(payload, bytes):
        r = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def test_chat_errors(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                  "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"


def test_unknown_route_is_404_in_openai_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_body_over_limit_is_413(make_client):
    client, _ = make_client(max_body_bytes=200)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 500})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_api_key(make_client):
    client, _ = make_client(api_key="sekret")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes stay open


def test_queue_full_is_503_with_retry_after(make_client):
    client, engine = make_client(max_waiting=2)
    gate = threading.Event()
    engine.run_between_steps(lambda e: gate.wait(30))  # hold the engine so submissions pile up
    results = []

    def post():
        results.append(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    while engine.num_queued() < 2:
        threading.Event().wait(0.01)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    gate.set()
    for t in threads:
        t.join(30)
    assert [x.status_code for x in results] == [200, 200]
    assert engine.metrics.snapshot()["requests_rejected_total"] == 1


def test_a_failing_step_fails_its_requests_not_the_server(make_client):
    client, engine = make_client()
    real = engine.runner.execute
    calls = []

    def broken(out):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return real(out)

    engine.runner.execute = broken
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}).status_code == 200
    assert client.get("/health").status_code == 200 and not engine.runner.caches
    assert engine.metrics.snapshot()["step_errors_total"] == 1
