"""Schema fuzzing of the HTTP API (hypothesis): zero 5xx, and every error in OpenAI's shape.

The request schema is the pydantic models' own field list (``model_fields``): each example keeps a
random subset of the documented fields and gives each either a plausible value or any JSON value
at all (huge and negative integers, booleans, floats, nesting, lone surrogates), or sends a body
that is not an object, or bytes that are not JSON. Bounded: a fixed number of examples, no
shrinking database, and short generations, so the file runs in well under a minute.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsla.serve.protocol import ChatCompletionRequest, CompletionRequest
from tests.serve.conftest import make_engine

MODEL = "tiny"
EXAMPLES = 120  # per route

text = st.text(st.characters(codec=None, categories=("L", "N", "P", "Zs", "Cs", "So")), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=False, allow_infinity=False) | st.floats(-1, 3) | text)
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(text, inner, max_size=4), max_leaves=12)
token_ids = st.lists(st.integers(-5, 400) | st.integers(-(2**64), 2**64), min_size=0, max_size=6)
PLAUSIBLE = {  # values near the valid range for each documented field
    "model": st.just(MODEL) | text,
    "prompt": text | token_ids | st.lists(text, max_size=3) | st.lists(token_ids, max_size=3),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": text | st.none()}), max_size=3),
    "max_tokens": st.integers(-2, 8), "max_completion_tokens": st.integers(-2, 8),
    "temperature": st.floats(-1, 3) | st.just(1e-300), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 50),
    "seed": st.integers(-(2**65), 2**65), "stop": text | st.lists(text, max_size=20),
    "stop_token_ids": token_ids, "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "logprobs": st.integers(-1, 25) | st.booleans(), "top_logprobs": st.integers(-1, 25),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | any_json,
    "n": st.integers(0, 3), "best_of": st.integers(0, 3),
}


def bodies(fields: list[str]):
    """JSON bodies: a random subset of ``fields``, each plausible or arbitrary; sometimes not an object."""
    def field(name: str):
        return PLAUSIBLE.get(name, any_json) | any_json

    objects = st.fixed_dictionaries({"model": st.just(MODEL)},
                                    optional={f: field(f) for f in fields if f != "model"})
    raw = st.binary(max_size=40) | st.sampled_from([b"[" * 5000, b'{"a": NaN}', b"1e999", b"\xff"])
    return (objects.map(lambda d: json.dumps(d).encode()) | any_json.map(lambda d: json.dumps(d).encode()) | raw)


def short(body: bytes) -> bytes:
    """Cap generation so each example stays quick: long outputs test nothing new here."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(obj, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool) and 8 < obj[k] < 10_000:
                obj[k] = 8
        if "max_tokens" not in obj and "max_completion_tokens" not in obj and "messages" in obj:
            obj["max_tokens"] = 8
        return json.dumps(obj).encode()
    return body


@pytest.fixture(scope="module")
def client(serve_model, serve_tok):
    from fastapi.testclient import TestClient

    from dsla.serve.api import create_app

    engine = make_engine(serve_model, serve_tok, max_waiting=4)
    yield TestClient(create_app(engine, MODEL), raise_server_exceptions=False), engine
    engine.shutdown()


def check(client, path: str, body: bytes) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert err["type"] == "invalid_request_error" and (err["param"] is None or isinstance(err["param"], str))
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.split("\n") if ln]
        assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines), r.text[-300:]
        assert not any("error" in json.loads(ln[6:]) for ln in lines[:-1]), r.text[-300:]
    else:
        assert isinstance(r.json(), dict)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(body=bodies(list(CompletionRequest.model_fields)))
def test_fuzz_completions(client, body):
    check(client[0], "/v1/completions", short(body))


@FUZZ
@given(body=bodies(list(ChatCompletionRequest.model_fields)))
def test_fuzz_chat_completions(client, body):
    check(client[0], "/v1/chat/completions", short(body))


@FUZZ
@given(body=st.fixed_dictionaries({}, optional={"ratio": st.floats(-1, 2) | any_json,
                                                "layers": st.lists(st.integers(-2, 5), max_size=4) | any_json,
                                                "reason": text | any_json}).map(lambda d: json.dumps(d).encode())
       | any_json.map(lambda d: json.dumps(d).encode()))
def test_fuzz_plan(client, body):
    check(client[0], "/v1/dsla/plan", body)
    assert client[1].is_alive
