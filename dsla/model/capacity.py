"""How a KV buffer is sized and grows: one rule for ``KVState`` and the serving scheduler's byte
accounting (pure Python: the scheduler imports no torch)."""

from __future__ import annotations

KV_GROWTH = 1.25  # a full KV buffer grows to max(needed, KV_GROWTH x its capacity), then to its class


def size_class(tokens: int) -> int:
    """The smallest capacity class holding ``tokens``: above 8 tokens, 2^m x {5/4, 6/4, 7/4, 2}, four
    classes per doubling (1.25x apart at most), so a rounded buffer wastes under a quarter of its size. Requests whose buffers share a
    class share one attention call per decode step (``KVBatch``): with exact sizes, a server's
    requests, each sized for its own prompt, would almost never do."""
    if tokens <= 8:
        return max(tokens, 1)
    step = 1 << max((tokens - 1).bit_length() - 3, 0)  # a quarter of the octave (2^m, 2^(m+1)] holding tokens
    return -(-tokens // step) * step


def grown_capacity(capacity: int, needed: int) -> int:
    """Capacity of a KV buffer of ``capacity`` tokens after it must hold ``needed``: unchanged when
    it fits, else geometric growth (appending stays amortised O(1) per token) rounded up to its
    ``size_class``. A factor of 1.25, not 2: a server's buffers are sized for the prompt at
    admission, and doubling a long cache for its first few extra tokens would waste most of a
    memory budget."""
    return capacity if needed <= capacity else size_class(max(needed, int(KV_GROWTH * capacity)))
