"""A llama.cpp timing worker for `dsla bench decode --impl llamacpp`, run in the peer's own venv.

This file runs under ``$DSLA_HOME/peers/llamacpp/bin/python`` (see scripts/peers/): it imports
only the standard library and ``llama_cpp`` (llama-cpp-python's low-level bindings), never
``dsla`` or torch. ``dsla.bench.llamacpp`` starts it as a subprocess.

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout (stdout carries
nothing else; llama.cpp's own log goes to stderr, errors only). Every reply has ``"ok"``; a
failed command answers ``{"ok": false, "error": "..."}`` and the worker keeps serving.

- ``{"op": "load", "model": PATH, "threads": N, "flash_attn": false}`` ->
  ``{"n_vocab", "n_layer", "n_ctx_train", "version", "system_info", "rss_mb"}``
- ``{"op": "prefill", "tokens": [...]}``: clear the prefill context (one sequence, grown when a
  longer prompt comes) and decode the tokens as sequence 0, logits for the last one only. Also
  replies ``setup_mb``: what making that context added (llama.cpp allocates its KV and compute
  buffers up front, so the call itself hardly raises the RSS).
- ``{"op": "fork", "tokens": [...], "n_seq": B, "n_ctx_seq": C}``: a fresh decode context with
  B sequences of C cells each (``kv_unified`` off: each sequence has its own KV stream, as B
  different prompts would), the tokens prefilled into sequence 0 and copied to 1..B-1.
  Untimed; replies ``setup_mb`` (resident memory the context and the B caches added).
- ``{"op": "decode", "tokens": [t_0, ..., t_{B-1}]}``: one ``llama_decode`` of B tokens, token
  i appended to sequence i, logits for all B.
- ``{"op": "quit"}``

``prefill`` and ``decode`` reply ``wall_s`` and ``cpu_s`` (this process, all threads) of the
``llama_decode`` call alone, and memory: ``peak_rss_mb`` (this process's peak RSS during the
call; the high-water mark is reset before it where Linux allows) and ``rise_mb`` (that peak
minus the RSS just before the call).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
import traceback

import llama_cpp as L


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level in ggml.h (not exported by the bindings)


@L.llama_log_callback
def _log(level, text, user_data):  # errors only: the bench's table is on the parent's stdout
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


class Worker:
    def __init__(self) -> None:
        self.model = None
        self.threads = 1
        self.flash_attn = False
        self.prefill_ctx = None  # (ctx, n_ctx, MiB its creation added)
        self.decode_ctx = None  # (ctx, n_seq)
        self.positions: list[int] = []  # next position of each decode sequence

    # ---- contexts ------------------------------------------------------------------------
    def _context(self, n_ctx: int, n_seq: int, n_batch: int):
        p = L.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.n_batch = n_ctx, n_seq, n_batch
        p.n_ubatch = min(512, n_batch)  # llama.cpp's default micro-batch
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn = self.flash_attn
        p.kv_unified = False
        p.no_perf = True
        ctx = L.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_ctx={n_ctx}, n_seq={n_seq}, n_batch={n_batch})")
        return ctx

    def _free_prefill(self) -> None:
        if self.prefill_ctx is not None:
            L.llama_free(self.prefill_ctx[0])
            self.prefill_ctx = None

    def _free_decode(self) -> None:
        if self.decode_ctx is not None:
            L.llama_free(self.decode_ctx[0])
            self.decode_ctx = None

    @staticmethod
    def _decode(ctx, tokens: list[int], seqs: list[int], positions: list[int], logits_all: bool) -> None:
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, (t, s, p) in enumerate(zip(tokens, seqs, positions)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p, 1
                batch.seq_id[i][0] = s
                batch.logits[i] = 1 if logits_all or i == n - 1 else 0
            batch.n_tokens = n
            rc = L.llama_decode(ctx, batch)
            L.llama_synchronize(ctx)
        finally:
            L.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {n} tokens")

    def _timed(self, fn) -> dict:
        _reset_peak()
        before = _status_mb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = max(_status_mb("VmHWM"), _status_mb("VmRSS"))
        return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": round(peak, 1), "rise_mb": round(peak - before, 1)}

    # ---- commands ------------------------------------------------------------------------
    def load(self, model: str, threads: int, flash_attn: bool = False) -> dict:
        if threads < 1:
            raise ValueError(f"threads={threads} must be at least 1")
        L.llama_log_set(_log, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.threads, self.flash_attn = threads, flash_attn
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        vocab = L.llama_model_get_vocab(self.model)
        return {"n_vocab": L.llama_vocab_n_tokens(vocab), "n_layer": L.llama_model_n_layer(self.model),
                "n_ctx_train": L.llama_model_n_ctx_train(self.model), "version": L.__version__,
                "system_info": L.llama_print_system_info().decode(), "rss_mb": round(_status_mb("VmRSS"), 1)}

    def prefill(self, tokens: list[int]) -> dict:
        n = len(tokens)
        if self.prefill_ctx is None or self.prefill_ctx[1] < n:
            self._free_prefill()
            before = _status_mb("VmRSS")
            ctx = self._context(n, 1, n)
            self.prefill_ctx = (ctx, n, round(max(0.0, _status_mb("VmRSS") - before), 1))
        ctx, _, setup_mb = self.prefill_ctx
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        out = self._timed(lambda: self._decode(ctx, tokens, [0] * n, list(range(n)), logits_all=False))
        return {**out, "setup_mb": setup_mb}

    def fork(self, tokens: list[int], n_seq: int, n_ctx_seq: int) -> dict:
        self._free_decode()
        self._free_prefill()  # its memory would count against the decode rows
        before = _status_mb("VmRSS")
        n = len(tokens)
        if n >= n_ctx_seq:
            raise ValueError(f"{n} prompt tokens leave no room in n_ctx_seq={n_ctx_seq}")
        ctx = self._context(n_seq * n_ctx_seq, n_seq, max(n, n_seq))
        self.decode_ctx = (ctx, n_seq)
        self._decode(ctx, tokens, [0] * n, list(range(n)), logits_all=False)
        mem = L.llama_get_memory(ctx)
        for s in range(1, n_seq):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        L.llama_synchronize(ctx)
        self.positions = [L.llama_memory_seq_pos_max(mem, s) + 1 for s in range(n_seq)]
        if self.positions != [n] * n_seq:
            raise RuntimeError(f"after copying the prompt, sequence lengths are {self.positions}, expected {n} each")
        return {"setup_mb": round(max(0.0, _status_mb("VmRSS") - before), 1)}

    def decode(self, tokens: list[int]) -> dict:
        if self.decode_ctx is None or len(tokens) != self.decode_ctx[1]:
            raise ValueError(f"decode of {len(tokens)} tokens needs a fork with n_seq={len(tokens)} first")
        seqs, pos = list(range(len(tokens))), list(self.positions)
        out = self._timed(lambda: self._decode(self.decode_ctx[0], tokens, seqs, pos, logits_all=True))
        self.positions = [p + 1 for p in pos]
        return out


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the bench dies: the bench keeps it stopped (SIGSTOP)
    between calls, and a stopped orphan would never read the end of its stdin."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    _die_with_parent()
    worker = Worker()
    for line in stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            op = msg.pop("op")
            if op == "quit":
                break
            if op not in ("load", "prefill", "fork", "decode"):
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **getattr(worker, op)(**msg)}
        except Exception as e:  # reported to the parent, which raises it with this text
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    worker._free_decode()
    worker._free_prefill()


if __name__ == "__main__":
    serve()
