"""Pieces the evaluation suites share: forking request caches, statistics, progress bars."""

from __future__ import annotations

import math
from typing import Iterable, Sequence, TypeVar

from dsla.model.state import DSLAState, KVState, RequestCache

T = TypeVar("T")


def fork_cache(cache: RequestCache, extra: int = 0) -> RequestCache:
    """An independent copy of ``cache`` (room for ``extra`` more tokens), so one prompt's
    prefix can be continued several ways without recomputing it."""
    layers = []
    for s in cache.layers:
        if isinstance(s, KVState):
            c = KVState(s.k.shape[0], s.k.shape[2], s.k.dtype, s.k.device, capacity=max(1, s.length + extra))
            c.append(s.k, s.v)  # copies into c's own buffer
            layers.append(c)
        elif isinstance(s, DSLAState):
            layers.append(s.clone())
        else:
            raise TypeError(f"unknown layer state {type(s).__name__}")
    return RequestCache(layers, cache.num_tokens)


def token_batches(sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's sizes sum to at most ``max_tokens``
    (a single larger item gets a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if groups and total + n <= max_tokens:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def progress(it: Iterable[T], desc: str, total: int | None = None, enabled: bool = True, unit: str = "it"):
    """tqdm around ``it`` when enabled (stderr), else ``it`` unchanged."""
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
