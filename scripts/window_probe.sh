#!/usr/bin/env bash
# Diagnostic: the perplexity of a trained student with its exact window W widened at inference
# (no retraining), to split its gap to the teacher into what the linear states cost and what the
# trained q/o projections cost (a W as long as the perplexity windows attends everything exactly).
#
#   scripts/window_probe.sh STUDENT_DIR RATIOS W [W ...]   e.g. scripts/window_probe.sh ~/.cache/dsla/students/l15 0.25 128 256
#
# Each W gets a copy of the student in a temporary directory whose manifest says window W; one
# `dsla eval ppl` runs them side by side (bfloat16, 2 threads) into $OUT (default /tmp/window_probe);
# EVAL_FLAGS adds flags (e.g. "--limit 1" for a quick check).
set -euo pipefail
STUDENT=${1:?usage: $0 STUDENT_DIR RATIOS W [W ...]}
RATIOS=${2:?usage: $0 STUDENT_DIR RATIOS W [W ...]}
shift 2
[ $# -gt 0 ] || { echo "give at least one window W" >&2; exit 2; }
BIN=${BIN:-.venv/bin}
OUT=${OUT:-/tmp/window_probe}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
args=()
for W in "$@"; do
  d="$TMP/$(basename "$STUDENT")_w$W"
  mkdir -p "$d"
  ln -s "$(realpath "$STUDENT")/dsla.safetensors" "$d/dsla.safetensors"
  "$BIN/python" - "$STUDENT/manifest.json" "$d/manifest.json" "$W" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["config"]["dsla"]["window"] = int(sys.argv[3])
json.dump(m, open(sys.argv[2], "w"))
PY
  args+=(--student "$d@$RATIOS")
done
HF_HUB_OFFLINE=1 "$BIN/dsla" eval ppl --dtype bfloat16 --threads 2 --ratios 0 --no-progress --no-plots --out "$OUT" ${EVAL_FLAGS:-} "${args[@]}"
