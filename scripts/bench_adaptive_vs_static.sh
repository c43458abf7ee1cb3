#!/usr/bin/env bash
# Adaptive vs static full attention on the same trace and seed, one server at a time.
#
#   scripts/bench_adaptive_vs_static.sh OUT_DIR [extra `dsla bench serve` flags...]
#
# For each policy: start `dsla serve` (loopback, $PORT), wait for /health, replay the trace with
# `dsla bench serve --policy P --server-pid PID --out OUT_DIR/trace_P.json`, stop the server.
# Then print one table of both runs and draw OUT_DIR/trace_timeline.png.
# Environment: STUDENT (default: the default student), PORT (8000), THREADS (1),
# SERVE_FLAGS (extra `dsla serve` flags for both servers, e.g. --cache-budget-mb 700),
# ADAPTIVE_FLAGS (extra flags for the adaptive server only), TRACE (default: synthetic),
# POLICIES (default "static adaptive": the dsla servers to run, e.g. "adaptive" alone; "none": only
# the PEERS, their rows joining the dsla runs already in OUT_DIR),
# PEERS (e.g. "vllm": also replay the same trace, same seed and flags, against each of these peer
# servers, started with scripts/peers/serve.sh: a third column; set them up with
# scripts/peers/setup_<peer>.sh first), READY_TIMEOUT (seconds a server may take to start, 900).
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [bench flags...]}
shift
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8000}
THREADS=${THREADS:-1}
TRACE=${TRACE:-synthetic}
STUDENT=${STUDENT:-$($BIN/python -c 'from dsla.paths import SHIPPED_STUDENT_DIR; print(SHIPPED_STUDENT_DIR)')}
READY_TIMEOUT=${READY_TIMEOUT:-900}
PEERS=${PEERS:-}
POLICIES=${POLICIES:-static adaptive}
[ "$POLICIES" = none ] && POLICIES=""
mkdir -p "$OUT"

wait_ready() {  # wait_ready NAME PID: until /v1/models answers, or the server dies or times out
  for i in $(seq "$READY_TIMEOUT"); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server ($1) died:"; tail "$OUT/server_$1.log"; exit 1; }
    sleep 1
  done
  echo "server ($1) not ready after $READY_TIMEOUT s"; exit 1
}

for policy in $POLICIES; do
  flags=()
  [ "$policy" = adaptive ] && flags=(${ADAPTIVE_FLAGS:-})
  $BIN/dsla serve --threads "$THREADS" --port "$PORT" --student "$STUDENT" --policy "$policy" \
    ${SERVE_FLAGS:-} "${flags[@]}" > "$OUT/server_$policy.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  wait_ready "$policy" $pid
  $BIN/dsla bench serve --url "http://127.0.0.1:$PORT" --trace "$TRACE" --policy "$policy" --label "$policy" \
    --server-pid $pid --timeout 3600 --save-trace "$OUT/trace.csv" --out "$OUT/trace_$policy.json" "$@"
  kill $pid
  wait $pid 2>/dev/null || true
  trap - EXIT
done

for peer in $PEERS; do
  # its own session, so stopping it stops its engine processes too (vLLM runs its engine in a child)
  BIN=$BIN setsid "$(dirname "$0")/peers/serve.sh" "$peer" "$PORT" "$THREADS" > "$OUT/server_$peer.log" 2>&1 &
  pid=$!
  trap 'kill -- -$pid 2>/dev/null || true' EXIT
  wait_ready "$peer" $pid
  $BIN/dsla bench serve --url "http://127.0.0.1:$PORT" --trace "$TRACE" --label "$peer" --poll-interval 0 \
    --server-pid $pid --timeout 3600 --out "$OUT/trace_$peer.json" "$@"
  kill -- -$pid
  wait $pid 2>/dev/null || true
  trap - EXIT
done

$BIN/python - "$OUT" $PEERS <<'EOF'
import json, sys
from pathlib import Path
from dsla.bench.common import format_table
out = Path(sys.argv[1])
runs = {p: json.loads((out / f"trace_{p}.json").read_text())["summary"]
        for p in ("static", "adaptive", *sys.argv[2:]) if (out / f"trace_{p}.json").is_file()}
cols = ["label", "requests", "completed", "rejected", "failed", "per_token_latency_mean_s", "ttft_p50_s", "ttft_p99_s",
        "e2e_p50_s", "e2e_p99_s", "output_token_throughput", "mean_token_ratio", "plan_changes"]
print(format_table(list(runs.values()), cols))
a = runs.get("adaptive", {}).get("per_token_latency_mean_s")
for name, run in runs.items():
    if name != "adaptive" and run["per_token_latency_mean_s"] and a:
        print(f"mean per-token latency, {run['label']} / adaptive: {run['per_token_latency_mean_s'] / a:.2f}x")
if "adaptive" in runs:
    print("adaptive: output tokens by conversion ratio:", runs["adaptive"]["token_fraction_by_ratio"])
EOF
if [ -f "$OUT/trace_static.json" ] && [ -f "$OUT/trace_adaptive.json" ]; then
  $BIN/dsla bench plot "$OUT/trace_static.json" "$OUT/trace_adaptive.json" --out "$OUT/trace_timeline.png" \
    --title "adaptive vs static full attention, same trace"
fi
