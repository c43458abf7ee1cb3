"""Continuous-batching scheduler: token arithmetic only (no torch, no clocks of its own).

Each step: running requests get the tokens they still lack (one for a decode, a chunk for an
unfinished prefill), decodes first, within a per-step token budget; what is left of the budget
admits waiting requests (FIFO, preempted ones first). Admission is also bounded by
``max_num_seqs`` and by a cache memory budget in bytes, from the ``CacheCost`` the runner reports
for its caches. An admitted request's KV buffers are sized at once for its whole prompt plus up
to ``decode_reserve_tokens`` of output (so a chunked prefill never regrows them, and admission
counts what the request will really hold). When a running request's cache would still grow past
the budget, the newest running request is preempted: its cache is freed and it goes back to the
head of the queue, to be recomputed from its tokens later. Nobody fails for lack of memory.

Each running request is priced with the ``CacheCost`` of its own cache (``Request.cache_cost``):
requests admitted under different layer plans, or converted in flight, hold different caches.
``cost`` is the price of a request admitted now.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsla.serve.cost import CacheCost
from dsla.serve.request import FinishReason, Request, RequestStatus

__all__ = ["CacheCost", "Scheduler", "SchedulerConfig", "SchedulerOutput", "ScheduledChunk"]  # CacheCost: re-exported


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine. Every field is a CLI flag of `dsla serve`."""

    max_num_seqs: int = 64  # requests running (holding a cache) at once (32 -> 64: docs/results/speed.md 0b)
    max_num_batched_tokens: int = 512  # tokens per step: decode tokens plus prefill chunks
    cache_budget_bytes: int = 1 << 30  # cache memory of all running requests together, bytes
    max_waiting: int = 256  # requests queued beyond this are refused (HTTP 503 + Retry-After)
    decode_reserve_tokens: int = 256  # output tokens of KV room reserved at admission, beyond the prompt

    def __post_init__(self) -> None:
        if self.decode_reserve_tokens < 0:
            raise ValueError(f"decode_reserve_tokens={self.decode_reserve_tokens} must be non-negative")
        for name in ("max_num_seqs", "max_num_batched_tokens", "cache_budget_bytes", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                f"{self.max_num_seqs}: a step could not give every running request its decode token")


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed tokens [start, start + num_tokens) of ``request`` to the model in this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """The step brings the request level with its tokens: its last logits are fresh."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def samples(self) -> bool:
        """The step ends with a new token sampled for the request."""
        r = self.request
        return self.completes and r.num_output_tokens < r.options.max_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: what to run, and which caches to drop before running it."""

    chunks: tuple[ScheduledChunk, ...]
    freed: tuple[str, ...]  # request ids whose caches the runner must free first
    preempted: tuple[str, ...]  # the subset of ``freed`` that will be recomputed later
    cache_bytes: int  # the scheduler's accounting of cache bytes once this step has run

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.freed


class Scheduler:
    def __init__(self, config: SchedulerConfig, cost: CacheCost) -> None:
        self.config = config
        self.cost = cost
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the newest
        self._freed: list[str] = []
        self.num_preemptions = 0

    # ---- bookkeeping ------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._freed)

    def cache_bytes(self) -> int:
        return sum(r.cache_cost.bytes(r.kv_capacity) for r in self.running)

    def check_fits(self, req: Request) -> None:
        """Raise ValueError when the request could not run even alone within the budget."""
        need = self.cost.worst_case_bytes(req.max_total_tokens)
        if need > self.config.cache_budget_bytes:
            raise ValueError(
                f"the request may need {need:,} bytes of cache ({req.num_prompt_tokens} prompt + "
                f"{req.options.max_tokens} new tokens) but the server's whole cache budget is "
                f"{self.config.cache_budget_bytes:,} bytes: shorten the prompt or max_tokens")

    def add(self, req: Request) -> None:
        self.check_fits(req)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request (its cache is freed at the next step)."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._freed.append(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._freed.append(req.request_id)
        req.status, req.num_computed_tokens, req.kv_capacity = RequestStatus.WAITING, 0, 0
        req.cache_cost = None  # recomputed under the plan of its readmission
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def reservation(self, req: Request, cost: CacheCost) -> int:
        """KV capacity (tokens) a request gets at admission: its tokens so far (prompt, and output
        when it was preempted) plus up to ``decode_reserve_tokens`` of what it may still generate."""
        more = min(req.max_total_tokens - req.num_tokens, self.config.decode_reserve_tokens)
        return cost.grow(0, req.num_tokens + max(more, 0))

    def set_cost(self, cost: CacheCost) -> None:
        """Price requests admitted from now on with ``cost`` (the layer plan changed between steps)."""
        self.cost = cost

    def reprice(self, req: Request, cost: CacheCost) -> None:
        """A running request's cache changed kind between steps (a layer was folded into state)."""
        if req.status is RequestStatus.RUNNING:
            req.cache_cost = cost

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        used = self.cache_bytes()
        chunks: dict[str, ScheduledChunk] = {}
        preempted: list[str] = []
        # Decodes (one token) before unfinished prefills, oldest first within each.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            cost = req.cache_cost
            while True:
                cap = cost.grow(req.kv_capacity, req.num_computed_tokens + n)
                extra = cost.bytes(cap) - cost.bytes(req.kv_capacity)
                if used + extra <= cfg.cache_budget_bytes:
                    break
                victim = self.running[-1]
                used -= victim.cache_cost.bytes(victim.kv_capacity)
                if victim.request_id in chunks:
                    budget += chunks.pop(victim.request_id).num_tokens
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            req.kv_capacity, used = cap, used + extra
            chunks[req.request_id] = ScheduledChunk(req, req.num_computed_tokens, n)
            budget -= n
        # Admit waiting requests only in a step that preempted nobody (no thrashing), and only
        # when the request's reservation (all its tokens so far plus the decode reserve) fits the
        # budget next to everyone else's.
        cost = self.cost
        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            cap = self.reservation(req, cost)
            if used + cost.bytes(cap) > cfg.cache_budget_bytes:
                break
            self.waiting.popleft()
            n = min(req.num_tokens, budget)
            req.status, req.kv_capacity, req.cache_cost = RequestStatus.RUNNING, cap, cost
            self.running.append(req)
            used += cost.bytes(req.kv_capacity)
            chunks[req.request_id] = ScheduledChunk(req, 0, n)
            budget -= n
        freed, self._freed = tuple(self._freed), []
        return SchedulerOutput(tuple(chunks.values()), freed, tuple(preempted), used)

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the step ran: each scheduled request's cache now holds its chunk."""
        for c in out.chunks:
            if c.request.status is RequestStatus.RUNNING:
                c.request.num_computed_tokens = c.start + c.num_tokens
