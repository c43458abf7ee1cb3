"""A serving request: its tokens, how far the model has processed them, and how to sample more.

Pure Python (no torch): the scheduler reasons about requests with token arithmetic only. The
invariant the whole engine turns on: ``num_computed_tokens`` (tokens already in the request's
cache) catches up with ``num_tokens`` (prompt + generated). A step that brings it level yields
logits for the last token and so one new sampled token; there is no separate prefill phase.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from dsla.sampling import SamplingParams
from dsla.serve.cost import CacheCost


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # admitted: holds a cache in the runner
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended; the first two are OpenAI's ``finish_reason`` values."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled (client disconnect); never reported to a client
    ERROR = "error"  # the model step failed for this request


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of one token under the model, with the top alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(eq=False)  # identity: two requests are never "equal", and list.remove stays O(R)
class Request:
    """One generation request as the engine tracks it (mutated only by the engine thread)."""

    request_id: str
    prompt_token_ids: list[int]
    options: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # One per output token, plus the stop token's last when the request ended on EOS or a stop token id.
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # prompt_logprobs[i] scores prompt token i + 1 (token 0 has no context and no logprob).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    kv_capacity: int = 0  # tokens the request's KV buffers can hold (scheduler's accounting)
    cache_cost: CacheCost | None = None  # byte cost of its cache's layer plan, while it holds one
    admitted_time: float | None = None  # first admission
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the cache must eventually hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.options.max_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output (what a step feeds the model)."""
        p = self.prompt_token_ids
        if stop <= len(p):
            return p[start:stop]
        return (p + self.output_token_ids)[start:stop]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
