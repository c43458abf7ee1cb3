"""What a request's cache costs in bytes, replaying the KV buffers' growth rule (pure Python).

Its own module, beside nothing but the capacity rule it replays, so that ``request`` (which
holds a request's price) and ``scheduler`` (which sets it) both import it and not each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsla.model.capacity import KV_GROWTH, grown_capacity, size_class


@dataclass(frozen=True)
class CacheCost:
    """Bytes one request's cache holds, as a function of its KV buffer capacity in tokens.

    Reported by the runner for the current layer plan. KV buffers hold at least
    ``initial_capacity`` tokens and, when a step needs more, grow by
    ``dsla.model.capacity.grown_capacity`` (the rule of ``KVState``); the scheduler replays that
    rule so its accounting equals the caches' real ``nbytes``.
    """

    kv_bytes_per_token: int  # K and V bytes per token, summed over the attention layers and DSLA layers' exact groups
    fixed_bytes: int  # DSLA states and windows of the DSLA layers: independent of the token count
    initial_capacity: int = 64  # tokens a fresh KV buffer holds at least

    def grow(self, capacity: int, needed: int) -> int:
        """Capacity after the buffer must hold ``needed`` tokens."""
        return grown_capacity(max(capacity, self.initial_capacity), needed)

    def bytes(self, capacity: int) -> int:
        return self.fixed_bytes + self.kv_bytes_per_token * capacity

    def worst_case_bytes(self, tokens: int) -> int:
        """An upper bound on the bytes of a request that reaches ``tokens`` tokens."""
        return self.bytes(max(self.initial_capacity, size_class(math.ceil(KV_GROWTH * tokens))))
