"""`dsla bench chaos`: concurrent streams while the layer plan is forced at random; check nothing breaks.

``--concurrency`` workers send streaming requests back to back for ``--duration`` seconds (a mix
of /v1/completions and /v1/chat/completions, random prompt lengths, random ``max_tokens`` with
``ignore_eos``), while a changer POSTs /v1/dsla/plan every ``--plan-interval`` seconds (times
0.5..1.5 at random): a random ratio of the server's order (conversions fold in-flight KV), a
random subset of the order's layers (conversions and reverts at once), ratio 0 (revert all), or
now and then an invalid body (must get 400 and change nothing).

``--stream-fraction`` below 1 mixes in non-streaming requests; ``--disconnect-fraction`` makes
that share of clients go away at a random moment (streaming: after a few chunks; non-streaming:
after a random wait, mid-generation); ``--rate`` replaces the workers by open-loop Poisson
arrivals at that many requests per second (a soak above the sustainable rate). /metrics'
``process_resident_memory_bytes`` is sampled every ``--sample-interval`` seconds.

Checked, and reported as violations (exit status 1 if any):
- every request gets HTTP 200 (503 "queue full" is counted as rejected, not as a violation);
- every stream is well formed: only ``data: <json>`` lines, each a chunk of the right object
  type, exactly one ``finish_reason`` (``length``: ignore_eos asks for exactly max_tokens), a
  usage chunk whose completion_tokens equals max_tokens, and ``data: [DONE]`` last;
- every forced change answers 200 (invalid ones 400);
- afterwards: /health is 200, the engine has no step errors, no engine faults and no request
  that ended in an error, nothing is left running or waiting, the live caches hold 0 bytes, and
  the server finished as many requests as the client completed or abandoned (none lost).

Seeded; prompts are random words (no tokenizer or corpus needed), so it runs against any model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

WORDS = ("the model converts attention layers into linear state when the load rises and folds every cached "
         "key and value into two decaying states history recency serving requests stream tokens quickly").split()


def prompt_text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, max_words)))


def check_stream(lines: list[str], chat: bool, max_tokens: int) -> str | None:
    """None when the SSE body is well formed, else what is wrong with it."""
    data = [ln for ln in lines if ln]
    if not data or data[-1] != "data: [DONE]":
        return f"stream does not end with [DONE] (last line {data[-1:]!r})"
    if any(not ln.startswith("data: ") for ln in data):
        return f"non-data line {next(ln for ln in data if not ln.startswith('data: '))!r}"
    finishes, usage = [], None
    for ln in data[:-1]:
        try:
            ev = json.loads(ln[6:])
        except json.JSONDecodeError:
            return f"invalid JSON chunk {ln[:120]!r}"
        if "error" in ev:
            return f"error in stream: {ev['error']}"
        if ev.get("object") != ("chat.completion.chunk" if chat else "text_completion"):
            return f"chunk of object {ev.get('object')!r}"
        finishes += [c["finish_reason"] for c in ev.get("choices", []) if c.get("finish_reason")]
        usage = ev.get("usage") or usage
    if finishes != ["length"]:
        return f"finish reasons {finishes} (expected one 'length')"
    if usage is None or usage.get("completion_tokens") != max_tokens:
        return f"usage {usage} (expected completion_tokens={max_tokens})"
    return None


def check_whole(body: dict, chat: bool, max_tokens: int) -> str | None:
    """None when a non-streaming response is well formed, else what is wrong with it."""
    if body.get("object") != ("chat.completion" if chat else "text_completion"):
        return f"response of object {body.get('object')!r}"
    reasons = [c.get("finish_reason") for c in body.get("choices", [])]
    if reasons != ["length"]:
        return f"finish reasons {reasons} (expected one 'length')"
    if (body.get("usage") or {}).get("completion_tokens") != max_tokens:
        return f"usage {body.get('usage')} (expected completion_tokens={max_tokens})"
    return None


async def _exchange(client, url: str, path: str, body: dict, headers: dict, stream: bool, leave_after: int | None):
    """(status, payload): the SSE lines, the JSON body, or None when the client left on purpose."""
    if not stream:
        r = await client.post(url + path, json=body, headers=headers)
        return r.status_code, (r.json() if r.status_code == 200 else r.text[:200])
    async with client.stream("POST", url + path, json=body, headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread())[:200]
        lines = []
        async for ln in r.aiter_lines():
            lines.append(ln)
            if leave_after is not None and len(lines) >= leave_after:
                return 200, None  # closing the stream here is the disconnect
        return 200, lines


async def one(client, url: str, headers: dict, model: str, rng: random.Random, args, stats: dict) -> None:
    chat = rng.random() < args.chat_fraction
    stream = rng.random() < args.stream_fraction
    leave = rng.random() < args.disconnect_fraction
    max_tokens = rng.randint(1, args.max_tokens)
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        common["stream_options"] = {"include_usage": True}
    text = prompt_text(rng, args.max_prompt_words)
    body = {**common, "messages": [{"role": "user", "content": text}]} if chat else {**common, "prompt": text}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    stats["sent"] += 1
    try:
        call = _exchange(client, url, path, body, headers, stream, rng.randint(1, 6) if leave and stream else None)
        if leave and not stream:  # a client that times out mid-generation
            try:
                status, payload = await asyncio.wait_for(call, rng.uniform(0.05, args.disconnect_after_s))
            except asyncio.TimeoutError:
                status, payload = 200, None
        else:
            status, payload = await call
    except Exception as e:  # a dropped connection is exactly what this run looks for
        stats["violations"].append(f"{path}: {type(e).__name__}: {e}")
        return
    if status == 503:
        stats["rejected"] += 1
        return
    if status != 200:
        stats["violations"].append(f"{path}: HTTP {status} {payload!r}")
        return
    if payload is None:
        stats["disconnected"] += 1
        return
    problem = check_stream(payload, chat, max_tokens) if stream else check_whole(payload, chat, max_tokens)
    if problem:
        stats["violations"].append(f"{path}: {problem}")
    else:
        stats["completed"] += 1
        stats["tokens"] += max_tokens


def random_plan(rng: random.Random, order: list[int], num_layers: int) -> dict[str, Any]:
    u = rng.random()
    if u < 0.05:
        return rng.choice([{"ratio": 2.0}, {"layers": [num_layers]}, {"layers": "x"}, {}])  # must be refused
    if u < 0.25:
        return {"ratio": 0}
    if u < 0.6:
        return {"ratio": rng.randint(0, len(order)) / num_layers}
    return {"layers": rng.sample(order, rng.randint(0, len(order)))}


async def changer(client, url, headers, rng, args, stop: asyncio.Event, stats: dict) -> None:
    view = (await client.get(url + "/v1/dsla/plan", headers=headers)).json()
    order, L = view["order"], view["num_layers"]
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.plan_interval * rng.uniform(0.5, 1.5))
            return
        except asyncio.TimeoutError:
            pass
        body = random_plan(rng, order, L)
        invalid = not ("ratio" in body and 0 <= body["ratio"] <= 1 or isinstance(body.get("layers"), list)
                       and all(0 <= i < L for i in body["layers"]))
        r = await client.post(url + "/v1/dsla/plan", json=body, headers=headers)
        want = 400 if invalid else 200
        if r.status_code != want:
            stats["violations"].append(f"POST /v1/dsla/plan {body}: HTTP {r.status_code} (expected {want}) "
                                       f"{r.text[:200]}")
        elif not invalid:
            ch = r.json()["change"]
            stats["plan_changes"] += 1
            stats["layers_converted"] += len(ch["converted"])
            stats["layers_reverted"] += len(ch["reverted"])
            stats["in_flight_folds"] += ch["in_flight_folded"] if ch["converted"] else 0
        else:
            stats["refused_plans"] += 1


async def worker(client, url, headers, model, rng, args, deadline: float, stats: dict) -> None:
    while time.monotonic() < deadline:
        await one(client, url, headers, model, rng, args, stats)


async def arrivals(client, url, headers, model, rng, args, deadline: float, stats: dict) -> None:
    """Open loop: requests arrive at ``args.rate`` per second (Poisson) whatever the server does."""
    tasks = set()
    while time.monotonic() < deadline:
        await asyncio.sleep(rng.expovariate(args.rate))
        t = asyncio.create_task(one(client, url, headers, model, random.Random(rng.random()), args, stats))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def sampler(client, url, args, stop: asyncio.Event, t0: float, stats: dict) -> None:
    """Every ``sample_interval`` s: the server's RSS and queue, for the timeline."""
    while not stop.is_set():
        m = (await client.get(url + "/metrics")).text
        stats["samples"].append({"t": round(time.monotonic() - t0, 1),
                                 "rss_mb": round(metric(m, "process_resident_memory_bytes") / 2**20, 1),
                                 "running": metric(m, "dsla_requests_running"),
                                 "waiting": metric(m, "dsla_requests_waiting")})
        try:
            await asyncio.wait_for(stop.wait(), args.sample_interval)
        except asyncio.TimeoutError:
            pass


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def chaos(args) -> dict[str, Any]:
    import httpx

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stats: dict[str, Any] = {k: 0 for k in ("sent", "completed", "rejected", "disconnected", "tokens",
                                            "plan_changes", "refused_plans", "layers_converted", "layers_reverted",
                                            "in_flight_folds")}
    stats["violations"], stats["samples"] = [], []
    # Open loop: no client-side pool limit, or the pool (not the server) would queue the overload.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64) if args.rate else httpx.Limits()
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10), limits=limits) as client:
        model = (await client.get(url + "/v1/models", headers=headers)).json()["data"][0]["id"]
        finished_before = metric((await client.get(url + "/metrics")).text, "dsla_requests_finished_total")
        t0, stop = time.monotonic(), asyncio.Event()
        deadline = t0 + args.duration
        change = asyncio.create_task(changer(client, url, headers, random.Random(args.seed + 1), args, stop, stats))
        watch = asyncio.create_task(sampler(client, url, args, stop, t0, stats))
        if args.rate:
            await arrivals(client, url, headers, model, random.Random(args.seed), args, deadline, stats)
        else:
            await asyncio.gather(*(worker(client, url, headers, model, random.Random(args.seed * 1000 + i), args,
                                          deadline, stats) for i in range(args.concurrency)))
        stop.set()
        await change
        await watch
        stats["wall_s"] = time.monotonic() - t0
        await asyncio.sleep(1.0)  # let the engine step once more: freed caches are dropped at the next step
        for _ in range(60):  # abandoned requests are aborted at the engine's next step boundary
            m = (await client.get(url + "/metrics")).text
            if metric(m, "dsla_requests_running") == metric(m, "dsla_requests_waiting") == 0:
                break
            await asyncio.sleep(1.0)
        health = await client.get(url + "/health")
        m = (await client.get(url + "/metrics")).text
    server_finished = metric(m, "dsla_requests_finished_total") - finished_before
    end = {"health": health.status_code, "step_errors": metric(m, "dsla_step_errors_total"),
           "engine_faults": metric(m, "dsla_engine_faults_total"),
           "request_errors": metric(m, 'dsla_requests_finished_total{finish_reason="error"}'),
           "running": metric(m, "dsla_requests_running"), "waiting": metric(m, "dsla_requests_waiting"),
           "cache_bytes_used": metric(m, "dsla_cache_bytes_used"), "server_finished": server_finished}
    expected = stats["completed"] + stats["disconnected"]
    for name, ok in (("health", end["health"] == 200), ("step_errors", end["step_errors"] == 0),
                     ("engine_faults", end["engine_faults"] == 0), ("request_errors", end["request_errors"] == 0),
                     ("running", end["running"] == 0), ("waiting", end["waiting"] == 0),
                     ("cache_bytes_used", end["cache_bytes_used"] == 0),
                     ("server_finished", server_finished == expected)):
        if not ok:
            extra = f" (client completed or left {expected})" if name == "server_finished" else ""
            stats["violations"].append(f"after the run: {name} = {end[name]}{extra}")
    rss = [x["rss_mb"] for x in stats["samples"] if x["rss_mb"]]
    after_1min = [x["rss_mb"] for x in stats["samples"] if x["t"] >= 60 and x["rss_mb"]]
    stats["rss_mb"] = {"first": rss[0] if rss else None, "at_1min": after_1min[0] if after_1min else None,
                       "max_after_1min": max(after_1min, default=None), "last": rss[-1] if rss else None}
    return {**stats, "end": end}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=8, help="workers sending requests back to back")
    p.add_argument("--plan-interval", type=float, default=2.0, help="mean seconds between forced plan changes")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens is drawn from 1..this")
    p.add_argument("--max-prompt-words", type=int, default=400, help="prompt length is drawn from 3..this words")
    p.add_argument("--chat-fraction", type=float, default=0.3, help="share of requests sent as chat completions")
    p.add_argument("--stream-fraction", type=float, default=1.0, help="share of requests sent with stream=true")
    p.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="share of clients that go away mid-request (streams after 1..6 chunks, others after a wait)")
    p.add_argument("--disconnect-after-s", type=float, default=2.0,
                   help="a leaving non-streaming client waits 0.05..this many seconds")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals per second instead of --concurrency workers")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between /metrics samples (RSS)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report JSON here")


def run(args: argparse.Namespace) -> int:
    import logging

    from dsla.bench.common import machine_info, write_json_atomic

    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = asyncio.run(chaos(args))
    shown = {k: v for k, v in report.items() if k not in ("violations", "samples")}
    print(json.dumps(shown, indent=1))
    print(f"violations: {len(report['violations'])}")
    for v in report["violations"][:20]:
        print("  " + v)
    if args.out:
        cfg = {k: v for k, v in vars(args).items() if k not in ("handler", "api_key")}
        write_json_atomic(args.out, {"config": cfg, "machine": machine_info(), "report": report})
        print(f"wrote {args.out}")
    return 1 if report["violations"] else 0
