"""`dsla bench chaos` for a few seconds against a real uvicorn: forced conversions under load break nothing."""

from __future__ import annotations

import argparse


from dsla.bench import chaos
from tests.serve.conftest import make_engine, serve_in_thread



def test_check_stream():
    ok = ['data: {"object": "text_completion", "choices": [{"text": "a", "finish_reason": null}]}', "",
          'data: {"object": "text_completion", "choices": [{"text": "b", "finish_reason": "length"}]}',
          'data: {"object": "text_completion", "choices": [], "usage": {"completion_tokens": 2}}', "data: [DONE]"]
    assert chaos.check_stream(ok, chat=False, max_tokens=2) is None
    assert "DONE" in chaos.check_stream(ok[:-1], chat=False, max_tokens=2)
    assert "completion_tokens" in chaos.check_stream(ok, chat=False, max_tokens=3)
    assert "invalid JSON" in chaos.check_stream(["data: {oops", "data: [DONE]"], chat=False, max_tokens=1)
    assert "object" in chaos.check_stream(ok, chat=True, max_tokens=2)


def run_chaos(serve_dir, serve_tok, argv: list[str], api_key: str | None = None):
    """`dsla bench chaos` with ``argv`` against a uvicorn serving the tiny model with 3 DSLA layers."""
    from dsla.model.loading import load_teacher
    from dsla.serve.api import create_app

    model = load_teacher(serve_dir)
    model.add_dsla([0, 1, 2])
    engine = make_engine(model, serve_tok, max_num_seqs=4, max_num_batched_tokens=32)
    url, stop = serve_in_thread(create_app(engine, "tiny", api_key=api_key))
    try:
        p = argparse.ArgumentParser()
        chaos.add_arguments(p)
        args = p.parse_args(["--url", url, *(["--api-key", api_key] if api_key else []), *argv])
        report = chaos.asyncio.run(chaos.chaos(args))
    finally:
        stop()
        engine.shutdown()
    return report, engine


def test_chaos_run_against_a_real_server(serve_dir, serve_tok):
    report, engine = run_chaos(serve_dir, serve_tok, [
        "--duration", "4", "--concurrency", "3", "--plan-interval", "0.2", "--max-tokens", "12",
        "--max-prompt-words", "40"], api_key="k")
    assert report["violations"] == [], report["violations"]
    assert report["completed"] >= 3 and report["plan_changes"] >= 3 and report["layers_converted"] > 0
    assert report["end"]["server_finished"] == report["completed"] and engine.error is None


def test_chaos_with_disconnects_and_non_streaming_requests(serve_dir, serve_tok):
    """Clients that leave mid-request (streaming or not) are aborted and counted: none lost, no errors."""
    report, engine = run_chaos(serve_dir, serve_tok, [
        "--duration", "4", "--concurrency", "4", "--plan-interval", "0.3", "--max-tokens", "40",
        "--max-prompt-words", "30", "--stream-fraction", "0.5", "--disconnect-fraction", "0.5",
        "--disconnect-after-s", "0.2", "--sample-interval", "1"])
    assert report["violations"] == [], report["violations"]
    assert report["completed"] >= 2 and report["disconnected"] >= 2 and report["samples"]
    assert report["end"]["server_finished"] == report["completed"] + report["disconnected"]
    assert engine.metrics.snapshot()["requests_finished"].get("abort", 0) >= 1
