"""KVBatch: equal-capacity KV caches as rows of one tensor, so a decode step makes one SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsla.model.llama import decode_attention
from dsla.model.state import KVBatch, KVState

H, G, D = 2, 3, 8


def make_states(lengths, capacity=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = []
    for n in lengths:
        s = KVState(H, D, dtype, capacity=capacity)
        s.append(torch.randn(H, n, D, generator=g).to(dtype), torch.randn(H, n, D, generator=g).to(dtype))
        states.append(s)
    return states


def per_request(q, k, v, states):
    """The definition: each request alone, softmax over its cache plus the new token."""
    outs = []
    for r, s in enumerate(states):
        kr = torch.cat([s.k, k[:, r: r + 1]], dim=1).float()
        vr = torch.cat([s.v, v[:, r: r + 1]], dim=1).float()
        qr = q[:, r].float().view(H, G, D)
        outs.append(F.scaled_dot_product_attention(qr[None], kr[None], vr[None])[0].reshape(-1))
    return torch.stack(outs)


def step_inputs(R, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H * G, R, D, generator=g).to(dtype), torch.randn(H, R, D, generator=g).to(dtype),
            torch.randn(H, R, D, generator=g).to(dtype))


def test_batched_steps_equal_each_request_alone_and_copy_once():
    """Mixed lengths and capacities (a group of three, one alone); the group's rows stay one
    tensor across steps (no copy), and each step equals the per-request definition."""
    states = make_states([5, 9, 1], capacity=16) + make_states([3], capacity=32, seed=1)
    for step in range(4):
        q, k, v = step_inputs(4, torch.float32, step)
        want = per_request(q, k, v, states)
        got = decode_attention(q, k, v, states)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if step == 0:
            batch = states[0].batch[0]
        assert all(s.batch[0] is batch for s in states[:3]) and states[3].batch is None
    assert [s.length for s in states] == [9, 13, 5, 7]


def test_bf16_batched_equals_alone():
    states = make_states([20, 7], capacity=32, dtype=torch.bfloat16)
    q, k, v = step_inputs(2, torch.bfloat16, 3)
    want = per_request(q, k, v, states)
    torch.testing.assert_close(decode_attention(q, k, v, states).float(), want, rtol=2e-2, atol=2e-2)


def test_growing_leaves_the_batch_and_a_new_batch_frees_the_old():
    states = make_states([15, 4, 6], capacity=16)
    old = KVBatch.of(states)
    assert [s.batch[1] for s in states] == [0, 1, 2] and KVBatch.of(states) is old
    kept = [s.k.clone() for s in states]
    states[0].reserve(17)  # grows: its own buffer again
    assert states[0].batch is None and states[0].capacity > 16
    torch.testing.assert_close(states[0].k, kept[0])
    new = KVBatch.of(states[1:])  # a new batch of the other two (one copy)
    assert new is not old and all(s.batch[0] is new for s in states[1:])
    for s, k in zip(states, kept):  # contents unchanged by the moves
        torch.testing.assert_close(s.k, k)
    # a member left behind by a rebuild gets its own buffer: nothing refers to the old tensor
    third = KVBatch.of(states[1:2])
    assert states[2].batch is None
    assert states[2]._kv.untyped_storage().data_ptr() != new.kv.untyped_storage().data_ptr()
    torch.testing.assert_close(states[2].k, kept[2])
    assert third.kv.shape[1] == 1


def storage_bytes(s: KVState) -> int:
    return s._kv.untyped_storage().nbytes()


def test_a_leaving_member_frees_the_batch_tensor():
    """release / convert / growth: afterwards every remaining member's storage is its own buffer
    (the bytes the scheduler counts) and nothing keeps the batch's tensor alive."""
    import gc
    import weakref

    from dsla.model.state import RequestCache

    states = make_states([3, 5, 8], capacity=16)
    batch = KVBatch.of(states)
    assert all(storage_bytes(s) == 3 * s.nbytes for s in states)  # one tensor, three rows
    gone = weakref.ref(batch.kv)  # the stacked tensor
    del batch
    kept = [s.k.clone() for s in states]
    RequestCache([states[1]]).release()  # the cache of request 1 is dropped
    gc.collect()
    assert gone() is None
    for s, k in zip(states, kept):
        assert storage_bytes(s) == s.nbytes
        torch.testing.assert_close(s.k, k)


def test_rows_past_a_length_are_zeros():
    """A batch reads every row up to the longest length; the shorter requests' rows past their
    length are masked, but a NaN there would still reach the output (NaN times a zero weight),
    so buffers start as zeros, and so do the rows a growth adds."""
    s = make_states([5], capacity=8)[0]
    assert torch.equal(s._kv[:, :, 5:], torch.zeros_like(s._kv[:, :, 5:]))
    s.reserve(9)
    assert s.capacity > 9 and torch.equal(s._kv[:, :, 5:], torch.zeros_like(s._kv[:, :, 5:]))
