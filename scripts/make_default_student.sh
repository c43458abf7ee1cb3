#!/usr/bin/env bash
# Reproduce the shipped default student (dsla/students/default) from scratch, on a CPU:
#   1. rank: the retrieval probe (each layer alone restricted to local attention; loss at 1024
#      tokens and passkey log-likelihood) -> a retrieval-aware conversion order;
#   2. distill: layer-wise (chained, 1024-token windows) over the first $LAYERS layers of that
#      order with an exact $BASE_WINDOW-token window (256), then the end-to-end KL stage ($E2E_FLAGS: 4096-token
#      windows, 120 distinct windows; per step 8 or 15 converted layers, i.e. ratio 0.25 or 0.5), run
#      for each step count of $E2E_STEPS in turn ("80 160": 80 steps on a cosine schedule, then the
#      stage extended to 160, its lr warmed up again and following the cosine of 160 from step 80);
#   3. re-window: a new run starts from those layers (`dsla distill --init-from`) with the served
#      window $WINDOW (512) and runs its own end-to-end stage of $ADAPT_STEPS steps (0: none);
#   4. eval: perplexity (1024-token windows), loss by position and passkey at ratios 0..$RATIOS;
#   5. export: the compact artifact + its eval report into dsla/students/default.
# Every step resumes where it stopped: re-run the same command after an interruption.
# Usage: scripts/make_default_student.sh [extra `dsla distill` flags for both runs]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
HOME_DIR=${DSLA_HOME:-$HOME/.cache/dsla}
BASE=${BASE:-$HOME_DIR/students/default_base}  # steps 1-2
OUT=${OUT:-$HOME_DIR/students/default}         # step 3
RANK=${RANK:-docs/results/quality/rank_retrieval.json}
LAYERS=${LAYERS:-15}       # the shipped student: 15 layers (ratios 0.25 and 0.5)
RATIOS=${RATIOS:-0,0.25,0.5}
BASE_WINDOW=${BASE_WINDOW:-256}  # exact window of steps 1-2; 64 gave 1.03-1.10x perplexity at 0.25
WINDOW=${WINDOW:-512}      # the served window (docs/results/quality.md: 256 -> 512 met the 0.25 / 0.5 targets)
ADAPT_STEPS=${ADAPT_STEPS:-80}  # end-to-end steps at $WINDOW
E2E_FLAGS=${E2E_FLAGS:---e2e-seq-len 4096 --e2e-windows 120}
E2E_STEPS=${E2E_STEPS:-80 160}  # the shipped student: 80, then extended to 160 (docs/results/quality.md)
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
  "$BIN/dsla" distill --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$BASE_WINDOW" --dtype "$DTYPE" \
    --threads "$THREADS" --out "$BASE" --no-loss-delta $E2E_FLAGS --e2e-steps "$steps" "$@"
done
"$BIN/dsla" distill --init-from "$BASE" --order given --layers "$ORDER" --max-layers "$LAYERS" --window "$WINDOW" \
  --dtype "$DTYPE" --threads "$THREADS" --out "$OUT" --no-loss-delta $E2E_FLAGS --e2e-steps "$ADAPT_STEPS" "$@"
"$BIN/dsla" eval ppl position passkey --student "$OUT" --ratios "$RATIOS" --dtype "$DTYPE" \
  --threads "$THREADS" --no-progress --out "$OUT/eval" --position-windows 2 \
  --contexts 1024,2048,4096 --trials 20 --resume
"$BIN/dsla" export "$OUT" --out "$SHIP" --report "$OUT/eval/report.json" --dtype "$DTYPE"
