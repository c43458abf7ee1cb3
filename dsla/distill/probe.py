"""Forward-only layer probes at long context: which layers need exact long-range attention.

A linear layer keeps recent tokens well (a fast decaying state, or an exact window) and blurs
the distant past. So the probe replaces one layer at a time by the teacher's own attention
restricted to the last ``window`` tokens plus the first ``sinks`` (``LocalAttention``) and
measures what that costs, with no student needed:

- ``loss``: the increase of mean next-token loss on text windows (nats/token);
- ``retrieval``: the drop of the passkey's log-likelihood (nats per key, teacher-forced) and of
  teacher-forced key accuracy, on passkey prompts built from validation text.

The retrieval-aware order converts least costly layers first and the layers the passkey needs last.

One layer at a time misses what layers do together: several layers may each keep the key alone
and lose it once all of them are local. ``greedy_layer_set`` grows the set of local layers one
layer at a time, each time adding the layer whose restriction *together with those already
chosen* costs least, so the first k of its order are what a ratio of k / L would convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsla.model.llama import HybridLM, LlamaAttention, split_heads, uniform_length
from dsla.ops.rope import apply_rope


class LocalAttention(nn.Module):
    """``teacher`` attention that sees only the last ``window`` keys and the first ``sinks``.

    Same forward contract as the layer it stands for (stateless rectangular batches only).
    """

    def __init__(self, teacher: LlamaAttention, window: int, sinks: int) -> None:
        super().__init__()
        if window < 1 or sinks < 0:
            raise ValueError(f"window={window} must be >= 1 and sinks={sinks} >= 0")
        object.__setattr__(self, "teacher", teacher)  # shared, not registered
        self.window, self.sinks = window, sinks

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seq_lens: Sequence[int], states=None) -> Tensor:
        t = self.teacher
        T = uniform_length(seq_lens, states)
        if T is None:
            raise ValueError("LocalAttention runs stateless batches of equal-length windows only")
        B = len(seq_lens)
        q = apply_rope(split_heads(t.q_proj(x), t.cfg.num_attention_heads), cos, sin)  # (Hq, N, D)
        _, k, v = t.project_kv(x, cos, sin)  # (Hkv, N, D)
        batch = lambda z: z.view(z.shape[0], B, T, -1).transpose(0, 1)  # noqa: E731  (B, H, T, D)
        i = torch.arange(T, device=x.device)
        dist = i[:, None] - i[None, :]  # (T, T) query minus key position
        mask = (dist >= 0) & ((dist < self.window) | (i[None, :] < self.sinks))
        o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), attn_mask=mask, enable_gqa=True)
        return t.o_proj(o.transpose(1, 2).reshape(B * T, -1))  # (N, hidden)


@dataclass(frozen=True)
class KeyPrompt:
    """A passkey prompt with its answer tokens appended: score ``ids[start:]`` given the rest."""

    ids: tuple[int, ...]
    start: int  # index of the first answer token


def _with_probe(model: HybridLM, layers: Sequence[int], window: int, sinks: int):
    """(dsla_layers, restore) running ``layers`` as LocalAttention through the model's DSLA slots."""
    layers = list(layers)
    saved = {}
    for layer in layers:
        key = str(layer)
        saved[key] = model.dsla[key] if key in model.dsla else None
        model.dsla[key] = LocalAttention(model.model.layers[layer].self_attn, window, sinks)

    def restore() -> None:
        for key, module in saved.items():
            if module is None:
                del model.dsla[key]
            else:
                model.dsla[key] = module
    return layers, restore


@torch.no_grad()
def _nll_sum(model: HybridLM, windows: Tensor, layers: list[int], batch_size: int) -> tuple[float, int]:
    total, n = 0.0, 0
    for s in range(0, len(windows), batch_size):
        w = windows[s: s + batch_size]
        logits = model(w, dsla_layers=layers)  # (B, T, vocab)
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    return total, n


@torch.no_grad()
def _key_scores(model: HybridLM, prompts: Sequence[KeyPrompt], layers: list[int]) -> tuple[float, float]:
    """Mean log-likelihood of the key tokens (nats per prompt) and the fraction of prompts whose
    key tokens are all the argmax (teacher-forced)."""
    logp_sum, exact = 0.0, 0
    for p in prompts:
        ids = torch.tensor(p.ids)
        logits = model(ids[None], dsla_layers=layers)[0, p.start - 1: -1].float()  # (A, vocab)
        target = ids[p.start:]
        logp_sum += float(logits.log_softmax(-1).gather(-1, target[:, None]).sum())
        exact += int(bool((logits.argmax(-1) == target).all()))
    return logp_sum / len(prompts), exact / len(prompts)


def probe_layers(model: HybridLM, text_windows: Tensor | None, prompts: Sequence[KeyPrompt],
                 window: int = 64, sinks: int = 4, batch_size: int = 2, progress: bool = False) -> dict:
    """Per-layer cost of restricting that layer alone to local attention.

    Returns {"loss_delta": [L floats] or None, "key_logp_drop": [L] or None, "key_acc": [L] or None,
    "base": {...}} (the teacher's own values in "base").
    """
    L = model.cfg.num_hidden_layers
    out: dict = {"window": window, "sinks": sinks, "loss_delta": None, "key_logp_drop": None, "key_acc": None}
    base: dict = {}
    if text_windows is not None:
        s, n = _nll_sum(model, text_windows, [], batch_size)
        base["loss"] = s / n
        out["loss_delta"] = []
    if prompts:
        base["key_logp"], base["key_acc"] = _key_scores(model, prompts, [])
        out["key_logp_drop"], out["key_acc"] = [], []
    out["base"] = base
    layers = range(L)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="probe", unit="layer", dynamic_ncols=True)
    for i in layers:
        dl, restore = _with_probe(model, [i], window, sinks)
        try:
            if text_windows is not None:
                s, n = _nll_sum(model, text_windows, dl, batch_size)
                out["loss_delta"].append(s / n - base["loss"])
            if prompts:
                logp, acc = _key_scores(model, prompts, dl)
                out["key_logp_drop"].append(base["key_logp"] - logp)
                out["key_acc"].append(acc)
        finally:
            restore()
    return out


def greedy_layer_set(model: HybridLM, text_windows: Tensor, prompts: Sequence[KeyPrompt], count: int,
                     window: int = 64, sinks: int = 4, key_weight: float = 0.1, batch_size: int = 2,
                     single: dict | None = None, progress: bool = False) -> dict:
    """Choose ``count`` layers to restrict *together* to local attention, greedily.

    Step j tries every layer not chosen yet alongside the j chosen ones and keeps the one of least
    cost = loss increase (nats/token on ``text_windows``) + ``key_weight`` x drop of the passkey's
    log-likelihood (nats per key), both against the teacher. Costs L + (L-1) + ... forward passes
    over the windows and prompts; ``single``, ``probe_layers``' result on the same windows, prompts,
    window and sinks, stands for the first step. Returns {"order": the chosen layers in the order
    chosen, "steps": per step the chosen layer with its joint loss_delta, key_logp_drop, key_acc
    and cost, "base": the teacher's values}.
    """
    L = model.cfg.num_hidden_layers
    if not 1 <= count <= L:
        raise ValueError(f"count={count} must lie in [1, {L}] (the model's layers)")
    if not key_weight >= 0:
        raise ValueError(f"key_weight={key_weight} must be >= 0")
    if single is not None:
        if (single["window"], single["sinks"]) != (window, sinks) or single["loss_delta"] is None \
                or (prompts and single["key_logp_drop"] is None):
            raise ValueError("single: a probe_layers result with the same window, sinks, windows and prompts")
        base = dict(single["base"])
    else:
        s, n = _nll_sum(model, text_windows, [], batch_size)
        base = {"loss": s / n}
        base["key_logp"], base["key_acc"] = _key_scores(model, prompts, []) if prompts else (0.0, 1.0)
    chosen: list[int] = []
    steps: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm
        total = sum(L - j for j in range(1 if single is not None else 0, count))
        bar = tqdm(total=total, desc="greedy probe", unit="pass", dynamic_ncols=True)

    def measure(c: int) -> dict:
        if not chosen and single is not None:
            return {"layer": c, "loss_delta": single["loss_delta"][c],
                    "key_logp_drop": single["key_logp_drop"][c] if prompts else 0.0,
                    "key_acc": single["key_acc"][c] if prompts else 1.0}
        dl, restore = _with_probe(model, chosen + [c], window, sinks)
        try:
            s, n = _nll_sum(model, text_windows, dl, batch_size)
            logp, acc = _key_scores(model, prompts, dl) if prompts else (0.0, 1.0)
        finally:
            restore()
        if bar is not None:
            bar.update()
        return {"layer": c, "loss_delta": s / n - base["loss"], "key_logp_drop": base["key_logp"] - logp,
                "key_acc": acc}

    for _ in range(count):
        best = None
        for c in range(L):
            if c in chosen:
                continue
            m = measure(c)
            m["cost"] = m["loss_delta"] + key_weight * m["key_logp_drop"]
            if m["cost"] != m["cost"]:  # NaN: not a cost to compare
                raise ValueError(f"layer {c} with layers {chosen} restricted gave a NaN cost ({m}): "
                                 "check the model's dtype and the probe's inputs")
            if best is None or m["cost"] < best["cost"]:
                best = m
        chosen.append(best["layer"])
        steps.append(best)
        if bar is not None:
            bar.set_postfix(layers=len(chosen), key_acc=f"{best['key_acc']:.2f}")
    if bar is not None:
        bar.close()
    return {"order": chosen, "steps": steps, "base": base, "window": window, "sinks": sinks,
            "key_weight": key_weight}


def retrieval_aware_order(loss_delta: Sequence[float], key_logp_drop: Sequence[float],
                          protect: int) -> list[int]:
    """Layers by measured loss cost, ascending, except that the ``protect`` layers whose local
    restriction costs the passkey most go last (in ascending order of that cost)."""
    L = len(loss_delta)
    if not 0 <= protect <= L:
        raise ValueError(f"protect={protect} must lie in [0, {L}]")
    by_key = sorted(range(L), key=lambda i: (key_logp_drop[i], i))
    kept = set(by_key[L - protect:]) if protect else set()
    head = sorted((i for i in range(L) if i not in kept), key=lambda i: (loss_delta[i], i))
    tail = sorted(kept, key=lambda i: (key_logp_drop[i], i))
    return head + tail
