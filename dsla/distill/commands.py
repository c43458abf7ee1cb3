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


def window_sources(teacher: Path, seq_len: int):
    """Callables (num, seed) -> windows over the train and validation splits of all corpora."""
    from dsla.distill.data import corpus_tokens, random_windows

    train, val = corpus_tokens(teacher, "train"), corpus_tokens(teacher, "validation")
    return (lambda n, seed: random_windows(train, seq_len, n, seed),
            lambda n, seed: random_windows(val, seq_len, n, seed))


# ---- dsla distill -----------------------------------------------------------------------------
def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments
    from dsla.cliargs import add_dataclass_arguments
    from dsla.config import DistillConfig

    add_model_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="student directory (resumed if it exists)")
    p.add_argument("--max-layers", type=int, default=None, help="stop after this many finished layers")
    p.add_argument("--loss-delta", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, measure each layer's loss-delta on validation windows")
    add_dataclass_arguments(p, DistillConfig)


def run_distill(args: argparse.Namespace) -> int:
    from dsla.cliargs import dataclass_from_args
    from dsla.config import DistillConfig
    from dsla.distill.rank import loss_delta, spearman
    from dsla.distill.train import distill, layer_seed
    from dsla.fileio import atomic_write_json

    cfg = dataclass_from_args(DistillConfig, args)
    teacher, model, sha = _setup(args)
    train_w, val_w = window_sources(teacher, cfg.seq_len)
    m = distill(model, teacher, sha, args.out, cfg, train_w, val_w, max_layers=args.max_layers)
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
    p.add_argument("--metric", choices=["entropy", "loss-delta"], default="entropy")
    p.add_argument("--student", type=Path, default=None, help="student directory (needed for loss-delta)")
    p.add_argument("--sequences", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def run_rank(args: argparse.Namespace) -> int:
    from dsla.distill.artifact import load_student
    from dsla.distill.rank import attention_entropy, loss_delta, order_from_scores
    from dsla.fileio import atomic_write_json

    teacher, model, sha = _setup(args)
    train_w, val_w = window_sources(teacher, args.seq_len)
    L = model.cfg.num_hidden_layers
    if args.metric == "entropy":
        scores = attention_entropy(model, train_w(args.sequences, args.seed), progress=True)
    else:
        if args.student is None:
            raise ValueError("--metric loss-delta needs --student DIR (distilled DSLA layers to convert)")
        m = load_student(model, args.student, sha)
        deltas = loss_delta(model, val_w(args.sequences, args.seed), m["layers_done"], progress=True)
        scores = [deltas.get(i, float("nan")) for i in range(L)]
    order = order_from_scores(scores, "entropy")
    atomic_write_json(args.out, {"metric": args.metric, "scores": scores, "order": order,
                                 "teacher": {"name": teacher.name, "sha256": sha},
                                 "sequences": args.sequences, "seq_len": args.seq_len, "seed": args.seed})
    print(json.dumps({"metric": args.metric, "order": order}))
    for i in order:
        print(f"  layer {i:3d}: {scores[i]:.4f}")
    return 0
