"""Layer sensitivity: attention entropy (the paper's metric) and measured loss change (loss-delta)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dsla.model.llama import HybridLM, split_heads
from dsla.ops.rope import apply_rope


@torch.no_grad()
def attention_entropy(model: HybridLM, windows: Tensor, batch_size: int = 4,
                      progress: bool = False) -> list[float]:
    """Mean attention entropy (nats) of every layer over the windows' query positions.

    Averaged over query positions and windows per head, then over heads. windows: (n, T).
    """
    cfg = model.cfg
    L, Hq, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    sums = torch.zeros(L, Hq, dtype=torch.float64)
    count = 0
    hooks = []

    def make_hook(i: int):
        def hook(module, args):
            x, cos, sin, seq_lens = args[:4]
            B, T = len(seq_lens), seq_lens[0]
            q = apply_rope(split_heads(module.q_proj(x), Hq), cos, sin)  # (Hq, N, D)
            k = module.project_kv(x, cos, sin)[1]  # (Hkv, N, D)
            q = q.view(Hq, B, T, D).transpose(0, 1).float()  # (B, Hq, T, D)
            k = k.view(-1, B, T, D).transpose(0, 1).float().repeat_interleave(cfg.group_size, dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, Hq, T, T)
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            logp = F.log_softmax(scores, dim=-1)
            ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B, Hq, T)
            sums[i] += ent.double().mean(-1).sum(0)
        return hook

    for i, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.register_forward_pre_hook(make_hook(i)))
    try:
        batches = range(0, len(windows), batch_size)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc="entropy", unit="batch")
        for s in batches:
            model.hidden_states(windows[s: s + batch_size].reshape(-1), [windows.shape[1]] * len(windows[s: s + batch_size]))
            count += len(windows[s: s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return (sums / count).mean(-1).tolist()


@torch.no_grad()
def mean_loss(model: HybridLM, windows: Tensor, dsla_layers: Iterable[int] = (), batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) over the windows with the given layers as DSLA."""
    total, n = 0.0, 0
    layers = list(dsla_layers)
    for s in range(0, len(windows), batch_size):
        w = windows[s: s + batch_size]
        logits = model(w, dsla_layers=layers)  # (B, T, vocab)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                               reduction="sum")
        total, n = total + float(loss), n + w[:, 1:].numel()
    return total / n


def loss_delta(model: HybridLM, windows: Tensor, layers: Sequence[int], batch_size: int = 4,
               progress: bool = False) -> dict[int, float]:
    """Increase of mean loss when each layer alone runs DSLA (needs its DSLA module)."""
    base = mean_loss(model, windows, (), batch_size)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="loss-delta", unit="layer", dynamic_ncols=True)
    return {i: mean_loss(model, windows, [i], batch_size) - base for i in layers}


def order_from_scores(scores: Sequence[float], order: str) -> list[int]:
    """Least sensitive first ('entropy': ascending scores) or the reverse ('reverse')."""
    idx = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return idx[::-1] if order == "reverse" else idx


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
