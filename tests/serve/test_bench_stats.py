"""Statistics of `dsla bench serve` (pure functions)."""

from __future__ import annotations

import random

from dsla.bench.serve import Record, lognormal_lengths, percentile, summarize


def test_lengths_are_long_tailed_and_clipped():
    xs = lognormal_lengths(random.Random(0), 2000, 100, 0.8, 10, 1000)
    assert min(xs) >= 10 and max(xs) <= 1000
    xs.sort()
    assert 85 < xs[1000] < 115  # median near 100
    assert xs[1980] > 4 * xs[1000]  # a long right tail


def test_percentile_and_summary():
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    recs = [Record(10, 5, sent=0.0, first_token=0.5, done=1.5, output_tokens=5, status=200),
            Record(10, 5, sent=1.0, first_token=1.2, done=2.0, output_tokens=5, status=200),
            Record(10, 5, sent=1.0, status=503, error="HTTP 503: full")]
    s = summarize(recs, wall=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == {"HTTP 503": 1}
    assert s["output_token_throughput"] == 5.0 and s["ttft_p50_s"] == 0.35
    assert abs(s["tpot_p50_s"] - (0.25 + 0.2) / 2) < 1e-9
