"""The live page's server side: its routes, the key rule, --no-plan-control, and the engine's live view."""

from __future__ import annotations

import math
import time

import pytest

from tests.serve.conftest import make_engine

MODEL = "tiny"


@pytest.fixture
def make_client(serve_dir, serve_tok):
    from fastapi.testclient import TestClient

    from dsla.model.loading import load_teacher
    from dsla.serve.api import create_app

    made = []

    def make(api_key=None, plan_control=True, controller=None):
        from dsla.serve.dashboard import set_plan_control
        from dsla.serve.engine import Engine
        from dsla.serve.runner import ModelRunner
        from dsla.serve.scheduler import SchedulerConfig

        model = load_teacher(serve_dir)
        model.add_dsla((0, 1, 2))
        if controller is None:
            engine = make_engine(model, serve_tok)
        else:
            engine = Engine(ModelRunner(model), serve_tok, SchedulerConfig(), controller=controller,
                            order=controller.order).start()
        made.append(engine)
        app = create_app(engine, MODEL, api_key=api_key)
        set_plan_control(app, plan_control)
        return TestClient(app), engine

    yield make
    for e in made:
        e.shutdown()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_page_and_assets_are_served_with_a_strict_policy(make_client):
    client, _ = make_client()
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard"
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and page.headers["x-frame-options"] == "DENY"
    assert 'src="/dashboard/dashboard.js"' in page.text and "http://" not in page.text.replace(
        "http://www.w3.org", "")  # no CDN
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = client.get(f"/dashboard/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.content
    r = client.get("/dashboard/api.py")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/dashboard/..%2Fapi.py").status_code == 404


def test_page_weighs_under_200_kb():
    from dsla.serve.dashboard import ASSETS, read_asset

    total = sum(len(read_asset(n)) for n in ("dashboard.html", *ASSETS))
    assert total < 200 * 1024, total


def test_data_route_returns_the_plan_and_new_samples(make_client):
    client, engine = make_client()
    wait_for(lambda: len(engine.timeline.since()) >= 2)
    body = client.get("/v1/dsla/dashboard").json()
    assert body["object"] == "dsla.dashboard" and body["model"] == MODEL and body["plan_control"] is True
    assert body["alive"] is True and body["plan"]["num_layers"] == 3 and len(body["samples"]) >= 2
    s = body["samples"][-1]
    for k in ("time", "ratio", "running", "waiting", "tokens_per_s", "kv_bytes", "dsla_state_bytes", "step_s"):
        assert k in s
    newer = client.get("/v1/dsla/dashboard", params={"since": s["time"]}).json()["samples"]
    assert all(x["time"] > s["time"] for x in newer)
    before = time.time()
    assert client.post("/v1/dsla/plan", json={"ratio": 0.34}).status_code == 200
    assert [e["converted"] for e in client.get("/v1/dsla/dashboard").json()["plan"]["history"]] == [[0]]
    assert [e["converted"] for e in client.get("/v1/dsla/dashboard", params={"since": before}).json()["plan"][
        "history"]] == [[0]]
    assert client.get("/v1/dsla/dashboard", params={"since": time.time()}).json()["plan"]["history"] == []
    r = client.get("/v1/dsla/dashboard", params={"since": "nan"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"


def test_key_protects_the_data_route_but_not_the_page(make_client):
    client, _ = make_client(api_key="sekret")
    assert client.get("/dashboard").status_code == 200  # the page itself has no data
    r = client.get("/v1/dsla/dashboard")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/dsla/dashboard", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/dsla/dashboard", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_no_plan_control_refuses_forced_plans_with_a_json_403(make_client):
    client, engine = make_client(plan_control=False)
    r = client.post("/v1/dsla/plan", json={"ratio": 0.34})
    assert r.status_code == 403 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "plan_control_disabled"
    assert engine.runner.plan == ()
    assert client.get("/v1/dsla/plan").status_code == 200  # reading stays open
    assert client.get("/v1/dsla/dashboard").json()["plan_control"] is False


def test_live_view_after_a_forced_conversion(make_client):
    """The last conversion is reported, the next candidate follows the order, and the static
    policy's signals have no thresholds."""
    client, _ = make_client()
    r = client.post("/v1/dsla/plan", json={"ratio": 0.34})
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["next_candidate"] == {"layer": 1, "blocked": ""}
    last = view["memory"]["last_conversion"]
    assert last["converted"] == [0] and last["source"] == "api" and last["in_flight_folded"] == 0
    assert all(s["convert"] is None for s in view["signals"]) and view["quality"]["expected_increase"] is None


def test_memory_splits_kv_and_dsla_state_and_says_what_a_conversion_freed(serve_dir, serve_tok):
    """An engine stepped by the test: after layer 0 of an in-flight request is folded, the timeline
    sample and the plan view count its KV and its DSLA state apart, and they add up."""
    from dsla.model.loading import load_teacher
    from dsla.serve.outputs import Collector
    from dsla.sampling import SamplingParams

    model = load_teacher(serve_dir)
    model.add_dsla((0, 1, 2))
    engine = make_engine(model, serve_tok, start=False)
    engine.submit(list(range(5, 45)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), Collector())
    engine._drain(block=False)
    for _ in range(3):
        engine.step()
    change = engine.set_plan([0], reason="test", source="api")
    engine._sample(time.monotonic())
    kv, state = engine.runner.cache_bytes_by_kind()
    assert kv + state == engine.runner.cache_bytes() and state == model.dsla["0"].new_state().nbytes
    sample, mem = engine.timeline.last(), engine.plan_view()["memory"]
    assert (sample["kv_bytes"], sample["dsla_state_bytes"]) == (kv, state) == (mem["kv_bytes"], mem["dsla_state_bytes"])
    assert sample["ratio"] == 1 / 3 and sample["running"] == 1 and sample["steps"] == 3 and sample["step_s"] > 0
    last = mem["last_conversion"]
    # KV dropped minus state added: negative here, where 40 tokens of KV are smaller than a DSLA state
    assert last["freed_bytes"] == change["freed_bytes"] != 0 and last["in_flight_folded"] == 1


def test_live_view_of_the_adaptive_policy(make_client):
    from dsla.serve.control import Controller
    from dsla.serve.policy import PolicyConfig

    ctl = Controller(PolicyConfig(max_ratio=0.34, quality_budget=0.5), order=[2, 0, 1],
                     quality=((0.33, 0.1), (0.67, 0.3)))
    client, _ = make_client(controller=ctl)
    view = client.get("/v1/dsla/plan").json()
    assert view["next_candidate"] == {"layer": 2, "blocked": ""}
    assert {s["name"] for s in view["signals"]} >= {"queued_prompt_tokens", "queue_depth", "cache_fraction"}
    assert view["signals"][0]["convert"] == 4096 and view["quality"]["budget"] == 0.5
    assert view["quality"]["expected_increase"] == 0.0
    view = client.post("/v1/dsla/plan", json={"layers": [2]}).json()
    assert view["next_candidate"]["layer"] is None and "max_ratio" in view["next_candidate"]["blocked"]
    assert math.isclose(view["quality"]["expected_increase"], 0.1, rel_tol=0.05)
    view = client.post("/v1/dsla/plan", json={"layers": [2, 0, 1]}).json()  # beyond the measured curve
    assert view["quality"]["expected_increase"] is None


def test_timeline_keeps_its_span_and_filters_by_time():
    from dsla.serve.live import Timeline

    tl = Timeline(period_s=1.0, span_s=5.0)
    assert tl.due(0.0) and tl.last() is None
    for i in range(10):
        tl.add(float(i), {"time": 100.0 + i})
        assert not tl.due(i + 0.5) and tl.due(i + 1.0)
    assert [s["time"] for s in tl.since()] == [104.0, 105.0, 106.0, 107.0, 108.0, 109.0]
    assert [s["time"] for s in tl.since(107.0)] == [108.0, 109.0] and tl.since(200.0) == []
    with pytest.raises(ValueError):
        Timeline(period_s=0)


def test_next_candidate_respects_order_max_ratio_and_budget():
    from dsla.serve.policy import PolicyConfig, next_candidate

    assert next_candidate(PolicyConfig(), (), [3, 1, 2, 0], 4) == (3, "")
    assert next_candidate(PolicyConfig(max_ratio=0.75), (3, 1), [3, 1, 2, 0], 4) == (2, "")
    layer, why = next_candidate(PolicyConfig(max_ratio=0.5), (3, 1), [3, 1, 2, 0], 4)
    assert layer is None and "max_ratio" in why
    layer, why = next_candidate(PolicyConfig(quality_budget=0.05), (), [3, 1], 4, ((0.25, 0.1),))
    assert layer is None and "quality budget" in why
    assert next_candidate(PolicyConfig(max_ratio=0.75), (3, 1), [3, 1], 4)[0] is None


def test_non_finite_numbers_become_null():
    from dsla.serve.dashboard import finite

    assert finite({"a": [1.0, math.inf, {"b": math.nan}], "c": "x", "d": 2}) == {"a": [1.0, None, {"b": None}],
                                                                                   "c": "x", "d": 2}


def test_cli_no_plan_control_flag():
    from dsla.cli import build_parser

    assert build_parser().parse_args(["serve"]).no_plan_control is False
    assert build_parser().parse_args(["serve", "--no-plan-control"]).no_plan_control is True
