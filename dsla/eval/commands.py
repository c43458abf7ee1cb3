"""`dsla eval [SUITE ...]`: quality of students at several conversion ratios."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SUITES = ("ppl",)


def _ratios(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios expects comma-separated numbers, got {text!r}") from None
    bad = [v for v in vals if not 0 <= v <= 1]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"ratios must lie in [0, 1], got {bad or text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dsla.cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("suites", nargs="*", default=list(SUITES), help=f"suites to run (default: all of {SUITES})")
    p.add_argument("--student", type=Path, default=None, help="student directory (omit for the teacher alone)")
    p.add_argument("--ratios", type=_ratios, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--out", type=Path, default=None, help="report directory (report.json)")
    p.add_argument("--splits", default="test", help="comma-separated: validation,test")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per corpus and split")


def run(args: argparse.Namespace) -> int:
    from dsla.cli import DTYPES
    from dsla.data.corpora import CORPORA
    from dsla.distill.artifact import load_student
    from dsla.eval.ppl import layers_for_ratio, perplexity
    from dsla.fileio import atomic_write_json
    from dsla.model.loading import load_teacher, teacher_hash
    from dsla.paths import resolve_teacher

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}: choose from {list(SUITES)}")
    teacher = resolve_teacher(args.teacher)
    model = load_teacher(teacher, dtype=DTYPES[args.dtype])
    order, done = [], []
    ratios = args.ratios
    if args.student is not None:
        m = load_student(model, args.student, teacher_hash(teacher))
        order, done = m["order"], m["layers_done"]
    elif any(r > 0 for r in ratios):
        print("no --student: evaluating the teacher alone (ratio 0)")
        ratios = [0.0]
    L = model.cfg.num_hidden_layers
    rows = []
    t0 = time.time()
    for r in ratios:
        layers = layers_for_ratio(order, L, r, done)
        for split in args.splits.split(","):
            ppl = perplexity(model, teacher, layers, list(CORPORA), split, args.seq_len, args.max_tokens)
            rows.append({"ratio": r, "layers": layers, "split": split, "ppl": ppl})
            print(f"ratio {r:.2f} ({len(layers):2d} layers) {split:10s} " +
                  "  ".join(f"{c}={v:8.3f}" for c, v in ppl.items()), flush=True)
    base = {(row["split"]): row["ppl"] for row in rows if row["ratio"] == 0}
    if base:
        print("relative to the teacher (ratio 0):")
        for row in rows:
            rel = {c: row["ppl"][c] / base[row["split"]][c] for c in row["ppl"]}
            row["ppl_over_teacher"] = rel
            print(f"  ratio {row['ratio']:.2f} {row['split']:10s} " + "  ".join(f"{c}={v:.3f}x" for c, v in rel.items()))
    if args.out is not None:
        atomic_write_json(args.out / "report.json", {
            "teacher": str(teacher), "student": str(args.student) if args.student else None,
            "seq_len": args.seq_len, "max_tokens": args.max_tokens, "rows": rows, "wall_time_s": time.time() - t0})
    return 0
