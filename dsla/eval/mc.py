"""Multiple choice by log-likelihood: score every choice as a continuation of the question.

Zero-shot, in each BIG-bench task's own prompt format (task prefix, input/output prefixes,
choices appended to the input when the task asks for it). The choices are shown and scored in
an order shuffled per example from the seed, so neither the listing nor argmax's tie-break
favours the file's order (several tasks list the answer first). ``acc`` picks the choice with
the highest summed log-probability; ``acc_norm`` divides it by the choice's length in UTF-8
bytes first (so long answers are not penalised for having more tokens).

Each question's prompt runs once; its cache is then forked once per choice and all choices of
a group of questions run as one flattened batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsla.data.bigbench import MCExample, MCTask
from dsla.eval.common import fork_cache, progress, token_batches, wilson_interval
from dsla.model.llama import HybridLM


@dataclass(frozen=True)
class MCItem:
    """One tokenised question: a shared context and one continuation per (shuffled) choice."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    nbytes: tuple[int, ...]  # UTF-8 length of each continuation's text, for acc_norm
    correct: tuple[bool, ...]  # whether each choice has the example's top score


def format_example(task: MCTask, ex: MCExample, rng: np.random.Generator) -> tuple[str, list[str], list[bool]]:
    """(context text, continuation texts, correct flags) of one example, choices shuffled.

    Whitespace that ends the prompt moves to the front of each continuation (``"...\\nA:"`` +
    ``" Find somewhere to go"``), so the tokeniser sees the word boundary inside the choice.
    """
    order = rng.permutation(len(ex.choices))
    choices = [ex.choices[i].strip() for i in order]
    best = max(ex.scores)
    correct = [ex.scores[i] == best for i in order]
    text = ex.input
    if task.append_choices_to_input:
        text += task.choice_prefix + task.choice_prefix.join(choices)
    prompt = task.task_prefix + task.input_prefix + text + task.output_prefix
    context = prompt.rstrip()
    sep = prompt[len(context):] or " "
    return context, [sep + c for c in choices], correct


def build_items(task: MCTask, encode, limit: int | None, seed: int) -> list[MCItem]:
    """Tokenised items of a task: all examples, or ``limit`` of them drawn with the seed."""
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    idx = rng.permutation(len(task.examples))
    if limit is not None:
        idx = np.sort(idx[:limit])
    items = []
    for i in idx:
        ctx, conts, correct = format_example(task, task.examples[i], rng)
        items.append(MCItem(tuple(encode(ctx)), tuple(tuple(encode(c)) for c in conts),
                            tuple(len(c.encode()) for c in conts), tuple(correct)))
    return items


@torch.no_grad()
def score_items(model: HybridLM, items: Sequence[MCItem], dsla_layers: Iterable[int] = (),
                max_tokens: int = 2048, show_progress: bool = False, desc: str = "mc") -> list[list[float]]:
    """Summed log p(continuation | context) of every choice of every item, in nats.

    Items are grouped up to ``max_tokens`` (contexts plus all continuations) per pair of forwards:
    the contexts with fresh caches, then every continuation on a fork of its item's cache.
    """
    layers = list(dsla_layers)
    sizes = [len(it.context) + sum(len(c) for c in it.continuations) for it in items]
    out: list[list[float]] = []
    groups = token_batches(sizes, max_tokens)
    for group in progress(groups, desc, enabled=show_progress, unit="batch"):
        its = [items[i] for i in group]
        if any(not it.context or not all(it.continuations) for it in its):
            raise ValueError("an item has an empty context or continuation")
        caches = [model.new_cache(layers) for _ in its]
        lens = [len(it.context) for it in its]
        ids = torch.tensor([t for it in its for t in it.context])
        last = torch.tensor(lens).cumsum(0) - 1
        first = F.log_softmax(model(ids, lens, caches, logits_for=last).float(), -1)  # (R, vocab)
        forks, cont_ids, cont_lens, owner = [], [], [], []
        for r, it in enumerate(its):
            for c in it.continuations:
                forks.append(fork_cache(caches[r], len(c)))
                cont_ids += c
                cont_lens.append(len(c))
                owner.append(r)
        del caches
        # Logits at every continuation token but the last predict the next continuation token.
        starts = np.concatenate([[0], np.cumsum(cont_lens)])
        want = [p for j, L in enumerate(cont_lens) for p in range(starts[j], starts[j] + L - 1)]
        lp_rest = None
        if want:
            logits = model(torch.tensor(cont_ids), cont_lens, forks, logits_for=torch.tensor(want))
            lp_rest = F.log_softmax(logits.float(), -1)  # (M, vocab)
        del forks
        targets = torch.tensor(cont_ids)
        scores: list[list[float]] = [[] for _ in its]
        row = 0
        for j, L in enumerate(cont_lens):
            s = float(first[owner[j], cont_ids[starts[j]]])
            if L > 1:
                tgt = targets[starts[j] + 1: starts[j] + L]
                s += float(lp_rest[row: row + L - 1].gather(1, tgt[:, None]).sum())
                row += L - 1
            scores[owner[j]].append(s)
        out += scores
    return out


def mc_metrics(items: Sequence[MCItem], scores: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm with 95% Wilson intervals, n, and the chance level of the items."""
    hits = hits_norm = 0
    chance = 0.0
    for it, s in zip(items, scores):
        s = np.asarray(s, dtype=np.float64)
        hits += it.correct[int(np.argmax(s))]
        hits_norm += it.correct[int(np.argmax(s / np.asarray(it.nbytes)))]
        chance += sum(it.correct) / len(it.correct)
    n = len(items)
    return {"n": n, "acc": hits / n if n else float("nan"), "acc_ci": list(wilson_interval(hits, n)),
            "acc_norm": hits_norm / n if n else float("nan"), "acc_norm_ci": list(wilson_interval(hits_norm, n)),
            "chance": chance / n if n else float("nan")}


def run_mc(model: HybridLM, items_by_task: dict[str, list[MCItem]], dsla_layers: Iterable[int] = (),
           show_progress: bool = False) -> dict[str, dict]:
    """``{task: mc_metrics}`` for every prepared task."""
    layers = list(dsla_layers)
    return {name: mc_metrics(items, score_items(model, items, layers, show_progress=show_progress,
                                                 desc=f"mc {name}"))
            for name, items in items_by_task.items()}
