"""`dsla rank` and `dsla distill` command handlers (argument parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _setup(args: argparse.Namespace):
    from dsla.cli import DTYPES
    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.paths import resolve_teacher

    teacher = resolve_teacher(args.teacher)
    model = load_teacher(teacher, dtype=DTYPES[args.dtype])
    return teacher, model, teacher_hash(teacher)


def window_sources(teacher: Path, seq_len: int, e2e_seq_len: int | None = None):
    """Callables (num, seed) -> windows over the train and validation splits of the distillation
    corpora, ``CORPORA`` (and, with ``e2e_seq_len``, a third one over the train split at that
    length). The evaluation-only corpora (``EVAL_CORPORA``) are never read here."""
    from dsla.data.corpora import CORPORA
    from dsla.distill.data import corpus_tokens, random_windows

    train, val = corpus_tokens(teacher, "train", CORPORA), corpus_tokens(teacher, "validation", CORPORA)
    out = (lambda n, seed: random_windows(train, seq_len, n, seed),
           lambda n, seed: random_windows(val, seq_len, n, seed))
    if e2e_seq_len is None:
        return out
    return (*out, lambda n, seed: random_windows(train, e2e_seq_len, n, seed))


# ---- dsla distill -----------------------------------------------------------------------------
def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments
    from dsla.cliargs import add_dataclass_arguments
    from dsla.config import DistillConfig

    add_model_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="student directory (resumed if it exists)")
    p.add_argument("--max-layers", type=int, default=None, help="stop after this many finished layers")
    p.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start a new --out from this finished student's layers (its order and weights, end-to-end "
                        "stage included) built with another --window (every other DSLA setting the same; pass "
                        "--order given --layers <its order>); further layers (--max-layers) and the end-to-end "
                        "stage (--e2e-steps) then run as usual")
    p.add_argument("--loss-delta", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, measure each layer's loss-delta on validation windows")
    p.add_argument("--recompute", action="store_true",
                   help="in the stages that train through the whole model (end-to-end, per-layer KL), recompute each "
                        "layer's activations in the backward pass instead of keeping them (activation checkpointing): "
                        "far less memory for many converted layers at long --e2e-seq-len, more time, the same result; "
                        "may change between a run and its resumption")
    add_dataclass_arguments(p, DistillConfig)


def run_distill(args: argparse.Namespace) -> int:
    from dsla.cliargs import dataclass_from_args
    from dsla.config import DistillConfig
    from dsla.distill.rank import loss_delta, spearman
    from dsla.distill.train import check_init_from, distill, layer_seed
    from dsla.fileio import atomic_write_json

    cfg = dataclass_from_args(DistillConfig, args)
    if args.init_from is not None and not (args.out / "manifest.json").exists():
        check_init_from(args.init_from, cfg, args.max_layers)  # before the teacher loads
    teacher, model, sha = _setup(args)
    model.recompute_layers = args.recompute
    train_w, val_w, e2e_w = window_sources(teacher, cfg.seq_len, cfg.e2e_seq_len)
    m = distill(model, teacher, sha, args.out, cfg, train_w, val_w, max_layers=args.max_layers, e2e_windows=e2e_w,
                init_from=args.init_from)
    if args.loss_delta and len(m["layers_done"]) == len(m["order"]) and "loss_delta" not in m:
        windows = val_w(cfg.rank_sequences, layer_seed(cfg, -1, 6))
        deltas = loss_delta(model, windows, m["layers_done"], batch_size=max(1, cfg.batch_size // 2), progress=True)
        m["loss_delta"] = {str(i): d for i, d in deltas.items()}
        if m["ranking"].get("scores"):
            ent = [m["ranking"]["scores"][i] for i in m["layers_done"]]
            m["spearman_entropy_vs_loss_delta"] = spearman(ent, [deltas[i] for i in m["layers_done"]])
        atomic_write_json(args.out / "manifest.json", m)
    print(f"student: {args.out}  layers done: {len(m['layers_done'])}/{len(m['order'])}  "
          f"wall time: {m['wall_time_s']:.0f}s")
    print(f"order: {m['order']}")
    for i in m["layers_done"]:
        r = m["metrics"][str(i)]
        print(f"  layer {i:3d}: attn val nmse {r['attn_val_nmse_before']:.4f} -> {r['attn_val_nmse_after']:.4f}"
              f"   {r['wall_time_s']:.1f}s")
    if "spearman_entropy_vs_loss_delta" in m:
        print(f"Spearman(entropy, loss-delta) = {m['spearman_entropy_vs_loss_delta']:.3f}")
    return 0


# ---- dsla rank --------------------------------------------------------------------------------
def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="ranking JSON to write")
    p.add_argument("--metric", choices=["entropy", "loss-delta", "retrieval"], default="entropy",
                   help="entropy: the paper's metric; loss-delta: a student's layers converted one at a time; "
                        "retrieval: forward-only probe (each layer alone restricted to local attention) of "
                        "loss at --seq-len and passkey log-likelihood, with a retrieval-aware order")
    p.add_argument("--student", type=Path, default=None, help="student directory (needed for loss-delta)")
    p.add_argument("--sequences", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("retrieval probe")
    g.add_argument("--probe-window", type=int, default=64, help="local attention window of the probed layer (tokens)")
    g.add_argument("--probe-sinks", type=int, default=4, help="first tokens the probed layer still sees")
    g.add_argument("--passkey-prompts", type=int, default=8, help="passkey prompts (validation text)")
    g.add_argument("--passkey-context", type=int, default=1024, help="tokens per passkey prompt")
    g.add_argument("--protect", type=int, default=None,
                   help="layers most needed by the passkey that go last in the order (default: a quarter)")
    g.add_argument("--greedy", type=int, default=0, metavar="K",
                   help="then choose the first K layers of the order greedily, each restricted together with "
                        "those chosen before it (L + (L-1) + ... forward passes); 0: off")
    g.add_argument("--key-weight", type=float, default=0.1,
                   help="greedy cost = loss increase (nats/token) + this x passkey log-likelihood drop (nats/key)")


def passkey_key_prompts(teacher: Path, tok, num: int, context: int, seed: int):
    """``num`` passkey prompts of ``context`` tokens on validation filler, the key's tokens appended,
    depths spread over 10-90%."""
    import numpy as np

    from dsla.data.corpora import load_texts
    from dsla.distill.probe import KeyPrompt
    from dsla.eval.passkey import PasskeyBuilder, filler_sentences, random_key

    texts = [t for c in ("wikipedia", "lee") for t in load_texts(c, "validation", teacher)]
    builder = PasskeyBuilder(tok, filler_sentences(texts, tok.encode), chat=tok.chat_template is not None)
    rng = np.random.default_rng([seed, context])
    out = []
    for n in range(num):
        p = builder.build(context, 0.1 + 0.8 * n / max(1, num - 1), random_key(rng), rng)
        out.append(KeyPrompt(p.ids + tuple(tok.encode(" " + p.key)), len(p.ids)))
    return out


def _retrieval_scores(args, teacher: Path, model, val_w) -> tuple[list[float], list[int], dict]:
    from dsla.distill.probe import probe_layers, retrieval_aware_order
    from dsla.model.tokenizer import Tokenizer

    tok = Tokenizer(teacher)
    prompts = passkey_key_prompts(teacher, tok, args.passkey_prompts, args.passkey_context, args.seed)
    windows = val_w(args.sequences, args.seed)  # the greedy steps reuse them: step 1 is this probe's result
    res = probe_layers(model, windows, prompts, args.probe_window, args.probe_sinks, progress=True)
    L = model.cfg.num_hidden_layers
    protect = L // 4 if args.protect is None else args.protect
    order = retrieval_aware_order(res["loss_delta"], res["key_logp_drop"], protect)
    extra = res | {"protect": protect}
    if args.greedy:
        from dsla.distill.probe import greedy_layer_set

        g = greedy_layer_set(model, windows, prompts, args.greedy, args.probe_window,
                             args.probe_sinks, args.key_weight, single=res, progress=True)
        extra["single_layer_order"] = order
        extra["greedy"] = g
        order = g["order"] + [i for i in order if i not in g["order"]]
    return res["key_logp_drop"], order, extra


def run_rank(args: argparse.Namespace) -> int:
    from dsla.distill.artifact import load_student
    from dsla.distill.rank import attention_entropy, loss_delta, order_from_scores
    from dsla.fileio import atomic_write_json

    if args.greedy and args.metric != "retrieval":
        raise ValueError(f"--greedy {args.greedy} needs --metric retrieval (it extends the retrieval probe)")
    if not args.key_weight >= 0:
        raise ValueError(f"--key-weight {args.key_weight} must be >= 0")
    teacher, model, sha = _setup(args)
    if not 0 <= args.greedy <= model.cfg.num_hidden_layers:
        raise ValueError(f"--greedy {args.greedy} must lie in [0, {model.cfg.num_hidden_layers}] (the model's layers)")
    train_w, val_w = window_sources(teacher, args.seq_len)
    L = model.cfg.num_hidden_layers
    extra: dict = {}
    if args.metric == "entropy":
        scores = attention_entropy(model, train_w(args.sequences, args.seed), progress=True)
    elif args.metric == "retrieval":
        scores, order, extra = _retrieval_scores(args, teacher, model, val_w)
    else:
        if args.student is None:
            raise ValueError("--metric loss-delta needs --student DIR (distilled DSLA layers to convert)")
        m = load_student(model, args.student, sha)
        deltas = loss_delta(model, val_w(args.sequences, args.seed), m["layers_done"], progress=True)
        scores = [deltas.get(i, float("nan")) for i in range(L)]
    if args.metric != "retrieval":
        order = order_from_scores(scores, "entropy")
    atomic_write_json(args.out, {"metric": args.metric, "scores": scores, "order": order,
                                 "teacher": {"name": teacher.name, "sha256": sha},
                                 "sequences": args.sequences, "seq_len": args.seq_len, "seed": args.seed, **extra})
    print(json.dumps({"metric": args.metric, "order": order}))
    for i in order:
        print(f"  layer {i:3d}: {scores[i]:.4f}")
    return 0


# ---- dsla export ------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("student", type=Path, help="student directory from `dsla distill`")
    p.add_argument("--out", type=Path, required=True,
                   help="directory of the compact copy (the shipped default: dsla/students/default)")
    p.add_argument("--report", type=Path, default=None,
                   help="a `dsla eval` report.json of this student to ship beside it (the server's quality curve)")
    p.add_argument("--delta-rank", type=int, default=None, metavar="R",
                   help="store each q/o difference from the teacher as its best rank-R approximation (lossy: "
                        "evaluate the export) instead of in full; for students too large in full")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the stored DSLA parameters (bfloat16 halves them; a model run in bfloat16 "
                        "rounds them so anyway)")


def run_export(args: argparse.Namespace) -> int:
    from dsla.distill.artifact import check_export_options, export_student
    from dsla.fileio import atomic_write

    check_export_options(args.delta_rank, args.param_dtype)  # before the teacher loads
    teacher, model, sha = _setup(args)
    size = export_student(args.student, args.out, model, sha, delta_rank=args.delta_rank,
                          param_dtype=args.param_dtype)
    if args.report is not None:
        src = args.report / "report.json" if args.report.is_dir() else args.report
        atomic_write(args.out / "report.json", lambda tmp: Path(tmp).write_bytes(src.read_bytes()))
    print(f"exported {args.student} -> {args.out}: weights {size / 2**20:.1f} MiB")
    return 0
