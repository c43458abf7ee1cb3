"""A stand-in for dsla/bench/llamacpp_worker.py speaking the same protocol, without llama.cpp.

Run as a script by tests/bench/test_llamacpp.py. It checks what a real worker would reject
(decode before fork, wrong batch, prompts too long for the context) and reports fake timings
that grow with the tokens processed. ``FAKE_FAIL_ON=op`` makes that op kill the process.
"""

import json
import os
import sys

N_VOCAB, N_LAYER = 97, 2
state = {"n_seq": None, "positions": [], "n_ctx_seq": 0}


def handle(msg):
    op = msg.pop("op")
    if op == os.environ.get("FAKE_FAIL_ON"):
        sys.stderr.write(f"fake worker: dying on {op}\n")
        sys.exit(3)
    if op == "load":
        if not os.path.exists(msg["model"]):
            raise FileNotFoundError(msg["model"])
        return {"n_vocab": N_VOCAB, "n_layer": N_LAYER, "n_ctx_train": 64, "version": "fake", "system_info": "",
                "rss_mb": 1.0}
    if op == "prefill":
        assert all(0 <= t < N_VOCAB for t in msg["tokens"])
        n = len(msg["tokens"])
        return {"wall_s": 1e-4 * n, "cpu_s": 2e-4 * n, "peak_rss_mb": 10.0, "rise_mb": 1.0}
    if op == "fork":
        if len(msg["tokens"]) >= msg["n_ctx_seq"]:
            raise ValueError("prompt longer than the context")
        state.update(n_seq=msg["n_seq"], positions=[len(msg["tokens"])] * msg["n_seq"], n_ctx_seq=msg["n_ctx_seq"])
        return {"setup_mb": 5.0}
    if op == "decode":
        if state["n_seq"] != len(msg["tokens"]):
            n = len(msg["tokens"])
            raise ValueError(f"decode of {n} tokens needs a fork with n_seq={n} first")
        state["positions"] = [p + 1 for p in state["positions"]]
        if max(state["positions"]) > state["n_ctx_seq"]:
            raise ValueError("context full")
        return {"wall_s": 1e-3 * len(msg["tokens"]), "cpu_s": 2e-3, "peak_rss_mb": 12.0, "rise_mb": 0.5}
    raise ValueError(f"unknown op {op!r}")


for line in sys.stdin:
    msg = json.loads(line)
    if msg["op"] == "quit":
        break
    try:
        reply = {"ok": True, **handle(msg)}
    except Exception as e:
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
