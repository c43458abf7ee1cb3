"""Traces for `dsla bench serve --trace`: Azure CSV parsing, the synthetic generator, token shares, the plot."""

from __future__ import annotations

import argparse
import random

import pytest

from dsla.bench import serve as bench_serve
from dsla.bench.timeline import mean_ratio, plan_events, plot_timeline, token_fractions
from dsla.bench.trace import (SyntheticTrace, TraceRequest, load_azure_csv, parse_timestamp, poisson_trace,
                              synthetic_trace, write_azure_csv)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2000000,879,55
2023-11-16 18:15:46.1805900,1200,8
"""


def test_timestamps_in_every_shape():
    base = parse_timestamp("2023-11-16 18:15:46")
    assert parse_timestamp("2023-11-16 18:15:46.6805900") == pytest.approx(base + 0.68059, abs=1e-6)
    assert parse_timestamp("2023-11-16T18:15:46.5Z") == pytest.approx(base + 0.5)
    assert parse_timestamp("2023-11-16 19:15:46+01:00") == pytest.approx(base)
    assert parse_timestamp(" 12.25 ") == 12.25
    with pytest.raises(ValueError, match="cannot read timestamp"):
        parse_timestamp("yesterday")


def test_azure_csv_is_sorted_shifted_windowed_and_sped_up(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(AZURE)
    reqs = load_azure_csv(path)
    assert [r.prompt_tokens for r in reqs] == [1200, 374, 396, 879]  # sorted by time
    assert reqs[0].arrival_s == 0 and reqs[1].arrival_s == pytest.approx(0.5)
    assert reqs[3].arrival_s == pytest.approx(5.0194100)
    fast = load_azure_csv(path, speedup=2.0)
    assert fast[3].arrival_s == pytest.approx(reqs[3].arrival_s / 2)
    window = load_azure_csv(path, start_s=0.4, duration_s=4.5)
    assert [r.prompt_tokens for r in window] == [374, 396] and window[0].arrival_s == pytest.approx(0.1)
    assert len(load_azure_csv(path, max_requests=2)) == 2
    # seconds instead of datetimes, and columns named with spaces and another case
    secs = tmp_path / "secs.csv"
    secs.write_text("timestamp, ContextTokens ,generatedtokens\n3.5,10,2\n1.5,20,4\n")
    assert load_azure_csv(secs) == [TraceRequest(0.0, 20, 4), TraceRequest(2.0, 10, 2)]


def test_bad_csvs_name_the_problem(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(ValueError, match="TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_azure_csv(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,lots,3\n")
    with pytest.raises(ValueError, match="line 3"):
        load_azure_csv(p)


def test_synthetic_trace_is_seeded_bursty_and_long_tailed(tmp_path):
    cfg = SyntheticTrace(duration_s=2000, idle_rate=0.05, burst_rate=1.0, idle_s=50, burst_s=50)
    a, b = synthetic_trace(cfg, seed=3), synthetic_trace(cfg, seed=3)
    assert a == b and a != synthetic_trace(cfg, seed=4)
    assert all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:])) and a[-1].arrival_s < 2000
    prompts = sorted(r.prompt_tokens for r in a)
    assert prompts[0] >= cfg.prompt_min and prompts[-1] <= cfg.prompt_max
    assert prompts[-1] > 4000 and prompts[len(prompts) // 2] < 2000  # long tail up to several thousand
    assert all(cfg.output_min <= r.output_tokens <= cfg.output_max for r in a)
    # bursty: arrivals per 10 s window vary far more than a Poisson process of the same mean rate
    counts = [0] * 200
    for r in a:
        counts[int(r.arrival_s // 10)] += 1
    mean = sum(counts) / len(counts)
    var = sum((c - mean) ** 2 for c in counts) / len(counts)
    assert var > 3 * mean
    path = tmp_path / "syn.csv"
    write_azure_csv(path, a[:20])
    back = load_azure_csv(path)
    assert [r.prompt_tokens for r in back] == [r.prompt_tokens for r in a[:20]]
    assert back[5].arrival_s == pytest.approx(a[5].arrival_s - a[0].arrival_s, abs=1e-5)
    with pytest.raises(ValueError, match="must satisfy"):
        SyntheticTrace(prompt_min=100, prompt_max=10)


def test_poisson_trace_keeps_the_old_schedule():
    trace = poisson_trace(random.Random(1), 2.0, [5, 6, 7], [1, 2, 3])
    rng = random.Random(1)
    assert trace[0].arrival_s == 0 and trace[1].arrival_s == rng.expovariate(2.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(5, 1), (6, 2), (7, 3)]


def test_bench_flags_build_a_synthetic_trace(tmp_path):
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    args = p.parse_args(["--trace", "synthetic", "--synthetic-duration-s", "300", "--synthetic-burst-rate", "2",
                         "--num-requests", "25", "--seed", "7", "--save-trace", str(tmp_path / "t.csv")])
    trace, info = bench_serve.load_trace(args)
    assert len(trace) == 25 and info["kind"] == "synthetic" and info["burst_rate"] == 2.0
    assert trace == synthetic_trace(SyntheticTrace(duration_s=300, burst_rate=2.0), 7)[:25]
    assert len(load_azure_csv(tmp_path / "t.csv")) == 25


def test_prompt_windows_have_the_asked_length():
    class Tok:
        def decode(self, ids):
            return ",".join(map(str, ids))

    tokens = list(range(100, 400))
    texts = bench_serve.cut_windows(tokens, Tok(), [5, 50, 10_000], random.Random(0))
    windows = [[int(t) for t in text.split(",")] for text in texts]
    assert [len(w) for w in windows] == [5, 50, 300]
    assert all(w == list(range(w[0], w[0] + len(w))) for w in windows)  # contiguous stretches of the stream


def test_token_fractions_and_events():
    before = {"num_layers": 10, "generation_tokens_by_dsla_layers": {"0": 100}}
    after = {"num_layers": 10, "generation_tokens_by_dsla_layers": {"0": 130, "2": 60, "5": 10},
             "history": [{"time": 5.0, "converted": [1]}, {"time": 12.0, "converted": [2]}]}
    fr = token_fractions(before, after)
    assert fr == {"0.000": 0.3, "0.200": 0.6, "0.500": 0.1}
    assert mean_ratio(fr) == pytest.approx(0.17)
    assert token_fractions(None, after) is None
    assert [e["t"] for e in plan_events(after, start_unix=10.0)] == [2.0]


def test_plot_writes_a_png(tmp_path):
    run = {"summary": {"label": "adaptive"}, "requests": [{"sent": 0.1}, {"sent": 1.5}],
           "timeline": [{"t": 0.0, "ratio": 0.0, "queue_depth": 0, "queued_prompt_tokens": 0},
                        {"t": 1.0, "ratio": 0.2, "queue_depth": 5, "queued_prompt_tokens": 9000},
                        {"t": 2.0, "ratio": 0.1, "queue_depth": 1, "queued_prompt_tokens": 100}]}
    out = plot_timeline([run, {"summary": {"label": "static"}, "timeline": []}], tmp_path / "tl.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
