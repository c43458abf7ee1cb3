"""Diagnostic: would keeping a few KV-head groups exact (DuoAttention-style) stop the loss growth?

With the first K layers of a student's order converted (no training):
1. **Score** every (layer, KV group), on one 8192-token window of the validation splits (not the
   test windows that step 2 reports on), by one of:
   - ``--rank grad`` (default): the first-order drop in the mean loss at positions 4096-8191 if the
     group's query heads moved from DSLA toward the teacher's softmax output, i.e. -dL/da at a = 0
     for o = DSLA + a (softmax - DSLA) (one forward and backward pass; DuoAttention trains such
     gates, here they are read at their start);
   - ``--rank drift``: how far its DSLA output drifts from the softmax output late in the window:
     the mean squared norm, after o_proj, of (DSLA - softmax) for the group's query heads at
     positions 4096-8191 minus that at 0-255 (forward only; favours the late layers, whose
     residual stream is larger).
   Both outputs see the same input (the hybrid's own hidden states).
2. **Evaluate** the loss excess by position (the `dsla eval position` windows: 2 of 8192 tokens,
   seed 0) with the top N groups made exact, for each N: their query heads attend with full
   softmax over every earlier token (their k/v, i.e. a full KV cache for that group), the other
   groups keep DSLA with its window.

    .venv/bin/python scripts/probe_exact_heads.py ~/.cache/dsla/students/l30w512a8k 30 0,3,9

Prints JSON on stdout, progress on stderr (bfloat16, 2 threads, on a 2-core CPU: ~2 min per N,
~5 min for the grad scores). The list it prints goes to `dsla distill --exact-groups`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from dsla.data.corpora import CORPORA, load_documents
from dsla.distill.artifact import apply_exact_groups, load_student
from dsla.eval.position import run_position, select_windows, token_losses
from dsla.model.dsla import DSLAAttention
from dsla.model.loading import load_teacher, teacher_hash
from dsla.ops.attention import causal_attention
from dsla.paths import default_teacher_dir


class Patch:
    """Replaces ``DSLAAttention.attend`` while active: scores groups, or makes some exact."""

    def __init__(self, model, layers: list[int]) -> None:
        self.by_id = {id(model.dsla[str(i)]): i for i in layers}
        self.exact: dict[int, list[int]] = {}  # layer -> exact KV groups
        self.score = False
        self.gates: dict[int, torch.Tensor] = {}  # layer -> (Hkv,) gate a, for --rank grad
        self.scores: dict[tuple[int, int], float] = {}
        self.real = DSLAAttention.attend

    def __enter__(self) -> Patch:
        patch = self

        def attend(mod, q, k_raw, k, v, seq_lens, states=None):
            o = patch.real(mod, q, k_raw, k, v, seq_lens, states)
            i = patch.by_id.get(id(mod))
            groups = list(range(mod.lcfg.num_key_value_heads)) if patch.score or patch.gates else patch.exact.get(i, [])
            if i is None or not groups:
                return o
            if states is not None or len(seq_lens) != 1:
                raise RuntimeError("the probe runs one stateless window at a time")
            G, D = mod.lcfg.group_size, mod.lcfg.head_dim
            t = causal_attention(q[None], k[None], v[None])[0].to(o.dtype)  # (Hq, N, D)
            if patch.gates:
                a = patch.gates[i].repeat_interleave(G)[:, None, None]  # (Hq, 1, 1)
                return o + a.to(o.dtype) * (t - o)
            if patch.score:
                N = o.shape[1]
                for g in groups:
                    d = torch.zeros(N, o.shape[0] * D, dtype=o.dtype, device=o.device)
                    d[:, g * G * D:(g + 1) * G * D] = (o - t)[g * G:(g + 1) * G].transpose(0, 1).reshape(N, -1)
                    e = mod.o_proj(d).float().pow(2).sum(-1)  # (N,)
                    patch.scores[(i, g)] = float(e[4096:8192].mean() - e[:256].mean())
                return o
            o = o.clone()
            for g in groups:
                o[g * G:(g + 1) * G] = t[g * G:(g + 1) * G]
            return o

        DSLAAttention.attend = attend
        return self

    def __exit__(self, *exc) -> None:
        DSLAAttention.attend = self.real


def grad_scores(model, patch: Patch, layers: list[int], tokens: torch.Tensor) -> None:
    """-dL/da per (layer, group) at a = 0, L the mean next-token loss at positions 4096-8191."""
    model.requires_grad_(False)
    H = model.cfg.num_key_value_heads
    patch.gates = {i: torch.zeros(H, requires_grad=True) for i in layers}
    model.recompute_layers = True  # 30 layers' activations at 8192 tokens do not fit otherwise
    try:
        with torch.enable_grad():
            h = model.hidden_states(tokens, [len(tokens)], None, layers)[4096:-1]
            loss = torch.nn.functional.cross_entropy(model.logits(h).float(), tokens[4097:])
            loss.backward()
    finally:
        model.recompute_layers = False
    for i, a in patch.gates.items():
        for g in range(H):
            patch.scores[(i, g)] = -float(a.grad[g])
    patch.gates = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("student")
    p.add_argument("k", type=int, help="converted layers: the first K of the student's order")
    p.add_argument("counts", help="comma-separated numbers N of top-scored groups to make exact, e.g. 0,3,6")
    p.add_argument("--rank", choices=("grad", "drift"), default="grad", help="how groups are scored (see above)")
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    torch.set_num_threads(2)
    teacher = default_teacher_dir()
    model = load_teacher(teacher, dtype=torch.bfloat16)
    m = load_student(model, args.student, teacher_hash(teacher))
    own = m["config"].get("exact_groups", "")
    apply_exact_groups(model, "")  # N = 0 is all DSLA even for a student trained with exact groups
    layers = m["order"][: args.k]
    if len(layers) < args.k or any(i not in m["layers_done"] for i in layers):
        raise SystemExit(f"{args.student} has finished layers {m['layers_done']}; K={args.k} asks for more")
    docs = {c: load_documents(teacher, c, "test") for c in CORPORA}
    windows = select_windows(docs, 8192, 2, 0)
    val = select_windows({c: load_documents(teacher, c, "validation") for c in CORPORA}, 8192, 1, 0)
    if windows.tokens.shape[1] < 8192 or val.tokens.shape[1] < 8192:
        raise SystemExit("the position windows are shorter than 8192 tokens")
    t = np.array(run_position(model, windows, [])["loss"])
    report = {"student": args.student, "k": args.k, "layers": layers, "dtype": "bfloat16", "rank": args.rank,
              "student_exact_groups": own,
              "teacher_loss": [round(float(v), 4) for v in t], "score_window": val.sources, "runs": []}
    with Patch(model, layers) as patch:
        if args.rank == "drift":
            patch.score = True
            token_losses(model, val.tokens[0], layers)
            patch.score = False
        else:
            grad_scores(model, patch, layers, val.tokens[0])
        ranked = sorted(patch.scores, key=patch.scores.get, reverse=True)
        report["scores"] = [{"layer": i, "group": g, "score": round(patch.scores[(i, g)], 4)} for i, g in ranked]
        print("top groups:", [(i, g, round(patch.scores[(i, g)], 4)) for i, g in ranked[:12]], file=sys.stderr)
        for n in counts:
            patch.exact = {}
            for i, g in ranked[:n]:
                patch.exact.setdefault(i, []).append(g)
            r = run_position(model, windows, layers)
            ex = np.array(r["loss"]) - t
            report["buckets"] = r["buckets"]
            spec = ",".join(f"{i}:{g}" for i, gs in sorted(patch.exact.items()) for g in sorted(gs))
            report["runs"].append({"exact_groups": n, "exact": spec,
                                   "excess": [round(float(v), 4) for v in ex], "growth": round(float(ex[-1] - ex[0]), 4)})
            print(f"N={n} ({spec or 'none'}): excess {np.round(ex, 3).tolist()} growth {ex[-1] - ex[0]:+.3f}",
                  file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
