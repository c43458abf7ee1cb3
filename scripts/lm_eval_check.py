"""lm-evaluation-harness through `dsla serve`, checked against the in-process multiple-choice scorer.

Runs ``lm_eval run --model local-completions`` (the stock harness, as a subprocess) on the local
task in ``scripts/lm_eval_task`` against a server's /v1/completions (echo + logprobs), then scores
the very same (context, continuation) pairs in-process with ``dsla.eval.mc.score_items`` and
compares per choice log-likelihoods, per-question picks and accuracy.

Tokenisation follows lm_eval's rule for causal models (trailing context whitespace moves to the
continuation; the continuation's ids are those of ``encode(context + continuation)`` after the
context's), with dsla's tokenizer; ``--check-hf-tokenizer`` also confirms that the Hugging Face
tokenizer lm_eval loads gives the same ids.

    pip install -e '.[lmeval]'
    python scripts/lm_eval_check.py --teacher ~/.cache/dsla/teachers/SmolLM2-135M-Instruct \\
        --serve --threads 1 --port 8011 --out docs/results/lm_eval_check.json
    python scripts/lm_eval_check.py --teacher DIR --url http://127.0.0.1:8000 --model NAME   # a running server

Needs ``lm-eval[api]`` (the ``lmeval`` extra). Nothing is downloaded: the task reads its JSONL
beside the YAML and the tokenizer comes from the teacher directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "dsla_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_args(base_url: str, model: str, tokenizer_dir: str | Path) -> str:
    """local-completions' arguments: our /v1/completions, the teacher's tokenizer, one request at a time."""
    return (f"base_url={base_url.rstrip('/')}/v1/completions,model={model},tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer_dir},num_concurrent=1,max_retries=1")


def lm_eval_command(base_url: str, model: str, tokenizer_dir: str | Path, out_dir: str | Path,
                    limit: int | None = None) -> list[str]:
    """The `lm_eval run` command line (local-completions, samples logged)."""
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", model_args(base_url, model, tokenizer_dir),
           "--tasks", TASK, "--include_path", str(TASK_DIR), "--output_path", str(out_dir), "--log_samples",
           "--seed", "0"]
    return cmd + (["--limit", str(limit)] if limit else [])


def run_lm_eval(cmd: Sequence[str], out_dir: str | Path, timeout_s: float = 600,
                echo: bool = False) -> tuple[dict, list[dict]]:
    """Run ``cmd``; return (the task's aggregated results, its logged samples in doc order).
    ``echo`` prints lm_eval's own summary (its stdout)."""
    env = {**os.environ, **OFFLINE, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "")}
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if echo:
        print(proc.stdout.strip(), flush=True)
    out = Path(out_dir)
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not results or not samples:
        raise RuntimeError(f"lm_eval wrote no results/samples under {out}:\n{proc.stderr[-2000:]}")
    res = json.loads(results[-1].read_text())["results"][TASK]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return res, sorted(rows, key=lambda r: r["doc_id"])


def evaluate_in_process(base_url: str, model: str, tokenizer_dir: str | Path,
                        limit: int | None = None) -> tuple[dict, list[dict]]:
    """The same run through lm_eval's Python API (same model class and evaluator), indexing only
    the local task: the CLI first indexes every built-in task, which costs ~15 s of CPU."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="local-completions", model_args=model_args(base_url, model, tokenizer_dir),
                          tasks=[TASK], task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
                          limit=limit, log_samples=True, random_seed=0)
    return out["results"][TASK], sorted(out["samples"][TASK], key=lambda r: r["doc_id"])


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval's causal models split them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = encode(context)
    return ctx, encode(context + continuation)[len(ctx):]


def sample_pairs(sample: dict) -> list[tuple[str, str]]:
    """The (context, continuation) strings lm_eval scored for one question, one per choice
    (a list of pairs in memory; ``{"gen_args_J": {"arg_0": ..., "arg_1": ...}}`` in its JSONL)."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [(args[f"gen_args_{j}"]["arg_0"], args[f"gen_args_{j}"]["arg_1"]) for j in range(len(args))]
    return [(c, x) for c, x in args]


def lm_eval_logliks(sample: dict) -> list[float]:
    """lm_eval's summed log-likelihood of each choice (``resps`` holds [(loglik, is_greedy)] per
    choice; the JSONL writes them as strings)."""
    return [float(r[0][0]) for r in sample["resps"]]


def build_items(samples: Sequence[dict], encode: Callable[[str], list[int]]):
    """``MCItem``s of the logged questions, choices in lm_eval's order, the gold one marked correct."""
    from dsla.eval.mc import MCItem

    items = []
    for s in samples:
        pairs = sample_pairs(s)
        split = [encode_pair(encode, c, x) for c, x in pairs]
        contexts = {tuple(c) for c, _ in split}
        if len(contexts) != 1:
            raise ValueError(f"doc {s['doc_id']}: choices have different contexts; not a multiple-choice sample")
        gold = int(s["doc"]["answer"])
        items.append(MCItem(contexts.pop(), tuple(tuple(x) for _, x in split),
                            tuple(len(x.encode()) for _, x in pairs), tuple(j == gold for j in range(len(pairs)))))
    return items


def hf_tokenizer_mismatches(tokenizer_dir: str | Path, samples: Sequence[dict],
                            encode: Callable[[str], list[int]]) -> int:
    """How many scored pairs the Hugging Face tokenizer (what lm_eval uses) splits differently."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def hf_encode(text: str) -> list[int]:
        return hf(text, add_special_tokens=False).input_ids

    return sum(encode_pair(hf_encode, c, x) != encode_pair(encode, c, x) for s in samples for c, x in sample_pairs(s))


def compare(samples: Sequence[dict], lm_results: dict, items, ours: Sequence[Sequence[float]]) -> dict:
    """Agreement of lm_eval's numbers with the in-process scores of the same items."""
    import numpy as np

    from dsla.eval.mc import mc_metrics

    theirs = [lm_eval_logliks(s) for s in samples]
    diffs = [abs(a - b) for t, o in zip(theirs, ours) for a, b in zip(t, o)]
    picks_agree = sum(int(np.argmax(t)) == int(np.argmax(o)) for t, o in zip(theirs, ours))
    # lm_eval's acc_norm divides by the choice's length in characters (without the delimiter);
    # mc.py's divides by the UTF-8 bytes of the scored continuation, so recompute lm_eval's rule too.
    norm_hits = 0
    for s, o in zip(samples, ours):
        lens = np.array([len(c) for c in s["doc"]["choices"]], dtype=np.float64)
        norm_hits += int(np.argmax(np.asarray(o) / lens)) == int(s["doc"]["answer"])
    m = mc_metrics(items, ours)
    n = len(samples)
    return {
        "n_questions": n, "n_choices": len(diffs),
        "acc_lm_eval": lm_results["acc,none"], "acc_in_process": m["acc"],
        "acc_norm_lm_eval": lm_results["acc_norm,none"], "acc_norm_in_process_lm_eval_rule": norm_hits / n,
        "acc_norm_in_process_mc_rule": m["acc_norm"],
        "picks_agree": picks_agree, "loglik_max_abs_diff": max(diffs), "loglik_mean_abs_diff": sum(diffs) / len(diffs),
        "acc_from_samples": sum(float(s["acc"]) for s in samples) / n,
    }


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"dsla serve exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher directory (weights for the in-process scorer, tokenizer)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (serving the teacher as is)")
    where.add_argument("--serve", action="store_true",
                       help="start `dsla serve --teacher DIR` on --port and stop it after")
    p.add_argument("--model", default=None, help="served model id (default: the teacher directory's name)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the server and the in-process scorer")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--work-dir", default=None, help="where lm_eval writes its outputs (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the comparison and the commands as JSON here")
    p.add_argument("--check-hf-tokenizer", action="store_true", help="also compare the HF tokenizer's ids with dsla's")
    args = p.parse_args(argv)

    import tempfile

    teacher = Path(args.teacher).expanduser().resolve()
    model_name = args.model or teacher.name
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lm_eval_check_"))
    server, url = None, args.url
    serve_cmd = None
    if args.serve:
        url = f"http://127.0.0.1:{args.port}"
        serve_cmd = [sys.executable, "-m", "dsla.cli", "serve", "--teacher", str(teacher),
                     "--threads", str(args.threads), "--port", str(args.port), "--served-model-name", model_name]
        print("$", " ".join(serve_cmd), flush=True)
        server = subprocess.Popen(serve_cmd, env={**os.environ, **OFFLINE}, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(url, server, 300)
        cmd = lm_eval_command(url, model_name, teacher, work, args.limit)
        print("$", " ".join(cmd), flush=True)
        t0 = time.monotonic()
        lm_results, samples = run_lm_eval(cmd, work, echo=True)
        lm_eval_s = time.monotonic() - t0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    import torch

    from dsla.eval.mc import score_items
    from dsla.model.loading import load_teacher
    from dsla.model.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    tok = Tokenizer(teacher)
    items = build_items(samples, tok.encode)
    t0 = time.monotonic()
    ours = score_items(load_teacher(teacher), items)
    report = compare(samples, lm_results, items, ours)
    report["in_process_s"], report["lm_eval_s"] = round(time.monotonic() - t0, 1), round(lm_eval_s, 1)
    if args.check_hf_tokenizer:
        report["hf_tokenizer_mismatches"] = hf_tokenizer_mismatches(teacher, samples, tok.encode)
    import lm_eval

    report["lm_eval_version"] = lm_eval.__version__
    for k, v in report.items():
        print(f"{k:36s} {v}")
    if args.out:
        per_question = [{"doc_id": s["doc_id"], "lm_eval": lm_eval_logliks(s), "in_process": o}
                        for s, o in zip(samples, ours)]
        record = {"teacher": str(teacher), "serve_command": serve_cmd, "lm_eval_command": cmd,
                  "comparison": report, "per_question": per_question}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    ok = report["acc_lm_eval"] == report["acc_in_process"] and report["loglik_max_abs_diff"] < 1e-3
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
