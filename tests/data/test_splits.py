"""The deterministic document split."""

from __future__ import annotations

import pytest

from dsla.data.corpora import SPLITS, assign_splits

IDS = [f"doc-{i}" for i in range(200)]


def test_split_is_deterministic_and_order_independent():
    a = assign_splits("wikipedia", IDS, (0.05, 0.05))
    b = assign_splits("wikipedia", IDS, (0.05, 0.05))
    assert a == b
    reversed_labels = assign_splits("wikipedia", IDS[::-1], (0.05, 0.05))
    assert dict(zip(IDS, a)) == dict(zip(IDS[::-1], reversed_labels))


def test_every_document_in_exactly_one_split_with_expected_sizes():
    labels = assign_splits("lee", IDS, (0.05, 0.1))
    assert len(labels) == len(IDS) and set(labels) <= set(SPLITS)
    assert labels.count("validation") == 10 and labels.count("test") == 20
    assert labels.count("train") == 170


def test_small_corpus_gets_minimum_eval_documents():
    ids = [f"play-{i}" for i in range(12)]
    labels = assign_splits("shakespeare", ids, (0.1, 0.1), min_eval_docs=3)
    assert labels.count("validation") == 3 and labels.count("test") == 3


def test_split_depends_on_corpus_name():
    assert assign_splits("lee", IDS, (0.1, 0.1)) != assign_splits("wikipedia", IDS, (0.1, 0.1))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not unique"):
        assign_splits("lee", ["a", "a", "b"], (0.1, 0.1))
    with pytest.raises(ValueError, match="training set"):
        assign_splits("lee", ["a", "b", "c", "d", "e", "f"], (0.1, 0.1), min_eval_docs=3)
