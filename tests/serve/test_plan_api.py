"""GET/POST /v1/dsla/plan and the plan metrics, through FastAPI's test client."""

from __future__ import annotations


import pytest

from tests.serve.conftest import make_engine

MODEL = "tiny"


@pytest.fixture
def make_client(serve_dir, serve_tok):
    from fastapi.testclient import TestClient

    from dsla.model.loading import load_teacher
    from dsla.serve.api import create_app

    made = []

    def make(api_key=None, dsla=(0, 1, 2)):
        model = load_teacher(serve_dir)
        model.add_dsla(dsla)
        engine = make_engine(model, serve_tok)
        made.append(engine)
        return TestClient(create_app(engine, MODEL, api_key=api_key)), engine

    yield make
    for e in made:
        e.shutdown()


def test_get_and_force_a_ratio_then_layers(make_client):
    client, engine = make_client()
    view = client.get("/v1/dsla/plan").json()
    assert view["object"] == "dsla.plan" and view["policy"] == "static"
    assert view["dsla_layers"] == [] and view["ratio"] == 0 and view["order"] == [0, 1, 2]
    r = client.post("/v1/dsla/plan", json={"ratio": 0.67, "reason": "drill"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dsla_layers"] == [0, 1] and body["change"]["converted"] == [0, 1]
    assert "forced via API" in body["change"]["reason"] and "drill" in body["change"]["reason"]
    r = client.post("/v1/dsla/plan", json={"layers": [2, 0]})
    assert r.json()["dsla_layers"] == [0, 2] and r.json()["change"]["reverted"] == [1]
    assert r.json()["converted_order"] == [0, 2]
    out = client.post("/v1/completions", json={"model": MODEL, "prompt": "The quick", "max_tokens": 5})
    assert out.status_code == 200
    metrics = client.get("/metrics").text
    assert "\ndsla_dsla_layers 2\n" in metrics and "dsla_layer_conversions_total 3.0" in metrics
    assert "dsla_layer_reverts_total 1.0" in metrics
    assert 'dsla_layer_is_dsla{layer="1"} 0.0' in metrics and 'dsla_layer_is_dsla{layer="2"} 1.0' in metrics
    assert 'dsla_generation_tokens_by_dsla_layers_total{dsla_layers="2"}' in metrics
    assert len(client.get("/v1/dsla/plan").json()["history"]) == 2


@pytest.mark.parametrize("body,param", [
    ({}, "ratio"), ({"ratio": 0.5, "layers": [1]}, None), ({"ratio": "half"}, "ratio"), ({"ratio": 1.5}, "ratio"),
    ({"ratio": True}, "ratio"), ({"layers": "1,2"}, "layers"), ({"layers": [1, 1]}, "layers"),
    ({"layers": [7]}, "layers"), ({"layers": [1.5]}, "layers"), ({"layers": [0], "reason": 3}, "reason"),
    ([1, 2], None)])
def test_bad_plan_requests_are_400_with_an_openai_body(make_client, body, param):
    client, engine = make_client()
    r = client.post("/v1/dsla/plan", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    assert engine.runner.plan == ()


def test_layers_without_a_dsla_module_and_malformed_json(make_client):
    client, engine = make_client(dsla=(1,))
    r = client.post("/v1/dsla/plan", json={"layers": [0]})
    assert r.status_code == 400 and "no DSLA module" in r.json()["error"]["message"]
    r = client.post("/v1/dsla/plan", json={"ratio": 0.67})  # 2 layers, only 1 can convert
    assert r.status_code == 400 and "only 1 layers" in r.json()["error"]["message"]
    r = client.post("/v1/dsla/plan", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert engine.runner.plan == ()


def test_forcing_the_plan_needs_the_key_when_set(make_client):
    client, engine = make_client(api_key="sekret")
    assert client.post("/v1/dsla/plan", json={"ratio": 0.34}).status_code == 401
    assert client.post("/v1/dsla/plan", json={"ratio": 0.34},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/dsla/plan").status_code == 401
    assert engine.runner.plan == ()
    auth = {"Authorization": "Bearer sekret"}
    r = client.post("/v1/dsla/plan", json={"ratio": 0.34}, headers=auth)
    assert r.status_code == 200 and r.json()["dsla_layers"] == [0]
    assert client.get("/v1/dsla/plan", headers=auth).json()["dsla_layers"] == [0]
