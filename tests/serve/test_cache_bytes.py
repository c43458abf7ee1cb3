"""The scheduler's byte accounting equals the bytes the caches' tensors really hold, at every step:
admission (buffers preallocated for prompt + decode reserve), decode (appends in place, regrowth
past the reserve), in-flight conversion (KV folded into DSLA state) and release."""

from __future__ import annotations

import pytest
import torch

from dsla.model.state import DSLAState, KVState
from dsla.sampling import SamplingParams
from dsla.serve.engine import Collector, Engine
from dsla.serve.runner import ModelRunner
from dsla.serve.scheduler import SchedulerConfig


def tensor_bytes(runner: ModelRunner) -> int:
    """Bytes of the tensors every live cache holds, counted from the tensors themselves."""
    total, storages = 0, {}
    for cache in runner.caches.values():
        for s in cache.layers:
            kv = s if isinstance(s, KVState) else s.exact  # the exact KV groups' buffer grows like a KV layer's
            if not isinstance(s, KVState):
                assert isinstance(s, DSLAState)
                total += sum(t.numel() * t.element_size() for t in (s.state, s.window_k, s.window_v, s.sink_k, s.sink_v)
                             if t is not None)
            if kv is not None:  # all of a storage counts, once (a KVBatch's tensor holds several requests' buffers)
                st = kv._kv.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return total + sum(storages.values())


@pytest.mark.parametrize("exact,sinks", [((), 0), ((1,), 0), ((), 2)], ids=["dsla", "exact_group", "window_sinks"])
def test_reported_cache_bytes_equal_the_tensors_through_a_run(serve_dir, serve_tok, exact, sinks):
    from dsla.config import DSLAConfig
    from dsla.model.loading import load_teacher

    torch.manual_seed(0)
    model = load_teacher(serve_dir)
    model.add_dsla(range(3), DSLAConfig(window=4, sinks=sinks) if sinks else None)  # window rows and sinks counted
    for i in (1, 2):  # layer 1 is folded mid-run: its exact group's KV is kept from the teacher's cache
        model.dsla[str(i)].set_exact_groups(exact)
    # a reserve of 3 output tokens: the longer requests regrow their KV during decode
    engine = Engine(ModelRunner(model), serve_tok, SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4,
                                                                   decode_reserve_tokens=3))
    cols = [Collector() for _ in range(3)]
    for n, max_tokens, col in zip((58, 7, 12), (10, 3, 14), cols):  # 58 + 10 > the 64-token minimum
        engine.submit(list(range(5, 5 + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True), col)
    engine._drain(block=False)
    seen_grow = converted = False
    for step in range(60):
        caps = {rid: [s.capacity for s in c.layers if isinstance(s, KVState)] for rid, c in engine.runner.caches.items()}
        engine.step()
        assert engine.scheduler.cache_bytes() == engine.runner.cache_bytes() == tensor_bytes(engine.runner)
        for rid, c in engine.runner.caches.items():
            now = [s.capacity for s in c.layers if isinstance(s, KVState)]
            seen_grow |= rid in caps and len(now) == len(caps[rid]) and now != caps[rid]
        if step == 6:  # mid-run: fold layer 1 of every live request
            engine.set_plan([1], reason="test")
            converted = True
            assert engine.scheduler.cache_bytes() == engine.runner.cache_bytes() == tensor_bytes(engine.runner)
        if not engine.scheduler.has_work:
            break
    assert converted and seen_grow
    assert [(c.wait(1.0)[-1].error, len(c.token_ids)) for c in cols] == [(None, 10), (None, 3), (None, 14)]
    assert engine.scheduler.cache_bytes() == engine.runner.cache_bytes() == tensor_bytes(engine.runner) == 0
