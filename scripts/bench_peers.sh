#!/usr/bin/env bash
# dsla serve against the peers (vLLM CPU, llama.cpp's server) on the same workloads, one server at a time.
#
#   scripts/bench_peers.sh OUT_DIR [extra `dsla bench serve` flags...]
#
# For each server in $SERVERS: start it (scripts/peers/serve.sh: loopback, $PORT, $THREADS threads, the
# teacher SmolLM2-135M-Instruct), wait until /v1/models answers, run each workload in $WORKLOADS with
# `dsla bench serve --server-pid PID --out OUT_DIR/serve_<workload>_<server>.json`, stop the server.
# Then print one table of every run. Same seed, so every server sees identical requests.
#
# Workloads (open loop, Poisson arrivals; greedy; prompts from the wikipedia test split):
#   chat        1 request/s, 32 requests, prompt/output medians 64/128 (docs/results/serve.md "chat")
#   prefill     0.5 request/s, 16 requests, prompt/output medians 1024/64 (issue 15's "prefill-heavy")
#   saturation  20 requests/s, 48 requests, 64/128: all arrive within seconds; throughput at saturation
# Servers: vllm (vLLM CPU, bfloat16), llamacpp (llama-cpp-python's server, $GGUF; it serves one request
# at a time: no continuous batching in that server), dsla (dsla serve: teacher, full attention, bfloat16).
# llama-cpp-python ignores `ignore_eos`, so its requests carry a logit bias that bans the teacher's
# end tokens (<|endoftext|> 0, <|im_end|> 2): every server then produces each request's full length.
#
# Environment: SERVERS ("vllm llamacpp dsla"), WORKLOADS ("chat prefill saturation"), THREADS (1),
# PORT (8100), GGUF (bf16; q4_1, f16 or a path), READY_TIMEOUT (900 s: vLLM starts slowly),
# SMOKE (1: 3 requests per workload, short lengths: checks the plumbing, measures nothing),
# BIN (dsla's venv bin, default .venv/bin), VLLM_FLAGS / LLAMACPP_FLAGS / DSLA_FLAGS (see peers/serve.sh).
# Setup first: scripts/peers/setup_vllm.sh, setup_llamacpp.sh.
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [bench flags...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8100}
THREADS=${THREADS:-1}
GGUF=${GGUF:-bf16}
SERVERS=${SERVERS:-vllm llamacpp dsla}
WORKLOADS=${WORKLOADS:-chat prefill saturation}
READY_TIMEOUT=${READY_TIMEOUT:-900}
BAN_EOS='{"logit_bias": {"0": -100, "2": -100}}'
export BIN
mkdir -p "$OUT"

workload_flags() {
  local common=(--seed 0 --timeout 3600 --poll-interval 0)
  case $1 in
    chat)       echo "${common[*]} --rate 1 --num-requests 32 --prompt-len-median 64 --output-len-median 128" ;;
    prefill)    echo "${common[*]} --rate 0.5 --num-requests 16 --prompt-len-median 1024 --output-len-median 64" ;;
    saturation) echo "${common[*]} --rate 20 --num-requests 48 --prompt-len-median 64 --output-len-median 128" ;;
    *) echo "unknown workload $1: choose chat, prefill or saturation" >&2; return 1 ;;
  esac
}
smoke_flags() {  # later flags win in argparse: tiny sizes on top of the workload's own
  [ "${SMOKE:-0}" = 1 ] && echo "--num-requests 3 --prompt-len-range 16,64 --output-len-range 8,16" || true
}

stop_server() {  # the server was started in its own session: stop its whole process group
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in $(seq 60); do kill -0 "$1" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

for server in $SERVERS; do
  for w in $WORKLOADS; do workload_flags "$w" > /dev/null; done  # fail before starting anything
  setsid "$HERE/peers/serve.sh" "$server" "$PORT" "$THREADS" "$GGUF" > "$OUT/server_$server.log" 2>&1 &
  pid=$!
  trap 'stop_server $pid' EXIT
  echo "[$server] starting (pid $pid, log $OUT/server_$server.log)"
  for i in $(seq "$READY_TIMEOUT"); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server $server died:"; tail -n 20 "$OUT/server_$server.log"; exit 1; }
    [ "$i" = "$READY_TIMEOUT" ] && { echo "server $server not ready after $READY_TIMEOUT s"; exit 1; }
    sleep 1
  done
  extra=()
  [ "$server" = llamacpp ] && extra=(--extra-body "$BAN_EOS")
  for w in $WORKLOADS; do
    echo "[$server] workload $w"
    # shellcheck disable=SC2046  # the flag lists are meant to split
    $BIN/dsla bench serve --url "http://127.0.0.1:$PORT" --label "$server" --server-pid $pid \
      $(workload_flags "$w") $(smoke_flags) "${extra[@]}" --out "$OUT/serve_${w}_${server}.json" "$@"
  done
  stop_server $pid
  trap - EXIT
done

$BIN/python - "$OUT" $WORKLOADS <<'EOF'
import json, sys
from pathlib import Path
from dsla.bench.common import format_table
out, workloads = Path(sys.argv[1]), sys.argv[2:]
rows = []
for w in workloads:
    for f in sorted(out.glob(f"serve_{w}_*.json")):
        s = json.loads(f.read_text())["summary"]
        rows.append({"workload": w, **s})
cols = ["workload", "label", "completed", "failed", "output_tokens", "output_token_throughput", "output_tokens_per_cpu_s",
        "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "server_rss_mb_after_load"]
print(format_table(rows, cols))
EOF
