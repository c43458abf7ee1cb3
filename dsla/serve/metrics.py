"""Engine metrics and their Prometheus text exposition (format 0.0.4), written by hand.

The engine thread updates; the HTTP thread renders. One lock guards both.
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass, field

PREFIX = "dsla"
# Latency buckets in seconds: CPU serving spans milliseconds (a decode step) to minutes (a backlog).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        acc = 0
        for le, c in zip((*(repr(float(b)) for b in self.buckets), "+Inf"), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters, gauges and histograms of one engine."""

    HISTOGRAMS = {
        "time_to_first_token_seconds": "arrival to first generated token",
        "time_per_output_token_seconds": "mean gap between output tokens of a finished request",
        "e2e_request_latency_seconds": "arrival to finish",
        "queue_time_seconds": "arrival to first admission",
        "step_seconds": "wall time of one engine step (schedule, forward, sample, emit)",
    }
    COUNTERS = {
        "prompt_tokens_total": "prompt tokens of finished requests",
        "generation_tokens_total": "tokens generated",
        "requests_rejected_total": "requests refused because the queue was full",
        "preemptions_total": "running requests preempted (cache freed, recomputed later)",
        "steps_total": "engine steps run",
        "step_errors_total": "engine steps whose forward raised",
        "request_errors_total": "requests failed alone (their sampling or output handling raised)",
        "engine_faults_total": "exceptions outside the forward (scheduler, output processing); the loop served on",
        "layer_conversions_total": "layers converted attention -> DSLA (in-flight KV folded into state)",
        "layer_reverts_total": "layers reverted DSLA -> attention (for new requests)",
        "conversion_freed_bytes_total": "cache bytes freed by folding in-flight KV into DSLA state",
        "prefill_folds_total": "prompts folded into DSLA state after an exact prefill (--dsla-prefill fold)",
    }
    GAUGES = {
        "requests_running": "requests holding a cache",
        "requests_waiting": "requests queued (new or preempted)",
        "cache_bytes_used": "bytes held by the live request caches",
        "cache_budget_bytes": "cache memory budget",
        "dsla_layers": "layers converted: they run DSLA for new requests",
        "num_layers": "layers in the model",
        "queued_prompt_tokens": "prompt tokens not yet computed (waiting requests and unfinished prefills)",
        "oldest_wait_seconds": "how long the oldest waiting request has waited",
    }
    # name -> (type, label, help): one series per label value
    LABELLED = {
        "layer_is_dsla": ("gauge", "layer", "1 when the layer runs DSLA for new requests, 0 for softmax attention"),
        "generation_tokens_by_dsla_layers_total": (
            "counter", "dsla_layers", "tokens generated, by the number of DSLA layers of the request's cache"),
    }

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hist = {k: Histogram() for k in self.HISTOGRAMS}
        self.counters = {k: 0.0 for k in self.COUNTERS}
        self.gauges = {k: 0.0 for k in self.GAUGES}
        self.finished: dict[str, int] = {}  # finish reason -> count
        self.labelled: dict[str, dict[int, float]] = {k: {} for k in self.LABELLED}
        self.info: dict[str, str] = {}  # static facts about the served model, as labels of one series

    def set_info(self, **labels: str) -> None:
        """Static labels of the ``model_info`` series (e.g. dtype, weights); its value is always 1."""
        with self.lock:
            self.info.update({k: str(v) for k, v in labels.items()})

    def inc(self, name: str, by: float = 1) -> None:
        with self.lock:
            self.counters[name] += by

    def set(self, **values: float) -> None:
        with self.lock:
            self.gauges.update(values)

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.hist[name].observe(value)

    def inc_labelled(self, name: str, label: int, by: float = 1) -> None:
        with self.lock:
            series = self.labelled[name]
            series[label] = series.get(label, 0) + by

    def set_labelled(self, name: str, label: int, value: float) -> None:
        with self.lock:
            self.labelled[name][label] = value

    def request_finished(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def snapshot(self) -> dict:
        """Plain numbers (for tests and /health)."""
        with self.lock:
            return {**self.counters, **self.gauges,
                    "requests_finished": dict(self.finished), "model_info": dict(self.info),
                    **{k: {str(i): v for i, v in sorted(s.items())} for k, s in self.labelled.items()},
                    **{f"{k}_count": h.count for k, h in self.hist.items()}}

    def render(self) -> str:
        with self.lock:
            out: list[str] = []
            rss = resident_bytes()
            if rss is not None:  # the standard process metric, so a soak can watch for leaks
                out += ["# HELP process_resident_memory_bytes resident memory of the server process",
                        "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
            if self.info:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(self.info.items()))
                out += [f"# HELP {PREFIX}_model_info the served model (value always 1; facts in the labels)",
                        f"# TYPE {PREFIX}_model_info gauge", f"{PREFIX}_model_info{{{labels}}} 1"]
            for k, help_ in self.GAUGES.items():
                out += [f"# HELP {PREFIX}_{k} {help_}", f"# TYPE {PREFIX}_{k} gauge", f"{PREFIX}_{k} {self.gauges[k]!r}"]
            for k, help_ in self.COUNTERS.items():
                out += [f"# HELP {PREFIX}_{k} {help_}", f"# TYPE {PREFIX}_{k} counter",
                        f"{PREFIX}_{k} {float(self.counters[k])!r}"]
            name = f"{PREFIX}_requests_finished_total"
            out += [f"# HELP {name} requests ended, by finish reason", f"# TYPE {name} counter"]
            out += [f'{name}{{finish_reason="{r}"}} {c}' for r, c in sorted(self.finished.items())]
            for k, (typ, label, help_) in self.LABELLED.items():
                out += [f"# HELP {PREFIX}_{k} {help_}", f"# TYPE {PREFIX}_{k} {typ}"]
                out += [f'{PREFIX}_{k}{{{label}="{i}"}} {float(v)!r}' for i, v in sorted(self.labelled[k].items())]
            for k, help_ in self.HISTOGRAMS.items():
                out += self.hist[k].lines(f"{PREFIX}_{k}", help_)
            return "\n".join(out) + "\n"


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
