"""Checks on the real prepared corpora (marked ``teacher``; skipped when not prepared)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dsla.data.corpora import ALL_CORPORA, EVAL_CORPORA, SPLITS, corpus_dir, load_documents, load_texts, summary
from dsla.paths import default_teacher_dir

from .conftest import REAL_HOME

TEACHER = default_teacher_dir(REAL_HOME)
pytestmark = [
    pytest.mark.teacher,
    pytest.mark.skipif(
        not all((corpus_dir(TEACHER, c, REAL_HOME) / "manifest.json").is_file() for c in ALL_CORPORA),
        reason=f"corpora not prepared in {REAL_HOME}",
    ),
]


def test_counts_match_manifest_and_tokens_decode_back():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TEACHER / "tokenizer.json"))
    stats = summary(TEACHER, REAL_HOME)
    for corpus in ALL_CORPORA:
        for split in SPLITS:
            if corpus in EVAL_CORPORA and split == "train":
                assert stats[corpus][split]["documents"] == 0  # evaluation only
                continue
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


def test_techdocs_has_no_rst_markup_left():
    # pages whose code blocks show reStructuredText or test-runner output (==== rules), on purpose
    shows_markup = {"internals/contributing/writing-documentation.txt", "internals/howto-release-django.txt",
                    "internals/contributing/writing-code/submitting-patches.txt", "intro/contributing.txt",
                    "intro/reusable-apps.txt", "intro/tutorial05.txt", "topics/testing/overview.txt"}
    bad = re.compile(r":(class|meth|doc|ref|setting|attr|func):`|^\s*\.\. [a-z-]+::|^=====+$", re.M)
    for split in ("validation", "test"):
        path = corpus_dir(TEACHER, "techdocs", REAL_HOME) / f"{split}.jsonl"
        for row in map(json.loads, path.open(encoding="utf-8")):
            if row["id"] not in shows_markup:
                assert not bad.search(row["text"]), (row["id"], bad.search(row["text"]))
