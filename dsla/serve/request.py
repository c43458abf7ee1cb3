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

from dsla.serve.cost import CacheCost


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch.Generator.manual_seed takes
# Below this a temperature divides logits into overflow (inf, then NaN probabilities); vLLM warns
# at the same bound. 0 means greedy.
MIN_TEMPERATURE = 0.01


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
class SamplingOptions:
    """What one request asks of the sampler. Validated here so every entry point agrees."""

    max_tokens: int = 16  # new tokens at most; 0 only with echo (score the prompt, generate nothing)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # per-request generator seed; None = nondeterministic
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request (not emitted)
    ignore_eos: bool = False  # keep going past EOS (benchmarks need fixed output lengths)
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    prompt_logprobs: bool = False  # also score the prompt tokens (echo + logprobs)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 0")
        if self.max_tokens == 0 and not self.prompt_logprobs:
            raise ValueError("max_tokens=0 only makes sense when scoring the prompt (echo with logprobs)")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(f"temperature={self.temperature} must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed={self.seed} is outside [{SEED_MIN}, {SEED_MAX}]")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs} must be >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


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
    options: SamplingOptions
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
