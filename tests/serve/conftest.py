"""Fixtures for the serving tests: a tiny random Llama with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from tests.conftest import make_bpe_tokenizer_dir, make_tiny_hf_dir

VOCAB = 320  # 256 bytes + specials + a few merges; the tiny model's vocab matches
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A hybrid model mixes softmax attention with linear attention layers.",
    "Serving many requests at once needs continuous batching and a memory budget.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9: bytes that span several tokens must decode cleanly.",
    "Numbers 12345 and symbols #@! appear in text too.",
]


def make_tokenizer_dir(path) -> None:
    """A byte-level BPE trained on a few sentences, with the chat template."""
    make_bpe_tokenizer_dir(path, SENTENCES * 4, VOCAB)


@pytest.fixture(scope="session")
def serve_dir(tmp_path_factory):
    """A tiny Llama (3 layers, vocab 320) with a real tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny_serve")
    make_tiny_hf_dir(path, vocab_size=VOCAB)
    make_tokenizer_dir(path)
    return path


@pytest.fixture(scope="session")
def serve_model(serve_dir):
    from dsla.model.loading import load_teacher

    return load_teacher(serve_dir)


@pytest.fixture(scope="session")
def serve_tok(serve_dir):
    from dsla.model.tokenizer import Tokenizer

    return Tokenizer(serve_dir)


def make_engine(model, tok, dsla_layers=(), start=True, **config):
    from dsla.serve.engine import Engine
    from dsla.serve.runner import ModelRunner
    from dsla.serve.scheduler import SchedulerConfig

    engine = Engine(ModelRunner(model, dsla_layers), tok, SchedulerConfig(**config))
    return engine.start() if start else engine


@pytest.fixture
def engine(serve_model, serve_tok):
    e = make_engine(serve_model, serve_tok)
    yield e
    e.shutdown()


def wait_for(cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def make_client(serve_model, serve_tok):
    """make(api_key=None, max_body_bytes=..., app_kw=None, model=None, **scheduler config) -> (TestClient,
    engine). Unexpected server exceptions come back as the app's 500 response, as a real client sees them."""
    from fastapi.testclient import TestClient

    from dsla.serve.api import create_app

    made = []

    def make(api_key=None, max_body_bytes=1 << 20, app_kw=None, model=None, **config):
        engine = make_engine(model or serve_model, serve_tok, **config)
        made.append(engine)
        app = create_app(engine, "tiny", api_key=api_key, max_body_bytes=max_body_bytes, **(app_kw or {}))
        return TestClient(app, raise_server_exceptions=False), engine

    yield make
    for e in made:
        e.shutdown()


def serve_in_thread(app):
    """Run ``app`` on uvicorn at 127.0.0.1 on an ephemeral port; return (base url, stop function)."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]

    def stop():
        srv.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop

