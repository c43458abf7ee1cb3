"""The scheduler alone: token arithmetic, admission limits, the byte budget and preemption."""

from __future__ import annotations

import pytest

from dsla.sampling import SamplingParams
from dsla.serve.request import FinishReason, Request, RequestStatus
from dsla.serve.scheduler import CacheCost, Scheduler, SchedulerConfig

COST = CacheCost(kv_bytes_per_token=100, fixed_bytes=1000, initial_capacity=16)


def req(name: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, sample: bool = True):
    """Pretend the model ran: advance, and append a token to each request that completed."""
    out = s.schedule()
    s.advance(out)
    for c in out.chunks:
        if sample and c.samples:
            c.request.output_token_ids.append(7)
    return out


def test_cost_replays_kv_growth():
    assert COST.grow(0, 10) == 16 and COST.grow(16, 17) == 20 and COST.grow(16, 100) == 112
    assert COST.grow(40, 41) == 56 and COST.bytes(32) == 1000 + 3200
    assert COST.worst_case_bytes(100) >= COST.bytes(COST.grow(COST.grow(0, 99), 100))


def test_kv_state_grows_as_the_cost_says():
    import torch

    from dsla.model.state import KVState

    kv, cap = KVState(2, 4, torch.float32, capacity=16), 16
    for n in (3, 14, 1, 5, 30, 1):
        kv.append(torch.zeros(2, n, 4), torch.zeros(2, n, 4))
        cap = COST.grow(cap, kv.length)
        assert kv.nbytes == 2 * 2 * 4 * 4 * cap


def test_admission_reserves_the_prompt_and_the_decode_reserve():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4, decode_reserve_tokens=5), COST)
    a, b = req("a", 45, max_tokens=3), req("b", 45, max_tokens=100)
    s.add(a)
    s.add(b)
    out = run_step(s)  # a chunked prefill: the buffers are sized for the whole prompt at once
    assert a.kv_capacity == 48 and out.chunks[0].num_tokens == 10  # 45 + 3, a size class
    for _ in range(4):
        run_step(s)
    assert a.kv_capacity == 48  # never regrown during the prefill
    s.finish(a, FinishReason.STOP)
    for _ in range(5):
        run_step(s)
    assert b.kv_capacity == 56  # 45 prompt + 5 reserved of its 100 = 50, rounded up to its size class


def test_prefill_is_chunked_by_the_token_budget_and_decodes_come_first():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4), COST)
    a = req("a", 3)
    s.add(a)
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 3)]
    s.add(req("b", 25))
    out = run_step(s)  # a decodes (1 token), b gets the other 9
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 3, 1), ("b", 0, 9)]
    assert not out.chunks[1].samples
    out = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 5, 1), ("b", 18, 7)]
    assert s.running[1].output_token_ids == [7]  # b's prefill completed: it sampled


def test_max_num_seqs_limits_admission():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2), COST)
    for n in "abc":
        s.add(req(n, 4))
    out = run_step(s)
    assert len(out.chunks) == 2 and s.num_waiting == 1
    s.finish(s.running[0], FinishReason.STOP)
    out = run_step(s)
    assert "c" in [c.request.request_id for c in out.chunks] and out.freed == ("a",)


def test_admission_waits_for_the_byte_budget():
    budget = 2 * COST.bytes(32)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, cache_budget_bytes=budget, decode_reserve_tokens=2), COST)
    for n in "abc":
        s.add(req(n, 30, max_tokens=2))
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["a", "b"] and out.cache_bytes <= budget


def test_growth_over_budget_preempts_the_newest():
    budget = 2 * COST.bytes(16) + 10
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, cache_budget_bytes=budget, decode_reserve_tokens=0),
                  COST)
    a, b = req("a", 15, 5), req("b", 10, 5)
    s.add(a)
    s.add(b)
    run_step(s)
    run_step(s)
    assert s.num_running == 2 and a.num_tokens == 17
    out = run_step(s)  # a's 17th token overflows its 16-token buffer: it grows, b must go
    assert out.preempted == ("b",) and "b" in out.freed
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [c.request.request_id for c in out.chunks] == ["a"] and out.cache_bytes <= budget
    s.finish(a, FinishReason.STOP)
    out = run_step(s)  # b comes back, recomputing prompt + its one output token
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 0, 12)]


def test_request_larger_than_the_budget_is_refused():
    s = Scheduler(SchedulerConfig(cache_budget_bytes=5000), COST)
    with pytest.raises(ValueError, match="cache budget"):
        s.add(req("a", 40, 10))


def test_finish_while_waiting_and_config_checks():
    s = Scheduler(SchedulerConfig(), COST)
    a = req("a", 3)
    s.add(a)
    s.finish(a, FinishReason.ABORT)
    assert not s.has_work and a.finish_reason is FinishReason.ABORT
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=8)
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)


def test_each_running_request_keeps_the_price_of_its_own_cache():
    cheap = CacheCost(kv_bytes_per_token=10, fixed_bytes=500, initial_capacity=16)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=4), COST)
    a = req("a", 10)
    s.add(a)
    run_step(s)
    s.set_cost(cheap)  # the plan changed: new requests are priced with the new cost
    b = req("b", 10)
    s.add(b)
    run_step(s)
    assert a.cache_cost is COST and b.cache_cost is cheap
    assert s.cache_bytes() == COST.bytes(a.kv_capacity) + cheap.bytes(b.kv_capacity)
    s.reprice(a, cheap)  # a's cache was converted in flight
    assert s.cache_bytes() == cheap.bytes(a.kv_capacity) + cheap.bytes(b.kv_capacity)
    s._preempt(b)
    assert b.cache_cost is None and s.cache_bytes() == cheap.bytes(a.kv_capacity)
