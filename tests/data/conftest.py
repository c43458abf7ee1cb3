"""Fixtures for dsla.data: an isolated cache home and a tiny tokenizer built in the test.

Every test here runs with ``DSLA_HOME`` pointing into ``tmp_path``, so nothing reads or
writes the user's real cache; tests marked ``teacher`` read the real cache (never write it)
and skip when it is absent.
"""

from __future__ import annotations

import pytest

from dsla.paths import dsla_home

REAL_HOME = dsla_home()  # evaluated before any test changes DSLA_HOME

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "to be or not to be that is the question",
    "all the world is a stage and all the men and women merely players",
]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, request):
    """Point DSLA_HOME at an empty temporary directory (unless the test is marked teacher)."""
    if request.node.get_closest_marker("teacher") is None:
        home = tmp_path / "dsla_home"
        monkeypatch.setenv("DSLA_HOME", str(home))
        return home
    return None


@pytest.fixture
def tiny_teacher(tmp_path):
    """A directory holding only a tokenizer.json: a WordLevel tokenizer trained on SENTENCES."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path / "tiny-teacher"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path
