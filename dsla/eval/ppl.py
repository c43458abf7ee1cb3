"""Perplexity of the hybrid model on the corpora's held-out splits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from dsla.distill.data import contiguous_windows, corpus_tokens
from dsla.distill.rank import mean_loss
from dsla.model.llama import HybridLM


def perplexity(model: HybridLM, teacher_dir: Path, dsla_layers: Sequence[int], corpora: Sequence[str],
               split: str, seq_len: int = 1024, max_tokens: int = 16384, batch_size: int = 2) -> dict[str, float]:
    """exp(mean next-token loss) per corpus over the first ``max_tokens`` of its split."""
    out = {}
    for name, stream in zip(corpora, corpus_tokens(teacher_dir, split, corpora)):
        windows = contiguous_windows(stream, seq_len, max_tokens)
        out[name] = math.exp(mean_loss(model, windows, dsla_layers, batch_size))
    return out
