#!/usr/bin/env bash
# Issue 14's ablation table at one reduced budget: one student per row, each the first 8 layers of its
# order, stage 1 on 1024-token windows, then 60 end-to-end KL steps on 2048-token windows (30 windows),
# all evaluated in ONE report at ratio 0.25 (perplexity, loss by position, passkey with $TRIALS trials
# per cell), so the rows differ only in the ingredient named:
#   probe_w0_stage1   retrieval-aware order, window 0, stage 1 only (the snapshot of probe_w0)
#   probe_w0          + the end-to-end stage
#   probe_w64_stage1  retrieval-aware order, window 64, stage 1 only (the snapshot of probe_w64)
#   probe_w64         + the end-to-end stage (the reference row)
#   probe_w64_single  the reference with one state (--num-states 1) instead of two
#   entropy_w64       the reference with the paper's entropy order
#   lossdelta_w64     the reference ordered by the probe's measured loss-delta alone (no retrieval guard)
# Every step resumes: re-run the same command after an interruption. Students go to $ABL; the report
# to $OUT. Usage: scripts/ablation.sh [row ...]   (default: every row, in the order above)
# Relative paths in BIN, RANK, ABL and OUT are taken from the repository root (the script cd's there).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
HOME_DIR=${DSLA_HOME:-$HOME/.cache/dsla}
ABL=${ABL:-$HOME_DIR/ablation}
OUT=${OUT:-$ABL/eval}
RANK=${RANK:-docs/results/quality/rank_retrieval.json}
TRIALS=${TRIALS:-10}
DTYPE=${DTYPE:-bfloat16}
THREADS=${THREADS:-2}
export HF_HUB_OFFLINE=1
ALL_ROWS=(probe_w0_stage1 probe_w0 probe_w64_stage1 probe_w64 probe_w64_single entropy_w64 lossdelta_w64)
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=("${ALL_ROWS[@]}")
for row in "${ROWS[@]}"; do  # before hours of training, not when the row's turn comes
  [[ " ${ALL_ROWS[*]} " == *" $row "* ]] || { echo "unknown row '$row' (rows: ${ALL_ROWS[*]})" >&2; exit 2; }
done

order() {  # $1 = order (retrieval) or loss_delta (ascending measured cost) from the probe's JSON
  "$BIN/python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
o = d["order"] if sys.argv[2] == "order" else sorted(range(len(d[sys.argv[2]])), key=lambda i: d[sys.argv[2]][i])
print(",".join(map(str, o)))' "$RANK" "$1"
}
BUDGET=(--max-layers 8 --seq-len 1024 --no-loss-delta --e2e-steps 60 --e2e-seq-len 2048 --e2e-windows 30
        --dtype "$DTYPE" --threads "$THREADS")

distill() {  # $1 = student name, then its own flags
  local name=$1; shift
  "$BIN/dsla" distill "${BUDGET[@]}" --out "$ABL/$name" "$@"
}

train() {  # $1 = row; trains it (or its parent, for a stage-1 snapshot) unless already done
  local probe cost  # assigned on their own lines: a failing $(...) inside an argument list would not stop set -e
  probe=$(order order)
  cost=$(order loss_delta)
  case $1 in
    probe_w0) distill probe_w0 --order given --layers "$probe" --window 0 ;;
    probe_w64) distill probe_w64 --order given --layers "$probe" --window 64 ;;
    probe_w64_single) distill probe_w64_single --order given --layers "$probe" --window 64 --num-states 1 ;;
    entropy_w64) distill entropy_w64 --order entropy --window 64 ;;
    lossdelta_w64) distill lossdelta_w64 --order given --layers "$cost" --window 64 ;;
    *_stage1)
      local parent=${1%_stage1}
      train "$parent"
      if [ ! -f "$ABL/$1/manifest.json" ]; then  # a copy, so the report names the row (eval labels by dir)
        rm -rf "$ABL/$1.tmp" && cp -r "$ABL/$parent/stage1" "$ABL/$1.tmp" && mv "$ABL/$1.tmp" "$ABL/$1"
      fi ;;
  esac  # row names were checked against ALL_ROWS before any work
}

mkdir -p "$ABL"
STUDENTS=()
for row in "${ROWS[@]}"; do
  train "$row"
  STUDENTS+=(--student "$ABL/$row")
  # one report for every row so far (the teacher's run is reused, each finished row too)
  "$BIN/dsla" eval ppl position passkey "${STUDENTS[@]}" --ratios 0,0.25 --dtype "$DTYPE" --threads "$THREADS" \
    --no-progress --out "$OUT" --position-windows 2 --contexts 1024,2048,4096 --trials "$TRIALS" --resume
done
