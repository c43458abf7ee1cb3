"""Single-request generation loop (the CLI's `dsla generate`; the server has its own engine)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from dsla.model.llama import HybridLM
from dsla.sampling import SamplingParams, sample


@torch.no_grad()
def generate(model: HybridLM, prompt_ids: Sequence[int], params: SamplingParams,
             stop_ids: Iterable[int] = (), dsla_layers: Iterable[int] = (),
             prefill_chunk: int = 2048) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id (not yielded) or ``params.max_tokens``."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {limit}")
    stop = set(stop_ids)
    cache = model.new_cache(dsla_layers)
    gen = params.generator()
    ids = torch.tensor(list(prompt_ids))
    for start in range(0, len(ids), prefill_chunk):
        chunk = ids[start: start + prefill_chunk]
        logits = model(chunk, [len(chunk)], [cache], logits_for=torch.tensor([len(chunk) - 1]))
    for _ in range(min(params.max_tokens, limit - len(prompt_ids))):
        tok = sample(logits[-1], params, gen)
        if tok in stop:
            return
        yield tok
        logits = model(torch.tensor([tok]), [1], [cache])
