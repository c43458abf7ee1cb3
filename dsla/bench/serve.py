"""`dsla bench serve`: open-loop load against any OpenAI-compatible /v1/completions URL.

Requests arrive on schedule whether or not earlier ones finished (open loop: a slow server
builds a backlog instead of slowing the load down). The schedule is either Poisson arrivals at
``--rate`` with prompt and output lengths from clipped log-normal distributions (prompts cut from
documents of a prepared corpus's test split), or a trace (``--trace FILE.csv`` in the Azure LLM
inference format, or ``--trace synthetic``: bursty arrivals and long prompts, see
``dsla.bench.trace``) replayed with its arrival times and lengths (prompts cut as windows of the
concatenated test split, so any length up to the model's context exists).

Every request streams, so time to first token (TTFT) and time per output token (TPOT) are
measured at the client; the per-token latency of a request is its end-to-end latency over its
output tokens. ``ignore_eos`` asks the server to produce exactly ``max_tokens`` (servers that do
not know the field ignore it; output tokens are then counted from ``usage`` or the stream).
Against a dsla server the run also records the layer plan over time and the share of output
tokens generated at each conversion ratio (``dsla.bench.timeline``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from dsla.bench.trace import SyntheticTrace, TraceRequest

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One request as the client saw it (seconds relative to the run start)."""

    prompt_tokens: int  # as cut by the client's tokenizer
    max_tokens: int
    sent: float
    first_token: float | None = None
    done: float | None = None
    output_tokens: int = 0
    status: int | None = None  # HTTP status (None: no response)
    error: str | None = None
    server_prompt_tokens: int | None = None  # as counted by the server (usage)

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None


def lognormal_lengths(rng: random.Random, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    """n long-tailed lengths: log-normal with the given median and sigma, clipped to [lo, hi]."""
    return [min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0, 1))))) for _ in range(n)]


def cut_prompts(texts: list[str], tokenizer, lengths: list[int], rng: random.Random) -> list[str]:
    """A prompt of each length (in tokens) from a random place in a random long-enough document."""
    docs = [tokenizer.encode(t) for t in texts]
    docs = [d for d in docs if len(d) >= 8]
    if not docs:
        raise ValueError("the corpus split has no documents to cut prompts from")
    out = []
    for n in lengths:
        fits = [d for d in docs if len(d) >= n] or [max(docs, key=len)]
        d = rng.choice(fits)
        start = rng.randrange(0, len(d) - min(n, len(d)) + 1)
        out.append(tokenizer.decode(d[start: start + n]))
    return out


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[Record], wall: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = [r.first_token - r.sent for r in ok if r.first_token is not None]
    tpot = [(r.done - r.first_token) / (r.output_tokens - 1) for r in ok
            if r.first_token is not None and r.output_tokens > 1]
    e2e = [r.done - r.sent for r in ok]
    per_token = [(r.done - r.sent) / r.output_tokens for r in ok if r.output_tokens]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = f"HTTP {r.status}" if r.status and r.status != 200 else (r.error or "unknown").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok), "errors": errors,
        "rejected": sum(1 for r in records if r.status == 503),
        "per_token_latency_mean_s": statistics.fmean(per_token) if per_token else None,
        "duration_s": wall, "request_throughput": len(ok) / wall if wall else None,
        "output_token_throughput": out_tokens / wall if wall else None,
        "output_tokens": out_tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        s[f"{name}_mean_s"] = statistics.fmean(xs) if xs else None
        for q in (50, 90, 99):
            s[f"{name}_p{q}_s"] = percentile(xs, q)
    return s


async def one_request(client, url: str, headers: dict, payload: dict, rec: Record, t0: float, timeout: float) -> None:
    import httpx

    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=payload, headers=headers) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return
                counted, usage = 0, None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        rec.error = f"stream error: {ev['error'].get('message')}"
                        return
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for ch in ev.get("choices") or []:
                        if ch.get("text"):
                            counted += 1
                            if rec.first_token is None:
                                rec.first_token = time.perf_counter() - t0
                rec.done = time.perf_counter() - t0
                rec.output_tokens = usage["completion_tokens"] if usage else counted
                rec.server_prompt_tokens = usage.get("prompt_tokens") if usage else None
    except TimeoutError:
        rec.error = f"timeout: no complete answer within {timeout:.0f} s"
    except httpx.HTTPError as e:
        rec.error = f"connection: {type(e).__name__} {e}"


def request_payload(model: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The /v1/completions body of one request: greedy, streamed, exactly ``max_tokens`` where the
    server honours ``ignore_eos``; ``extra`` (``--extra-body``) adds or overrides fields."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    payload.update(extra or {})
    return payload


async def run_load(url: str, model: str, prompts: list[str], trace: list[TraceRequest], timeout: float,
                   api_key: str | None, poll_s: float | None = None,
                   extra_body: dict[str, Any] | None = None) -> tuple[list[Record], float, dict[str, Any]]:
    """Send ``prompts[i]`` at ``trace[i].arrival_s`` asking for ``trace[i].output_tokens`` tokens.

    Returns the records, the wall time and, with ``poll_s``, what the server said about its layer
    plan: ``timeline`` samples, ``plan_before``/``plan_after`` views and ``start_unix`` (empty
    when the server has no /v1/dsla/plan).
    """
    import httpx

    from dsla.bench.timeline import fetch_plan, poll_plan

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    records: list[Record] = []
    plan: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits) as client:
        before = await fetch_plan(client, url, headers) if poll_s else None
        t0, done = time.perf_counter(), asyncio.Event()
        plan.update(start_unix=time.time(), timeline=[], plan_before=before)
        poller = None
        if before is not None:
            in_flight = lambda: sum(1 for r in records if r.done is None and r.error is None)  # noqa: E731
            poller = asyncio.create_task(poll_plan(client, url, headers, t0, poll_s, done, in_flight,
                                                   plan["timeline"]))
        tasks = []
        for prompt, req in zip(prompts, trace):
            delay = req.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Record(req.prompt_tokens, req.output_tokens, sent=time.perf_counter() - t0)
            records.append(rec)
            payload = request_payload(model, prompt, req.output_tokens, extra_body)
            tasks.append(asyncio.create_task(one_request(client, endpoint, headers, payload, rec, t0, timeout)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        done.set()
        if poller is not None:
            await poller
            plan["plan_after"] = await fetch_plan(client, url, headers)
    return records, wall, plan


def cut_windows(tokens, tokenizer, lengths: list[int], rng: random.Random) -> list[str]:
    """A prompt of each length: a window at a random offset of one long token stream, as text."""
    if len(tokens) < 2:
        raise ValueError("the corpus split has no tokens to cut prompts from")
    out = []
    for n in lengths:
        n = min(n, len(tokens))
        start = rng.randrange(0, len(tokens) - n + 1)
        out.append(tokenizer.decode([int(t) for t in tokens[start: start + n]]))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc): servers such as vLLM run their engine in
    child processes, whose memory and CPU time belong to the server too."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def server_rss_mb(pid: int | None) -> float | None:
    """Resident memory of the server process and its children, MiB (None: no such process)."""
    if pid is None or _rss_mb(pid) is None:
        return None
    return sum(r for r in map(_rss_mb, process_tree(pid)) if r is not None)


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds the server process and its live children (all threads) have used:
    on a shared, busy machine output tokens per CPU second compares servers more fairly than tokens
    per wall second. (A child that exited during the run takes its seconds with it.)"""
    if pid is None or _cpu_s(pid) is None:
        return None
    return sum(c for c in map(_cpu_s, process_tree(pid)) if c is not None)


def fetch_model(url: str, api_key: str | None) -> tuple[str, int | None]:
    """The first model id of /v1/models and its context length when the server says it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    m = r.json()["data"][0]
    return m["id"], m.get("max_model_len")


def server_policy(url: str, api_key: str | None) -> str | None:
    """The policy a dsla server reports on /v1/dsla/plan (None for other servers)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/dsla/plan", headers=headers, timeout=10)
    return r.json().get("policy") if r.status_code == 200 else None


def add_synthetic_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--trace synthetic (see dsla/bench/trace.py for the distributions)")
    for f in fields(SyntheticTrace):
        g.add_argument("--synthetic-" + f.name.replace("_", "-"), dest="synthetic_" + f.name, type=type(f.default),
                       default=f.default, help=f"(default: {f.default})")


def load_trace(args: argparse.Namespace) -> tuple[list[TraceRequest], dict[str, Any]]:
    """The trace of --trace and what describes it (for the JSON)."""
    from dsla.bench.trace import load_azure_csv, synthetic_trace, write_azure_csv

    if args.trace == "synthetic":
        cfg = SyntheticTrace(**{f.name: getattr(args, "synthetic_" + f.name) for f in fields(SyntheticTrace)})
        trace, info = synthetic_trace(cfg, args.seed), {"kind": "synthetic", **asdict(cfg)}
    else:
        trace = load_azure_csv(args.trace, args.trace_start_s, args.trace_duration_s, args.trace_speedup)
        info = {"kind": "csv", "path": args.trace, "start_s": args.trace_start_s,
                "duration_s": args.trace_duration_s, "speedup": args.trace_speedup}
    if args.num_requests is not None:
        trace = trace[: args.num_requests]
    if not trace:
        raise ValueError(f"the trace {args.trace} has no requests in the chosen window")
    if args.save_trace:
        write_azure_csv(args.save_trace, trace)
    return trace, info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the OpenAI-compatible server")
    p.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default=None, help="name of this run in the table and JSON (default: server policy)")
    p.add_argument("--policy", choices=["static", "adaptive"], default=None,
                   help="refuse to run unless the server reports this policy (a guard for side-by-side runs)")
    p.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, requests/s (Poisson; not with --trace)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests to send (default 50; with --trace: at most this many)")
    g.add_argument("--duration", type=float, default=None, help="send for this many seconds (then drain)")
    p.add_argument("--trace", default=None,
                   help="replay a trace: an Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or 'synthetic'")
    p.add_argument("--trace-start-s", type=float, default=0.0, help="CSV: skip this many seconds of the trace")
    p.add_argument("--trace-duration-s", type=float, default=None, help="CSV: replay this many seconds of it")
    p.add_argument("--trace-speedup", type=float, default=1.0, help="CSV: divide arrival times by this")
    p.add_argument("--save-trace", default=None, help="write the replayed trace here (Azure CSV, seconds)")
    add_synthetic_arguments(p)
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="seconds between polls of /v1/dsla/plan for the timeline (0: do not poll)")
    p.add_argument("--teacher", default=None, help="tokenizer used to cut prompts (default: the prepared teacher)")
    p.add_argument("--corpus", default="wikipedia", help="prepared corpus to cut prompts from (test split)")
    p.add_argument("--prompt-len-median", type=float, default=128)
    p.add_argument("--prompt-len-sigma", type=float, default=0.8, help="log-normal sigma (0: fixed length)")
    p.add_argument("--prompt-len-range", default="16,1024", help="min,max prompt tokens")
    p.add_argument("--output-len-median", type=float, default=64)
    p.add_argument("--output-len-sigma", type=float, default=0.6)
    p.add_argument("--output-len-range", default="8,256", help="min,max output tokens")
    p.add_argument("--timeout", type=float, default=300, help="seconds a request may take before it counts as failed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-pid", type=int, default=None,
                   help="report this local process's RSS and CPU time, its children's included, over the run "
                        "(soak, busy machines)")
    p.add_argument("--settle", type=float, default=0, help="seconds to wait after the load before the last RSS")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    p.add_argument("--extra-body", type=_json_object, default=None,
                   help="JSON object merged into every request body, e.g. '{\"logit_bias\": {\"2\": -100}}' "
                        "for a server that ignores ignore_eos")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--extra-body {text!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--extra-body {text!r} must be a JSON object ({{...}})")
    return value


def build_requests(args: argparse.Namespace, tok, teacher, context: int | None):
    """(prompts, trace, trace description) for the run."""
    from dsla.bench.common import parse_list
    from dsla.bench.trace import poisson_trace
    from dsla.data.corpora import load_texts, load_tokens

    rng = random.Random(args.seed)
    if args.trace is None:
        if args.rate <= 0:
            raise ValueError(f"--rate={args.rate} must be positive")
        n = args.num_requests or (math.ceil(args.duration * args.rate) if args.duration else 50)
        plo, phi = parse_list(args.prompt_len_range, int)
        olo, ohi = parse_list(args.output_len_range, int)
        prompt_lens = lognormal_lengths(rng, n, args.prompt_len_median, args.prompt_len_sigma, plo, phi)
        out_lens = lognormal_lengths(rng, n, args.output_len_median, args.output_len_sigma, olo, ohi)
        trace = poisson_trace(random.Random(args.seed + 1), args.rate, prompt_lens, out_lens)
        prompts = cut_prompts(load_texts(args.corpus, "test", teacher), tok, prompt_lens, rng)
        return prompts, trace, {"kind": "poisson", "rate": args.rate}
    trace, info = load_trace(args)
    if context is not None:  # keep prompt + output inside the context (a little slack for re-tokenising)
        clipped = [TraceRequest(r.arrival_s, max(1, min(r.prompt_tokens, context - r.output_tokens - 16)),
                                min(r.output_tokens, context // 2)) for r in trace]
        info["clipped_to_context"] = sum(a != b for a, b in zip(trace, clipped))
        trace = clipped
    tokens = load_tokens(teacher, args.corpus, "test")
    return cut_windows(tokens, tok, [r.prompt_tokens for r in trace], rng), trace, info


def run(args: argparse.Namespace) -> int:
    from dsla.bench.common import format_table, machine_info, write_json_atomic
    from dsla.bench.timeline import mean_ratio, plan_events, token_fractions
    from dsla.model.tokenizer import Tokenizer
    from dsla.paths import resolve_teacher

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    teacher = resolve_teacher(args.teacher)
    tok = Tokenizer(teacher)
    model, context = fetch_model(args.url, args.api_key)
    model = args.model or model
    if args.policy is not None:
        policy = server_policy(args.url, args.api_key)
        if policy != args.policy:
            raise RuntimeError(f"--policy={args.policy} but the server reports policy {policy!r}: start it with "
                               f"`dsla serve --policy {args.policy}`")
    prompts, trace, trace_info = build_requests(args, tok, teacher, context)
    rss_before, cpu_before = server_rss_mb(args.server_pid), server_cpu_s(args.server_pid)
    log.info("%d requests over %.0f s to %s (%s)", len(trace), trace[-1].arrival_s, args.url, model)
    records, wall, plan = asyncio.run(run_load(args.url, model, prompts, trace, args.timeout, args.api_key,
                                               args.poll_interval or None, args.extra_body))
    rss_after, cpu_after = server_rss_mb(args.server_pid), server_cpu_s(args.server_pid)
    before, after = plan.get("plan_before"), plan.get("plan_after")
    policy = (after or {}).get("policy")
    if args.settle:
        time.sleep(args.settle)
    fractions = token_fractions(before, after)
    label = args.label or (f"dsla-{policy}" if policy else "server")
    summary = {"label": label, "policy": policy, "trace": trace_info["kind"], **summarize(records, wall),
               "token_fraction_by_ratio": fractions, "mean_token_ratio": mean_ratio(fractions),
               "plan_changes": len(plan_events(after, plan["start_unix"]))}
    if args.trace is None:
        summary["rate"] = args.rate
    if args.server_pid is not None:
        summary.update(server_rss_mb_before=rss_before, server_rss_mb_after_load=rss_after,
                       server_rss_mb_after_settle=server_rss_mb(args.server_pid))
        if cpu_before is not None and cpu_after is not None:
            cpu = cpu_after - cpu_before
            summary.update(server_cpu_s=cpu, output_tokens_per_cpu_s=summary["output_tokens"] / cpu if cpu else None)
    cols = ["label", "completed", "rejected", "failed", "per_token_latency_mean_s", "output_token_throughput",
            "ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "mean_token_ratio"]
    if summary.get("output_tokens_per_cpu_s") is not None:
        cols.append("output_tokens_per_cpu_s")
    print(format_table([summary], cols))
    if fractions:
        print("output tokens by conversion ratio:", {r: round(f, 3) for r, f in fractions.items()})
    if summary["errors"]:
        print("errors:", summary["errors"])
    if args.out:
        cfg = {k: v for k, v in vars(args).items() if k != "handler" and k != "api_key"}
        write_json_atomic(args.out, {"config": cfg, "machine": machine_info(), "trace": trace_info,
                                     "summary": summary, "timeline": plan["timeline"],
                                     "plan_events": plan_events(after, plan["start_unix"]),
                                     "server_plan_after": after, "requests": [asdict(r) for r in records]})
        print(f"wrote {args.out}")
    return 0
