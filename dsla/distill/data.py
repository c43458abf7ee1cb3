"""Token windows for calibration, training and evaluation, cut from the prepared corpora."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def corpus_tokens(teacher_dir: Path, split: str, corpora: Sequence[str] | None = None) -> list[np.ndarray]:
    """Flat token arrays of each corpus' split (see dsla.data.corpora); ``corpora`` None means the
    distillation corpora (``CORPORA``), never the evaluation-only ones.

    Raises ``ValueError`` when asked for the train split of an evaluation-only corpus.
    """
    from dsla.data.corpora import CORPORA, EVAL_CORPORA, load_tokens

    names = list(corpora or CORPORA)
    held_out = [c for c in names if c in EVAL_CORPORA]
    if split == "train" and held_out:
        raise ValueError(f"{held_out} are evaluation-only corpora with no train split: "
                         f"train on {list(CORPORA)}")
    return [np.asarray(load_tokens(teacher_dir, c, split)) for c in names]


def random_windows(streams: Sequence[np.ndarray], seq_len: int, num: int, seed: int) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens at random offsets, a stream picked in proportion to its size.

    Deterministic in ``seed``. Returns (num, seq_len) int64.
    """
    usable = [s for s in streams if len(s) > seq_len]
    if not usable:
        raise ValueError(f"no corpus has more than seq_len={seq_len} tokens: lower seq_len")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(s) - seq_len for s in usable], dtype=np.float64)
    which = rng.choice(len(usable), size=num, p=sizes / sizes.sum())
    out = np.empty((num, seq_len), dtype=np.int64)
    for n, w in enumerate(which):
        start = rng.integers(0, len(usable[w]) - seq_len)
        out[n] = usable[w][start: start + seq_len]
    return torch.from_numpy(out)


def contiguous_windows(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering the start of ``stream`` (for perplexity), (n, seq_len)."""
    n = len(stream) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"the stream has {len(stream)} tokens, fewer than seq_len={seq_len}")
    return torch.from_numpy(np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len))
