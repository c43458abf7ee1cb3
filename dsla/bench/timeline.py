"""The layer plan over a `dsla bench serve` run: polling /v1/dsla/plan, token shares, the plot.

During a run the benchmark polls ``GET /v1/dsla/plan`` every ``--poll-interval`` seconds and
keeps, per sample (seconds since the run start, client clock): the conversion ratio, the number
of DSLA layers, requests waiting and running, queued prompt tokens and cache bytes. Servers
without the route (e.g. the transformers baseline) simply get no timeline.

The fraction of output tokens generated at each conversion ratio is *not* sampled: the server
counts every generated token by the number of DSLA layers of the cache that produced it
(``generation_tokens_by_dsla_layers``); the benchmark reads that counter before and after the
run and reports the difference. After a revert, in-flight requests keep their DSLA layers, so
this is the ratio the token really ran at, which may differ from the plan for new requests.

`dsla bench plot RUN.json [RUN.json ...] --out timeline.png` draws the ratio, the queue and the
queued prompt tokens of one or more runs against time (matplotlib, imported only there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

PLAN_PATH = "/v1/dsla/plan"


async def fetch_plan(client, url: str, headers: dict) -> dict | None:
    """The server's plan view, or None when it has none (404, not our server, unreachable)."""
    import httpx

    try:
        r = await client.get(url.rstrip("/") + PLAN_PATH, headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    body = r.json()
    return body if isinstance(body, dict) and body.get("object") == "dsla.plan" else None


def sample(view: dict, t: float, in_flight: int) -> dict[str, Any]:
    load = view.get("load") or {}
    return {"t": t, "ratio": view["ratio"], "dsla_layers": len(view["dsla_layers"]),
            "queue_depth": load.get("requests_waiting"), "running": load.get("requests_running"),
            "queued_prompt_tokens": load.get("queued_prompt_tokens"), "cache_bytes": load.get("cache_bytes_used"),
            "in_flight": in_flight}


async def poll_plan(client, url: str, headers: dict, t0: float, interval: float, done: asyncio.Event,
                    in_flight, out: list[dict]) -> None:
    """Append a sample every ``interval`` s until ``done`` is set. ``in_flight()``: the client's
    count of requests sent and not finished."""
    while not done.is_set():
        view = await fetch_plan(client, url, headers)
        if view is not None:
            out.append(sample(view, time.perf_counter() - t0, in_flight()))
        try:
            await asyncio.wait_for(done.wait(), interval)
        except asyncio.TimeoutError:
            pass


def token_fractions(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """Share of the run's output tokens per conversion ratio ("0.200": 0.35, ...), from the counters."""
    if before is None or after is None:
        return None
    b, a = before["generation_tokens_by_dsla_layers"], after["generation_tokens_by_dsla_layers"]
    diff = {int(k): v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0) > 0}
    total = sum(diff.values())
    L = after["num_layers"]
    return {f"{k / L:.3f}": v / total for k, v in sorted(diff.items())} if total else {}


def mean_ratio(fractions: dict[str, float] | None) -> float | None:
    if not fractions:
        return None
    return sum(float(r) * f for r, f in fractions.items())


def plan_events(after: dict | None, start_unix: float) -> list[dict]:
    """The plan changes the server made during the run, with ``t`` seconds since the run start."""
    if after is None:
        return []
    return [{**e, "t": e["time"] - start_unix} for e in after.get("history", []) if e["time"] >= start_unix]


# ---- plotting -----------------------------------------------------------------------------------
def plot_timeline(runs: list[dict], out: str | Path, title: str | None = None) -> Path:
    """One figure: conversion ratio, requests waiting and queued prompt tokens over time, one
    line per run (each a `dsla bench serve --out` JSON with a timeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for run in runs:
        label = run["summary"]["label"]
        tl = run.get("timeline") or []
        if not tl:
            continue
        t = [s["t"] for s in tl]
        axes[0].step(t, [s["ratio"] for s in tl], where="post", label=label)
        axes[1].plot(t, [s["queue_depth"] or 0 for s in tl], label=label)
        axes[2].plot(t, [(s["queued_prompt_tokens"] or 0) / 1000 for s in tl], label=label)
        arrivals = [r["sent"] for r in run.get("requests", [])]
        if arrivals:
            axes[1].plot(arrivals, [0] * len(arrivals), "|", color=axes[1].lines[-1].get_color(), alpha=0.5)
    axes[0].set_ylabel("conversion ratio")
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].set_ylabel("requests waiting\n(ticks: arrivals)")
    axes[2].set_ylabel("queued prompt\ntokens (k)")
    axes[2].set_xlabel("seconds since the run started")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="JSON files written by `dsla bench serve --out`")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None)


def run(args: argparse.Namespace) -> int:
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    missing = [p for p, r in zip(args.runs, runs) if not r.get("timeline")]
    if missing:
        print(f"no timeline in {missing} (server without /v1/dsla/plan?): drawn without them")
    print(f"wrote {plot_timeline(runs, args.out, args.title)}")
    return 0
