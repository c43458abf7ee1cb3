"""`dsla bench serve`: open-loop Poisson load against any OpenAI-compatible /v1/completions URL.

Requests arrive at exponential gaps (mean 1/rate) whether or not earlier ones finished (open
loop: a slow server builds a backlog instead of slowing the load down). Prompt and output lengths
are drawn from clipped log-normal distributions (long-tailed); prompts are cut from the real
test-split text of a prepared corpus. Every request streams, so time to first token (TTFT) and
time per output token (TPOT) are measured at the client. ``ignore_eos`` asks the server to
produce exactly ``max_tokens`` (servers that do not know the field ignore it; output tokens are
then counted from ``usage`` or from the stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = f"HTTP {r.status}" if r.status and r.status != 200 else (r.error or "unknown").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok), "errors": errors,
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
    except TimeoutError:
        rec.error = f"timeout: no complete answer within {timeout:.0f} s"
    except httpx.HTTPError as e:
        rec.error = f"connection: {type(e).__name__} {e}"


async def run_load(url: str, model: str, prompts: list[str], prompt_lens: list[int], out_lens: list[int],
                   rate: float, seed: int, timeout: float, api_key: str | None) -> tuple[list[Record], float]:
    import httpx

    rng = random.Random(seed + 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    records: list[Record] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits) as client:
        t0 = time.perf_counter()
        tasks, next_at = [], 0.0
        for prompt, plen, olen in zip(prompts, prompt_lens, out_lens):
            delay = next_at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Record(plen, olen, sent=time.perf_counter() - t0)
            records.append(rec)
            payload = {"model": model, "prompt": prompt, "max_tokens": olen, "temperature": 0.0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(one_request(client, endpoint, headers, payload, rec, t0, timeout)))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return records, wall


def server_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds the process (all its threads) has used: on a shared, busy machine
    output tokens per CPU second compares servers more fairly than tokens per wall second."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def fetch_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the OpenAI-compatible server")
    p.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default="server", help="name of this run in the table and JSON")
    p.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, requests/s (Poisson)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-requests", type=int, default=None, help="requests to send (default 50)")
    g.add_argument("--duration", type=float, default=None, help="send for this many seconds (then drain)")
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
    p.add_argument("--server-pid", type=int, default=None, help="report this local process's RSS and CPU time over the run (soak, busy machines)")
    p.add_argument("--settle", type=float, default=0, help="seconds to wait after the load before the last RSS")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")


def run(args: argparse.Namespace) -> int:
    from dsla.bench.common import format_table, machine_info, parse_list, write_json_atomic
    from dsla.data.corpora import load_texts
    from dsla.model.tokenizer import Tokenizer
    from dsla.paths import resolve_teacher

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if args.rate <= 0:
        raise ValueError(f"--rate={args.rate} must be positive")
    rng = random.Random(args.seed)
    n = args.num_requests or (math.ceil(args.duration * args.rate) if args.duration else 50)
    plo, phi = parse_list(args.prompt_len_range, int)
    olo, ohi = parse_list(args.output_len_range, int)
    prompt_lens = lognormal_lengths(rng, n, args.prompt_len_median, args.prompt_len_sigma, plo, phi)
    out_lens = lognormal_lengths(rng, n, args.output_len_median, args.output_len_sigma, olo, ohi)
    teacher = resolve_teacher(args.teacher)
    tok = Tokenizer(teacher)
    prompts = cut_prompts(load_texts(args.corpus, "test", teacher), tok, prompt_lens, rng)
    model = args.model or fetch_model(args.url, args.api_key)
    rss_before, cpu_before = server_rss_mb(args.server_pid), server_cpu_s(args.server_pid)
    log.info("%s: %d requests at %.2f/s to %s (%s)", args.label, n, args.rate, args.url, model)
    records, wall = asyncio.run(run_load(args.url, model, prompts, prompt_lens, out_lens, args.rate,
                                         args.seed, args.timeout, args.api_key))
    rss_after, cpu_after = server_rss_mb(args.server_pid), server_cpu_s(args.server_pid)
    if args.settle:
        time.sleep(args.settle)
    summary = {"label": args.label, "rate": args.rate, **summarize(records, wall)}
    if args.server_pid is not None:
        summary.update(server_rss_mb_before=rss_before, server_rss_mb_after_load=rss_after,
                       server_rss_mb_after_settle=server_rss_mb(args.server_pid))
        if cpu_before is not None and cpu_after is not None:
            cpu = cpu_after - cpu_before
            summary.update(server_cpu_s=cpu, output_tokens_per_cpu_s=summary["output_tokens"] / cpu if cpu else None)
    cols = ["label", "rate", "completed", "failed", "request_throughput", "output_token_throughput",
            "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s"]
    if summary.get("output_tokens_per_cpu_s") is not None:
        cols.append("output_tokens_per_cpu_s")
    print(format_table([summary], cols))
    if summary["errors"]:
        print("errors:", summary["errors"])
    if args.out:
        cfg = {k: v for k, v in vars(args).items() if k != "handler" and k != "api_key"}
        write_json_atomic(args.out, {"config": cfg, "machine": machine_info(), "summary": summary,
                                     "requests": [asdict(r) for r in records]})
        print(f"wrote {args.out}")
    return 0
