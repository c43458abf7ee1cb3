"""Incremental detokenising (DecodeStream) equals decoding the whole output; stop strings are held back."""

from __future__ import annotations

import pytest

from dsla.serve.detokenize import Detokenizer
from tests.serve.conftest import SENTENCES


@pytest.mark.parametrize("text", SENTENCES + ["Caf\u00e9 \u00e9\u00e9 \u4f60\u597d \U0001F600 end"])
def test_deltas_join_to_the_whole_decode(serve_tok, text):
    ids = serve_tok.encode(text)
    for split in (1, len(ids) // 2):
        prompt, out = ids[:split], ids[split:]
        d = Detokenizer(serve_tok, prompt)
        got = "".join(d.push(t) for t in out) + d.flush()
        assert got == serve_tok.decode(ids)[len(serve_tok.decode(prompt)):], (text, split)


def test_a_stop_string_is_held_back_and_cut(serve_tok):
    ids = serve_tok.encode("The quick brown fox jumps over the lazy dog.")
    d = Detokenizer(serve_tok, ids[:1], stop=("fox",))
    pieces = []
    for t in ids[1:]:
        pieces.append(d.push(t))
        if d.stopped:
            break
    assert d.stopped and "".join(pieces) + d.flush() == " quick brown "
    assert all("f" not in p for p in pieces[:-1])  # no prefix of the stop string left early


def test_unknown_ids_do_not_raise(serve_tok):
    d = Detokenizer(serve_tok, [5])
    for t in (serve_tok.vocab_size + 3, 6, 7):
        d.push(t)
    d.flush()
