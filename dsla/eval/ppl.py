"""Perplexity of the hybrid model on the corpora's held-out splits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

from dsla.distill.data import contiguous_windows, corpus_tokens
from dsla.distill.rank import mean_loss
from dsla.model.llama import HybridLM


def layers_for_ratio(order: Sequence[int], num_layers: int, ratio: float, available: Iterable[int]) -> list[int]:
    """The first round(ratio * num_layers) layers of ``order``; error if some are not distilled."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio} is outside [0, 1]")
    k = round(ratio * num_layers)
    layers = list(order[:k])
    missing = [i for i in layers if i not in set(available)]
    if len(layers) < k or missing:
        raise ValueError(
            f"ratio {ratio} needs {k} converted layers but the student has only {len(set(available))} "
            f"finished (missing {missing or 'order entries'}): finish `dsla distill` or use a lower ratio")
    return layers


def perplexity(model: HybridLM, teacher_dir: Path, dsla_layers: Sequence[int], corpora: Sequence[str],
               split: str, seq_len: int = 1024, max_tokens: int = 16384, batch_size: int = 2) -> dict[str, float]:
    """exp(mean next-token loss) per corpus over the first ``max_tokens`` of its split."""
    out = {}
    for name, stream in zip(corpora, corpus_tokens(teacher_dir, split, corpora)):
        windows = contiguous_windows(stream, seq_len, max_tokens)
        out[name] = math.exp(mean_loss(model, windows, dsla_layers, batch_size))
    return out
