"""What the live page (``dsla.serve.dashboard``) reads from the engine beyond its plan.

Torch-free. ``Timeline``: the engine's recent past, one sample a second (the engine thread adds a
sample when ``due``; any thread reads ``since``); samples are plain dicts of numbers, oldest first,
the last ``span_s`` seconds of them. ``live_view``: load signals against the policy's thresholds,
the next candidate layer, the quality side and memory, merged into ``Engine.plan_view``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from dsla.serve.policy import LoadSnapshot, expected_increase, next_candidate, on_layers, signals

SAMPLE_PERIOD_S = 1.0  # one sample a second
SPAN_S = 600.0  # ten minutes of them


class Timeline:
    def __init__(self, period_s: float = SAMPLE_PERIOD_S, span_s: float = SPAN_S) -> None:
        if period_s <= 0 or span_s < period_s:
            raise ValueError(f"period_s={period_s} must be positive and span_s={span_s} at least one period")
        self.period_s = period_s
        self._next = -math.inf  # monotonic time of the next sample
        self._samples: deque[dict[str, Any]] = deque(maxlen=int(span_s / period_s) + 1)
        self._lock = threading.Lock()

    def due(self, now: float) -> bool:
        """Whether a sample is due at monotonic time ``now`` (the caller then calls ``add``)."""
        return now >= self._next

    def add(self, now: float, sample: dict[str, Any]) -> None:
        """Keep ``sample`` (it must have a wall-clock ``"time"``); the next one is due a period later."""
        self._next = now + self.period_s
        with self._lock:
            self._samples.append(sample)

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def since(self, t: float | None = None) -> list[dict[str, Any]]:
        """Samples whose ``"time"`` is after ``t`` (wall clock, seconds), oldest first; all when None."""
        with self._lock:
            items = list(self._samples)
        if t is None:
            return items
        lo = len(items)
        while lo > 0 and items[lo - 1]["time"] > t:
            lo -= 1
        return items[lo:]


def live_view(engine: Any, converted: Sequence[int], history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the live page shows beyond ``engine``'s plan (an ``Engine``; typed loosely to keep this
    module free of it): load signals against the policy's thresholds, the next candidate layer, the
    quality side and memory, from the latest timeline sample. Safe from any thread."""
    load = engine.last_load or LoadSnapshot(cache_budget_bytes=engine.config.cache_budget_bytes)  # before a sample
    ctl, sample = engine.controller, engine.timeline.last() or {}
    if ctl is not None:
        sig = [{"name": n, "value": v, "convert": c, "revert": r} for n, v, c, r in signals(ctl.config, load)]
        layer, why = next_candidate(ctl.config, converted, ctl.order, engine.num_layers, ctl.quality)
    else:  # static: no thresholds; a forced ratio step would take the next layer of the order
        sig = [{"name": n, "value": v, "convert": None, "revert": None} for n, v in (
            ("queued_prompt_tokens", load.queued_prompt_tokens), ("queue_depth", load.queue_depth),
            ("oldest_wait_s", load.oldest_wait_s), ("cache_fraction", load.cache_bytes / load.cache_budget_bytes
                                                     if load.cache_budget_bytes else 0.0),
            ("ttft_s", load.ttft_s), ("tpot_s", load.tpot_s))]
        todo = [i for i in engine.order if i not in set(converted)]
        layer, why = (todo[0], "") if todo else (None, "every convertible layer is converted")
    curve = ctl.quality if ctl is not None else ()
    expected = expected_increase(on_layers(curve, engine.num_layers), len(converted) / engine.num_layers) if curve else None
    last = next((e for e in reversed(history) if e["converted"]), None)
    return {
        "signals": sig, "next_candidate": {"layer": layer, "blocked": why},
        "quality": {"curve": [list(p) for p in curve],
                    "budget": ctl.config.quality_budget if ctl is not None else None,
                    # beyond the largest measured ratio the increase is unknown (inf): null in JSON
                    "expected_increase": expected if expected is not None and expected != float("inf") else None},
        "memory": {"kv_bytes": sample.get("kv_bytes", 0), "dsla_state_bytes": sample.get("dsla_state_bytes", 0),
                   "cache_budget_bytes": engine.config.cache_budget_bytes,
                   "last_conversion": None if last is None else {
                       k: last[k] for k in ("time", "converted", "freed_bytes", "in_flight_folded", "source")}}}
