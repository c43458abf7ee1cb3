#!/usr/bin/env bash
# Reproduce the shipped default student (dsla/students/default) from scratch, on a CPU:
#   1. rank: the retrieval probe (each layer alone restricted to local attention; loss at 1024
#      tokens and passkey log-likelihood) -> a retrieval-aware conversion order;
#   2. distill the base: layer-wise (chained, 1024-token windows) over the first $BASE_LAYERS (15)
#      layers of that order with an exact $BASE_WINDOW-token window (256), then the end-to-end KL
#      stage ($E2E_FLAGS: 4096-token windows, 120 distinct windows; per step 8 or 15 converted
#      layers, i.e. ratio 0.25 or 0.5), run for each step count of $E2E_STEPS in turn ("80 160": 80
#      steps on a cosine schedule, then the stage extended to 160, its lr warmed up again);
#   3. re-window and complete: a new run starts from the base's layers (`dsla distill --init-from`)
#      with the served window $WINDOW (512), untrained, and distils the remaining layers of the order
#      up to $LAYERS (30) layer-wise with q/o frozen (--no-train-projections: nothing to ship for them),
#      no end-to-end stage ($ADAPT_STEPS = 0 steps);
#   4. long-context end-to-end runs, for ratios 0.25 and 0.5 (a-c) and then for all four (d), each
#      starting from the previous one (`--init-from`), q/o frozen so the artifact keeps its size
#      (docs/results/quality.md: the loss growth by position at 0.5: +0.208 after step 3, +0.171
#      after a, +0.145 after b; see there for c and d):
#      a. only the per-head scalars ($CAL_FLAGS: history/recency mix, window factor, decay-gate
#         biases; 786 numbers per layer), $CAL_STEPS steps on 4096-token windows;
#      b. the same, $CAL8K_STEPS steps on 8192-token windows, with activation checkpointing;
#      c. every DSLA parameter ($DSLA8K_FLAGS: feature maps and gates too, their own lower lr) on
#         the same 8192-token windows, run for each step count of $DSLA8K_STEPS in turn;
#      d. the same over all 30 layers ($ALL8K_FLAGS: ratios 0.25, 0.5, 0.75 and 1, one drawn per
#         step), $ALL8K_STEPS steps: layers 16-30 of the order get their first end-to-end training;
#      e. run d once more from its result ($ALL8K2_STEPS more steps, the same windows: run e);
#      f. exact KV groups ($EXACT_GROUPS, no training): 9 of the 45 KV heads of layers 16-30 of the
#         order keep the teacher's softmax over every token (DuoAttention-style). They are the 9
#         best of those layers by `scripts/probe_exact_heads.py <run e> 30 0,3,9,18` (grad ranking,
#         docs/results/quality/exact_groups_probe.json); ratios up to 0.5 do not reach them;
#      g. run e's recipe again, $EXACT_TRAIN_STEPS steps, with $EXACT_TRAINED_GROUPS exact during
#         training (f's 9 and 8 more, one of them 17:1 in layer 14 of the order: ratio 0.5 keeps a KV
#         head; how they were picked: docs/results/quality.md, tenth session): the DSLA heads learn to
#         work beside the exact ones. (The shipped run started from f's bfloat16 export, not from f's
#         float32 directory as here, so a rerun matches it closely, not bit for bit.)
#      h. $EXACT_MORE_GROUPS exact as well (no training), the best remaining groups of layers 11-20 of
#         the order by the same probe scores: growth at 0.75 +0.123 -> +0.085 (docs/results/quality.md);
#      i. attention sinks: the first $SINKS tokens stay exact in every converted layer (never folded into
#         the states), then run e's recipe again, $SINKS_STEPS steps, with h's 25 groups exact: growth
#         at 1.0 +0.222 -> +0.141, perplexity lower at every ratio (docs/results/quality.md, eleventh session);
#      j. i's recipe again from its result, $LONG_STEPS steps, the ratio drawn from $LONG_RATIOS only:
#         growth at 1.0 +0.141 -> +0.097, better at every ratio (docs/results/quality.md, twelfth session);
#   5. eval: perplexity (1024-token windows) and loss by position at ratios $RATIOS (the report the
#      adaptive server reads), passkey at $PASSKEY_RATIOS (a second report);
#   6. export: the compact artifact (DSLA parameters in bfloat16) + its eval report.
# Every step resumes where it stopped: re-run the same command after an interruption. (Run with a
# checkout from before 2026-11-29, whose step 3 wrote $HOME_DIR/students/default? Rename that to
# default_wide first, or step 3 runs again and step 4c refuses the old directory. From before
# 2026-11-30, whose step 4c wrote students/default? Rename that to default_dsla8k. From before
# 2026-11-30 03:00 UTC, whose step 4d wrote students/default? Rename that to default_all8k. From
# before 2026-11-30 07:00 UTC, whose step 4f wrote students/default? Rename that to default_exact9.
# From before 2026-11-30 09:00 UTC, whose step 4h wrote students/default? Rename that to default_exact25.
# From before 2026-11-30 12:00 UTC, whose step 4i wrote students/default? Rename that to default_sinks.)
# Usage: scripts/make_default_student.sh [extra `dsla distill` flags for every run]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
HOME_DIR=${DSLA_HOME:-$HOME/.cache/dsla}
BASE=${BASE:-$HOME_DIR/students/default_base}  # steps 1-2
WIDE=${WIDE:-$HOME_DIR/students/default_wide}  # step 3
CAL=${CAL:-$HOME_DIR/students/default_cal4k}   # step 4a
CAL8K=${CAL8K:-$HOME_DIR/students/default_cal8k}  # step 4b
DSLA8K=${DSLA8K:-$HOME_DIR/students/default_dsla8k}  # step 4c
ALL8K=${ALL8K:-$HOME_DIR/students/default_all8k}  # step 4d
ALL8K2=${ALL8K2:-$HOME_DIR/students/default_all8k2}  # step 4e
EXACT9=${EXACT9:-$HOME_DIR/students/default_exact9}  # step 4f
EXACT17=${EXACT17:-$HOME_DIR/students/default_exact17}  # step 4g
EXACT25=${EXACT25:-$HOME_DIR/students/default_exact25}  # step 4h
SINKED=${SINKED:-$HOME_DIR/students/default_sinks}  # step 4i
OUT=${OUT:-$HOME_DIR/students/default}         # step 4j: the student shipped
RANK=${RANK:-docs/results/quality/rank_retrieval.json}
BASE_LAYERS=${BASE_LAYERS:-15}  # layers of the base (ratios 0.25 and 0.5), trained end to end
LAYERS=${LAYERS:-30}       # the shipped student: all 30 layers (ratios up to 1)
RATIOS=${RATIOS:-0,0.25,0.5,0.75,1}
PASSKEY_RATIOS=${PASSKEY_RATIOS:-0,0.25,0.5}
BASE_WINDOW=${BASE_WINDOW:-256}  # exact window of steps 1-2; 64 gave 1.03-1.10x perplexity at 0.25
WINDOW=${WINDOW:-512}      # the served window (docs/results/quality.md: 256 -> 512 met the 0.25 / 0.5 targets)
ADAPT_STEPS=${ADAPT_STEPS:-0}  # end-to-end steps at $WINDOW over all $LAYERS layers (> 0 trains every q/o: too big to ship)
E2E_FLAGS=${E2E_FLAGS:---e2e-seq-len 4096 --e2e-windows 120}
E2E_STEPS=${E2E_STEPS:-80 160}  # the shipped student: 80, then extended to 160 (docs/results/quality.md)
CAL_FLAGS=${CAL_FLAGS:---no-train-projections --e2e-params scalars --e2e-ratios 0.25,0.5 --e2e-lr 3e-2}
CAL_STEPS=${CAL_STEPS:-40}      # 4096-token windows, 120 distinct
CAL8K_STEPS=${CAL8K_STEPS:-20}  # 8192-token windows, 20 distinct
DSLA8K_FLAGS=${DSLA8K_FLAGS:---no-train-projections --e2e-params dsla --e2e-ratios 0.25,0.5 --e2e-lr 1e-2 --e2e-weight-lr 1e-3}
DSLA8K_STEPS=${DSLA8K_STEPS:-20 40}  # 20, then extended to 40 (the same 20 windows)
ALL8K_FLAGS=${ALL8K_FLAGS:---no-train-projections --e2e-params dsla --e2e-ratios 0.25,0.5,0.75,1 --e2e-lr 1e-2 --e2e-weight-lr 1e-3}
ALL8K_STEPS=${ALL8K_STEPS:-30}  # the same 20 windows (docs/results/quality.md: run d)
ALL8K2_STEPS=${ALL8K2_STEPS:-30}  # run e
EXACT_GROUPS=${EXACT_GROUPS:-3:0,7:0,7:1,15:2,18:2,20:1,20:2,23:0,23:2}  # LAYER:KV-GROUP (step 4f)
EXACT_TRAINED_GROUPS=${EXACT_TRAINED_GROUPS:-$EXACT_GROUPS,3:1,20:0,17:1,24:0,24:1,2:1,4:0,8:2}  # step 4g
EXACT_TRAIN_STEPS=${EXACT_TRAIN_STEPS:-24}
EXACT_MORE_GROUPS=${EXACT_MORE_GROUPS:-19:0,17:2,24:2,10:1,19:2,5:1,9:2,21:2}  # step 4h
SINKS=${SINKS:-4}  # step 4i: attention sinks (the first tokens, exact for every query)
SINKS_STEPS=${SINKS_STEPS:-24}
LONG_RATIOS=${LONG_RATIOS:-0.75,1}  # step 4j: the ratios drawn, the two whose growth by position was largest
LONG_STEPS=${LONG_STEPS:-20}
DTYPE=${DTYPE:-bfloat16}   # fast on CPUs with avx512_bf16; use float32 on AVX2-only machines
THREADS=${THREADS:-2}
SHIP=${SHIP:-dsla/students/default}
export HF_HUB_OFFLINE=1

if [ ! -f "$RANK" ]; then
  "$BIN/dsla" rank --metric retrieval --out "$RANK" --dtype "$DTYPE" --threads "$THREADS" \
    --sequences 4 --seq-len 1024 --passkey-prompts 4 --passkey-context 1024
fi
ORDER=$("$BIN/python" -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["order"])))' "$RANK")
for steps in $E2E_STEPS; do  # each call resumes the run; a larger step count extends the finished stage
  "$BIN/dsla" distill --order given --layers "$ORDER" --max-layers "$BASE_LAYERS" --window "$BASE_WINDOW" --dtype "$DTYPE" \
    --threads "$THREADS" --out "$BASE" --no-loss-delta $E2E_FLAGS --e2e-steps "$steps" "$@"
done
"$BIN/dsla" distill --init-from "$BASE" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --no-train-projections --dtype "$DTYPE" --threads "$THREADS" --out "$WIDE" --no-loss-delta $E2E_FLAGS \
  --e2e-steps "$ADAPT_STEPS" "$@"
"$BIN/dsla" distill --init-from "$WIDE" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$CAL" --no-loss-delta $CAL_FLAGS \
  --e2e-seq-len 4096 --e2e-windows 120 --e2e-steps "$CAL_STEPS" "$@"
"$BIN/dsla" distill --init-from "$CAL" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$CAL8K" --no-loss-delta $CAL_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$CAL8K_STEPS" --recompute "$@"
for steps in $DSLA8K_STEPS; do
  "$BIN/dsla" distill --init-from "$CAL8K" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
    --dtype "$DTYPE" --threads "$THREADS" --out "$DSLA8K" --no-loss-delta $DSLA8K_FLAGS \
    --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$steps" --recompute "$@"
done
"$BIN/dsla" distill --init-from "$DSLA8K" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$ALL8K" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$ALL8K_STEPS" --recompute "$@"
"$BIN/dsla" distill --init-from "$ALL8K" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$ALL8K2" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$ALL8K2_STEPS" --recompute "$@"
"$BIN/dsla" distill --init-from "$ALL8K2" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$EXACT9" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps 0 --exact-groups "$EXACT_GROUPS" "$@"
"$BIN/dsla" distill --init-from "$EXACT9" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$EXACT17" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$EXACT_TRAIN_STEPS" --recompute \
  --exact-groups "$EXACT_TRAINED_GROUPS" "$@"
"$BIN/dsla" distill --init-from "$EXACT17" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$EXACT25" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps 0 --exact-groups "$EXACT_TRAINED_GROUPS,$EXACT_MORE_GROUPS" "$@"
"$BIN/dsla" distill --init-from "$EXACT25" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --sinks "$SINKS" --dtype "$DTYPE" --threads "$THREADS" --out "$SINKED" --no-loss-delta $ALL8K_FLAGS \
  --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$SINKS_STEPS" --recompute \
  --exact-groups "$EXACT_TRAINED_GROUPS,$EXACT_MORE_GROUPS" "$@"
"$BIN/dsla" distill --init-from "$SINKED" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --sinks "$SINKS" --dtype "$DTYPE" --threads "$THREADS" --out "$OUT" --no-loss-delta $ALL8K_FLAGS \
  --e2e-ratios "$LONG_RATIOS" --e2e-seq-len 8192 --e2e-windows 20 --e2e-steps "$LONG_STEPS" --recompute \
  --exact-groups "$EXACT_TRAINED_GROUPS,$EXACT_MORE_GROUPS" "$@"
"$BIN/dsla" eval ppl position --student "$OUT" --ratios "$RATIOS" --dtype "$DTYPE" \
  --threads "$THREADS" --no-progress --out "$OUT/eval" --position-windows 2 --resume
"$BIN/dsla" eval passkey --student "$OUT" --ratios "$PASSKEY_RATIOS" --dtype "$DTYPE" \
  --threads "$THREADS" --no-progress --out "$OUT/eval_passkey" --contexts 1024,2048,4096 --trials 20 --resume
"$BIN/dsla" export "$OUT" --out "$SHIP" --report "$OUT/eval/report.json" --dtype "$DTYPE" --param-dtype bfloat16
