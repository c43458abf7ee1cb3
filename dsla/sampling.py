"""Sampling: the one parameters type (``SamplingParams``), next-token sampling (greedy, temperature,
top-k, top-p, with a per-request seeded generator), and the ids that end generation.

The dataclass is pure Python (the serving scheduler imports it without torch); torch is imported
by the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch
    from torch import Tensor

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch.Generator.manual_seed takes
# Below this a temperature divides logits into overflow (inf, then NaN probabilities); vLLM warns
# at the same bound. 0 means greedy.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class SamplingParams:
    """What one generation asks of the sampler (CLI, server and evaluation alike); validated here
    so every entry point agrees. Defaults are OpenAI's."""

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

    def generator(self) -> "torch.Generator | None":
        """The request's random generator (None when greedy), seeded with ``seed`` when given."""
        import torch

        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def sample(logits: "Tensor", params: SamplingParams, generator: "torch.Generator | None") -> int:
    """Pick one token from (vocab,) logits."""
    import torch

    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        p_sorted, idx = probs.sort(descending=True)
        keep = p_sorted.cumsum(0) - p_sorted < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p_sorted[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_token_ids(model_eos: Iterable[int], tokenizer, extra: Iterable[int] = ()) -> frozenset[int]:
    """The ids that end generation: the model config's EOS ids, the tokenizer's ``eos_token``
    (a ``dsla.model.tokenizer.Tokenizer``; chat checkpoints often differ from the config), and ``extra``."""
    ids = set(model_eos) | set(extra)
    eos = tokenizer.token_id(tokenizer.special("eos_token"))
    if eos is not None:
        ids.add(eos)
    return frozenset(ids)
