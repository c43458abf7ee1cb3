"""Checks on the real prepared corpora (marked ``teacher``; skipped when not prepared)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dsla.data.corpora import CORPORA, SPLITS, corpus_dir, load_documents, load_texts, summary
from dsla.paths import default_teacher_dir

from .conftest import REAL_HOME

TEACHER = default_teacher_dir(REAL_HOME)
pytestmark = [
    pytest.mark.teacher,
    pytest.mark.skipif(
        not all((corpus_dir(TEACHER, c, REAL_HOME) / "manifest.json").is_file() for c in CORPORA),
        reason=f"corpora not prepared in {REAL_HOME}",
    ),
]


def test_counts_match_manifest_and_tokens_decode_back():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TEACHER / "tokenizer.json"))
    stats = summary(TEACHER, REAL_HOME)
    for corpus in CORPORA:
        for split in SPLITS:
            docs = load_documents(TEACHER, corpus, split, REAL_HOME)
            texts = load_texts(corpus, split, TEACHER, REAL_HOME)
            assert len(docs) == len(texts) == stats[corpus][split]["documents"] >= 3
            assert sum(len(d) for d in docs) == stats[corpus][split]["tokens"]
            assert int(np.concatenate(docs).max()) < tok.get_vocab_size()
            assert tok.decode(docs[0].tolist()) == texts[0]


def test_wikipedia_has_no_markup_left():
    bad = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||<ref|<!--|</?(div|span|table|small|br)\b")
    for split in SPLITS:
        for text in load_texts("wikipedia", split, TEACHER, REAL_HOME):
            assert not bad.search(text), bad.search(text)
