"""Next-token sampling: greedy, temperature, top-k, top-p, with a per-request seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # per-request seed; None = nondeterministic
    max_tokens: int = 256  # new tokens to generate at most

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from (vocab,) logits."""
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
