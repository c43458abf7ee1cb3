"""Request traces for `dsla bench serve --trace`: arrival times with prompt and output lengths.

Two sources, one shape (``TraceRequest``, arrival seconds from the start):

- **A CSV in the Azure LLM inference trace format** (``TIMESTAMP,ContextTokens,GeneratedTokens``,
  as published in Azure/AzurePublicDataset). ``TIMESTAMP`` may be a datetime
  (``2023-11-16 18:15:46.6805900``, any number of fractional digits, optional ``T`` and time
  zone) or plain seconds; rows are sorted by time and shifted so the first arrives at 0.
- **A synthetic generator** (``SyntheticTrace``), seeded, whose distributions are:
  *arrivals* from an on/off Markov-modulated Poisson process: the run alternates idle and burst
  periods (starting idle), each of exponentially distributed length (means ``idle_s`` and
  ``burst_s``), with Poisson arrivals at ``idle_rate`` and ``burst_rate`` requests/s inside them;
  *prompt lengths* log-normal (median ``prompt_median``, log-space sigma ``prompt_sigma``)
  clipped to [``prompt_min``, ``prompt_max``] (long-tailed: with the defaults about 1 prompt in 8
  is over 2,500 tokens); *output lengths* log-normal likewise.

Pure Python (no torch, no HTTP).
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the first request
    prompt_tokens: int
    output_tokens: int


_DT = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$")


def parse_timestamp(text: str) -> float:
    """Seconds (a number, or a datetime as POSIX seconds; naive datetimes are read as UTC)."""
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    m = _DT.match(s)
    if m is None:
        raise ValueError(f"cannot read timestamp {text!r}: expected seconds or 'YYYY-MM-DD HH:MM:SS[.fff]'")
    date, hh, mm, ss, frac, tz = m.groups()
    dt = datetime.fromisoformat(f"{date}T{hh}:{mm}:{ss}")
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = sign * (int(tz[1:3]) * 3600 + int(tz[-2:]) * 60)
    else:
        offset = 0
    seconds = dt.replace(tzinfo=timezone.utc).timestamp() - offset
    return seconds + (float(f"0.{frac}") if frac else 0.0)


def load_azure_csv(path: str | Path, start_s: float = 0.0, duration_s: float | None = None,
                   speedup: float = 1.0, max_requests: int | None = None) -> list[TraceRequest]:
    """Read a trace CSV; keep arrivals in [start_s, start_s + duration_s) of the trace, shifted
    to start at 0 and divided by ``speedup`` (2 = twice the request rate)."""
    if speedup <= 0:
        raise ValueError(f"speedup={speedup} must be positive")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or ()}
        need = ("timestamp", "contexttokens", "generatedtokens")
        missing = [n for n in need if n not in cols]
        if missing:
            raise ValueError(f"{path}: columns {reader.fieldnames} lack {missing}; expected the Azure LLM trace "
                             "format TIMESTAMP,ContextTokens,GeneratedTokens")
        for n, row in enumerate(reader, start=2):
            try:
                rows.append((parse_timestamp(row[cols["timestamp"]]), int(float(row[cols["contexttokens"]])),
                             int(float(row[cols["generatedtokens"]]))))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path} line {n}: {e}") from None
    if not rows:
        raise ValueError(f"{path} has no requests")
    rows.sort()
    t0 = rows[0][0] + start_s
    out = []
    for t, p, o in rows:
        rel = t - t0
        if rel < 0 or (duration_s is not None and rel >= duration_s):
            continue
        out.append(TraceRequest(rel / speedup, max(1, p), max(1, o)))
        if max_requests is not None and len(out) >= max_requests:
            break
    return out


def write_azure_csv(path: str | Path, reqs: Iterable[TraceRequest]) -> None:
    """Write a trace in the Azure format (seconds in TIMESTAMP), e.g. to keep a synthetic one."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for r in reqs:
            w.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens])


@dataclass(frozen=True)
class SyntheticTrace:
    """A bursty, long-prompt synthetic trace (see the module docstring for the distributions)."""

    duration_s: float = 360.0  # arrivals stop after this many seconds
    idle_rate: float = 0.05  # requests/s between bursts
    burst_rate: float = 0.5  # requests/s inside a burst
    idle_s: float = 60.0  # mean idle period, seconds (exponential); the trace starts idle
    burst_s: float = 60.0  # mean burst period, seconds (exponential)
    prompt_median: float = 1200.0  # prompt tokens, log-normal median
    prompt_sigma: float = 0.9  # log-space sigma of prompt lengths
    prompt_min: int = 32
    prompt_max: int = 6000
    output_median: float = 64.0  # output tokens, log-normal median
    output_sigma: float = 0.5
    output_min: int = 8
    output_max: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name}={getattr(self, f.name)} must be >= 0")
        if self.idle_s <= 0 or self.burst_s <= 0 or self.duration_s <= 0:
            raise ValueError("duration_s, idle_s and burst_s must be positive")
        if self.prompt_min > self.prompt_max or self.output_min > self.output_max or self.prompt_min < 1:
            raise ValueError(f"length ranges must satisfy 1 <= min <= max (prompt {self.prompt_min}.."
                             f"{self.prompt_max}, output {self.output_min}..{self.output_max})")


def lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0, 1)))))


def synthetic_trace(cfg: SyntheticTrace, seed: int) -> list[TraceRequest]:
    """Draw a trace; the same config and seed always give the same trace."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t, burst = 0.0, False
    while t < cfg.duration_s:
        end = min(cfg.duration_s, t + rng.expovariate(1 / (cfg.burst_s if burst else cfg.idle_s)))
        rate = cfg.burst_rate if burst else cfg.idle_rate
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append(TraceRequest(t, lognormal(rng, cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_min,
                                                 cfg.prompt_max),
                                    lognormal(rng, cfg.output_median, cfg.output_sigma, cfg.output_min,
                                              cfg.output_max)))
        t, burst = end, not burst
    return out


def poisson_trace(rng: random.Random, rate: float, prompt_lens: list[int], out_lens: list[int]) -> list[TraceRequest]:
    """Poisson arrivals at ``rate`` for the given lengths (the non-trace mode of the benchmark)."""
    out, t = [], 0.0
    for p, o in zip(prompt_lens, out_lens):
        out.append(TraceRequest(t, p, o))
        t += rng.expovariate(rate)
    return out
