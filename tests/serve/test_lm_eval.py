"""lm-evaluation-harness's loglikelihood path against the server, checked with the in-process scorer.

lm_eval's ``local-completions`` model sends each (context + continuation) as token ids with
``echo=true, logprobs=1, max_tokens=1, temperature=0`` and sums ``token_logprobs[ctxlen:-1]``:
it counts on one entry per prompt token plus exactly one for the generated token, including when
that token is EOS. The end-to-end test runs the real `lm_eval` CLI (skipped when lm-eval is not
installed: ``pip install -e '.[lmeval]'``) on the local task in scripts/lm_eval_task.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.serve.conftest import VOCAB, serve_in_thread

MODEL = "tiny"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lm_eval_check.py"
QUESTIONS = [("Question: What is the capital of France?\nAnswer:", [" Paris", " Berlin", " Rome"]),
             ("The quick brown fox", [" jumps over the lazy dog.", " sleeps", " runs away quickly"])]


def load_check():
    spec = importlib.util.spec_from_file_location("lm_eval_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("every_token_is_eos", [False, True], ids=["normal", "eos-after-prompt"])
def test_lm_eval_payload_scores_the_continuation(serve_model, serve_tok, every_token_is_eos):
    """lm_eval's request and slicing rule give the in-process scorer's log-likelihoods, also when
    the greedy token after the prompt ends the request (it must still get its logprob entry)."""
    from fastapi.testclient import TestClient

    from dsla.eval.mc import MCItem, score_items
    from dsla.serve.api import create_app
    from dsla.serve.engine import Engine
    from dsla.serve.runner import ModelRunner

    check = load_check()
    eos = range(VOCAB) if every_token_is_eos else ()
    engine = Engine(ModelRunner(serve_model), serve_tok, extra_eos_ids=eos).start()
    try:
        client = TestClient(create_app(engine, MODEL))
        for context, choices in QUESTIONS:
            pairs = [check.encode_pair(serve_tok.encode, context, c) for c in choices]
            item = MCItem(tuple(pairs[0][0]), tuple(tuple(x) for _, x in pairs), (1,) * len(pairs),
                          (True,) + (False,) * (len(pairs) - 1))
            want = score_items(serve_model, [item])[0]
            for (ctx, cont), w in zip(pairs, want):
                r = client.post("/v1/completions", json={"model": MODEL, "prompt": [ctx + cont], "temperature": 0,
                                                         "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
                assert r.status_code == 200, r.text
                ch = r.json()["choices"][0]
                lp = ch["logprobs"]["token_logprobs"]
                assert len(lp) == len(ctx) + len(cont) + 1 and lp[0] is None
                assert ch["finish_reason"] == ("stop" if every_token_is_eos else "length")
                assert sum(lp[len(ctx):-1]) == pytest.approx(w, abs=1e-4)
                assert all(t is None or len(t) == 1 for t in ch["logprobs"]["top_logprobs"])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("every_token_is_eos", [False, True], ids=["normal", "eos-after-prompt"])
def test_lm_eval_agrees_with_in_process_scorer(serve_dir, serve_model, serve_tok, every_token_is_eos):
    """lm_eval's local-completions model (its Python API: the CLI would first spend ~15 s indexing
    every built-in task) on the local task, through a real uvicorn: the same per-choice
    log-likelihoods (to float32 noise), picks and accuracy as ``dsla.eval.mc``."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lmeval]'")
    for mod in ("tenacity", "aiohttp", "requests"):
        pytest.importorskip(mod, reason="lm-eval's API models need lm-eval[api]: pip install -e '.[lmeval]'")
    from dsla.eval.mc import score_items
    from dsla.serve.api import create_app
    from dsla.serve.engine import Engine
    from dsla.serve.runner import ModelRunner

    check = load_check()
    engine = Engine(ModelRunner(serve_model), serve_tok, extra_eos_ids=range(VOCAB) if every_token_is_eos else ())
    url, stop = serve_in_thread(create_app(engine.start(), MODEL))
    try:
        results, samples = check.evaluate_in_process(url, MODEL, serve_dir)
    finally:
        stop()
        engine.shutdown()
    assert len(samples) == 32
    items = check.build_items(samples, serve_tok.encode)
    report = check.compare(samples, results, items, score_items(serve_model, items))
    assert report["n_choices"] == sum(len(it.continuations) for it in items) == 127
    assert report["loglik_max_abs_diff"] < 1e-4, report
    assert report["picks_agree"] == 32
    assert report["acc_lm_eval"] == report["acc_in_process"] == report["acc_from_samples"]
    assert report["acc_norm_lm_eval"] == report["acc_norm_in_process_lm_eval_rule"]
    assert check.hf_tokenizer_mismatches(serve_dir, samples, serve_tok.encode) == 0
