"""Passkey retrieval: a random 5-digit key hidden in real text at a given depth; greedy answer.

A prompt is: an instruction, filler sentences from the test splits (prose, drawn at a random
place), the needle ``The pass key is 12345. Remember it. 12345 is the pass key.`` inserted at a
sentence boundary so that ``depth`` of the filler comes before it, more filler, and the question.
The whole prompt plus the answer fits in ``context`` tokens. ``chat`` wraps it in the tokenizer's
chat template (the default teacher is an instruct model) and starts the assistant's answer with
``The pass key is`` so the key is the next thing it says.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from dsla.eval.common import progress, token_batches
from dsla.model.llama import HybridLM

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will ask you about it.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the 5-digit pass key hidden in the text above?"
ANSWER_START = "The pass key is"
CONTEXTS = (1024, 2048, 4096, 8192)
DEPTHS = (0.1, 0.5, 0.9)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_DIGITS = re.compile(r"\d+(?:[ ,.\-]\d+)*")


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: tuple[int, ...]
    key: str
    depth: float  # asked fraction of the filler before the needle
    needle_start: int  # token index where the needle begins (the achieved depth is this / len)


def filler_sentences(texts: Iterable[str], encode: Callable[[str], list[int]],
                     max_tokens: int = 200) -> list[tuple[str, int]]:
    """(sentence, token count) of real text, in order, without anything that looks like a key
    (5+ digit numbers, 'pass key') and without overlong runs (tables, lists)."""
    out = []
    for text in texts:
        for s in _SENTENCE_END.split(text):
            s = " ".join(s.split())
            if not s or re.search(r"\d{5}|pass ?key", s, re.I):
                continue
            n = len(encode(" " + s))
            if n <= max_tokens:
                out.append((s, n))
    if not out:
        raise ValueError("no usable filler sentences: the filler texts are empty")
    return out


def parse_key(text: str) -> str | None:
    """The first number in ``text`` with separators between digits removed ('1 2 3 4 5',
    '12,345', '**12345**.' -> '12345'); None when there is none."""
    m = _DIGITS.search(text)
    return None if m is None else re.sub(r"\D", "", m.group())


class PasskeyBuilder:
    """Builds prompts within a token budget from a filler sentence list and a tokenizer."""

    def __init__(self, tokenizer, sentences: Sequence[tuple[str, int]], chat: bool = True,
                 answer_tokens: int = 12) -> None:
        self.tok, self.sentences, self.chat, self.answer_tokens = tokenizer, list(sentences), chat, answer_tokens

    def render(self, before: Sequence[str], needle: str, after: Sequence[str]) -> tuple[str, str]:
        """(text before the needle, the rest: " " + needle, filler, question, answer start)."""
        head = INSTRUCTION + "\n\n" + " ".join(before)
        tail = " ".join(after) + "\n\n" + QUESTION
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": head + " " + needle + " " + tail}])
            cut = text.index(" " + needle)
            return text[:cut], text[cut:] + ANSWER_START
        return head, " " + needle + " " + tail + " " + ANSWER_START

    def build(self, context: int, depth: float, key: str, rng: np.random.Generator) -> PasskeyPrompt:
        """A prompt of at most ``context - answer_tokens`` tokens with the needle at ``depth``
        of the filler (the nearest sentence boundary)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside [0, 1]")
        needle = NEEDLE.format(key=key)
        limit = context - self.answer_tokens
        a, b = self.render([], needle, [])
        budget = limit - len(self.tok.encode(a)) - len(self.tok.encode(b))
        if budget <= 0:
            raise ValueError(f"context {context} is too short for the passkey prompt itself")
        n_sent = len(self.sentences)
        start = int(rng.integers(n_sent))
        chosen, total = [], 0
        while len(chosen) < n_sent:  # consecutive sentences from a random place, wrapping around
            s, n = self.sentences[(start + len(chosen)) % n_sent]
            if total + n > budget:
                break
            chosen.append((s, n))
            total += n
        while True:
            bounds = np.cumsum([0] + [n for _, n in chosen])  # token offset of each sentence boundary
            split = int(np.argmin(np.abs(bounds - depth * bounds[-1])))
            pre, post = self.render([s for s, _ in chosen[:split]], needle, [s for s, _ in chosen[split:]])
            pre_ids, post_ids = self.tok.encode(pre), self.tok.encode(post)
            if len(pre_ids) + len(post_ids) <= limit or not chosen:
                break
            chosen = chosen[:-1]  # joined text tokenised a little longer than the estimate
        return PasskeyPrompt(tuple(pre_ids + post_ids), key, depth, len(pre_ids))


def random_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10000, 100000)))


def build_trials(builder: PasskeyBuilder, contexts: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int) -> dict[tuple[int, float], list[PasskeyPrompt]]:
    """``trials`` prompts per (context, depth) cell, each with its own key and filler place."""
    out = {}
    for c in contexts:
        for d in depths:
            rng = np.random.default_rng([seed, c, int(round(d * 1000))])
            out[(c, d)] = [builder.build(c, d, random_key(rng), rng) for _ in range(trials)]
    return out


@torch.no_grad()
def greedy_answers(model: HybridLM, prompts: Sequence[Sequence[int]], max_new: int, stop_ids: Iterable[int],
                   dsla_layers: Iterable[int] = (), max_batch_tokens: int = 8192) -> list[list[int]]:
    """Greedy continuations (up to ``max_new`` tokens, stopping at a stop id) of each prompt,
    prefilled in groups of at most ``max_batch_tokens`` and decoded together."""
    stop, layers = set(stop_ids), list(dsla_layers)
    out: list[list[int]] = []
    for group in token_batches([len(p) for p in prompts], max_batch_tokens):
        ps = [prompts[i] for i in group]
        caches = [model.new_cache(layers) for _ in ps]
        lens = [len(p) for p in ps]
        ids = torch.tensor([t for p in ps for t in p])
        logits = model(ids, lens, caches, logits_for=torch.tensor(lens).cumsum(0) - 1)  # (R, vocab)
        gen: list[list[int]] = [[] for _ in ps]
        live = list(range(len(ps)))
        for step in range(max_new):
            nxt = logits.argmax(-1).tolist()
            kept = [(r, t) for r, t in zip(live, nxt) if t not in stop]
            for r, t in kept:
                gen[r].append(t)
            live = [r for r, _ in kept]
            if not live or step == max_new - 1:
                break
            logits = model(torch.tensor([t for _, t in kept]), [1] * len(kept), [caches[r] for r in live])
        out += gen
    return out


def run_passkey(model: HybridLM, tokenizer, trials: dict[tuple[int, float], list[PasskeyPrompt]],
                dsla_layers: Iterable[int] = (), stop_ids: Iterable[int] = (), max_new: int = 10,
                show_progress: bool = False, examples: int = 3, previous: dict | None = None,
                on_cell: Callable[[dict], None] | None = None) -> dict:
    """Accuracy per (context, depth) cell as a context x depth grid (also the achieved needle
    position and seconds per cell), plus a few wrong answers.

    ``previous``: a partial (or whole) result of the same trials, e.g. from an interrupted run; its
    finished cells (n equal to the cell's trials) are kept, not recomputed. ``on_cell`` gets the
    result so far (``"complete": False`` until the last cell) after each computed cell, so a
    caller can save it.
    """
    contexts = sorted({c for c, _ in trials})
    depths = sorted({d for _, d in trials})
    acc = [[float("nan")] * len(depths) for _ in contexts]
    n = [[0] * len(depths) for _ in contexts]
    achieved = [[0.0] * len(depths) for _ in contexts]
    seconds = [[0.0] * len(depths) for _ in contexts]
    wrong: list[dict] = []
    result = {"contexts": contexts, "depths": depths, "acc": acc, "n": n, "needle_position": achieved,
              "seconds": seconds, "wrong_examples": wrong}
    todo = []
    for (c, d), ps in trials.items():
        i, j = contexts.index(c), depths.index(d)
        if previous is not None and _finished(previous, c, d, len(ps)):
            pi, pj = previous["contexts"].index(c), previous["depths"].index(d)
            for key in ("acc", "n", "needle_position", "seconds"):
                result[key][i][j] = previous[key][pi][pj]
            wrong += [w for w in previous["wrong_examples"] if (w["context"], w["depth"]) == (c, d)]
        else:
            todo.append((c, d))
    layers = list(dsla_layers)
    for c, d in progress(todo, "passkey", enabled=show_progress, unit="cell"):
        ps = trials[(c, d)]
        t0 = time.time()
        answers = greedy_answers(model, [p.ids for p in ps], max_new, stop_ids, layers)
        texts = [tokenizer.decode(a) for a in answers]
        ok = [parse_key(t) == p.key for t, p in zip(texts, ps)]
        i, j = contexts.index(c), depths.index(d)
        acc[i][j], n[i][j] = sum(ok) / len(ok), len(ok)
        achieved[i][j] = float(np.mean([p.needle_start / len(p.ids) for p in ps]))
        seconds[i][j] = round(time.time() - t0, 1)
        wrong += [{"context": c, "depth": d, "key": p.key, "answer": t}
                  for t, p, good in zip(texts, ps, ok) if not good][:examples]
        if on_cell is not None and (c, d) != todo[-1]:
            on_cell(result | {"complete": False, "mean_acc": float(np.nanmean(acc))})
    order = {(c, d): k for k, (c, d) in enumerate((c, d) for c in contexts for d in depths)}
    wrong.sort(key=lambda w: order[(w["context"], w["depth"])])  # the same order resumed or not
    return result | {"mean_acc": float(np.nanmean(acc))}


def _finished(previous: dict, context: int, depth: float, trials: int) -> bool:
    """Whether ``previous`` holds a finished cell (context, depth) of ``trials`` trials."""
    if context not in previous.get("contexts", ()) or depth not in previous.get("depths", ()):
        return False
    return previous["n"][previous["contexts"].index(context)][previous["depths"].index(depth)] == trials
