"""How a KV buffer grows: one rule for ``KVState`` and the serving scheduler's byte accounting
(pure Python: the scheduler imports no torch)."""

from __future__ import annotations

KV_GROWTH = 1.25  # a full KV buffer grows to max(needed, KV_GROWTH x its capacity)


def grown_capacity(capacity: int, needed: int) -> int:
    """Capacity of a KV buffer of ``capacity`` tokens after it must hold ``needed``: unchanged when
    it fits, else geometric growth (appending stays amortised O(1) per token). A factor of 1.25,
    not 2: a server's buffers are sized for the prompt at admission, and doubling a long cache for
    its first few extra tokens would waste most of a memory budget."""
    return capacity if needed <= capacity else max(needed, int(KV_GROWTH * capacity))
