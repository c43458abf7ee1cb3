"""Issue 16's defects, one regression test each: no request hurts another, every bad input gets a
JSON 4xx in OpenAI's shape, the engine survives its own faults, plan changes are all-or-nothing,
and shutdown ends every stream with [DONE] or an error."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from dsla.serve.engine import Collector
from dsla.sampling import SamplingParams
from tests.serve.conftest import make_engine, serve_in_thread, wait_for

MODEL = "tiny"
CTX = 512  # the tiny model's max_position_embeddings


def assert_openai_error(r, status: int, param: str | None = "any", code: str | None = "any") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


@pytest.fixture
def client(make_client):
    return make_client()[0]


def body(**kw) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **kw}


# ---- defects 1, 2 and 4: the edge refuses what used to fail a step, a 500 or a silent clip ------
NESTED = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BAD = [
    ("seed beyond 64 bits", body(temperature=1, seed=2**64), "seed"),
    ("seed below int64", body(temperature=1, seed=-(2**63) - 1), "seed"),
    ("underflowing temperature", body(temperature=1e-300), "temperature"),
    ("tiny temperature", body(temperature=0.001), "temperature"),
    ("negative token id", body(prompt=[5, -1]), "prompt"),
    ("token id >= 2**63", body(prompt=[5, 2**63]), "prompt"),
    ("token id in a batch", body(prompt=[[5, 6], [7, 10**30]]), "prompt"),
    ("lone surrogate in prompt", body(prompt="\ud800"), "prompt"),
    ("lone surrogate in a stop string", body(stop=["a\udfff"]), "stop"),
    ("max_tokens true", body(max_tokens=True), "max_tokens"),
    ("stream 1", body(stream=1), "stream"),
    ("stream 'yes'", body(stream="yes"), "stream"),
    ("echo 'true'", body(echo="true"), "echo"),
    ("logprobs false", body(logprobs=False), "logprobs"),
    ("temperature true", body(temperature=True), "temperature"),
    ("max_tokens beyond the context", body(max_tokens=CTX), "max_tokens"),
    ("stop string too long", body(stop=["x" * 10_000]), "stop"),
    ("too many stop strings", body(stop=["a"] * 17), "stop"),
    ("too many stop_token_ids", body(stop_token_ids=list(range(65))), "stop_token_ids"),
    ("stop_token_id outside the vocabulary", body(stop_token_ids=[10**6]), "stop_token_ids"),
    ("negative stop_token_id", body(stop_token_ids=[-3]), "stop_token_ids"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_fields_are_400_naming_the_param(client, case):
    _, payload, param = case
    r = client.post("/v1/completions", content=json.dumps(payload).encode(),
                    headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param=param)
    assert client.get("/health").json() == {"status": "ok"}


def test_max_tokens_beyond_the_context_names_the_numbers(client, serve_tok):
    n_prompt = len(serve_tok.encode("Hi"))
    err = assert_openai_error(client.post("/v1/completions", json=body(max_tokens=CTX)), 400, "max_tokens",
                              "context_length_exceeded")
    assert str(CTX) in err["message"] and str(n_prompt) in err["message"] and "max_tokens" in err["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CTX}
    assert_openai_error(client.post("/v1/chat/completions", json=chat), 400, "max_completion_tokens")
    ok = client.post("/v1/completions", json=body(max_tokens=CTX - n_prompt, stop_token_ids=[2]))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800x"}]}', "messages"),
    (b'{"\\ud800": 1, "model": "tiny", "prompt": "x"}', None),
    (NESTED, None),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', None),
    (b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    (b'{"model": "tiny", "prompt": "x"', None),
    (b"\xff\xfe", None),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/dsla/plan"])
def test_malformed_bodies_are_json_400s_on_every_post_route(client, raw, param, path):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    if param is not None and path != "/v1/dsla/plan" and (param == "prompt") == (path == "/v1/completions"):
        assert err["param"] == param


def test_a_prompt_list_larger_than_the_queue_is_400_not_503(make_client):
    client, engine = make_client(max_waiting=2)
    assert_openai_error(client.post("/v1/completions", json=body(prompt=["a", "b", "c"])), 400, "prompt")
    assert client.post("/v1/completions", json=body(prompt=["a", "b"])).status_code == 200


def test_an_unexpected_exception_is_a_json_500(make_client):
    client, engine = make_client()

    def broken():
        raise KeyError("bug")

    engine.plan_view = broken
    err = assert_openai_error(client.get("/v1/dsla/plan"), 500, code="internal_error")
    assert "KeyError" in err["message"]
    assert_openai_error(client.delete("/v1/completions"), 405)


# ---- defect 5: a web page cannot reach the loopback server ------------------------------------------
def test_post_needs_a_json_content_type(client):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/dsla/plan"):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": ctype} if ctype else {}
            r = client.post(path, content=json.dumps(body()).encode(), headers=headers)
            assert_openai_error(r, 415, code="unsupported_media_type")
    r = client.post("/v1/completions", content=json.dumps(body()).encode(),
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_host_header_is_checked_against_the_allowed_hosts(make_client):
    from dsla.serve.edge import default_allowed_hosts

    client, _ = make_client(app_kw={"allowed_hosts": default_allowed_hosts("127.0.0.1")})
    for host in ("evil.example", "127.0.0.1.evil.example", "attacker:8000"):
        assert_openai_error(client.get("/health", headers={"host": host}), 400, code="invalid_host")
        assert_openai_error(client.post("/v1/completions", json=body(), headers={"host": host}), 400,
                            code="invalid_host")
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "LOCALHOST:1"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.0.0.5") == ("10.0.0.5",)


# ---- defect 1: a failure in one request's sampling fails that request alone -------------------------
def sneak(opts: SamplingParams, **fields) -> SamplingParams:
    """Options the edge would refuse, as if a check were missing (to test the engine's own isolation)."""
    for k, v in fields.items():
        object.__setattr__(opts, k, v)
    return opts


@pytest.mark.parametrize("bad", [{"seed": 2**64}, {"temperature": 1e-300}], ids=["seed", "temperature"])
def test_engine_isolates_a_request_whose_sampling_raises(serve_model, serve_tok, bad):
    engine = make_engine(serve_model, serve_tok)
    try:
        healthy, alone = Collector(), Collector()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), alone)
        alone.wait(60)
        engine.submit([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), healthy)
        broken = Collector()
        engine.submit([8, 9], sneak(SamplingParams(max_tokens=30, temperature=1.0, seed=1), **bad), broken)
        healthy.wait(60), broken.wait(60)
    finally:
        engine.shutdown()
    assert broken.outputs[-1].finish_reason.value == "error" and "sampling failed" in broken.outputs[-1].error
    assert healthy.outputs[-1].error is None and healthy.token_ids == alone.token_ids
    assert engine.metrics.snapshot()["request_errors_total"] == 1 and engine.error is None


def test_a_failing_stop_check_fails_its_request_alone(serve_model, serve_tok):
    engine = make_engine(serve_model, serve_tok, start=False)
    good, bad = Collector(), Collector()
    engine.submit([5, 6], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), good)
    rid = engine.submit([7, 8], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, stop=("zz",)), bad)
    engine._drain(block=False)

    def explode(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    engine._tracked[rid].detok.push = explode
    while engine.scheduler.has_work:
        engine.step()
    good.wait(5), bad.wait(5)
    assert good.outputs[-1].finish_reason.value == "length" and len(good.token_ids) == 5
    assert bad.outputs[-1].finish_reason.value == "error" and "injected" in bad.outputs[-1].error


def test_seed_and_temperature_repros_leave_a_concurrent_stream_intact(serve_model, serve_tok):
    """The issue's repro: a stream runs while other clients send the two requests that used to fail
    the whole step. They get 400s; the stream completes with every token and [DONE]."""
    from dsla.serve.api import create_app

    engine = make_engine(serve_model, serve_tok)
    url, stop = serve_in_thread(create_app(engine, MODEL))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body(prompt="The quick", max_tokens=120, temperature=0,
                                                                ignore_eos=True, stream=True)) as s:
                lines = s.iter_lines()
                first = next(ln for ln in lines if ln)
                bad = [c.post("/v1/completions", json=body(temperature=1, seed=18446744073709551616)),
                       c.post("/v1/completions", json=body(temperature=1e-300))]
                rest = [ln for ln in lines if ln]
            assert [r.status_code for r in bad] == [400, 400]
            assert [r.json()["error"]["param"] for r in bad] == ["seed", "temperature"]
            events = [json.loads(ln[6:]) for ln in [first] + rest[:-1]]
            assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
            assert c.get("/health").json() == {"status": "ok"}
    finally:
        stop()
        engine.shutdown()
    assert engine.metrics.snapshot()["requests_finished"] == {"length": 1}


# ---- defect 3: a non-streaming client that leaves mid-generation is aborted at once -----------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_disconnect_during_decoding_aborts(serve_model, serve_tok, path, caplog):
    from dsla.serve.api import create_app

    engine = make_engine(serve_model, serve_tok)
    flowing, closed, steps = threading.Event(), threading.Event(), []
    real = engine.runner.execute

    def gated(out):  # hold the engine mid-decode until the client has gone
        steps.append(1)
        if len(steps) == 4:
            flowing.set()
            closed.wait(30)
        return real(out)

    engine.runner.execute = gated
    url, stop = serve_in_thread(create_app(engine, MODEL))
    payload = ({"prompt": "The quick"} if path == "/v1/completions"
               else {"messages": [{"role": "user", "content": "hi"}]})
    raw = json.dumps({"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True, **payload}).encode()
    host, port = url.removeprefix("http://").split(":")
    try:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        assert flowing.wait(30)
        sock.close()
        closed.set()
        assert wait_for(lambda: engine.metrics.snapshot()["requests_finished"].get("abort") == 1)
    finally:
        stop()
        engine.shutdown()
    assert engine.metrics.snapshot()["generation_tokens_total"] < 400
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# ---- defect 6: engine faults outside the forward --------------------------------------------------
def test_a_scheduler_fault_fails_its_requests_and_the_loop_serves_on(make_client):
    client, engine = make_client()
    real, calls = engine.scheduler.schedule, []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("scheduler bug")
        return real()

    engine.scheduler.schedule = broken
    err = assert_openai_error(client.post("/v1/completions", json=body(max_tokens=3)), 500)
    assert "engine fault" in err["message"] and "scheduler bug" in err["message"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post("/v1/completions", json=body(max_tokens=3)).status_code == 200
    assert engine.metrics.snapshot()["engine_faults_total"] == 1
    assert "dsla_engine_faults_total 1.0" in client.get("/metrics").text


def test_an_output_fault_fails_only_that_request(make_client, serve_tok):
    client, engine = make_client()
    real = engine._process

    def broken(t, completes, res, now):
        if t.req.prompt_token_ids == serve_tok.encode("boom"):
            raise IndexError("output bug")
        return real(t, completes, res, now)

    engine._process = broken
    out = []
    th = threading.Thread(target=lambda: out.append(client.post("/v1/completions", json=body(
        prompt="The quick", max_tokens=40, ignore_eos=True, temperature=0))))
    th.start()
    err = assert_openai_error(client.post("/v1/completions", json=body(prompt="boom")), 500)
    th.join(60)
    assert "output bug" in err["message"]
    assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 40
    assert engine.is_alive and engine.metrics.snapshot()["request_errors_total"] == 1


def test_a_fault_admitting_one_request_fails_it_alone(serve_model, serve_tok, monkeypatch):
    import dsla.serve.engine as engine_mod

    real = engine_mod.Detokenizer

    def picky(tok, prompt_ids, stop=()):
        if list(prompt_ids) == [9, 9]:
            raise RuntimeError("detokenizer bug")
        return real(tok, prompt_ids, stop)

    monkeypatch.setattr(engine_mod, "Detokenizer", picky)
    engine = make_engine(serve_model, serve_tok)
    try:
        good, bad = Collector(), Collector()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), good)
        engine.submit([9, 9], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), bad)
        good.wait(60), bad.wait(60)
    finally:
        engine.shutdown()
    assert bad.outputs[-1].finish_reason.value == "error" and "detokenizer bug" in bad.outputs[-1].error
    assert good.outputs[-1].finish_reason.value == "length" and len(good.token_ids) == 8
    assert engine.metrics.snapshot()["engine_faults_total"] == 1 and engine.error is None


def test_a_fault_outside_any_step_fails_no_request(serve_model, serve_tok):
    engine = make_engine(serve_model, serve_tok, start=False)
    real, calls = engine._load_metrics, []

    def broken(now):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("metrics bug")
        return real(now)

    engine._load_metrics = broken
    engine.start()
    try:
        c = Collector()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), c)
        c.wait(60)
        assert wait_for(lambda: len(calls) >= 3)
    finally:
        engine.shutdown()
    assert c.outputs[-1].finish_reason.value == "length" and len(c.token_ids) == 8
    assert engine.metrics.snapshot()["engine_faults_total"] == 1 and engine.error is None


# ---- defect 6: set_plan is all or nothing ------------------------------------------------------------
def plan_state(engine) -> dict:
    m = engine.metrics.snapshot()
    return {"plan": engine.runner.plan, "order": engine.converted_order, "cost": engine.scheduler.cost,
            "caches": {rid: (tuple(c.dsla_layers()), c.nbytes) for rid, c in engine.runner.caches.items()},
            "prices": {r.request_id: r.cache_cost for r in engine.scheduler.running},
            "metrics": {k: m[k] for k in ("layer_conversions_total", "layer_reverts_total",
                                          "conversion_freed_bytes_total", "dsla_layers", "layer_is_dsla")},
            "history": len(engine.plan_history)}


@pytest.mark.parametrize("where", ["convert_layer", "reprice", "set_cost"])
def test_a_plan_change_that_fails_part_way_changes_nothing(serve_dir, serve_tok, where):
    from dsla.model.loading import load_teacher

    model = load_teacher(serve_dir)
    model.add_dsla([0, 1, 2])
    engine = make_engine(model, serve_tok, start=False)
    engine.set_plan([1], "before")
    cols = [Collector() for _ in range(3)]
    for i, c in enumerate(cols):
        engine.submit([5 + i, 6, 7, 8], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), c)
    for _ in range(3):
        engine._drain(block=False)
        engine.step()
    before = plan_state(engine)
    assert len(before["caches"]) == 3

    calls = []
    target = {"convert_layer": model, "reprice": engine.scheduler, "set_cost": engine.scheduler}[where]
    real = getattr(target, where)

    fail_at = 1 if where == "set_cost" else 2  # part-way: after the first cache was folded or re-priced

    def fault(*a, **kw):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected fault")
        return real(*a, **kw)

    setattr(target, where, fault)
    with pytest.raises(RuntimeError, match="injected"):
        engine.set_plan([1, 0, 2], "boom")
    setattr(target, where, real)
    assert plan_state(engine) == before
    while engine.scheduler.has_work:  # the caches still work: everyone finishes
        engine.step()
    for c in cols:
        c.wait(5)
    assert all(c.outputs[-1].finish_reason.value == "length" and len(c.token_ids) == 12 for c in cols)
    engine.set_plan([1, 0], "after")  # and the plan can still change
    assert engine.runner.plan == (0, 1) and engine.converted_order == (1, 0)


# ---- defect 6: graceful shutdown --------------------------------------------------------------------
def hold_from_step(engine, n: int) -> threading.Event:
    """From the engine's ``n``-th step on, each step waits for the returned event (set it to go on)."""
    release, steps, real = threading.Event(), [], engine.runner.execute

    def held(out):
        steps.append(1)
        if len(steps) >= n:
            release.wait(30)
        return real(out)

    engine.runner.execute = held
    return release


def test_drain_refuses_new_work_and_ends_streams_with_an_error_event(serve_model, serve_tok):
    from dsla.serve.api import create_app

    engine = make_engine(serve_model, serve_tok)
    release = hold_from_step(engine, 3)
    url, stop = serve_in_thread(create_app(engine, MODEL))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body(max_tokens=200, ignore_eos=True, stream=True)) as s:
                lines = s.iter_lines()
                next(ln for ln in lines if ln)
                drained = []
                th = threading.Thread(target=lambda: drained.append(engine.drain(0.0)))
                th.start()
                assert wait_for(lambda: not engine.admitting)
                assert_openai_error(c.post("/v1/completions", json=body()), 503, code="shutting_down")
                assert c.get("/health").status_code == 503
                release.set()
                th.join(30)
                rest = [ln for ln in lines if ln]
        assert drained == [1]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        assert last["error"]["code"] == "shutting_down" and "shutting down" in last["error"]["message"]
    finally:
        stop()
        engine.shutdown()


def test_drain_lets_in_flight_requests_finish_within_the_timeout(serve_model, serve_tok):
    engine = make_engine(serve_model, serve_tok)
    try:
        c = Collector()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), c)
        assert engine.drain(60.0) == 0
        c.wait(5)
        assert c.outputs[-1].finish_reason.value == "length" and len(c.token_ids) == 20
    finally:
        engine.shutdown()


def test_sigterm_drains_then_stops_the_server(serve_model, serve_tok):
    """`dsla serve`'s server: the first SIGTERM stops admitting, ends what is left with an error event
    after the timeout, and only then lets uvicorn exit."""
    import signal

    from dsla.serve.api import create_app
    from dsla.serve.commands import graceful_server

    engine = make_engine(serve_model, serve_tok)
    release = hold_from_step(engine, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = graceful_server(create_app(engine, MODEL), engine, "127.0.0.1", port, shutdown_timeout_s=0.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                    "ignore_eos": True, "stream": True}) as s:
                lines = s.iter_lines()
                next(ln for ln in lines if ln)
                server.handle_exit(signal.SIGTERM, None)
                assert wait_for(lambda: not engine.admitting)
                release.set()
                rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()
        server.should_exit = True
        engine.shutdown()
