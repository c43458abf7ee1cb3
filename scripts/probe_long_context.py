"""Diagnostic: why a student's loss excess grows with position (docs/results/quality.md).

For the first K layers of a student's order, converted together:
- each layer's state horizons on one 4096-token test window (1 / -mean log decay per channel,
  in tokens), its history/recency mix and its window factor;
- the loss excess over the teacher by position bucket (the `dsla eval position` windows: 2 of
  8192 tokens, seed 0) with every converted layer's window factor multiplied by each of SCALES,
  no training. If the excess far into the window falls as the factor grows, the linear states
  take too much of the shared normaliser there.

    .venv/bin/python scripts/probe_long_context.py ~/.cache/dsla/students/l30w512 15 1,2,4,0.5
    .venv/bin/python scripts/probe_long_context.py ~/.cache/dsla/students/l30w512 12,25,14,26,16 1

Prints JSON on stdout, progress on stderr (bfloat16, 2 threads; ~1 min per scale on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from dsla.data.corpora import CORPORA, load_documents, load_tokens
from dsla.distill.artifact import load_student
from dsla.eval.position import run_position, select_windows
from dsla.model.dsla import DSLAAttention
from dsla.model.loading import load_teacher, teacher_hash
from dsla.paths import default_teacher_dir


def horizons(model, layers: list[int], tokens: torch.Tensor) -> list[dict]:
    """Per layer: quantiles of the history/recency horizons, the mix and the window factor."""
    seen: dict[int, torch.Tensor] = {}
    real = DSLAAttention.log_gates

    def record(self, k_raw):
        g = real(self, k_raw)
        seen[id(self)] = g.detach()
        return g
    DSLAAttention.log_gates = record
    try:
        with torch.no_grad():
            model(tokens[None], dsla_layers=layers)
    finally:
        DSLAAttention.log_gates = real
    out = []
    for i in layers:
        mod = model.dsla[str(i)]
        g = seen[id(mod)].float()  # (H, S, N, K)
        row = {"layer": i}
        for s, name in enumerate(["history", "recency"][: g.shape[1]]):
            h = 1.0 / (-g[:, s].mean(dim=1)).clamp_min(1e-9)  # (H, K) tokens
            row[f"{name}_horizon_p10_p50_p90"] = [round(float(v)) for v in
                                                 torch.quantile(h.flatten(), torch.tensor([0.1, 0.5, 0.9]))]
        if hasattr(mod, "mix_logits"):
            row["history_mix_mean"] = round(float(torch.sigmoid(mod.mix_logits.float()).mean()), 3)
        if hasattr(mod, "window_log_scale"):
            row["window_factor_mean"] = round(float(mod.window_log_scale.float().exp().mean()), 3)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("student")
    p.add_argument("k", help="converted layers: the first K of the student's order, or an explicit "
                              "comma-separated list of its finished layers (e.g. 12,25,14; one layer: 12,)")
    p.add_argument("scales", help="comma-separated multipliers of the window factor, e.g. 1,2,4")
    args = p.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    torch.set_num_threads(2)
    teacher = default_teacher_dir()
    model = load_teacher(teacher, dtype=torch.bfloat16)
    m = load_student(model, args.student, teacher_hash(teacher))
    if "," in args.k:  # a list (one layer: "12,")
        layers = [int(i) for i in args.k.split(",") if i.strip()]
    else:
        layers = m["order"][: int(args.k)]
        if len(layers) < int(args.k):
            raise SystemExit(f"{args.student}'s order has {len(layers)} layers; K={args.k} is too many")
    if not layers:
        raise SystemExit(f"K={args.k!r} converts no layer: give K >= 1 or a list of layers")
    if any(i not in m["layers_done"] for i in layers):
        raise SystemExit(f"{args.student} has finished layers {m['layers_done']}; {args.k} asks for others")
    if any(not hasattr(model.dsla[str(i)], "window_log_scale") for i in layers):
        raise SystemExit(f"{args.student} has no exact window (window 0): there is no window factor to scale")
    tokens = torch.as_tensor(load_tokens(teacher, "wikipedia", "test")[:4096].astype(np.int64))
    report = {"student": args.student, "k": len(layers), "layers": layers, "dtype": "bfloat16",
              "horizons": horizons(model, layers, tokens)}
    docs = {c: load_documents(teacher, c, "test") for c in CORPORA}
    windows = select_windows(docs, 8192, 2, 0)
    t = np.array(run_position(model, windows, [])["loss"])
    report["teacher_loss"] = [round(float(v), 4) for v in t]
    base = {i: model.dsla[str(i)].window_log_scale.detach().clone() for i in layers}
    report["scales"] = []
    for c in scales:
        with torch.no_grad():
            for i in layers:
                model.dsla[str(i)].window_log_scale.copy_(base[i] + math.log(c))
        r = run_position(model, windows, layers)
        ex = np.array(r["loss"]) - t
        report["buckets"] = r["buckets"]
        report["scales"].append({"factor_x": c, "excess": [round(float(v), 4) for v in ex],
                                 "growth": round(float(ex[-1] - ex[0]), 4)})
        print(f"factor x{c}: excess {np.round(ex, 3).tolist()} growth {ex[-1] - ex[0]:+.3f}", file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
