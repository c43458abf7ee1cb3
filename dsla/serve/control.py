"""The adaptive controller's engine side: recent latencies, and asking the policy between steps.

Torch-free. ``Controller.tick`` runs on the engine thread between steps: it reads the engine's
load, asks ``policy.decide`` and, unless the decision is to hold, has the engine apply it
(``Engine.set_plan``, which folds in-flight KV for conversions). The policy itself stays a pure
function of numbers; this module only gathers them.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections import deque
from typing import Any, Protocol, Sequence

from dsla.serve.policy import Decision, LoadSnapshot, PolicyConfig, PolicyState, QualityCurve, decide

log = logging.getLogger(__name__)


class LatencyWindow:
    """Values observed over the last ``window_s`` seconds (times are the caller's clock)."""

    def __init__(self, window_s: float, max_items: int = 4096) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)

    def add(self, now: float, value: float) -> None:
        self._items.append((now, value))

    def median(self, now: float) -> float | None:
        while self._items and self._items[0][0] < now - self.window_s:
            self._items.popleft()
        return statistics.median(v for _, v in self._items) if self._items else None


class PlanTarget(Protocol):
    """What the controller needs of an engine (``dsla.serve.engine.Engine`` is one)."""

    converted_order: tuple[int, ...]
    last_plan_change: float | None

    @property
    def num_layers(self) -> int: ...

    def load(self, now: float) -> LoadSnapshot: ...

    def set_plan(self, layers: Sequence[int], reason: str, source: str = "api") -> dict[str, Any]: ...


class Controller:
    """The adaptive policy bound to one engine: its configuration, the student's order, its memory."""

    name = "adaptive"

    def __init__(self, config: PolicyConfig, order: Sequence[int], quality: QualityCurve = ()) -> None:
        if config.quality_budget is not None and not quality:
            raise ValueError("a quality budget needs the student's per-ratio perplexity: pass --quality-report "
                             "(report.json of `dsla eval`), or drop --quality-budget")
        self.config, self.order, self.quality = config, tuple(order), tuple(quality)
        self.calm_since: float | None = None
        self.next_tick = float("-inf")
        self.last_decision: Decision | None = None
        self.last_decision_time: float | None = None

    def tick(self, engine: PlanTarget, now: float) -> Decision | None:
        """Decide (at most every ``interval_s``) and apply; return the decision, None when not due."""
        if now < self.next_tick:
            return None
        self.next_tick = now + self.config.interval_s
        state = PolicyState(engine.converted_order, engine.last_plan_change, self.calm_since)
        d = decide(self.config, engine.load(now), state, self.order, engine.num_layers, now, self.quality)
        self.calm_since = d.state.calm_since_s
        if d.action != "hold" or self.last_decision is None or d.reason != self.last_decision.reason:
            log.debug("policy: %s %s (%s)", d.action, list(d.layers), d.reason)
        self.last_decision, self.last_decision_time = d, now
        if d.action != "hold":
            engine.set_plan(d.plan, reason=d.reason, source="policy")
        return d

    def describe(self) -> dict[str, Any]:
        d = self.last_decision
        return {"config": dataclasses.asdict(self.config), "quality_curve": [list(p) for p in self.quality],
                "last_decision": None if d is None else {"action": d.action, "layers": list(d.layers),
                                                         "reason": d.reason}}
