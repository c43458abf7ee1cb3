"""The adaptive policy alone, on scripted load sequences (pure Python: no model, no clock)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from dsla.serve.policy import (Decision, LoadSnapshot, PolicyConfig, PolicyState, decide, expected_increase,
                               quality_curve_from_report)

L = 8  # layers in the pretend model
ORDER = (5, 2, 7, 0, 3, 6, 1, 4)
CFG = PolicyConfig(convert_queued_tokens=1000, revert_queued_tokens=100, convert_queue_depth=10,
                   revert_queue_depth=1, convert_wait_s=5, revert_wait_s=1, calm_s=4, cooldown_s=2,
                   max_ratio=0.75, step_layers=1, max_step_layers=3)
IDLE = LoadSnapshot()
MID = LoadSnapshot(queued_prompt_tokens=500, queue_depth=3)  # inside the hysteresis band


def over(factor: float) -> LoadSnapshot:
    return LoadSnapshot(queued_prompt_tokens=int(1000 * factor), queue_depth=2)


def run(loads, cfg=CFG, order=ORDER, dt=1.0, quality=(), state=PolicyState()) -> list[Decision]:
    """Feed one load per ``dt`` seconds, applying every decision as the engine would."""
    out = []
    for n, load in enumerate(loads):
        d = decide(cfg, load, state, order, L, now=n * dt, quality=quality)
        state = d.state
        out.append(d)
    return out


def actions(ds):
    return [(d.action, d.layers) for d in ds]


def test_convert_follows_the_order_and_k_grows_with_overload():
    ds = run([over(1.2), IDLE, IDLE, over(2.5), IDLE, IDLE, over(10)])
    assert actions(ds)[0] == ("convert", (5,))
    assert actions(ds)[3] == ("convert", (2, 7))  # 2.5x overload: 2 layers
    assert actions(ds)[6] == ("convert", (0, 3, 6))  # capped at max_step_layers
    assert ds[-1].plan == (5, 2, 7, 0, 3, 6)
    assert "queued_prompt_tokens" in ds[0].reason and "ratio 0.12" in ds[0].reason


def test_cooldown_holds_and_then_converts():
    ds = run([over(1.5)] * 6)  # cooldown 2 s, one decision per second
    assert [d.action for d in ds] == ["convert", "hold", "convert", "hold", "convert", "hold"]
    assert "cooldown" in ds[1].reason


def test_hysteresis_band_holds_both_ways():
    ds = run([over(1.5), MID, MID, MID, MID, MID, MID])
    assert [d.action for d in ds] == ["convert"] + ["hold"] * 6
    assert all("hysteresis" in d.reason for d in ds[1:])
    # a queue depth just under its convert threshold does not convert either
    d = decide(CFG, LoadSnapshot(queue_depth=9), PolicyState(), ORDER, L, now=0)
    assert d.action == "hold"


def test_revert_needs_sustained_calm_and_reverts_the_latest_first():
    ds = run([over(2)] + [IDLE] * 12)  # converts (5, 2); calm from t=1
    assert actions(ds)[0] == ("convert", (5, 2))
    reverts = [(n, d.layers) for n, d in enumerate(ds) if d.action == "revert"]
    assert reverts[0] == (5, (2,))  # calm 4 s (t=1..5), most recent conversion first
    assert reverts[1] == (7, (5,))  # same calm stretch: only the 2 s cooldown
    assert ds[-1].plan == () and "calm at ratio 0" in ds[-1].reason
    # a blip of load resets the calm clock
    ds = run([over(1.5), IDLE, IDLE, IDLE, MID, IDLE, IDLE, IDLE, IDLE, IDLE])
    assert [n for n, d in enumerate(ds) if d.action == "revert"] == [9]  # calm again from t=5


def test_max_ratio_caps_conversions():
    ds = run([over(10)] * 20, cfg=PolicyConfig(**{**CFG.__dict__, "cooldown_s": 0}))
    assert len(ds[-1].plan) == 6  # floor(0.75 * 8)
    assert "max_ratio" in ds[-1].reason and ds[-1].action == "hold"


def test_never_converts_a_layer_twice_and_only_finished_layers():
    finished = (5, 2, 7)  # the student has finished only these
    state = PolicyState(converted=(2,))  # e.g. forced through the API out of order
    ds = run([over(10)] * 6, cfg=PolicyConfig(**{**CFG.__dict__, "cooldown_s": 0}), order=finished, state=state)
    converted = [layer for d in ds if d.action == "convert" for layer in d.layers]
    assert converted == [5, 7] and sorted(ds[-1].plan) == [2, 5, 7]
    assert "every finished layer" in ds[-1].reason
    with pytest.raises(ValueError, match="twice"):
        decide(CFG, IDLE, PolicyState(), (1, 2, 1), L, now=0)


def test_quality_budget_stops_at_the_expected_perplexity():
    curve = ((0.25, 0.02), (0.5, 0.08), (0.75, 0.30))
    assert expected_increase(curve, 0) == 0 and math.isclose(expected_increase(curve, 0.375), 0.05)
    assert expected_increase(curve, 0.8) == math.inf  # beyond the measured ratios: unknown
    cfg = PolicyConfig(**{**CFG.__dict__, "cooldown_s": 0, "quality_budget": 0.10})
    ds = run([over(10)] * 6, cfg=cfg, quality=curve)
    # ratio 4/8 = 0.5 -> +8% fits; 5/8 = 0.625 -> +19% does not
    assert len(ds[-1].plan) == 4 and "quality budget" in ds[-1].reason


def test_cache_and_latency_signals():
    cfg = PolicyConfig(**{**CFG.__dict__, "ttft_target_s": 2.0})
    d = decide(cfg, LoadSnapshot(cache_bytes=95, cache_budget_bytes=100), PolicyState(), ORDER, L, now=0)
    assert d.action == "convert" and "cache_fraction" in d.reason
    d = decide(cfg, LoadSnapshot(ttft_s=5.0), PolicyState(), ORDER, L, now=0)
    assert d.action == "convert" and d.layers == (5, 2) and "ttft_s" in d.reason  # 2.5x
    d = decide(cfg, LoadSnapshot(ttft_s=1.5), PolicyState(converted=(5,), calm_since_s=0), ORDER, L, now=100)
    assert d.action == "hold"  # 1.5 s is above half the target: not calm


def test_config_checks():
    with pytest.raises(ValueError, match="hysteresis"):
        PolicyConfig(convert_queue_depth=4, revert_queue_depth=4)
    with pytest.raises(ValueError, match="max_ratio"):
        PolicyConfig(max_ratio=1.5)
    with pytest.raises(ValueError, match="quality_budget"):
        PolicyConfig(quality_budget=0)


def test_quality_curve_from_an_eval_report():
    flat = {"rows": [
        {"ratio": 0.0, "split": "test", "ppl": {"a": 10.0, "b": 20.0}},
        {"ratio": 0.5, "split": "test", "ppl": {"a": 11.0, "b": 24.0}},
        {"ratio": 0.5, "split": "validation", "ppl": {"a": 99.0, "b": 99.0}}]}
    curve = quality_curve_from_report(flat)
    assert curve[0] == (0.0, 0.0) and curve[1][0] == 0.5 and math.isclose(curve[1][1], 0.15)
    runs = {"format": "dsla-eval-report/1",
            "models": [{"label": "teacher"}, {"label": "s1", "dir": "/x/s1"}, {"label": "s2", "dir": "/x/s2"}],
            "runs": [{"model": "teacher", "ratio": 0.0, "layers": [], "ppl": {"test": {"a": 10.0, "b": 20.0}}},
                     {"model": "s1", "ratio": 0.5, "layers": [1], "ppl": {"test": {"a": 11.0, "b": 24.0}}},
                     {"model": "s2", "ratio": 0.5, "layers": [1], "ppl": {"test": {"a": 20.0, "b": 40.0}}},
                     {"model": "s1", "ratio": 0.25, "layers": [1], "passkey": {}}]}
    assert quality_curve_from_report(runs) == curve
    assert quality_curve_from_report(runs, student="/x/s2")[1] == (0.5, 1.0)
    with pytest.raises(ValueError, match="ratio-0"):
        quality_curve_from_report({"rows": [{"ratio": 0.5, "split": "test", "ppl": {"a": 1.0}}]})


def test_policy_imports_no_torch():
    code = "import sys, dsla.serve.policy, dsla.serve.control; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_ratio_measured_by_eval_covers_the_layers_it_converted():
    from dsla.serve.policy import expected_increase, on_layers
    curve = ((0.0, 0.0), (0.25, 0.065))  # eval at 0.25 of 30 layers converted round(7.5) = 8
    assert expected_increase(curve, 8 / 30) == float("inf")  # 0.267 lies past the measured 0.25
    assert expected_increase(on_layers(curve, 30), 8 / 30) == pytest.approx(0.065)
    assert expected_increase(on_layers(curve, 30), 9 / 30) == float("inf")
