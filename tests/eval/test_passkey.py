"""Passkey prompts: the key sits at the asked depth within the budget; answers parse robustly;
batched greedy decoding equals the plain generation loop."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dsla.eval import passkey as pk
from dsla.generate import generate
from dsla.sampling import SamplingParams

from .conftest import sentence


@pytest.fixture(scope="module")
def sentences(eval_tok):
    rng = random.Random(7)
    return pk.filler_sentences([" ".join(sentence(rng) for _ in range(200))], eval_tok.encode)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("context", [256, 480])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_is_placed_at_the_asked_depth(eval_tok, sentences, chat, context, depth):
    builder = pk.PasskeyBuilder(eval_tok, sentences, chat=chat, answer_tokens=12)
    p = builder.build(context, depth, "40917", np.random.default_rng(0))
    longest = max(n for _, n in sentences)
    assert context - 12 - 2 * longest - 8 <= len(p.ids) <= context - 12
    text = eval_tok.decode(p.ids, skip_special_tokens=False)
    assert text.count("40917") == 2 and text.endswith(pk.ANSWER_START)
    needle = text.index(" " + pk.NEEDLE.format(key="40917"))
    start = text.index(pk.INSTRUCTION) + len(pk.INSTRUCTION) + 2
    end = text.index("\n\n" + pk.QUESTION)
    filler = (end - start) - len(pk.NEEDLE.format(key="40917")) - 1
    before = needle - start
    longest_chars = max(len(s) for s, _ in sentences) + 1
    assert abs(before - depth * filler) <= longest_chars / 2 + 2
    assert p.needle_start == len(eval_tok.encode(text[:needle]))


def test_trials_are_reproducible_and_vary(eval_tok, sentences):
    builder = pk.PasskeyBuilder(eval_tok, sentences)
    a = pk.build_trials(builder, [256], [0.5], 6, seed=1)
    assert a == pk.build_trials(builder, [256], [0.5], 6, seed=1)
    ps = a[(256, 0.5)]
    assert len({p.key for p in ps}) > 1 and len({p.ids[40:60] for p in ps}) > 1
    assert all(len(p.key) == 5 for p in ps)
    assert pk.build_trials(builder, [256], [0.5], 6, seed=2) != a


@pytest.mark.parametrize("said,key", [
    ("12345", "12345"), (" 12345.", "12345"), ("The pass key is **12345**!", "12345"),
    ("1 2 3 4 5", "12345"), ("12,345 is it", "12345"), ("key: 12345 and 67890", "12345"),
    ("123456", "123456"), ("no digits here", None), ("", None), (" 0042 1", "00421"),
])
def test_parse_key(said, key):
    assert pk.parse_key(said) == key


def test_filler_drops_key_like_sentences(eval_tok):
    got = pk.filler_sentences(["A year 12345 here. The pass key is not this. Plain words stay.\nNew line too"],
                              eval_tok.encode)
    assert [s for s, _ in got] == ["Plain words stay.", "New line too"]
    with pytest.raises(ValueError, match="no usable filler"):
        pk.filler_sentences(["99999."], eval_tok.encode)


def test_context_too_short_is_an_error(eval_tok, sentences):
    with pytest.raises(ValueError, match="too short"):
        pk.PasskeyBuilder(eval_tok, sentences).build(40, 0.5, "12345", np.random.default_rng(0))


def test_batched_greedy_equals_generate(tiny_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in (9, 30, 17, 30)]
    stop = {5, 7}
    got = pk.greedy_answers(tiny_model, prompts, max_new=8, stop_ids=stop, max_batch_tokens=50)
    for p, g in zip(prompts, got):
        want = list(generate(tiny_model, p, SamplingParams(temperature=0.0, max_tokens=8), stop_ids=stop))
        assert g == want


def test_run_passkey_grid(eval_teacher, eval_tok, sentences):
    from dsla.model.loading import load_teacher

    model = load_teacher(eval_teacher)
    trials = pk.build_trials(pk.PasskeyBuilder(eval_tok, sentences), [128, 256], [0.1, 0.9], 2, seed=0)
    r = pk.run_passkey(model, eval_tok, trials, stop_ids={2}, max_new=4)
    assert r["contexts"] == [128, 256] and r["depths"] == [0.1, 0.9]
    assert np.array(r["acc"]).shape == (2, 2) and r["n"] == [[2, 2], [2, 2]]
    assert r["needle_position"][0][0] < r["needle_position"][0][1]
