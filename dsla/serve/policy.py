"""The conversion controller's policy: observable load + the student's layer order -> one plan step.

Pure Python (no torch, no clock, no engine): the caller passes the load, the time and the current
plan in, and applies the ``Decision`` itself (the engine does, between steps). One decision is
at most one step: convert the next k layers of the order to DSLA (k grows with the overload), or
revert the most recently converted layers, or hold. Rules:

- **Overload** when any enabled signal reaches its convert threshold; the overload factor is the
  largest ``value / threshold`` among them. **Calm** when every signal is at or below its revert
  threshold. Between the two (the hysteresis band) the plan holds.
- A revert needs the load to have stayed calm for ``calm_s`` seconds (later reverts in the same
  calm stretch follow one per cooldown); any change needs ``cooldown_s`` seconds since the
  previous one (forced changes count too).
- Conversions follow the order, never name a layer that is already converted, stop at
  ``max_ratio`` of the model's layers and, with a quality budget, at the largest ratio whose
  expected perplexity increase (interpolated from the student's measured per-ratio numbers) is
  within the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from dsla.plan import layer_count

QualityCurve = tuple[tuple[float, float], ...]  # (conversion ratio, expected relative ppl increase), by ratio


@dataclass(frozen=True)
class PolicyConfig:
    """When the adaptive policy converts layers to DSLA and back. Each field is a `dsla serve` flag.

    Each load signal has a convert threshold (at or above it: overload) and a lower revert
    threshold (at or below it: calm); the gap between them is the hysteresis.
    """

    convert_queued_tokens: int = 4096  # prompt tokens not yet prefilled (waiting + unfinished prefills; the paper's)
    revert_queued_tokens: int = 512  # ... calm at or below this
    convert_queue_depth: int = 16  # requests waiting for admission
    revert_queue_depth: int = 1
    convert_wait_s: float = 10.0  # seconds the oldest waiting request has waited
    revert_wait_s: float = 1.0
    convert_cache_fraction: float = 0.9  # cache bytes in use / cache budget
    revert_cache_fraction: float = 0.5
    ttft_target_s: float | None = None  # recent median time to first token above this is overload (None: no target)
    tpot_target_s: float | None = None  # recent median time per output token above this is overload (None: no target)
    revert_latency_fraction: float = 0.5  # calm needs recent TTFT/TPOT at most this fraction of their targets
    latency_window_s: float = 30.0  # TTFT/TPOT of requests seen in this many recent seconds count
    calm_s: float = 10.0  # seconds the load must stay calm before a revert
    cooldown_s: float = 3.0  # minimum seconds between two plan changes
    max_ratio: float = 0.5  # never convert more than this fraction of the layers (the shipped student meets
    # the quality targets up to 0.75, unproven on a served trace there; at 1.0 its loss at 4k-8k tokens grows
    # 0.22 nats over the teacher's: docs/results/quality.md)
    step_layers: int = 1  # layers converted per unit of overload factor: k = step_layers * floor(factor)
    max_step_layers: int = 4  # at most this many layers per conversion step
    revert_step_layers: int = 1  # layers reverted per step
    quality_budget: float | None = 0.15  # max expected relative perplexity increase (0.15 = +15%) from the student's eval report; None: no budget
    interval_s: float = 0.5  # how often the engine asks the policy, seconds

    def __post_init__(self) -> None:
        for c, r in (("convert_queued_tokens", "revert_queued_tokens"), ("convert_queue_depth", "revert_queue_depth"),
                     ("convert_wait_s", "revert_wait_s"), ("convert_cache_fraction", "revert_cache_fraction")):
            cv, rv = getattr(self, c), getattr(self, r)
            if cv <= 0 or rv < 0:
                raise ValueError(f"{c}={cv} must be positive and {r}={rv} non-negative")
            if rv >= cv:
                raise ValueError(f"{r}={rv} must be below {c}={cv} (the gap is the hysteresis)")
        for name in ("ttft_target_s", "tpot_target_s", "quality_budget"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be positive (or unset)")
        if not 0 < self.revert_latency_fraction < 1:
            raise ValueError(f"revert_latency_fraction={self.revert_latency_fraction} must be in (0, 1)")
        if not 0 <= self.max_ratio <= 1:
            raise ValueError(f"max_ratio={self.max_ratio} must be in [0, 1]")
        for name in ("step_layers", "max_step_layers", "revert_step_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_step_layers < self.step_layers:
            raise ValueError(f"max_step_layers={self.max_step_layers} is below step_layers={self.step_layers}")
        for name in ("latency_window_s", "calm_s", "cooldown_s", "interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine can observe about its load at one moment."""

    queued_prompt_tokens: int = 0  # prompt tokens not yet computed (waiting requests + unfinished prefills)
    queue_depth: int = 0  # requests waiting for admission (new or preempted)
    oldest_wait_s: float = 0.0  # how long the oldest waiting request has waited
    cache_bytes: int = 0  # bytes the live caches hold
    cache_budget_bytes: int = 0  # the budget they are held against (0: signal off)
    ttft_s: float | None = None  # median TTFT over the latency window (None: no first token lately)
    tpot_s: float | None = None  # median TPOT over the latency window (None: no finished request lately)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class PolicyState:
    """The plan as the policy sees it, plus the policy's memory."""

    converted: tuple[int, ...] = ()  # layers that run DSLA for new requests, in the order they were converted
    last_change_s: float | None = None  # time of the last plan change (policy or forced)
    calm_since_s: float | None = None  # start of the current calm stretch (None: not calm)


@dataclass(frozen=True)
class Decision:
    action: str  # "convert", "revert" or "hold"
    layers: tuple[int, ...]  # the layers to convert or revert (in that order); () for hold
    reason: str  # one line for the log and /v1/dsla/plan
    state: PolicyState  # the policy state once this decision is applied

    @property
    def plan(self) -> tuple[int, ...]:
        """The conversion order after the decision (what the engine should make the plan)."""
        return self.state.converted


def on_layers(curve: QualityCurve, num_layers: int) -> QualityCurve:
    """The curve with each measured ratio r moved to round(r * num_layers) / num_layers, the
    fraction of layers an evaluation at r actually converted (0.25 of 30 layers is 8, i.e. 0.267),
    so a plan of exactly those layers counts as measured."""
    return tuple(sorted((layer_count(r, num_layers) / num_layers, q) for r, q in curve))


def expected_increase(curve: QualityCurve, ratio: float) -> float:
    """Expected relative perplexity increase at ``ratio``: linear between measured ratios, 0 at
    ratio 0 when it is not measured, infinite beyond the largest measured ratio (unknown)."""
    pts = sorted(curve)
    if not pts or pts[0][0] > 0:
        pts = [(0.0, 0.0), *pts]
    if ratio > pts[-1][0] + 1e-9:
        return math.inf
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if ratio <= r1 + 1e-9:
            return q0 if r1 == r0 else q0 + (q1 - q0) * (ratio - r0) / (r1 - r0)
    return pts[-1][1]


def quality_curve_from_report(report: dict[str, Any], split: str = "test", student: str | None = None) -> QualityCurve:
    """Per-ratio expected perplexity increase from a `dsla eval` report.json.

    Reads both report layouts: ``"runs"`` (format dsla-eval-report/1: per model label and ratio,
    ``ppl[split][corpus]``, the teacher's ratio-0 run as the base; ``student`` picks the model by
    label or directory when the report holds several) and the older flat ``"rows"``. Uses
    ``split`` (or the first split present), averaging perplexity over the teacher's across corpora.
    """
    if "runs" in report:
        labels = [m["label"] for m in report.get("models", []) if m["label"] != "teacher"]
        if student is not None:
            labels = [m["label"] for m in report.get("models", []) if m["label"] != "teacher"
                      and student in (m["label"], str(m.get("dir")))] or labels
        if not labels:
            raise ValueError("the eval report has no student runs: run `dsla eval --student DIR`")
        rows = [{"ratio": r["ratio"], "ppl": r["ppl"], "model": r["model"]} for r in report["runs"]
                if "ppl" in r and (r["model"] == labels[0] or (r["model"] == "teacher" and r["ratio"] == 0))]
        rows = [{"ratio": r["ratio"], "split": s, "ppl": v} for r in rows for s, v in r["ppl"].items()]
    else:
        rows = report.get("rows") or []
    if not rows:
        raise ValueError("the eval report has no perplexity rows: run `dsla eval` with the ppl suite")
    splits = [r["split"] for r in rows]
    use = split if split in splits else splits[0]
    rows = [r for r in rows if r["split"] == use]
    base = next((r["ppl"] for r in rows if r["ratio"] == 0), None)
    if base is None:
        raise ValueError("the eval report has no ratio-0 (teacher) perplexity to compare against: include ratio 0")
    by_ratio = {float(r["ratio"]): sum(v / base[c] for c, v in r["ppl"].items()) / len(r["ppl"]) - 1.0
                for r in rows}
    return tuple(sorted(by_ratio.items()))


def signals(cfg: PolicyConfig, load: LoadSnapshot) -> list[tuple[str, float, float, float]]:
    """(name, value, convert threshold, revert threshold) of each enabled signal."""
    sig = [("queued_prompt_tokens", load.queued_prompt_tokens, cfg.convert_queued_tokens, cfg.revert_queued_tokens),
           ("queue_depth", load.queue_depth, cfg.convert_queue_depth, cfg.revert_queue_depth),
           ("oldest_wait_s", load.oldest_wait_s, cfg.convert_wait_s, cfg.revert_wait_s)]
    if load.cache_budget_bytes > 0:
        sig.append(("cache_fraction", load.cache_bytes / load.cache_budget_bytes,
                    cfg.convert_cache_fraction, cfg.revert_cache_fraction))
    f = cfg.revert_latency_fraction
    if cfg.ttft_target_s is not None:
        sig.append(("ttft_s", load.ttft_s or 0.0, cfg.ttft_target_s, f * cfg.ttft_target_s))
    if cfg.tpot_target_s is not None:
        sig.append(("tpot_s", load.tpot_s or 0.0, cfg.tpot_target_s, f * cfg.tpot_target_s))
    return sig


def next_candidate(cfg: PolicyConfig, converted: Sequence[int], order: Sequence[int], num_layers: int,
                   quality: QualityCurve = ()) -> tuple[int | None, str]:
    """The layer the next conversion would take (None when none can be), and why not when None.

    The same limits as ``decide`` (the order, ``max_ratio``, the quality budget), without the load:
    what the live page marks as the policy's next candidate.
    """
    todo = [i for i in order if i not in set(converted)]
    if not todo:
        return None, "every finished layer is converted"
    if len(converted) + 1 > math.floor(cfg.max_ratio * num_layers + 1e-9):
        return None, f"at max_ratio {cfg.max_ratio} ({len(converted)}/{num_layers} layers)"
    ratio = (len(converted) + 1) / num_layers
    if (cfg.quality_budget is not None and quality
            and expected_increase(on_layers(quality, num_layers), ratio) > cfg.quality_budget):
        return None, f"quality budget: ratio {ratio:.2f} would exceed {cfg.quality_budget:.1%}"
    return todo[0], ""


def _fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def decide(cfg: PolicyConfig, load: LoadSnapshot, state: PolicyState, order: Sequence[int], num_layers: int,
           now: float, quality: QualityCurve = ()) -> Decision:
    """One decision. ``order``: the layers the student has finished, in conversion order."""
    if len(set(order)) != len(order):
        raise ValueError(f"the layer order {list(order)} names a layer twice")
    sig = signals(cfg, load)
    factor, name, value, thr = max(((v / c, n, v, c) for n, v, c, _ in sig), key=lambda t: t[0])
    calm = all(v <= r for _, v, _, r in sig)
    st = replace(state, calm_since_s=(state.calm_since_s if state.calm_since_s is not None else now) if calm else None)
    n_conv = len(st.converted)
    cooling = st.last_change_s is not None and now - st.last_change_s < cfg.cooldown_s

    def hold(reason: str) -> Decision:
        return Decision("hold", (), reason, st)

    if factor >= 1:
        why = f"overload: {name}={_fmt(value)} >= {_fmt(thr)} ({factor:.1f}x)"
        todo = [i for i in order if i not in set(st.converted)]
        room = math.floor(cfg.max_ratio * num_layers + 1e-9) - n_conv
        if not todo:
            return hold(f"{why}; every finished layer is converted already")
        if room <= 0:
            return hold(f"{why}; at max_ratio {cfg.max_ratio} ({n_conv}/{num_layers} layers)")
        k = min(cfg.max_step_layers, cfg.step_layers * math.floor(factor), room, len(todo))
        if cfg.quality_budget is not None and quality:
            quality = on_layers(quality, num_layers)
            while k > 0 and expected_increase(quality, (n_conv + k) / num_layers) > cfg.quality_budget:
                k -= 1
            if k == 0:
                q = expected_increase(quality, (n_conv + 1) / num_layers)
                return hold(f"{why}; quality budget: ratio {(n_conv + 1) / num_layers:.2f} would add "
                            f"{q:.1%} perplexity > {cfg.quality_budget:.1%}")
        if cooling:
            return hold(f"{why}; cooldown ({cfg.cooldown_s - (now - st.last_change_s):.1f} s left)")
        layers = tuple(todo[:k])
        ratio = (n_conv + k) / num_layers
        new = replace(st, converted=st.converted + layers, last_change_s=now, calm_since_s=None)
        return Decision("convert", layers, f"{why}; convert {list(layers)} -> ratio {ratio:.2f}", new)
    if calm and n_conv:
        if now - st.calm_since_s < cfg.calm_s:
            return hold(f"calm for {now - st.calm_since_s:.1f} of {cfg.calm_s:g} s")
        if cooling:
            return hold(f"calm; cooldown ({cfg.cooldown_s - (now - st.last_change_s):.1f} s left)")
        k = min(cfg.revert_step_layers, n_conv)
        layers = tuple(reversed(st.converted[-k:]))
        # Still calm: the next revert of this stretch waits only for the cooldown.
        new = replace(st, converted=st.converted[:-k], last_change_s=now)
        return Decision("revert", layers, f"calm for {cfg.calm_s:g} s: revert {list(layers)} -> ratio "
                                          f"{(n_conv - k) / num_layers:.2f}", new)
    if calm:
        return hold("calm at ratio 0")
    return hold(f"between thresholds (hysteresis): highest {name}={_fmt(value)} ({factor:.2f}x of convert)")
