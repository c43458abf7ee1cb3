"""Fixtures for the evaluation tests: a tiny Llama with a byte-level BPE tokenizer and chat
template, corpora of generated text prepared into a temporary DSLA_HOME, and tiny students."""

from __future__ import annotations

import random

import pytest

from tests.conftest import make_bpe_tokenizer_dir, make_tiny_hf_dir

VOCAB = 1000
WORDS = ("river stone light green quiet market letter winter garden paper window silver "
         "morning harbour engine castle forest question").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."


def document(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def write_tokenizer(path) -> None:
    """A byte-level BPE trained on generated text and the passkey prompt's words, with the chat template."""
    from dsla.eval import passkey as pk

    rng = random.Random(0)
    prompt = " ".join([pk.INSTRUCTION, pk.NEEDLE, pk.QUESTION, pk.ANSWER_START, "system user assistant"])
    make_bpe_tokenizer_dir(path, [document(rng, 5) for _ in range(20)] + [prompt] * 20, VOCAB)


@pytest.fixture(scope="session")
def eval_home(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_home")


@pytest.fixture(scope="session")
def eval_teacher(tmp_path_factory, eval_home):
    """A tiny Llama (3 layers, vocab 1000, context 512) whose corpora (the evaluation-only ones too)
    are prepared in eval_home."""
    from dsla.data.corpora import ALL_CORPORA, prepare_corpus
    from dsla.data.sources import Document

    path = tmp_path_factory.mktemp("eval_teacher")
    make_tiny_hf_dir(path, vocab_size=VOCAB)
    write_tokenizer(path)
    rng = random.Random(1)
    for c in ALL_CORPORA:
        docs = [Document(f"{c}{i}", document(rng, 25)) for i in range(12)]  # ~1.5k characters each
        prepare_corpus(c, path, eval_home, documents=docs)
    return path


@pytest.fixture(autouse=True)
def _home(eval_home, monkeypatch):
    monkeypatch.setenv("DSLA_HOME", str(eval_home))


@pytest.fixture(scope="session")
def eval_tok(eval_teacher):
    from dsla.model.tokenizer import Tokenizer

    return Tokenizer(eval_teacher)


def make_student(teacher_dir, out, num_states: int = 2, order=(2, 0, 1), sha: str | None = None, seed: int = 0):
    """A student artifact with untrained DSLA layers (random gates so students differ)."""
    import torch

    from dsla.config import DSLAConfig
    from dsla.distill.artifact import FORMAT, config_dict, save_student
    from dsla.model.loading import load_teacher, teacher_hash

    model = load_teacher(teacher_dir)
    cfg = DSLAConfig(num_states=num_states, feature_dim=8, chunk_size=8)
    model.add_dsla(order, cfg)
    torch.manual_seed(seed)
    for i in order:
        model.dsla[str(i)].history_gate.weight.data.normal_(0, 0.1)
    save_student(out, model, {
        "format": FORMAT, "teacher": {"name": teacher_dir.name, "path": str(teacher_dir),
                                      "sha256": sha or teacher_hash(teacher_dir)},
        "config": {"dsla": config_dict(cfg)}, "order": list(order), "layers_done": list(order)})
    return out
