"""Loss by token position on long test documents: where a recency bias shows.

Windows of ``window`` tokens are cut from test-split documents at least that long (non-overlapping,
from each document's start, spread over as many documents as possible). Only when no document is long enough are the documents of each
corpus' test split concatenated, and the result says so. A token's position is its index in the
window (the number of tokens the model saw before predicting it, minus one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsla.eval.common import progress
from dsla.model.llama import HybridLM

BUCKETS = ((0, 256), (256, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


@dataclass(frozen=True)
class PositionWindows:
    tokens: torch.Tensor  # (n, T) int64
    sources: tuple[str, ...]  # "corpus/doc<i>@<offset>" per window
    concatenated: bool  # True when documents had to be joined to reach the window length


def bucket_label(lo: int, hi: int) -> str:
    k = lambda v: f"{v // 1024}k" if v >= 1024 and v % 1024 == 0 else str(v)  # noqa: E731
    return f"{k(lo)}-{k(hi)}"


def buckets_for(window: int) -> list[tuple[int, int]]:
    """The standard buckets clipped to a window (a model with a shorter context gets fewer)."""
    return [(lo, min(hi, window)) for lo, hi in BUCKETS if lo < window]


def select_windows(docs_by_corpus: dict[str, Sequence[np.ndarray]], window: int, num: int,
                   seed: int) -> PositionWindows:
    """``num`` windows (fewer if there are not that many) of long documents, spread over as many
    documents as possible: every document's first window (from its start) in an order drawn
    with the seed, then every document's second window, and so on. Documents are concatenated
    only as a fallback, when none is long enough."""
    docs = {c: list(ds) for c, ds in docs_by_corpus.items()}
    concatenated = not any(len(d) >= window for ds in docs.values() for d in ds)
    if concatenated:
        docs = {c: [np.concatenate(ds)] for c, ds in docs.items() if len(ds)}
    long_docs = [(c, i) for c, ds in docs.items() for i, d in enumerate(ds) if len(d) >= window]
    if not long_docs:
        raise ValueError(f"the test splits hold fewer than {window} tokens even concatenated: lower the window")
    rng = np.random.default_rng(seed)
    long_docs = [long_docs[j] for j in rng.permutation(len(long_docs))]
    cands = [(c, i, k * window) for k in range(max(len(docs[c][i]) // window for c, i in long_docs))
             for c, i in long_docs if (k + 1) * window <= len(docs[c][i])]
    pick = cands[:num]
    rows = [docs[c][i][off: off + window] for c, i, off in pick]
    sources = tuple(f"{c}/{'concat' if concatenated else f'doc{i}'}@{off}" for c, i, off in pick)
    return PositionWindows(torch.from_numpy(np.stack(rows).astype(np.int64)), sources, concatenated)


@torch.no_grad()
def token_losses(model: HybridLM, window: torch.Tensor, dsla_layers: Iterable[int] = (),
                 chunk: int = 1024) -> torch.Tensor:
    """Next-token losses (T-1,) of one (T,) window; logits are made ``chunk`` rows at a time."""
    h = model.hidden_states(window, [len(window)], None, dsla_layers)  # (T, hidden)
    out = []
    for s in range(0, len(window) - 1, chunk):
        e = min(s + chunk, len(window) - 1)
        out.append(F.cross_entropy(model.logits(h[s:e]).float(), window[s + 1: e + 1], reduction="none"))
    return torch.cat(out)


def run_position(model: HybridLM, windows: PositionWindows, dsla_layers: Iterable[int] = (),
                 show_progress: bool = False) -> dict:
    """Mean loss (nats/token), its standard error over windows, and token count per bucket.

    Position p's loss is that of predicting token p + 1 from tokens 0..p; bucket [lo, hi) holds
    positions lo <= p < hi.
    """
    layers = list(dsla_layers)
    T = windows.tokens.shape[1]
    buckets = buckets_for(T)
    per_window = []
    for w in progress(windows.tokens, "position", total=len(windows.tokens), enabled=show_progress, unit="window"):
        loss = token_losses(model, w, layers).double().numpy()  # position p at index p
        per_window.append([loss[lo: min(hi, T - 1)].mean() for lo, hi in buckets])
    arr = np.asarray(per_window)  # (n, buckets)
    n = len(arr)
    se = arr.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(buckets), np.nan)
    return {"buckets": [bucket_label(lo, hi) for lo, hi in buckets],
            "loss": arr.mean(0).tolist(), "se": se.tolist(),
            "tokens": [(min(hi, T - 1) - lo) * n for lo, hi in buckets], "windows": n}
